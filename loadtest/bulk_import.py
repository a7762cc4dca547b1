"""BulkCreateUsers throughput into Redis: N users without passwords, timed end to end.

    .venv/bin/python -m loadtest.bulk_import [--users 100000] [--redis-url URL] \\
        [--batch-size N] [--streams 1] [--json]

Without --redis-url a throwaway `redis-server` (no RDB, no AOF) is started on a free port and
killed at the end; the shared Redis is only ever used when its URL is passed explicitly (the
users created there stay). The hub runs as a `python -m hub serve` subprocess with
HUB_LOG_LEVEL=WARNING (and HUB_WRITE_RATE=0 unless set), so client and server never share an
event loop. Every request message is built before the clock starts; the time runs from the
first send to the last response. The run fails (exit 1) unless every row was created without
error and Redis holds exactly N more ids.

--batch-size sets the server's HUB_BULK_BATCH_SIZE (default: the environment's, else 500).
--streams splits the users over that many concurrent BulkCreateUsers calls on one channel.
--json prints the result as JSON on stdout (the table then goes to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc.aio
import redis

from harness.redis import free_port
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_service_pb2_grpc as pb_grpc
from hub.client import CHANNEL_OPTIONS
from hub.settings import Settings
from loadtest.bench.procs import (
    BenchError,
    cpu_model,
    cpu_seconds,
    nproc,
    print_table,
    start_redis,
    stop,
    tail,
    wait_serving,
)

DEFAULT_USERS = 100_000
# Keeps a run bounded in time and memory (every request is built up front).
MAX_USERS = 1_000_000
# Keys of the server's Redis store (RedisStore's default prefix "hub").
IDS_KEY = "hub:ids"
# A BulkCreateResponse lists every created id: field tag, length and 26 ULID characters.
_BYTES_PER_ID = 28


@dataclass(frozen=True)
class Result:
    users: int
    streams: int
    seconds: float
    users_per_s: float
    batch_size: int
    nproc: int
    cpu: str
    redis: str
    redis_version: str
    # CPU seconds the hub (and our own redis-server) used during the timed window, if known.
    hub_cpu_s: float | None
    redis_cpu_s: float | None
    python: str


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 1 <= args.users <= MAX_USERS:
        parser.error(f"--users must be 1 to {MAX_USERS}")
    if not 1 <= args.streams <= args.users:
        parser.error("--streams must be 1 to --users")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        result = run(args)
    except BenchError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1
    if args.json:
        _print_table(result, sys.stderr)
        print(json.dumps(asdict(result), indent=2))
    else:
        _print_table(result, sys.stdout)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bulk_import", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--users", type=int, default=DEFAULT_USERS,
                        help=f"users to create (default {DEFAULT_USERS}, at most {MAX_USERS})")
    parser.add_argument("--redis-url", default="",
                        help="use this Redis (its users stay); default: a throwaway redis-server")
    parser.add_argument("--batch-size", type=int,
                        help="server's bulk batch size (HUB_BULK_BATCH_SIZE, default 500)")
    parser.add_argument("--streams", type=int, default=1,
                        help="concurrent BulkCreateUsers calls sharing the users (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="deadline of each BulkCreateUsers call in seconds (default 600)")
    parser.add_argument("--json", action="store_true",
                        help="print the result as JSON on stdout, the table on stderr")
    return parser


def run(args: argparse.Namespace) -> Result:
    """Start what is needed, create args.users users, verify, stop; BenchError if anything fails."""
    # The write rate limit is off unless the environment sets one: the figure is the hub's.
    env = {"HUB_WRITE_RATE": "0", **os.environ, "HUB_LOG_LEVEL": "WARNING"}
    if args.batch_size is not None:
        env["HUB_BULK_BATCH_SIZE"] = str(args.batch_size)
    try:
        settings = Settings.load(environ=env)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    per_stream = -(-args.users // args.streams)
    max_per_stream = (settings.max_message_bytes - 64) // _BYTES_PER_ID
    if per_stream > max_per_stream:
        raise BenchError(
            f"{per_stream} users in one stream: the response (one id per user) would exceed"
            f" the {settings.max_message_bytes}-byte message limit; use --streams"
            f" {-(-args.users // max_per_stream)} or more (or raise HUB_MAX_MESSAGE_BYTES)"
        )

    with tempfile.TemporaryDirectory(prefix="hub-bulk-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        redis_proc: subprocess.Popen[bytes] | None = None
        if args.redis_url:
            redis_url, redis_label = args.redis_url, "external"
        else:
            redis_proc, redis_url = start_redis(workdir)
            stack.callback(stop, redis_proc)
            redis_label = "own redis-server (no persistence)"
        store = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
        stack.callback(store.close)
        try:
            info: dict[str, Any] = store.info("server")
            ids_before = int(store.zcard(IDS_KEY))
        except redis.RedisError as exc:
            raise BenchError(f"cannot reach Redis at {_redact(redis_url)}: {exc}") from None

        hub_port = free_port()
        hub_log = workdir / "hub.log"
        with hub_log.open("wb") as out:
            hub_proc = subprocess.Popen(
                [sys.executable, "-m", "hub", "serve", "--host", "127.0.0.1",
                 "--port", str(hub_port), "--redis-url", redis_url],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        stack.callback(stop, hub_proc)

        # Built before the clock starts; a per-run tag keeps emails unique in a reused Redis.
        tag = secrets.token_hex(4)
        requests = [
            pb.CreateUserRequest(email=f"bench-{tag}-{i}@example.com", name=f"Bench User {i}",
                                 status=common_pb2.USER_STATUS_ACTIVE)
            for i in range(args.users)
        ]
        chunks = [requests[i:i + per_stream] for i in range(0, args.users, per_stream)]

        try:
            seconds, cpu, responses = asyncio.run(_bench(
                f"127.0.0.1:{hub_port}", hub_proc, redis_proc, chunks, args.timeout,
                settings.max_message_bytes,
            ))
        except BenchError as exc:
            raise BenchError(f"{exc}\n{tail(hub_log)}") from None
        _verify(chunks, responses)
        try:
            added = int(store.zcard(IDS_KEY)) - ids_before
        except redis.RedisError as exc:
            raise BenchError(f"cannot read {IDS_KEY} after the run: {exc}") from None
        if added != args.users:
            raise BenchError(f"Redis {IDS_KEY} grew by {added}, expected {args.users}")

    return Result(
        users=args.users, streams=len(chunks), seconds=round(seconds, 3),
        users_per_s=round(args.users / seconds, 1), batch_size=settings.bulk_batch_size,
        nproc=nproc(), cpu=cpu_model(), redis=redis_label,
        redis_version=str(info.get("redis_version", "?")),
        hub_cpu_s=cpu[0], redis_cpu_s=cpu[1], python=platform.python_version(),
    )


async def _bench(
    target: str,
    hub_proc: subprocess.Popen[bytes],
    redis_proc: subprocess.Popen[bytes] | None,
    chunks: list[list[pb.CreateUserRequest]],
    deadline: float,
    max_message_bytes: int,
) -> tuple[float, tuple[float | None, float | None], list[pb.BulkCreateResponse]]:
    options = [(k, v) for k, v in CHANNEL_OPTIONS if k != "grpc.max_receive_message_length"]
    options.append(("grpc.max_receive_message_length", max_message_bytes))
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        # The health check also opens the connection the timed calls then use.
        await wait_serving(channel, hub_proc)
        stub: pb_grpc.UserServiceAsyncStub = pb_grpc.UserServiceStub(channel)
        hub_cpu0 = cpu_seconds(hub_proc.pid)
        redis_cpu0 = cpu_seconds(redis_proc.pid) if redis_proc else None
        started = time.perf_counter()
        try:
            responses = await asyncio.gather(
                *(stub.BulkCreateUsers(iter(chunk), timeout=deadline) for chunk in chunks)
            )
        except grpc.aio.AioRpcError as err:
            raise BenchError(f"BulkCreateUsers failed: {err.code().name}: {err.details()}") \
                from None
        seconds = time.perf_counter() - started
    cpu = (_delta(hub_cpu0, cpu_seconds(hub_proc.pid)),
           _delta(redis_cpu0, cpu_seconds(redis_proc.pid)) if redis_proc else None)
    return seconds, cpu, list(responses)


def _verify(chunks: list[list[pb.CreateUserRequest]],
            responses: list[pb.BulkCreateResponse]) -> None:
    problems: list[str] = []
    ids: set[str] = set()
    for n, (chunk, response) in enumerate(zip(chunks, responses, strict=True)):
        if response.created_count != len(chunk) or len(response.user_ids) != len(chunk):
            problems.append(f"stream {n}: created_count {response.created_count},"
                            f" {len(response.user_ids)} ids, expected {len(chunk)}")
        if response.errors:
            first = response.errors[0]
            problems.append(f"stream {n}: {len(response.errors)} refused rows, first: row"
                            f" {first.index} code {first.code} {first.field}: {first.message}")
        ids.update(response.user_ids)
    total = sum(len(chunk) for chunk in chunks)
    if len(ids) != total:
        problems.append(f"{len(ids)} distinct ids for {total} users")
    if problems:
        raise BenchError("wrong BulkCreateUsers result:\n  " + "\n  ".join(problems))


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 2)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return scheme + sep + ("***@" + rest.split("@", 1)[1] if "@" in rest else rest)


def _rows(result: Result) -> Iterator[tuple[str, str]]:
    yield "users", f"{result.users:,}"
    yield "streams", str(result.streams)
    yield "seconds", f"{result.seconds:.2f}"
    yield "users/s", f"{result.users_per_s:,.0f}"
    yield "server batch size", str(result.batch_size)
    if result.hub_cpu_s is not None:
        yield "hub cpu", f"{result.hub_cpu_s:.2f} s ({result.hub_cpu_s / result.seconds:.0%})"
    if result.redis_cpu_s is not None:
        yield "redis cpu", \
            f"{result.redis_cpu_s:.2f} s ({result.redis_cpu_s / result.seconds:.0%})"
    yield "redis", f"{result.redis}, {result.redis_version}"
    yield "machine", f"nproc {result.nproc}, {result.cpu}, Python {result.python}"


def _print_table(result: Result, out: TextIO) -> None:
    print_table("BulkCreateUsers -> Redis (no passwords)", _rows(result), out)


if __name__ == "__main__":
    raise SystemExit(main())
