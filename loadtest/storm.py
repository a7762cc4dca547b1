"""A resume storm: many `Sync` subscribers resuming far back, all at once, on one hub.

    python -m loadtest.storm [--subscribers 900] [--back 2000] [--workers 3] [--json FILE]

The situation of issue 9 (finding 5): one instance was killed and its subscribers all resume on
the surviving one from tokens some 2,000 events back. This script starts its own redis-server
and one hub (`python -m hub serve`, as `loadtest.bench` does), then:

1. creates `--probe-users` users for the GetUser probe;
2. takes a token from ListUsers' trailing metadata (`hub-resume-token`), from before:
3. `--back` creates (ImportUsers, 500 rows per message): the events every subscriber must get,
   each exactly once;
4. starts `--workers` client processes holding `--subscribers` Sync streams between them (each
   on its own connection, opened at the storm like a reconnecting client's unless
   `--preconnect`), and a probe process calling GetUser one call at a time;
5. at one instant every stream sends Subscribe{resume_token} and reads until it has all the
   events (or fails, or `--timeout` passes).

It prints, beside the targets: time to first response and to completion per subscriber
(p50/p99/max, from the common start), events lost, duplicated or unexpected, how the streams
ended (CANCELLED, UNAVAILABLE, ...), GetUser latency during the storm (and before it, as a
baseline), and the CPU of the hub, Redis and every client process (a client near 100% of a
core would make the figures its own, not the hub's). Exit status 1 when a target is missed or
an event was lost, 2 when the storm could not be run.

The worker roles (`python -m loadtest.storm _sub|_probe ...`) are this module too; they speak
JSON lines on stdin/stdout like `loadtest._subscriber`'s, and stop when their stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from harness.redis import free_port
from hub.api.user.v1 import common_pb2, user_service_pb2, user_service_pb2_grpc
from hub.api.user.v1 import user_sync_service_pb2 as sync_pb
from hub.api.user.v1 import user_sync_service_pb2_grpc as sync_grpc
from loadtest._subscriber import NOBODY, RESUME_TOKEN_KEY, _channel, _command, _reply, _stdin
from loadtest.bench.procs import (
    HUB_FLAGS,
    BenchError,
    Children,
    CpuMeter,
    Hub,
    log_summary,
    print_table,
    start_hub,
    start_redis,
    stop,
    wait_hub,
)

RAW_IDLE = "/loadtest.Raw/Idle"
RAW_ECHO = "/loadtest.Raw/Echo"

FIRST_RESPONSE_TARGET_S = 5.0
GETUSER_P99_TARGET_MS = 100.0
_IMPORT_ROWS = 500
_PROBE_TIMEOUT = 5.0  # a GetUser slower than this counts as failed (and as this long)
_MAX_PROBE_SAMPLES = 200_000
_PROBE_IN_FLIGHT = 500
_MAX_ERRORS = 5  # kept per stream
_SETUP_TIMEOUT = 60.0


# -- the subscriber worker --------------------------------------------------------------------


@dataclass
class StreamResult:
    called_s: float = -1.0  # when the call was made, from the common start
    first_s: float = -1.0  # first response (of any kind), from the common start
    complete_s: float = -1.0  # every expected event received
    ended_s: float = -1.0  # when the stream ended, however it ended
    events: int = 0
    responses: int = 0
    missing: int = 0
    duplicates: int = 0
    unexpected: int = 0  # events of users outside the expected set, or not version 1
    resumes: int = 0  # RESOURCE_EXHAUSTED cuts resumed from the trailing token
    code: str = ""  # how the stream ended: OK (complete), a status name, TIMEOUT
    errors: list[str] = field(default_factory=list)


class _Storm:
    """`streams` Sync streams resuming from one token, each counting the expected events."""

    def __init__(self, target: str, streams: int, first_channel: int,
                 verify_every: int = 1) -> None:
        self.channels = [_channel(target, first_channel + i) for i in range(streams)]
        self.first_channel = first_channel
        self.verify_every = verify_every
        self.results = [StreamResult() for _ in range(streams)]
        self.index: dict[str, int] = {}
        self.token = ""
        self.end_token = ""  # the position right after the expected events

    async def stream(self, i: int, start_at: float, deadline: float) -> None:
        result, stub = self.results[i], sync_grpc.UserSyncServiceStub(self.channels[i])
        counts = bytearray(len(self.index))
        index = self.index
        token = self.token
        distinct = 0  # expected events seen at least once
        # Checking every event's user costs the clients ~1 us an event; with --verify-every N
        # the other streams count events up to the end token (a loss shows as LOST there, a
        # duplicate as an event too many).
        verify = (self.first_channel + i) % self.verify_every == 0
        result.called_s = time.time() - start_at
        try:
            while True:
                call = stub.Sync(timeout=max(0.1, deadline - time.time()))
                try:
                    await call.write(sync_pb.SyncRequest(
                        subscribe=common_pb2.Subscribe(resume_token=token)))
                    while distinct < len(index):
                        response = await call.read()
                        if response is grpc.aio.EOF:
                            result.code = "EOF"
                            return
                        assert isinstance(response, sync_pb.SyncResponse)
                        if result.first_s < 0:
                            result.first_s = time.time() - start_at
                        result.responses += 1
                        result.events += len(response.events)
                        if verify:
                            for event in response.events:
                                user = event.user
                                n = index.get(user.id)
                                if n is None or user.version != 1:
                                    result.unexpected += 1
                                elif counts[n]:
                                    counts[n] = min(255, counts[n] + 1)
                                else:
                                    counts[n] = 1
                                    distinct += 1
                        if response.resume_token:
                            token = response.resume_token
                            if token == self.end_token and (
                                    distinct < len(index) if verify
                                    else result.events != len(index)):
                                # Past every expected event without them all: a silent loss.
                                result.code = "LOST"
                                return
                            if token == self.end_token:
                                break
                    result.complete_s = time.time() - start_at
                    result.code = "OK"
                    return
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                    if len(result.errors) < _MAX_ERRORS:
                        result.errors.append(f"{code.name}: {err.details()}")
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        # A slow-consumer cut: resume as SyncFeed does, from the trailing token.
                        cut = dict(err.trailing_metadata() or ()).get(RESUME_TOKEN_KEY)
                        if isinstance(cut, str) and cut:
                            token = cut
                        result.resumes += 1
                        continue
                    result.code = "TIMEOUT" if code == grpc.StatusCode.DEADLINE_EXCEEDED \
                        else code.name
                    return
                finally:
                    call.cancel()
        finally:
            result.ended_s = time.time() - start_at
            if verify:
                result.missing = counts.count(0)
                result.duplicates = sum(c - 1 for c in counts if c > 1)
            else:
                result.missing = max(0, len(index) - result.events)
                result.duplicates = max(0, result.events - len(index))

    async def empty_stream(self, i: int, start_at: float, deadline: float) -> None:
        """No replay: Subscribe(snapshot of a user nobody has), done at snapshot_complete. What
        the hub's streams cost without the events (--empty)."""
        result, stub = self.results[i], sync_grpc.UserSyncServiceStub(self.channels[i])
        result.called_s = time.time() - start_at
        call = stub.Sync(timeout=max(0.1, deadline - time.time()))
        try:
            await call.write(sync_pb.SyncRequest(subscribe=common_pb2.Subscribe(
                user_ids=[NOBODY], snapshot=True)))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    result.code = "EOF"
                    return
                assert isinstance(response, sync_pb.SyncResponse)
                if result.first_s < 0:
                    result.first_s = time.time() - start_at
                result.responses += 1
                if response.snapshot_complete:
                    result.complete_s = time.time() - start_at
                    result.code = "OK"
                    return
        except grpc.aio.AioRpcError as err:
            result.errors.append(f"{err.code().name}: {err.details()}")
            result.code = err.code().name
        finally:
            call.cancel()

    async def raw_stream(self, i: int, start_at: float, deadline: float) -> None:
        """The ceiling's stream: the raw server's Idle method answers the first request once,
        as cheaply as a grpc.aio server can; the time to that answer is all there is."""
        result = self.results[i]
        method: Any = self.channels[i].stream_stream(
            RAW_IDLE, request_serializer=None, response_deserializer=None)
        result.called_s = time.time() - start_at
        call = method(timeout=max(0.1, deadline - time.time()))
        try:
            await call.write(b"")
            response = await call.read()
            if response is grpc.aio.EOF:
                result.code = "EOF"
                return
            result.first_s = result.complete_s = time.time() - start_at
            result.responses = 1
            result.code = "OK"
        except grpc.aio.AioRpcError as err:
            result.errors.append(f"{err.code().name}: {err.details()}")
            result.code = err.code().name
        finally:
            call.cancel()


async def _run_sub(args: argparse.Namespace) -> None:
    commands = await _stdin()
    storm = _Storm(args.target, args.streams, args.first_channel, args.verify_every)
    try:
        setup = await _command(commands)
        if setup["cmd"] != "setup":
            return
        storm.token, storm.end_token = setup["token"], setup["end_token"]
        storm.index = {user_id: n for n, user_id in enumerate(setup["expected"])}
        if args.preconnect:
            await asyncio.wait_for(asyncio.gather(
                *(c.channel_ready() for c in storm.channels)), _SETUP_TIMEOUT)
        _reply({"ready": True})
        go = await _command(commands)
        if go["cmd"] != "go":
            return
        start_at, deadline = go["start_at"], go["start_at"] + go["timeout"]
        await asyncio.sleep(max(0.0, start_at - time.time()))
        stream = storm.raw_stream if args.raw else storm.empty_stream if args.empty \
            else storm.stream
        tasks = [asyncio.create_task(stream(i, start_at, deadline))
                 for i in range(args.streams)]
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.time()) + 5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for result in storm.results:
            if not result.code:
                result.code = "TIMEOUT"
        _reply({"streams": [asdict(r) for r in storm.results]})
        await _command(commands)  # until "stop" (or the parent is gone)
    finally:
        await asyncio.gather(*(c.close(None) for c in storm.channels))


# -- the GetUser probe ------------------------------------------------------------------------


async def _run_probe(args: argparse.Namespace) -> None:
    """GetUser at a steady rate, open loop: a call starts every `interval` whether or not the
    last one answered, so a stall shows as every call it held up (a closed loop would make
    one slow call and then stop sampling), and each latency counts from the call's due time."""
    commands = await _stdin()
    channel = _channel(args.target, 10_000_000)
    get_user: Any = user_service_pb2_grpc.UserServiceStub(channel).GetUser
    if args.raw:  # the ceiling: the raw server's Echo answers with a pre-encoded User
        get_user = channel.unary_unary(RAW_ECHO, request_serializer=None,
                                       response_deserializer=None)
    samples: list[tuple[float, float, str]] = []  # (wall time due, ms, code)
    try:
        setup = await _command(commands)
        ids = setup["ids"]
        await asyncio.wait_for(channel.channel_ready(), _SETUP_TIMEOUT)
        _reply({"ready": True})
        stopped = asyncio.Event()
        slots = asyncio.Semaphore(_PROBE_IN_FLIGHT)

        async def one(user_id: str, due: float) -> None:
            code = "OK"
            try:
                request = user_service_pb2.GetUserRequest(user_id=user_id)
                await get_user(request.SerializeToString() if args.raw else request,
                               timeout=_PROBE_TIMEOUT)
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            finally:
                slots.release()
            samples.append((due, (time.time() - due) * 1000, code))

        async def probe() -> None:
            calls: set[asyncio.Task[None]] = set()
            due = time.time()
            for n in range(_MAX_PROBE_SAMPLES):
                if stopped.is_set():
                    break
                await slots.acquire()  # bounded in flight: a hub that stops answering
                task = asyncio.create_task(one(ids[n % len(ids)], due))
                calls.add(task)
                task.add_done_callback(calls.discard)
                due += args.interval
                await asyncio.sleep(max(0.0, due - time.time()))
            await asyncio.gather(*calls)

        task = asyncio.create_task(probe())
        await _command(commands)  # "report" (or the parent is gone)
        stopped.set()
        await task
        _reply({"samples": samples})
    finally:
        await channel.close(None)


# -- the harness ------------------------------------------------------------------------------


def _rank(ordered: Sequence[float], p: float) -> float:
    """The p-quantile (nearest rank) of an ascending list."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]


def _summary(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50": _rank(ordered, 0.5), "p99": _rank(ordered, 0.99),
            "max": ordered[-1] if ordered else math.nan}


def _seconds(s: dict[str, float]) -> str:
    if not s["n"]:
        return "none"
    return f"p50 {s['p50']:.2f}  p99 {s['p99']:.2f}  max {s['max']:.2f} s  (n={s['n']:.0f})"


def _millis(s: dict[str, float]) -> str:
    if not s["n"]:
        return "none"
    return f"p50 {s['p50']:.1f}  p99 {s['p99']:.1f}  max {s['max']:.1f} ms  (n={s['n']:.0f})"


async def _import(stub: user_service_pb2_grpc.UserServiceStub, tag: str, first: int,
                  count: int) -> list[str]:
    """Creates `count` users in ImportUsers messages of 500 rows; their ids, in order."""
    requests = [
        user_service_pb2.ImportUsersRequest(users=[
            user_service_pb2.CreateUserRequest(
                email=f"storm-{tag}-{n}@example.com", name=f"Storm {n}",
                status=common_pb2.USER_STATUS_ACTIVE)
            for n in range(start, min(first + count, start + _IMPORT_ROWS))])
        for start in range(first, first + count, _IMPORT_ROWS)
    ]
    response = await stub.ImportUsers(iter(requests), timeout=120)
    if response.errors or response.created_count != count:
        raise BenchError(f"ImportUsers created {response.created_count} of {count}:"
                         f" {list(response.errors)[:3]}")
    return list(response.user_ids)


async def _resume_token(stub: user_service_pb2_grpc.UserServiceStub) -> str:
    call = stub.ListUsers(user_service_pb2.ListUsersRequest(page_size=1), timeout=30)
    async for _ in call:
        pass
    token = dict(await call.trailing_metadata() or ()).get(RESUME_TOKEN_KEY)
    if not isinstance(token, str) or not token:
        raise BenchError("ListUsers sent no hub-resume-token")
    return token


@dataclass
class StormReport:
    subscribers: int
    back: int
    workers: int
    first: dict[str, float]
    complete: dict[str, float]
    called: dict[str, float]
    failed_ended: dict[str, float]  # when the streams that did not complete ended
    codes: dict[str, int]
    lost_streams: int  # streams that were given the end position without every event
    missing: int  # events those streams never got: lost
    undelivered: int  # events failed streams did not get before they failed
    duplicates: int
    unexpected: int
    resumes: int
    getuser: dict[str, float]
    getuser_failed: int
    getuser_baseline: dict[str, float]
    storm_s: float
    cpu: dict[str, float]
    errors: list[str]
    hub_log: list[str]
    met: dict[str, bool]
    ceiling: Ceiling | None = None

    @property
    def ok(self) -> bool:
        return all(self.met.values())


async def run(args: argparse.Namespace, out: Any = sys.stdout) -> StormReport:
    workdir = Path(tempfile.mkdtemp(prefix="hub-storm-"))
    redis_proc = None
    hub: Hub | None = None
    children = Children(workdir, module="loadtest.storm")
    try:
        if args.redis_url:
            redis_url = args.redis_url
        else:
            redis_proc, redis_url = start_redis(workdir)
        hub = start_hub("storm", redis_url, workdir, flags=[*HUB_FLAGS, *args.hub_flag],
                        extra_env={"HUB_PARTITIONS": str(args.partitions)})
        await wait_hub(hub)
        print(f"hub on {hub.target} (log {hub.log}), Redis {redis_url}", file=out, flush=True)
        tag = secrets.token_hex(4)
        async with grpc.aio.insecure_channel(hub.target) as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            probe_ids = await _import(users, tag, 0, args.probe_users)
            token = await _resume_token(users)
            t0 = time.perf_counter()
            expected = await _import(users, tag, args.probe_users, args.back)
            end_token = await _resume_token(users)
            print(f"{args.back} events written after the token in"
                  f" {time.perf_counter() - t0:.1f}s", file=out, flush=True)
        setup = {"token": token, "end_token": end_token, "expected": expected}
        pids = {"hub": hub.proc.pid, **({"redis": redis_proc.pid} if redis_proc else {})}
        results, samples, start_at, storm_end, cpu = await _storm(
            args, children, hub.target, setup, probe_ids, pids, spy_pid=hub.proc.pid)
        report = _report(args, results, samples, start_at, storm_end, cpu, hub)
        _print(report, out)
        if args.ceiling:
            stop(hub.proc)  # the ceiling gets the machine the hub had
            report.ceiling = await _ceiling(args, children, setup, probe_ids)
            _print_ceiling(report.ceiling, out)
        return report
    finally:
        await children.close()
        if hub is not None:
            stop(hub.proc)
        if redis_proc is not None:
            stop(redis_proc)


async def _storm(args: argparse.Namespace, children: Children, target: str,
                 setup: dict[str, Any], probe_ids: list[str], pids: dict[str, int],
                 spy_pid: int = 0, raw: bool = False,
                 ) -> tuple[list[StreamResult], list[list[Any]], float, float, dict[str, float]]:
    """One storm on `target`: the results of every stream, the probe's samples, the start,
    the last completion, and the CPU of `pids` and of the clients in between."""
    per = [args.subscribers // args.workers + (i < args.subscribers % args.workers)
           for i in range(args.workers)]
    flags = [*(["--preconnect"] if args.preconnect else []), *(["--raw"] if raw else []),
             *(["--empty"] if args.empty and not raw else []),
             "--verify-every", str(args.verify_every)]
    label = "raw " if raw else ""
    subs = [await children.start(f"{label}sub {i}", "_sub", "--target", target, "--streams",
                                 str(n), "--first-channel", str(sum(per[:i])), *flags)
            for i, n in enumerate(per)]
    probe = await children.start(f"{label}probe", "_probe", "--target", target, "--interval",
                                 str(args.probe_interval), *(["--raw"] if raw else []))
    try:
        for child in subs:
            await child.send(cmd="setup", **setup)
        await probe.send(cmd="setup", ids=probe_ids)
        await children.ready([*subs, probe], within=_SETUP_TIMEOUT + 10)
        meter = CpuMeter({**pids, **{c.name.removeprefix(label): c.pid for c in subs},
                          "probe": probe.pid}, clients={"probe"})
        async with meter.running():
            await asyncio.sleep(args.baseline)  # the probe's baseline, before the storm
            start_at = time.time() + 0.5
            spy = _py_spy(args, spy_pid) if spy_pid else None
            try:
                for child in subs:
                    await child.send(cmd="go", start_at=start_at, timeout=args.timeout)
                replies = await asyncio.gather(
                    *(c.recv(within=args.timeout + 30) for c in subs))
            finally:
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                    await asyncio.to_thread(spy.wait, 60)
            ended = time.time()
            await probe.send(cmd="report")
            samples = (await probe.recv())["samples"]
    finally:
        await children.close([*subs, probe])
    results = [StreamResult(**r) for reply in replies for r in reply["streams"]]
    storm_end = max([start_at + r.complete_s for r in results if r.complete_s >= 0]
                    or [ended])
    return results, samples, start_at, storm_end, meter.percent(start_at, storm_end)


@dataclass
class Ceiling:
    """The same clients against a bare grpc.aio server (loadtest._subscriber raw-server):
    900 streams opened at once, each answered once, and Echo in place of GetUser."""

    first: dict[str, float]
    codes: dict[str, int]
    echo: dict[str, float]
    cpu: dict[str, float]


async def _ceiling(args: argparse.Namespace, children: Children, setup: dict[str, Any],
                   probe_ids: list[str]) -> Ceiling:
    port = free_port()
    server = await children.start("raw server", "raw-server", "--port", str(port),
                                  module="loadtest._subscriber")
    try:
        await children.ready([server])
        results, samples, start_at, end, cpu = await _storm(
            args, children, f"127.0.0.1:{port}", setup, probe_ids,
            {"raw server": server.pid}, raw=True)
    finally:
        await children.close([server])
    codes: dict[str, int] = {}
    for r in results:
        codes[r.code] = codes.get(r.code, 0) + 1
    return Ceiling(first=_summary(r.first_s for r in results if r.first_s >= 0), codes=codes,
                   echo=_summary(ms if code == "OK" else max(ms, _PROBE_TIMEOUT * 1000)
                                 for t, ms, code in samples if start_at <= t <= end),
                   cpu=cpu)


def _print_ceiling(c: Ceiling, out: Any) -> None:
    rows = [("first (and only) response", _seconds(c.first)),
            ("stream endings", ", ".join(f"{k} {v}" for k, v in sorted(c.codes.items()))),
            ("Echo (GetUser's ceiling) meanwhile", _millis(c.echo))]
    rows += [(f"CPU {k}", f"{v:.0f}%") for k, v in c.cpu.items()]
    print_table("ceiling: the same streams opened at once on a bare grpc.aio server, each"
                " answered once", rows, out)


def _py_spy(args: argparse.Namespace, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy recording the hub (collapsed stacks, the flamegraph input) until SIGINT."""
    if not args.py_spy:
        return None
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [binary, "record", "--pid", str(pid), "--format", "raw", "--output",
            str(args.py_spy), "--threads"]
    # Native frames need the process paused per sample: fewer samples, to disturb it less.
    argv += ["--native", "--rate", "100"] if args.py_spy_native else \
        ["--nonblocking", "--rate", "200"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _report(args: argparse.Namespace, results: list[StreamResult],
            samples: list[list[Any]], start_at: float, storm_end: float,
            cpu: dict[str, float], hub: Hub) -> StormReport:
    codes: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        codes[r.code] = codes.get(r.code, 0) + 1
        for e in r.errors:
            errors[e[:120]] = errors.get(e[:120], 0) + 1
    during = [(ms, code) for t, ms, code in samples if start_at <= t <= storm_end]
    before = [ms for t, ms, code in samples if t < start_at and code == "OK"]
    # A failed probe counts as at least its timeout: a timed-out GetUser is not fast.
    getuser = _summary(ms if code == "OK" else max(ms, _PROBE_TIMEOUT * 1000)
                       for ms, code in during)
    first = _summary(r.first_s for r in results if r.first_s >= 0)
    complete = _summary(r.complete_s for r in results if r.complete_s >= 0)
    reached = [r for r in results if r.code in ("OK", "LOST")]
    missing = sum(r.missing for r in reached)
    duplicates = sum(r.duplicates for r in results)
    unexpected = sum(r.unexpected for r in results)
    every_first = all(r.first_s >= 0 for r in results)
    met = {
        "every subscriber's first response within 5 s":
            every_first and first["max"] <= FIRST_RESPONSE_TARGET_S,
        "every subscriber completed": codes.get("OK", 0) == len(results),
        "no event lost, duplicated or unexpected": not (missing or duplicates or unexpected),
        "GetUser p99 under 100 ms": bool(getuser["n"]) and
            getuser["p99"] < GETUSER_P99_TARGET_MS,
    }
    return StormReport(
        subscribers=len(results), back=args.back, workers=args.workers,
        first=first, complete=complete, called=_summary(r.called_s for r in results),
        failed_ended=_summary(r.ended_s for r in results if r.code != "OK"),
        codes=codes, lost_streams=sum(r.missing > 0 for r in reached), missing=missing,
        undelivered=sum(r.missing for r in results if r.code not in ("OK", "LOST")),
        duplicates=duplicates, unexpected=unexpected,
        resumes=sum(r.resumes for r in results), getuser=getuser,
        getuser_failed=sum(code != "OK" for _, code in during),
        getuser_baseline=_summary(before), storm_s=storm_end - start_at, cpu=cpu,
        errors=[f"{n} x {e}" for e, n in sorted(errors.items(), key=lambda x: -x[1])[:8]],
        hub_log=log_summary(hub.log), met=met)


def _print(r: StormReport, out: Any) -> None:
    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    first_ok = r.met["every subscriber's first response within 5 s"]
    rows = [
        ("subscribers", f"{r.subscribers} in {r.workers} client processes, resuming"
                        f" {r.back} events back"),
        ("storm (start to last completion)", f"{r.storm_s:.2f} s"),
        ("calls made (client lag)", _seconds(r.called)),
        ("first response", f"{_seconds(r.first)}   target: all <= 5 s: {mark(first_ok)}"),
        ("complete (all events)", _seconds(r.complete)),
        ("stream endings", ", ".join(f"{k} {v}" for k, v in sorted(r.codes.items()))
         + f"   target: all OK: {mark(r.met['every subscriber completed'])}"),
        ("events lost / duplicated / unexpected",
         f"{r.missing} / {r.duplicates} / {r.unexpected} (streams with a loss:"
         f" {r.lost_streams}; slow-consumer resumes {r.resumes})   target: 0:"
         f" {mark(r.met['no event lost, duplicated or unexpected'])}"),
        ("events not delivered to failed streams", str(r.undelivered)),
        ("failed streams ended", _seconds(r.failed_ended)),
        ("GetUser during the storm", f"{_millis(r.getuser)}, failed {r.getuser_failed}"
         f"   target: p99 < 100 ms: {mark(r.met['GetUser p99 under 100 ms'])}"),
        ("GetUser before the storm", _millis(r.getuser_baseline)),
    ]
    rows += [(f"CPU {k}", f"{v:.0f}%") for k, v in r.cpu.items()]
    rows += [("stream error", e) for e in r.errors]
    rows += [("hub log", line) for line in r.hub_log]
    print_table("resume storm", rows, out)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_sub", "_probe"):
        return _worker(argv)
    parser = argparse.ArgumentParser(prog="python -m loadtest.storm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=900)
    parser.add_argument("--back", type=int, default=2000,
                        help="events written after the subscribers' token")
    parser.add_argument("--workers", type=int, default=3, help="subscriber client processes")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--probe-users", type=int, default=200)
    parser.add_argument("--probe-interval", type=float, default=0.02,
                        help="seconds between the probe's GetUser calls (open loop)")
    parser.add_argument("--baseline", type=float, default=1.0,
                        help="seconds of GetUser probing before the storm")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds every stream gets to complete")
    parser.add_argument("--preconnect", action="store_true",
                        help="connect every subscriber before the storm (default: at it, as"
                             " clients reconnecting to a surviving instance do)")
    parser.add_argument("--redis-url", default="", help="use this Redis (default: start one)")
    parser.add_argument("--hub-flag", action="append", default=[],
                        help="extra `hub serve` flag (repeat; e.g. --hub-flag=--redis-pool-size"
                             " --hub-flag=128)")
    parser.add_argument("--verify-every", type=int, default=1, metavar="N",
                        help="check every event's user on every Nth stream only (the others"
                             " count events up to the end token): lighter clients")
    parser.add_argument("--empty", action="store_true",
                        help="streams replay nothing: Subscribe(snapshot of a user nobody has)"
                             " until snapshot_complete; what the streams cost without events")
    parser.add_argument("--ceiling", action="store_true",
                        help="then the same storm on a bare grpc.aio server (each stream"
                             " answered once): what any grpc.aio server does on this machine")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--py-spy", type=Path, metavar="FILE",
                        help="record the hub with py-spy during the storm (collapsed stacks;"
                             " `pip install py-spy`)")
    parser.add_argument("--py-spy-native", action="store_true",
                        help="with --py-spy: native (C) frames too")
    args = parser.parse_args(argv)
    if min(args.subscribers, args.back, args.workers, args.verify_every) < 1:
        parser.error("--subscribers, --back, --workers and --verify-every must be at least 1")
    args.workers = min(args.workers, args.subscribers)
    try:
        report = asyncio.run(run(args))
    except BenchError as exc:
        print(f"storm could not run: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(_nan_to_none({**asdict(report), "ok": report.ok}),
                                        indent=2))
    return 0 if report.ok else 1


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.storm")
    roles = parser.add_subparsers(dest="role", required=True)
    sub = roles.add_parser("_sub")
    sub.add_argument("--target", required=True)
    sub.add_argument("--streams", type=int, required=True)
    sub.add_argument("--first-channel", type=int, default=0)
    sub.add_argument("--preconnect", action="store_true")
    sub.add_argument("--raw", action="store_true")
    sub.add_argument("--empty", action="store_true")
    sub.add_argument("--verify-every", type=int, default=1)
    probe = roles.add_parser("_probe")
    probe.add_argument("--target", required=True)
    probe.add_argument("--raw", action="store_true")
    probe.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_run_sub(args) if args.role == "_sub" else _run_probe(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
