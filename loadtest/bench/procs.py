"""What every load script starts and measures: redis-server, `hub serve` subprocesses, worker
processes spoken to in JSON lines, CPU and memory of process trees, and a table printer.
Redis and the hubs are the process harness's (`harness.redis.RedisProcess`,
`harness.hub.HubProcess`), wrapped in what the load scripts ask of them.

Shared by `loadtest.bench`, `loadtest.fanout` and `loadtest.bulk_import`, so each has one copy.
Everything started here is stopped by its owner in a `finally` (or an ExitStack callback): the
scripts never leave a redis-server, hub or worker behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.hub import ROOT, HubProcess
from harness.redis import HarnessError, RedisProcess

STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
REPLY_TIMEOUT = 60.0
_LINE_LIMIT = 256 * 1024 * 1024  # a worker's stats line (latency samples) can be large
_CPU_STEP = 0.25
# Flags of every hub a load script starts. The default of 100 streams per connection refuses
# (RST_STREAM REFUSED_STREAM, seen as UNAVAILABLE) the 101st concurrent call of a busy writer
# and could not hold the idle-stream test's thousands of streams per connection.
HUB_FLAGS = ("--max-concurrent-streams", "10000")
_CPU_SAMPLES = 4_000  # bounds a meter (~17 min at one sample per 0.25 s)


class BenchError(Exception):
    """The benchmark could not run or its result is wrong; the message says why."""


# -- machine ----------------------------------------------------------------------------------


def nproc() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process, None once it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def _tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants (a `hub serve --workers N` supervisor has N children)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_seconds(pid: int) -> float | None:
    total, seen = 0.0, False
    for proc in _tree(pid):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
            seen = True
    return total if seen else None


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants."""
    total = 0
    for proc in _tree(pid):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


# -- tables -----------------------------------------------------------------------------------


def print_table(title: str, rows: Iterable[tuple[str, str]], out: TextIO) -> None:
    """A title, then `label  value` rows with the labels aligned."""
    rows = list(rows)
    width = max(len(label) for label, _ in rows)
    print(title, file=out)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}", file=out)


def tail(log: Path, lines: int = 20, what: str = "hub log") -> str:
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no {what})"
    return f"{what} (last lines):\n" + "\n".join(f"  {line}" for line in text) if text \
        else f"({what} empty)"


def log_summary(log: Path) -> list[str]:
    """A hub's log (WARNING and up) in counts: records per level, access-log endings per
    method and status, and each distinct exception line of a traceback."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    counts: Counter[str] = Counter()
    for line in lines:
        parts = line.split(" ", 4)  # date, time, level, logger, message
        if len(parts) == 5 and parts[2] in ("WARNING", "ERROR", "CRITICAL"):
            if parts[3] == "hub.access":
                method, _, rest = parts[4].partition(" ")
                counts[f"{parts[2]} access {method.rsplit('/', 1)[-1]} {rest.split(' ')[0]}"] += 1
            else:
                counts[f"{parts[2]} {parts[3]}: {parts[4][:100]}"] += 1
        elif line[:1].isalpha() and ("Error" in line or "Exception" in line) and ":" in line:
            counts[f"exception {line[:160]}"] += 1
    return [f"{n} x {what}" for what, n in counts.most_common(10)]


# -- redis-server -----------------------------------------------------------------------------


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway redis-server on a free loopback port (harness.redis.RedisProcess): no RDB,
    no AOF, nothing kept."""
    server = RedisProcess(workdir)
    try:
        server.start()
    except HarnessError as exc:
        server.kill()
        raise BenchError(str(exc)) from None
    assert server.proc is not None
    return server.proc, server.url


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a hub drains, idle by now), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- hubs -------------------------------------------------------------------------------------


@dataclass
class Hub:
    """A hub of a load script: its harness process, the name its rows and CPU labels use
    (A, B, ...), and its worker processes (`hub serve --workers`)."""

    name: str
    process: HubProcess
    workers: int = 1

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.process.proc is not None, "not started"
        return self.process.proc

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def log(self) -> Path:
        return self.process.log

    @property
    def target(self) -> str:
        return self.process.target


@functools.cache
def serve_help(source: Path = ROOT) -> str:
    """`hub serve --help` of a checkout (empty if it cannot say): which flags it has."""
    try:
        done = subprocess.run([sys.executable, "-m", "hub", "serve", "--help"], cwd=source,
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def hub_supports_workers() -> bool:
    """Whether this checkout's `hub serve` has --workers (N processes on one port)."""
    return "--workers" in serve_help()


def start_hub(name: str, redis_url: str, workdir: Path, extra_env: Mapping[str, str] = {},
              flags: Sequence[str] = HUB_FLAGS, workers: int = 1, log_name: str = "",
              source: Path = ROOT) -> Hub:
    """`python -m hub serve` (harness.hub.HubProcess) of the checkout `source` on a free port
    with its log (stdout and stderr) in workdir/hub-{log_name or name}/; wait_hub waits until
    it serves. The write rate limit is off (HUB_WRITE_RATE=0): a load test measures the
    server, not its throttle."""
    args = ["--shutdown-grace", "2", *flags]
    if workers != 1:
        args += ["--workers", str(workers)]
    process = HubProcess(workdir / f"hub-{log_name or name}", redis_url, args=args,
                         source=source,
                         env={"HUB_LOG_LEVEL": "WARNING", "HUB_WRITE_RATE": "0", **extra_env})
    process.spawn()
    return Hub(name, process, workers)


async def wait_serving(channel: grpc.aio.Channel, proc: subprocess.Popen[bytes],
                       service: str = "user.v1.UserSyncService") -> None:
    """Until `service`'s health is SERVING (for the Sync service: the live feed is ready)."""
    # types-grpcio-health-checking declares HealthStub without its methods.
    health: Any = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    status = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"hub exited with code {proc.returncode} while starting")
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as err:
            status = err.code().name
        await asyncio.sleep(0.05)
    raise BenchError(f"hub not SERVING after {STARTUP_TIMEOUT:.0f}s (last health: {status})")


async def wait_hub(hub: Hub) -> None:
    """Until every worker of the hub answers SERVING: the harness's readiness wait, then, with
    --workers N, until N processes of the hub's tree listen on its port (the supervisor only
    reserves it) and several fresh connections in a row (which the kernel spreads over the
    workers) found SERVING."""
    try:
        await hub.process.await_serving(STARTUP_TIMEOUT)
    except HarnessError as exc:  # its first line; the callers add the log's tail
        raise BenchError(str(exc).splitlines()[0].rstrip(":")) from None
    if hub.workers == 1:
        return
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while hub.workers > 1 and listeners(hub.proc.pid, hub.port) < hub.workers:
        if hub.proc.poll() is not None:
            raise BenchError(f"hub exited with code {hub.proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise BenchError(f"hub {hub.name}: {listeners(hub.proc.pid, hub.port)} of"
                             f" {hub.workers} workers listening after {STARTUP_TIMEOUT:.0f}s")
        await asyncio.sleep(0.1)
    for n in range(4 * hub.workers):
        # A local subchannel pool: each probe gets its own connection.
        async with grpc.aio.insecure_channel(hub.target, options=[
                ("grpc.use_local_subchannel_pool", 1), ("loadtest.probe", n)]) as channel:
            await wait_serving(channel, hub.proc)


def listeners(pid: int, port: int) -> int:
    """Processes of the tree with a listening TCP socket on `port`."""
    count = 0
    for proc in _tree(pid):
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in proc.net_connections(kind="tcp")):
                count += 1
    return count


# -- worker processes -------------------------------------------------------------------------


class Child:
    """A worker process (`loadtest._subscriber` or `loadtest.bench.clients`) spoken to in
    JSON lines: commands on its stdin, replies on its stdout, its stderr in a log file."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    @classmethod
    async def start(cls, name: str, workdir: Path, module: str, *argv: str) -> Child:
        log = workdir / f"{name.replace(' ', '-')}.log"
        with log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, *argv,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                cwd=ROOT, limit=_LINE_LIMIT,
            )
        return cls(name, proc, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await self.proc.stdin.drain()

    async def recv(self, within: float = REPLY_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        except TimeoutError:
            raise BenchError(f"{self.name}: no reply within {within:.0f}s") from None
        if not line:
            await asyncio.wait_for(self.proc.wait(), 5)
            raise BenchError(f"{self.name} exited with code {self.proc.returncode}\n"
                             f"{tail(self.log, what='its log')}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send(cmd="stop")
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Children:
    """Every worker started, so that each is stopped whatever happens."""

    def __init__(self, workdir: Path, module: str = "loadtest._subscriber") -> None:
        self.workdir = workdir
        self.module = module
        self.all: list[Child] = []

    async def start(self, name: str, *argv: str, module: str | None = None) -> Child:
        child = await Child.start(name, self.workdir, module or self.module, *argv)
        self.all.append(child)
        return child

    async def ready(self, children: list[Child],
                    within: float = REPLY_TIMEOUT) -> list[dict[str, Any]]:
        replies = await asyncio.gather(*(c.recv(within) for c in children))
        for child, reply in zip(children, replies, strict=True):
            if not reply.get("ready"):
                raise BenchError(f"{child.name} not ready: {reply.get('errors')}")
        return list(replies)

    async def close(self, children: list[Child] | None = None) -> None:
        chosen = self.all if children is None else children
        await asyncio.gather(*(c.close() for c in chosen), return_exceptions=True)
        self.all = [c for c in self.all if c not in chosen]


# -- CPU --------------------------------------------------------------------------------------


def _system_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot."""
    t = psutil.cpu_times()
    total = sum(t)
    # Guest time is already counted in user; idle and iowait are not busy.
    total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return total - t.idle - getattr(t, "iowait", 0.0), total


_Sample = tuple[float, dict[str, float], tuple[float, float]]


class CpuMeter:
    """Samples the CPU time of labelled process trees (and of the machine) every 0.25 s.

    Labels in `clients` are the load generators: percent() sums them as "clients (sum)" and
    names the busiest, which is how a reader sees whether the clients were the bottleneck.
    Labels in `trees` count their descendants too (a hub with --workers); the others count
    one process (the harness is everyone's parent).
    """

    def __init__(self, pids: Mapping[str, int], clients: Iterable[str] = (),
                 trees: Iterable[str] = ()) -> None:
        self.pids = dict(pids)
        self.clients = set(clients)
        self.trees = set(trees)
        self.samples: list[_Sample] = []

    def snapshot(self) -> _Sample:
        cpu = {label: tree_cpu_seconds(pid) if label in self.trees else cpu_seconds(pid)
               for label, pid in self.pids.items()}
        return time.time(), {k: v for k, v in cpu.items() if v is not None}, _system_busy()

    async def run(self) -> None:
        while len(self.samples) < _CPU_SAMPLES:
            self.samples.append(self.snapshot())
            await asyncio.sleep(_CPU_STEP)

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.samples.append(self.snapshot())

    def percent(self, start: float, end: float) -> dict[str, float]:
        """% of one core per process tree between the samples nearest to start and end, plus
        `system busy` as % of all cores."""
        if len(self.samples) < 2:
            return {}
        a = min(self.samples, key=lambda s: abs(s[0] - start))
        b = min(self.samples, key=lambda s: abs(s[0] - end))
        if b[0] <= a[0]:  # a window shorter than the sampling step: the whole run instead
            a, b = self.samples[0], self.samples[-1]
        wall = b[0] - a[0]
        if wall <= 0:
            return {}
        out = {label: round((b[1][label] - a[1][label]) / wall * 100, 1)
               for label in self.pids if label in a[1] and label in b[1]}
        ours = sum(out.values())
        subs = [v for k, v in out.items() if k.startswith("sub ")]
        if subs:
            out["subscribers (sum)"] = round(sum(subs), 1)
        clients = [v for k, v in out.items() if k in self.clients or k.startswith("sub ")
                   or k == "writer"]
        if clients:
            out["clients (sum)"] = round(sum(clients), 1)
            out["busiest client"] = max(clients)
        busy, total = b[2][0] - a[2][0], b[2][1] - a[2][1]
        if total > 0:
            out["kernel + other processes"] = round(
                max(0.0, busy / total * nproc() * 100 - ours), 1)
            out["system busy (% of all cores)"] = round(busy / total * 100, 1)
        return out
