"""The stalled subscriber of the bench's catchup section (`loadtest.bench.catchup`); not meant
to be run by hand.

    python -m loadtest.stall_probe --target HOST:PORT [--resume-token T] [--window BYTES]

Like the bench's other workers (`loadtest._subscriber`, whose JSON-lines helpers it shares) it
reads commands on stdin and writes one JSON reply per command on stdout, and stops when its
stdin closes.

It opens one Sync stream on its own connection, subscribed to all users: live, or resumed
after --resume-token; then Subscribe(user_ids=[an id nobody has], snapshot=True), whose
`snapshot_complete` response (read, with whatever a resume replayed before it) proves the
subscription is in force. It replies ready and then stops reading: it does not iterate the
call, so gRPC asks for no more messages, HTTP/2 flow control stops the server's writes once the
connection's and the stream's windows are full, and what the engine routes to it piles up in
its buffer on the server. The window is kept small and fixed (--window, default 64 KiB;
BDP probing off), so a few hundred events fill it rather than the megabytes BDP probing
would grow it to. Then, each on its command:

- {"cmd": "read"}: starts reading everything, as fast as it can; replies {"reading_at": t}.
- {"cmd": "drain", "expected": [[user_id, version], ...], "timeout": s, "settle": s}: waits
  until every expected (user id, version) has been received, the stream has ended, or the
  timeout has passed; then reads on for `settle` s (a duplicate may come after the last new
  event) and replies with what it saw:
  {"status": "open" | "<CODE>: <details>", "cut": bool (the stream ended with a status),
  "cut_at", "cut_token", "events" (all events received, the ready phase's included),
  "unique", "duplicates" (events whose (user id, version) came before), "gaps" (expected
  pairs never received), "unexpected" (pairs received that were not expected), examples of
  each, "behind_at_read" (events written before reading_at that came after it: how far
  behind the stall left it), "reading_at", "first_after_read", "all_in_at" (when the last
  expected pair came), "timeline" ([time, events received so far] after each response from
  reading_at on, for the parent to see when it had caught up with the other subscribers),
  "max_lag_ms" (receive - written_at, at most), "responses", "heartbeats",
  "ready_events"}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from typing import Any

import grpc
import grpc.aio

from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_sync_service_pb2 as sync_pb
from hub.api.user.v1 import user_sync_service_pb2_grpc as sync_grpc
from loadtest._subscriber import (
    MAX_MESSAGE_BYTES,
    NOBODY,
    RESUME_TOKEN_KEY,
    _command,
    _reply,
    _stdin,
)

_READY_TIMEOUT = 30.0
_EXAMPLES = 5
_MAX_EVENTS = 5_000_000  # bounds what one probe keeps (one Counter entry per event)
_MAX_TIMELINE = 200_000  # (time, events) points, one per response after reading again


def _channel(target: str, window: int) -> grpc.aio.Channel:
    """Its own connection, with a fixed, small HTTP/2 receive window: gRPC C-core's BDP probe
    would otherwise grow it (to megabytes), and a stalled reader's transport would take in
    that many events before the server's writes stopped."""
    return grpc.aio.insecure_channel(target, options=[
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", window),
        ("grpc.lb_policy_name", "pick_first"),
    ])


class _Probe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.channel = _channel(args.target, args.window)
        self.call: Any = None
        self.seen: Counter[tuple[str, int]] = Counter()
        self.events = self.responses = self.heartbeats = self.ready_events = 0
        self.duplicates = 0
        self.duplicate_examples: list[str] = []
        self.status = "open"
        self.cut_at = 0.0
        self.cut_token = ""
        self.token = ""
        self.reading_at = 0.0
        self.first_after_read = 0.0
        self.timeline: list[tuple[float, int]] = []
        self.behind_at_read = 0
        self.max_lag_ms = 0.0
        self.last_new_at = 0.0  # when the last (user id, version) not seen before came
        self.ended = asyncio.Event()
        self.progress = asyncio.Event()  # set on every response

    async def open(self) -> None:
        """Subscribes (live or resumed) and reads until the empty snapshot's completion."""
        await asyncio.wait_for(self.channel.channel_ready(), _READY_TIMEOUT)
        self.call = sync_grpc.UserSyncServiceStub(self.channel).Sync()
        await self.call.write(sync_pb.SyncRequest(
            subscribe=common_pb2.Subscribe(resume_token=self.args.resume_token)))
        await self.call.write(sync_pb.SyncRequest(
            subscribe=common_pb2.Subscribe(user_ids=[NOBODY], snapshot=True)))
        while True:
            response = await asyncio.wait_for(self.call.read(), _READY_TIMEOUT)
            if response is grpc.aio.EOF:
                raise RuntimeError("the stream ended before snapshot_complete")
            self._count(response)
            if response.snapshot_complete:
                self.ready_events = self.events
                return

    def _count(self, response: sync_pb.SyncResponse) -> None:
        now = time.time()
        self.responses += 1
        if response.resume_token:
            self.token = response.resume_token
        if not response.events:
            self.heartbeats += 1
        for event in response.events:
            self.events += 1
            key = (event.user.id, event.user.version)
            self.seen[key] += 1
            if self.seen[key] > 1:
                self.duplicates += 1
                if len(self.duplicate_examples) < _EXAMPLES:
                    self.duplicate_examples.append(f"{key[0]} v{key[1]}")
            else:
                self.last_new_at = now
            written = event.written_at
            if not written.seconds:
                continue
            written_s = written.seconds + written.nanos / 1e9
            lag_ms = (now - written_s) * 1000
            self.max_lag_ms = max(self.max_lag_ms, lag_ms)
            if self.reading_at:
                self.first_after_read = self.first_after_read or now
                if written_s < self.reading_at:
                    self.behind_at_read += 1
        if self.reading_at and len(self.timeline) < _MAX_TIMELINE:
            self.timeline.append((round(now, 4), self.events))
        if len(self.seen) > _MAX_EVENTS:
            raise RuntimeError(f"more than {_MAX_EVENTS:,} distinct events")
        self.progress.set()

    async def read(self) -> None:
        """Everything the stream sends, until it ends."""
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    self.status = "ended by the server with OK"
                    self.cut_at = time.time()
                    return
                self._count(response)
        except grpc.aio.AioRpcError as err:
            self.status = f"{err.code().name}: {err.details()}"
            self.cut_at = time.time()
            trailing = dict(err.trailing_metadata() or ())
            token = trailing.get(RESUME_TOKEN_KEY)
            self.cut_token = token if isinstance(token, str) else ""
        finally:
            self.ended.set()
            self.progress.set()

    async def drain(self, expected: set[tuple[str, int]], within: float,
                    settle: float) -> dict[str, Any]:
        deadline = time.monotonic() + within
        all_in_at = 0.0
        missing = set(expected)
        while time.monotonic() < deadline and not self.ended.is_set():
            missing = {key for key in missing if key not in self.seen}
            if not missing:
                all_in_at = self.last_new_at
                break
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(),
                                       max(0.0, min(0.2, deadline - time.monotonic())))
        if not self.ended.is_set():
            await asyncio.sleep(settle)
        gaps = [key for key in expected if key not in self.seen]
        unexpected = [key for key in self.seen if key not in expected]
        return {
            "status": self.status, "cut": self.ended.is_set(), "cut_at": self.cut_at,
            "cut_token": self.cut_token, "token": self.token,
            "events": self.events, "unique": len(self.seen), "expected": len(expected),
            "duplicates": self.duplicates, "duplicate_examples": self.duplicate_examples,
            "gaps": len(gaps), "gap_examples": [f"{i} v{v}" for i, v in gaps[:_EXAMPLES]],
            "unexpected": len(unexpected),
            "unexpected_examples": [f"{i} v{v}" for i, v in unexpected[:_EXAMPLES]],
            "behind_at_read": self.behind_at_read, "reading_at": self.reading_at,
            "first_after_read": self.first_after_read, "timeline": self.timeline,
            "all_in_at": all_in_at, "max_lag_ms": round(self.max_lag_ms, 1),
            "responses": self.responses, "heartbeats": self.heartbeats,
            "ready_events": self.ready_events,
        }


async def _run(args: argparse.Namespace) -> None:
    commands = await _stdin()
    probe = _Probe(args)
    reader: asyncio.Task[None] | None = None
    try:
        try:
            await probe.open()
        except (grpc.aio.AioRpcError, RuntimeError, TimeoutError) as exc:
            text = f"{exc.code().name}: {exc.details()}" if isinstance(
                exc, grpc.aio.AioRpcError) else f"{type(exc).__name__}: {exc}"
            _reply({"ready": False, "errors": [text]})
            return
        _reply({"ready": True, "events": probe.events, "token": probe.token})
        while True:
            command = await _command(commands)
            if command["cmd"] == "read" and reader is None:
                probe.reading_at = time.time()
                reader = asyncio.create_task(probe.read())
                _reply({"reading_at": probe.reading_at})
            elif command["cmd"] == "drain":
                expected = {(str(i), int(v)) for i, v in command["expected"]}
                _reply(await probe.drain(expected, float(command["timeout"]),
                                         float(command.get("settle", 1.0))))
            else:
                return
    finally:
        if probe.call is not None:
            probe.call.cancel()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await probe.channel.close(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.stall_probe",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--resume-token", default="",
                        help="resume after this token (default: live from now)")
    parser.add_argument("--window", type=int, default=64 * 1024,
                        help="the connection's HTTP/2 receive window in bytes (default 64 KiB)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
