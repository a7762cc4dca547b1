"""Worker processes of `loadtest.fanout` and `loadtest.bench`; not meant to be run by hand.

    python -m loadtest._subscriber sub --target HOST:PORT --streams 25 [--raw] [--latency]
    python -m loadtest._subscriber writer --target HOST:PORT (--bulk-streams N | --rate R)
    python -m loadtest._subscriber raw-server --port P [--event B64 --batch N --token T]
        [--user B64] [--reuseport]

Each role talks to its parent in JSON lines: commands on stdin, replies on stdout (nothing else
is ever printed there). A worker whose stdin closes (the parent died) stops at once, so no
worker outlives the benchmark. All loops are bounded in count and in time.

- `sub`: N streams on their own connections (one channel each, local subchannel pool). Against
  a hub, each sends Subscribe() (all users) then Subscribe(user_ids=[an id nobody has],
  snapshot=True): the response with `snapshot_complete` proves the all-users subscription is
  live, so the parent can start writing without racing it. A stream cut with
  RESOURCE_EXHAUSTED resubscribes with the `hub-resume-token` of the trailing metadata (and is
  counted as a cut). With --raw the streams call the ceiling server's server-streaming method
  instead. Both deserialize with SyncResponse.FromString and count `len(events)`.
  Commands: {"cmd": "start", "start_at": t, "stop_at": t} (raw only), {"cmd": "drain",
  "expected": n | null, "timeout": s} (replies with the stats once every stream has n events,
  or has ended, or the timeout passed), {"cmd": "stop"}.
- `writer`: creates (BulkCreateUsers batches, plus optional concurrent UpdateUser loops) as
  fast as it can, or creates paced at --rate per second with CreateUser (or, with
  --rate-batch K, one ImportUsers call of K rows every K/rate s). Commands:
  {"cmd": "go", "start_at": t, "duration": s} (replies with what was written), {"cmd": "stop"}.
- `raw-server`: a bare grpc.aio server, the ceilings of `loadtest.bench`, bytes in and bytes
  out (no serializer, nothing parsed): `Stream` streams a pre-encoded SyncResponse of --batch
  copies of the given event from the request's start_at to its stop_at; `Count` reads a
  client stream and answers with the message count; `Echo` answers any request with a
  pre-encoded User; `Idle` answers a bidi stream's first request once, then stays silent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf import field_mask_pb2

from hub.api.user.v1 import common_pb2, user_service_pb2, user_service_pb2_grpc
from hub.api.user.v1 import user_sync_service_pb2 as sync_pb
from hub.api.user.v1 import user_sync_service_pb2_grpc as sync_grpc

RAW_METHOD = "/loadtest.Raw/Stream"
RESUME_TOKEN_KEY = "hub-resume-token"
# A syntactically valid id no user has: its snapshot is empty, and its snapshot_complete
# response tells us every earlier Subscribe of the stream is in force.
NOBODY = "00000000000000000000000000"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_READY_TIMEOUT = 30.0
_MAX_RESUMES = 1_000  # per stream
_MAX_ERRORS = 20  # kept per stream
_MAX_SAMPLES = 2_000_000  # latency samples per worker
_MAX_TIMELINE = 20_000  # (time, events) points per worker
_TIMELINE_STEP = 0.1
_MAX_USERS = 5_000_000  # per writer run
_MAX_RAW_MESSAGES = 50_000_000  # per raw stream


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint: the length prefix that frames each pre-encoded event in the
    raw server's SyncResponse (written here: the ceiling is a bare server, not hub's code)."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _channel(target: str, n: int) -> grpc.aio.Channel:
    # A local subchannel pool gives every channel its own TCP connection, as 100 separate
    # backends would have, instead of grpc sharing one connection between equal channels.
    return grpc.aio.insecure_channel(target, options=[
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.lb_policy_name", "pick_first"),
        ("loadtest.channel", n),
    ])


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _command(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        return {"cmd": "stop"}  # the parent is gone
    command: dict[str, Any] = json.loads(line)
    return command


# -- subscribers ------------------------------------------------------------------------------


@dataclass
class StreamStats:
    events: int = 0
    responses: int = 0  # responses carrying events
    empty: int = 0  # heartbeats and other responses without events
    snapshot_events: int = 0
    max_batch: int = 0
    cuts: int = 0  # RESOURCE_EXHAUSTED endings followed by a resume
    cuts_without_token: int = 0
    errors: list[str] = field(default_factory=list)
    first_event: float = 0.0  # wall clock
    last_event: float = 0.0
    last_response: float = 0.0
    idle_s: float = 0.0  # at the report: seconds since the last response (or the start)
    ended: bool = False


class _Subscriber:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stats = [StreamStats() for _ in range(args.streams)]
        self.ready = [asyncio.Event() for _ in range(args.streams)]
        self.channels = [_channel(args.target, i) for i in range(args.streams)]
        self.samples: list[float] = []
        self.timeline: list[tuple[float, int]] = []
        self.sample_event = b""
        self.sample_token = ""
        self.total = 0
        self.started = time.time()
        self.progress = asyncio.Event()  # set on every response with events

    def _count(self, stats: StreamStats, response: sync_pb.SyncResponse) -> None:
        events = response.events
        n = len(events)
        now = stats.last_response = time.time()
        if not n:
            stats.empty += 1
            return
        if not stats.events:
            stats.first_event = now
        stats.last_event = now
        stats.events += n
        stats.responses += 1
        stats.max_batch = max(stats.max_batch, n)
        self.total += n
        if not self.sample_event:
            self.sample_event = events[0].SerializeToString()
            self.sample_token = response.resume_token
        if self.args.latency and len(self.samples) < _MAX_SAMPLES:
            now_ns = time.time_ns()
            for event in events:
                written = event.written_at
                if written.seconds:
                    self.samples.append(
                        (now_ns - written.seconds * 1_000_000_000 - written.nanos) / 1e6
                    )
                else:
                    stats.snapshot_events += 1
        self.progress.set()

    async def hub_stream(self, i: int) -> None:
        stats, stub = self.stats[i], sync_grpc.UserSyncServiceStub(self.channels[i])
        token = ""
        try:
            for _ in range(_MAX_RESUMES + 1):
                call = stub.Sync()
                try:
                    await call.write(sync_pb.SyncRequest(
                        subscribe=common_pb2.Subscribe(resume_token=token)))
                    if not token:
                        await call.write(sync_pb.SyncRequest(
                            subscribe=common_pb2.Subscribe(user_ids=[NOBODY], snapshot=True)))
                    while True:
                        response = await call.read()
                        if response is grpc.aio.EOF:
                            stats.errors.append("stream ended by the server (OK)")
                            return
                        assert isinstance(response, sync_pb.SyncResponse)
                        self._count(stats, response)
                        if response.resume_token:
                            token = response.resume_token
                        if response.snapshot_complete:
                            self.ready[i].set()
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        if len(stats.errors) < _MAX_ERRORS:
                            stats.errors.append(f"{err.code().name}: {err.details()}")
                        return
                    trailing = dict(err.trailing_metadata() or ())
                    cut_token = trailing.get(RESUME_TOKEN_KEY)
                    if isinstance(cut_token, str) and cut_token:
                        token = cut_token
                    else:
                        stats.cuts_without_token += 1  # resume from the last response's token
                    stats.cuts += 1
                finally:
                    call.cancel()
            stats.errors.append(f"gave up after {_MAX_RESUMES} resumes")
        finally:
            stats.ended = True
            self.ready[i].set()  # a failed stream must not hold up the start
            self.progress.set()

    async def raw_stream(self, i: int, request: bytes) -> None:
        stats = self.stats[i]
        method: Any = self.channels[i].unary_stream(
            RAW_METHOD, request_serializer=None,
            response_deserializer=sync_pb.SyncResponse.FromString,
        )
        try:
            async for response in method(request):
                self._count(stats, response)
        except grpc.aio.AioRpcError as err:
            stats.errors.append(f"{err.code().name}: {err.details()}")
        finally:
            stats.ended = True
            self.progress.set()

    async def sample_timeline(self) -> None:
        while len(self.timeline) < _MAX_TIMELINE:
            self.timeline.append((round(time.time(), 4), self.total))
            await asyncio.sleep(_TIMELINE_STEP)

    async def drain(self, expected: int | None, within: float) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if all(s.ended or (expected is not None and s.events >= expected)
                   for s in self.stats):
                return
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(),
                                       max(0.0, min(0.2, deadline - time.monotonic())))

    def report(self) -> dict[str, Any]:
        now = time.time()
        self.timeline.append((round(now, 4), self.total))
        for stats in self.stats:
            stats.idle_s = round(now - (stats.last_response or self.started), 3)
        return {
            "streams": [asdict(s) for s in self.stats],
            "timeline": self.timeline,
            "samples": [round(s, 3) for s in self.samples],
            "sample_event": base64.b64encode(self.sample_event).decode(),
            "sample_token": self.sample_token,
        }


async def _run_subscriber(args: argparse.Namespace) -> None:
    commands = await _stdin()
    worker = _Subscriber(args)
    try:
        async with asyncio.TaskGroup() as tg:
            if args.raw:
                await asyncio.wait_for(asyncio.gather(
                    *(c.channel_ready() for c in worker.channels)), _READY_TIMEOUT)
            else:
                for i in range(args.streams):
                    tg.create_task(worker.hub_stream(i))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(
                        *(e.wait() for e in worker.ready)), _READY_TIMEOUT)
            failed = [s.errors[0] for s in worker.stats if s.ended and s.errors]
            late = 0 if args.raw else sum(not e.is_set() for e in worker.ready)
            if late:
                failed.append(f"{late} streams not subscribed after {_READY_TIMEOUT:.0f}s")
            _reply({"ready": not failed, "errors": failed[:5]})
            sampler = tg.create_task(worker.sample_timeline())
            while True:
                command = await _command(commands)
                if command["cmd"] == "start":
                    request = json.dumps(command).encode()
                    for i in range(args.streams):
                        tg.create_task(worker.raw_stream(i, request))
                elif command["cmd"] == "drain":
                    await worker.drain(command["expected"], command["timeout"])
                    _reply(worker.report())
                else:
                    break
            sampler.cancel()
            raise _Stop
    except* _Stop:
        pass
    finally:
        await asyncio.gather(*(c.close(None) for c in worker.channels))


class _Stop(Exception):
    """Ends a worker's task group (and so every stream it owns)."""


# -- writer -----------------------------------------------------------------------------------


@dataclass
class WriteStats:
    created: int = 0
    updated: int = 0
    refused: int = 0  # rejected by the hub: no event
    failed: int = 0  # the call failed: outcome unknown for bulk rows (counted in `unknown`)
    unknown: int = 0  # writes that may or may not have landed
    calls: int = 0
    started: float = 0.0
    ended: float = 0.0
    max_late_ms: float = 0.0  # paced mode: how far behind schedule a send started
    errors: list[str] = field(default_factory=list)

    def error(self, err: grpc.aio.AioRpcError) -> None:
        self.failed += 1
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(f"{err.code().name}: {err.details()}")


class _Writer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.channel = _channel(args.target, 0)
        self.users = user_service_pb2_grpc.UserServiceStub(self.channel)
        self.stats = WriteStats()
        self.ids: list[str] = []
        self.tag = secrets.token_hex(4)
        self.serial = 0

    def _email(self) -> str:
        self.serial += 1
        return f"fanout-{self.tag}-{self.serial}@example.com"

    async def bulk(self, stop_at: float) -> None:
        rows = self.args.batch
        while time.time() < stop_at and self.stats.created + rows <= _MAX_USERS:
            batch = [user_service_pb2.CreateUserRequest(
                email=self._email(), name=f"Fanout {self.serial}",
                status=common_pb2.USER_STATUS_ACTIVE) for _ in range(rows)]
            self.stats.calls += 1
            try:
                response = await self.users.BulkCreateUsers(iter(batch), timeout=60)
            except grpc.aio.AioRpcError as err:
                self.stats.error(err)
                self.stats.unknown += rows
                return
            self.stats.created += response.created_count
            self.stats.refused += len(response.errors)
            if len(self.ids) < 100_000:
                self.ids.extend(response.user_ids)

    async def update(self, stop_at: float, rng: random.Random) -> None:
        mask = field_mask_pb2.FieldMask(paths=["name"])
        while time.time() < stop_at:
            if not self.ids:
                await asyncio.sleep(0.01)
                continue
            self.serial += 1
            request = user_service_pb2.UpdateUserRequest(
                user=common_pb2.User(id=rng.choice(self.ids), name=f"Renamed {self.serial}"),
                update_mask=mask)
            self.stats.calls += 1
            try:
                await self.users.UpdateUser(request, timeout=30)
                self.stats.updated += 1
            except grpc.aio.AioRpcError as err:
                if err.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT):
                    self.stats.refused += 1  # refused before writing: no event
                else:
                    self.stats.error(err)
                    self.stats.unknown += 1

    async def create(self, request: user_service_pb2.CreateUserRequest,
                     slots: asyncio.Semaphore) -> None:
        try:
            await self.users.CreateUser(request, timeout=30)
            self.stats.created += 1
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT):
                self.stats.refused += 1
            else:
                self.stats.error(err)
                self.stats.unknown += 1
        finally:
            slots.release()

    async def create_batch(self, requests: list[user_service_pb2.CreateUserRequest],
                           slots: asyncio.Semaphore) -> None:
        try:
            response = await self.users.ImportUsers(
                iter([user_service_pb2.ImportUsersRequest(users=requests)]), timeout=30)
            self.stats.created += response.created_count
            self.stats.refused += len(response.errors)
        except grpc.aio.AioRpcError as err:
            self.stats.error(err)
            self.stats.unknown += len(requests)
        finally:
            slots.release()

    async def paced(self, start_at: float, duration: float) -> None:
        """rate writes/s, `rate_batch` rows per call: one CreateUser each, or (where one
        Python client cannot make thousands of unary calls a second) an ImportUsers call
        of rate_batch rows every rate_batch/rate s."""
        rate, rows = self.args.rate, self.args.rate_batch
        slots = asyncio.Semaphore(self.args.max_inflight)
        async with asyncio.TaskGroup() as tg:
            for i in range(int(rate * duration / rows)):
                due = start_at + i * rows / rate
                await asyncio.sleep(max(0.0, due - time.time()))
                await slots.acquire()  # bounded in flight: a stalled hub makes us late
                self.stats.max_late_ms = max(self.stats.max_late_ms,
                                             (time.time() - due) * 1000)
                self.stats.calls += 1
                if rows == 1:
                    tg.create_task(self.create(user_service_pb2.CreateUserRequest(
                        email=self._email(), name=f"Paced {self.serial}"), slots))
                else:
                    tg.create_task(self.create_batch([user_service_pb2.CreateUserRequest(
                        email=self._email(), name=f"Paced {self.serial}")
                        for _ in range(rows)], slots))

    async def go(self, start_at: float, duration: float) -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        self.stats.started = time.time()
        stop_at = start_at + duration
        rng = random.Random(1)
        async with asyncio.TaskGroup() as tg:
            if self.args.rate:
                tg.create_task(self.paced(start_at, duration))
            else:
                for _ in range(self.args.bulk_streams):
                    tg.create_task(self.bulk(stop_at))
                for _ in range(self.args.updaters):
                    tg.create_task(self.update(stop_at, rng))
        self.stats.ended = time.time()


async def _run_writer(args: argparse.Namespace) -> None:
    commands = await _stdin()
    writer = _Writer(args)
    try:
        await asyncio.wait_for(writer.channel.channel_ready(), _READY_TIMEOUT)
        _reply({"ready": True})
        while True:
            command = await _command(commands)
            if command["cmd"] != "go":
                return
            await writer.go(command["start_at"], command["duration"])
            _reply(asdict(writer.stats))
    finally:
        await writer.channel.close(None)


# -- raw ceiling server -----------------------------------------------------------------------


def _raw_handler(message: bytes) -> Callable[[bytes, Any], Awaitable[None]]:
    async def stream(request: bytes, context: Any) -> None:
        spec = json.loads(request)
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        stop_at = spec["stop_at"]
        for _ in range(_MAX_RAW_MESSAGES):
            if time.time() >= stop_at:
                break
            await context.write(message)
    return stream


async def _raw_count(requests: AsyncIterator[bytes], context: Any) -> bytes:
    """The client-stream ceiling: read every message, parse none, answer with the count."""
    count = 0
    async for _ in requests:
        count += 1
    return user_service_pb2.BulkCreateResponse(created_count=count).SerializeToString()


def _raw_echo(user: bytes) -> Callable[[bytes, Any], Awaitable[bytes]]:
    async def echo(request: bytes, context: Any) -> bytes:
        return user  # a GetUser-shaped answer, encoded once
    return echo


def _raw_idle(ready: bytes) -> Callable[[AsyncIterator[bytes], Any], AsyncIterator[bytes]]:
    async def idle(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        # Like a Sync stream that subscribed and has nothing to say: one answer to the first
        # request (so the client knows the stream is open), then silence until the client
        # goes away.
        answered = False
        async for _ in requests:
            if not answered:
                answered = True
                yield ready
    return idle


def _synthetic_user() -> common_pb2.User:
    now = int(time.time())
    user = common_pb2.User(
        id="01J00000000000000000000000", email="bench-00000000-1@example.com",
        name="Bench User 1", status=common_pb2.USER_STATUS_ACTIVE, version=1)
    user.created_at.seconds = user.updated_at.seconds = now
    return user


async def _run_raw_server(args: argparse.Namespace) -> None:
    commands = await _stdin()
    user = base64.b64decode(args.user) if args.user else \
        _synthetic_user().SerializeToString()
    if args.event:
        event = base64.b64decode(args.event)
    else:
        synthetic = common_pb2.UserEvent(type=common_pb2.EVENT_TYPE_CREATED,
                                         user=common_pb2.User.FromString(user))
        event = synthetic.SerializeToString()
    item = b"\x0a" + _varint(len(event)) + event  # SyncResponse.events, field 1
    message = item * args.batch + sync_pb.SyncResponse(resume_token=args.token) \
        .SerializeToString()
    sync_pb.SyncResponse.FromString(message)  # the clients must be able to parse it
    ready = sync_pb.SyncResponse(snapshot_complete=True).SerializeToString()
    # No serializers: request and response are the bytes themselves.
    handler = grpc.method_handlers_generic_handler("loadtest.Raw", {
        "Stream": grpc.unary_stream_rpc_method_handler(
            _raw_handler(message), request_deserializer=None, response_serializer=None),
        "Count": grpc.stream_unary_rpc_method_handler(
            _raw_count, request_deserializer=None, response_serializer=None),
        "Echo": grpc.unary_unary_rpc_method_handler(
            _raw_echo(user), request_deserializer=None, response_serializer=None),
        "Idle": grpc.stream_stream_rpc_method_handler(
            _raw_idle(ready), request_deserializer=None, response_serializer=None),
    })
    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # --reuseport: several raw servers share one port, as `hub serve --workers N` does.
        ("grpc.so_reuseport", int(args.reuseport)),
        ("grpc.max_concurrent_streams", args.max_concurrent_streams),
    ])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    try:
        _reply({"ready": True, "message_bytes": len(message)})
        while (await _command(commands))["cmd"] != "stop":
            pass
    finally:
        await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest._subscriber")
    roles = parser.add_subparsers(dest="role", required=True)
    sub = roles.add_parser("sub")
    sub.add_argument("--target", required=True)
    sub.add_argument("--streams", type=int, required=True)
    sub.add_argument("--raw", action="store_true")
    sub.add_argument("--latency", action="store_true")
    writer = roles.add_parser("writer")
    writer.add_argument("--target", required=True)
    writer.add_argument("--bulk-streams", type=int, default=2)
    writer.add_argument("--batch", type=int, default=500)
    writer.add_argument("--updaters", type=int, default=0)
    writer.add_argument("--rate", type=float, default=0.0)
    writer.add_argument("--rate-batch", type=int, default=1)
    writer.add_argument("--max-inflight", type=int, default=200)
    raw = roles.add_parser("raw-server")
    raw.add_argument("--port", type=int, required=True)
    raw.add_argument("--event", default="", help="base64 UserEvent (default: synthetic)")
    raw.add_argument("--batch", type=int, default=1)
    raw.add_argument("--token", default="")
    raw.add_argument("--user", default="", help="base64 User for Echo (default: synthetic)")
    raw.add_argument("--reuseport", action="store_true")
    raw.add_argument("--max-concurrent-streams", type=int, default=10_000)
    args = parser.parse_args(argv)
    run = {"sub": _run_subscriber, "writer": _run_writer, "raw-server": _run_raw_server}
    try:
        asyncio.run(run[args.role](args))
    except KeyboardInterrupt:
        return 130  # Ctrl-C reaches the whole process group; the parent reports it
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
