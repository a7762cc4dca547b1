"""Client worker processes of `loadtest.bench`; not meant to be run by hand.

    python -m loadtest.bench.clients unary --target HOST:PORT [--raw] [--concurrency 32]
    python -m loadtest.bench.clients stream --target HOST:PORT --kind bulk|import|raw \\
        --users N [--rows 1000]
    python -m loadtest.bench.clients idle --target HOST:PORT [--raw] [--channels 10]
    python -m loadtest.bench.clients redis-pipeline --url URL --users N [--batch 1000]

Like `loadtest._subscriber` (whose JSON-lines helpers they share), each role reads commands on
stdin and writes one JSON reply per command on stdout, and stops when its stdin closes. Every
request is built before the parent's "go", so the timed part is only the calls. A role runs
the same client code against the hub and against its raw ceiling (`--raw`: the bare grpc.aio
server of `_subscriber raw-server`), so the two figures differ only by the server.

- `unary`: --concurrency loops over --channels connections, each calling GetUser (or the raw
  Echo method, with the same serializer and deserializer) on the ids given in "go" until
  the duration ends. {"cmd": "go", "start_at": t, "duration": s, "ids": [...]}.
- `stream`: one client stream of --users pre-built CreateUserRequests: BulkCreateUsers (one
  row per message), ImportUsers (--rows per ImportUsersRequest) or the raw Count method (the
  same CreateUserRequest bytes). {"cmd": "go"} replies with the time and the response.
- `idle`: holds Sync streams (or raw Idle streams) that subscribed to a user nobody writes and
  then say nothing: {"cmd": "open", "count": n} opens n more, spread over --channels
  connections, and replies once each got its first response; {"cmd": "close"} ends them.
- `redis-pipeline`: the Redis ceiling of a bulk import: the commands a create makes (HSETNX
  email, HSET record, ZADD id, XADD event) for --users records encoded as the hub encodes
  them, in pipelines of --batch users with --window batches in flight on one connection. The
  commands are RESP bytes built before the clock and the replies are parsed by hiredis, so
  the figure is what Redis absorbs, not what a Python client can pack (redis-py's own
  pipeline packs ~60k commands/s, slower than the hub's Lua path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio
import hiredis
import msgpack
import redis.asyncio as aioredis

from hub.api.user.v1 import common_pb2, user_service_pb2, user_service_pb2_grpc
from hub.api.user.v1 import user_sync_service_pb2 as sync_pb
from hub.api.user.v1 import user_sync_service_pb2_grpc as sync_grpc
from loadtest._subscriber import NOBODY, _channel, _command, _reply, _stdin

RAW_ECHO = "/loadtest.Raw/Echo"
RAW_COUNT = "/loadtest.Raw/Count"
RAW_IDLE = "/loadtest.Raw/Idle"
_READY_TIMEOUT = 30.0
_STREAM_TIMEOUT = 600.0
_MAX_ERRORS = 10  # kept per worker
_GIVE_UP_ERRORS = 1_000  # a loop that fails this often stops: the figure is meaningless
_MAX_LATENCIES = 500_000
# Streams being opened at once by one idle worker. Each hub Subscribe with a snapshot makes a
# store call, and a burst of hundreds at once can exceed the hub's Redis connection pool
# (redis-py refuses the 101st concurrent command: UNAVAILABLE); opening is not what we measure.
_OPENING = 16
_OPEN_ATTEMPTS = 3


def build_users(tag: str, count: int) -> list[user_service_pb2.CreateUserRequest]:
    """The rows of a bulk import: unique emails, a name, no password (the parent builds the
    same shape for its own checks)."""
    return [user_service_pb2.CreateUserRequest(
        email=f"bench-{tag}-{i}@example.com", name=f"Bench User {i}",
        status=common_pb2.USER_STATUS_ACTIVE) for i in range(count)]


def _rank(ordered: list[float], p: float) -> float:
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else 0.0


# -- unary ------------------------------------------------------------------------------------


@dataclass
class _UnaryStats:
    ok: int = 0
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)


async def _run_unary(args: argparse.Namespace) -> None:
    commands = await _stdin()
    channels = [_channel(args.target, i) for i in range(args.channels)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)),
                               _READY_TIMEOUT)
        calls: list[Callable[..., Any]] = []
        for channel in channels:
            if args.raw:
                # The same serializer and deserializer a GetUser stub uses: only the server
                # differs between the two figures.
                calls.append(channel.unary_unary(
                    RAW_ECHO, request_serializer=user_service_pb2.GetUserRequest.SerializeToString,
                    response_deserializer=common_pb2.User.FromString))
            else:
                calls.append(user_service_pb2_grpc.UserServiceStub(channel).GetUser)
        _reply({"ready": True})
        while True:
            command = await _command(commands)
            if command["cmd"] != "go":
                return
            _reply(await _unary_go(calls, args.concurrency, command))
    finally:
        await asyncio.gather(*(c.close(None) for c in channels))


async def _unary_go(calls: list[Callable[..., Any]], concurrency: int,
                    command: dict[str, Any]) -> dict[str, Any]:
    requests = [user_service_pb2.GetUserRequest(user_id=i) for i in command["ids"]] or \
        [user_service_pb2.GetUserRequest(user_id=NOBODY)]
    stats = _UnaryStats()
    latencies: list[float] = []
    await asyncio.sleep(max(0.0, command["start_at"] - time.time()))
    started = time.time()
    stop_at = started + command["duration"]

    async def loop(n: int) -> None:
        call, i = calls[n % len(calls)], n
        while time.time() < stop_at and stats.errors < _GIVE_UP_ERRORS:
            request = requests[i % len(requests)]
            i += concurrency
            t0 = time.perf_counter()
            try:
                await call(request, timeout=10)
            except grpc.aio.AioRpcError as err:
                stats.errors += 1
                if len(stats.first_errors) < _MAX_ERRORS:
                    stats.first_errors.append(f"{err.code().name}: {err.details()}")
                continue
            stats.ok += 1
            if len(latencies) < _MAX_LATENCIES:
                latencies.append((time.perf_counter() - t0) * 1000)

    async with asyncio.TaskGroup() as tg:
        for n in range(concurrency):
            tg.create_task(loop(n))
    ended = time.time()
    latencies.sort()
    return {"ok": stats.ok, "errors": stats.errors, "first_errors": stats.first_errors,
            "started": started, "ended": ended,
            "p50_ms": round(_rank(latencies, 50), 3), "p99_ms": round(_rank(latencies, 99), 3)}


# -- one client stream ------------------------------------------------------------------------


async def _run_stream(args: argparse.Namespace) -> None:
    commands = await _stdin()
    rows = build_users(args.tag or secrets.token_hex(4), args.users)
    messages: list[Any]
    channel = _channel(args.target, 0)
    try:
        if args.kind == "import":
            messages = [user_service_pb2.ImportUsersRequest(users=rows[i:i + args.rows])
                        for i in range(0, len(rows), args.rows)]
            method: Any = user_service_pb2_grpc.UserServiceStub(channel).ImportUsers
        elif args.kind == "bulk":
            messages = rows
            method = user_service_pb2_grpc.UserServiceStub(channel).BulkCreateUsers
        else:
            messages = rows
            method = channel.stream_unary(
                RAW_COUNT,
                request_serializer=user_service_pb2.CreateUserRequest.SerializeToString,
                response_deserializer=user_service_pb2.BulkCreateResponse.FromString)
        await asyncio.wait_for(channel.channel_ready(), _READY_TIMEOUT)
        _reply({"ready": True, "messages": len(messages)})
        while (await _command(commands))["cmd"] == "go":
            started = time.perf_counter()
            try:
                response = await method(iter(messages), timeout=_STREAM_TIMEOUT)
            except grpc.aio.AioRpcError as err:
                _reply({"error": f"{err.code().name}: {err.details()}",
                        "seconds": time.perf_counter() - started})
                continue
            seconds = time.perf_counter() - started
            first = response.errors[0] if response.errors else None
            _reply({
                "seconds": seconds, "messages": len(messages), "rows": len(rows),
                "created_count": response.created_count, "ids": len(response.user_ids),
                "distinct_ids": len(set(response.user_ids)),
                "refused": len(response.errors),
                "first_refusal": f"row {first.index} code {first.code} {first.field}:"
                                 f" {first.message}" if first else "",
            })
    finally:
        await channel.close(None)


# -- idle streams -----------------------------------------------------------------------------


class _Idle:
    def __init__(self, args: argparse.Namespace) -> None:
        self.raw = args.raw
        self.channels = [_channel(args.target, i) for i in range(args.channels)]
        self.calls: list[Any] = []
        self.errors: list[str] = []
        self.retries = 0
        self.retry_reasons: list[str] = []
        self.subscribe = sync_pb.SyncRequest(
            subscribe=common_pb2.Subscribe(user_ids=[NOBODY], snapshot=True))

    async def open_one(self, n: int, slots: asyncio.Semaphore) -> None:
        channel = self.channels[n % len(self.channels)]
        async with slots:
            for attempt in range(_OPEN_ATTEMPTS):
                if self.raw:
                    call: Any = channel.stream_stream(
                        RAW_IDLE, request_serializer=sync_pb.SyncRequest.SerializeToString,
                        response_deserializer=sync_pb.SyncResponse.FromString)()
                else:
                    call = sync_grpc.UserSyncServiceStub(channel).Sync()
                try:
                    await call.write(self.subscribe)
                    # The hub answers the snapshot of nobody with snapshot_complete: from then
                    # on the stream is subscribed and idle. The raw server answers once, too.
                    while True:
                        response = await call.read()
                        if response is grpc.aio.EOF:
                            raise RuntimeError("stream ended before its first answer")
                        if response.snapshot_complete:
                            break
                except (grpc.aio.AioRpcError, RuntimeError) as err:
                    call.cancel()
                    retry = isinstance(err, grpc.aio.AioRpcError) and \
                        err.code() == grpc.StatusCode.UNAVAILABLE and attempt + 1 < _OPEN_ATTEMPTS
                    if retry:
                        # A store call refused in a burst of subscribes: count it, try again.
                        self.retries += 1
                        if len(self.retry_reasons) < _MAX_ERRORS:
                            self.retry_reasons.append(f"{err.code().name}: {err.details()}"
                                                      if isinstance(err, grpc.aio.AioRpcError)
                                                      else str(err))
                        await asyncio.sleep(0.05 * (attempt + 1))
                        continue
                    if len(self.errors) < _MAX_ERRORS:
                        self.errors.append(f"{err.code().name}: {err.details()}"
                                           if isinstance(err, grpc.aio.AioRpcError) else str(err))
                    return
                self.calls.append(call)
                return

    async def open(self, count: int, within: float) -> dict[str, Any]:
        before = len(self.calls)
        slots = asyncio.Semaphore(_OPENING)
        started = time.perf_counter()
        tasks = [asyncio.create_task(self.open_one(before + n, slots)) for n in range(count)]
        _, pending = await asyncio.wait(tasks, timeout=within)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        opened = len(self.calls) - before
        if pending:
            self.errors.append(f"{len(pending)} streams not open after {within:.0f}s")
        return {"ready": opened == count, "opened": opened, "open": len(self.calls),
                "seconds": round(time.perf_counter() - started, 3), "errors": self.errors[:5],
                "retries": self.retries, "retry_reasons": self.retry_reasons[:3]}

    def close(self) -> dict[str, Any]:
        for call in self.calls:
            call.cancel()
        closed = len(self.calls)
        self.calls.clear()
        return {"closed": closed}


async def _run_idle(args: argparse.Namespace) -> None:
    commands = await _stdin()
    idle = _Idle(args)
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in idle.channels)),
                               _READY_TIMEOUT)
        _reply({"ready": True})
        while True:
            command = await _command(commands)
            if command["cmd"] == "open":
                _reply(await idle.open(command["count"], command.get("timeout", 120.0)))
            elif command["cmd"] == "close":
                _reply(idle.close())
            else:
                return
    finally:
        idle.close()
        await asyncio.gather(*(c.close(None) for c in idle.channels))


# -- the Redis ceiling ------------------------------------------------------------------------


# The store's layout of a created user, written out here: the ceiling measures what Redis
# absorbs, not hub's code. A record is msgpack [id, email, name, status, created_at,
# updated_at, version, password hash], an event msgpack [type, the user's first seven fields,
# ts]; the email index is keyed by the casefolded email; a user's events go to partition
# crc32(id) % partitions; timestamps are microseconds.
_STATUS_ACTIVE = 1
_EVENT_CREATED = 1
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _crockford(value: int, chars: int) -> str:
    return "".join(_CROCKFORD[(value >> s) & 31] for s in range(5 * (chars - 1), -1, -5))


def _ulids(count: int) -> list[str]:
    """`count` ULIDs of this millisecond, counting up from a random start as a monotonic ULID
    maker does: the ids hub makes, in shape and order."""
    prefix = _crockford(time.time_ns() // 1_000_000, 10)
    start = int.from_bytes(os.urandom(10), "big") >> 1  # room to count up without a carry
    return [prefix + _crockford(start + n, 16) for n in range(count)]


def _records(count: int, tag: str, partitions: int) -> list[tuple[str, str, bytes, bytes, int]]:
    """(id, email key, record, event, partition) per user, encoded as the hub encodes them."""
    out = []
    ts = time.time_ns() // 1000
    for i, user_id in enumerate(_ulids(count)):
        email = f"bench-{tag}-{i}@example.com"
        fields = [user_id, email, f"Bench User {i}", _STATUS_ACTIVE, ts, ts, 1]
        # The store's record layout: the user's fields, then the password hash (none here).
        record = msgpack.packb([*fields, None])
        out.append((user_id, email.casefold(), record, msgpack.packb([_EVENT_CREATED, fields, ts]),
                    zlib.crc32(user_id.encode()) % partitions))
    return out


def _resp(*args: bytes | str | int) -> bytes:
    """One command in the Redis protocol (RESP), encoded before the clock starts."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _batches(args: argparse.Namespace) -> list[tuple[bytes, int]]:
    """(pipelined commands, their count) per --batch users: the four commands a create makes."""
    p, now_ms = args.prefix, time.time_ns() // 1_000_000
    records = _records(args.users, secrets.token_hex(4), args.partitions)
    out = []
    for at in range(0, len(records), args.batch):
        commands = []
        for user_id, key, record, event, partition in records[at:at + args.batch]:
            commands += [
                _resp("HSETNX", f"{p}:emails", key, user_id),
                _resp("HSET", f"{p}:user:{user_id}", "v", 1, "d", record),
                _resp("ZADD", f"{p}:ids", 0, user_id),
                _resp("XADD", f"{p}:log:{partition}", "MAXLEN", "~", args.history_size, "*",
                      "e", event, "t", now_ms),
            ]
        out.append((b"".join(commands), len(commands)))
    return out


async def _pipelined(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     batches: list[tuple[bytes, int]], window: int) -> list[str]:
    """Sends the batches with up to `window` of them unanswered, reads every reply (hiredis
    parses them); returns the error replies."""
    parser = hiredis.Reader()
    errors: list[str] = []
    slots = asyncio.Semaphore(window)

    async def replies() -> None:
        for _, expected in batches:
            got = 0
            while got < expected:
                reply = parser.gets()
                if reply is False:  # incomplete: read more
                    data = await reader.read(1 << 20)
                    if not data:
                        raise ConnectionError("Redis closed the connection")
                    parser.feed(data)
                    continue
                got += 1
                if isinstance(reply, hiredis.ReplyError) and len(errors) < _MAX_ERRORS:
                    errors.append(str(reply))
            slots.release()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(replies())
        for payload, _ in batches:
            await slots.acquire()
            writer.write(payload)
            await writer.drain()
    return errors


async def _run_redis(args: argparse.Namespace) -> None:
    commands = await _stdin()
    batches = _batches(args)
    url = urlsplit(args.url)
    reader, writer = await asyncio.open_connection(url.hostname or "127.0.0.1", url.port or 6379)
    client = aioredis.Redis.from_url(args.url, socket_connect_timeout=2)
    try:
        db = int((url.path or "/0").lstrip("/") or 0)
        if db:
            writer.write(_resp("SELECT", db))
            await reader.readline()
        await client.ping()
        _reply({"ready": True})
        while (await _command(commands))["cmd"] == "go":
            started = time.perf_counter()
            errors = await _pipelined(reader, writer, batches, args.window)
            seconds = time.perf_counter() - started
            _reply({"seconds": seconds, "users": args.users, "errors": errors,
                    "ids": int(await client.zcard(f"{args.prefix}:ids"))})
    finally:
        writer.close()
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.clients")
    roles = parser.add_subparsers(dest="role", required=True)
    unary = roles.add_parser("unary")
    unary.add_argument("--target", required=True)
    unary.add_argument("--raw", action="store_true")
    unary.add_argument("--concurrency", type=int, default=32)
    unary.add_argument("--channels", type=int, default=4)
    stream = roles.add_parser("stream")
    stream.add_argument("--target", required=True)
    stream.add_argument("--kind", choices=("bulk", "import", "raw"), required=True)
    stream.add_argument("--users", type=int, required=True)
    stream.add_argument("--rows", type=int, default=1000, help="rows per ImportUsersRequest")
    stream.add_argument("--tag", default="")
    idle = roles.add_parser("idle")
    idle.add_argument("--target", required=True)
    idle.add_argument("--raw", action="store_true")
    idle.add_argument("--channels", type=int, default=10)
    pipeline = roles.add_parser("redis-pipeline")
    pipeline.add_argument("--url", required=True)
    pipeline.add_argument("--users", type=int, required=True)
    pipeline.add_argument("--batch", type=int, default=1000)
    pipeline.add_argument("--partitions", type=int, default=16)
    pipeline.add_argument("--history-size", type=int, default=10_000)
    pipeline.add_argument("--prefix", default="ceiling")
    pipeline.add_argument("--window", type=int, default=4,
                          help="batches sent before the first one's replies are read")
    args = parser.parse_args(argv)
    run = {"unary": _run_unary, "stream": _run_stream, "idle": _run_idle,
           "redis-pipeline": _run_redis}
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reaches the whole process group
        asyncio.run(run[args.role](args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
