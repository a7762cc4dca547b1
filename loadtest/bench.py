"""hub bench: every headline figure of hub, each beside a ceiling measured in the same run.

    .venv/bin/python -m loadtest.bench [--out bench-results] [--quick]
        [--only fanout,latency,bulk,import,getuser,idle] [--no-workers-per-core]
        [--latency-rates 200,1000,5000]

Starts its own `redis-server` (free port, no persistence) and `python -m hub serve`
subprocesses (HUB_LOG_LEVEL=WARNING, write rate limit off, 10000 streams per connection), all
on 127.0.0.1, and stops everything at the end, on an error or on Ctrl-C. Redis is flushed
before each measurement, and every hub is started fresh for it. Clients and ceilings run in
their own processes (`loadtest._subscriber`, `loadtest._bench_clients`), never in this one.

Sections (--only picks some; all of them take about 3 minutes on 2 cores, --quick about 1):

- fanout: delivered events/s with 100 Sync subscribers (4 processes) on 2 instances while a
  writer creates users as fast as it can; every subscriber must get every event. Ceiling: a
  raw grpc.aio server streaming pre-encoded SyncResponses of the same batch size to the same
  subscriber code.
- latency: write->delivery p50/p99/p99.9 at paced write rates (default 200, 1000 and 5000/s)
  with 20 subscribers on 2 instances. Above 500 writes/s the writer sends ImportUsers
  calls of rate/500 rows (one Python process cannot pace thousands of unary calls a second);
  the achieved rate is reported beside the target.
- bulk: BulkCreateUsers users/s, one row per message, one stream. Ceilings: a raw grpc.aio
  client stream of the same messages (counted, not parsed), and pipelined Redis writes of
  the same records (HSETNX, HSET, ZADD, XADD per user).
- import: ImportUsers users/s (1000 rows per message, one stream, no passwords), against the
  pipelined-Redis ceiling. Both verify ZCARD hub:ids against what the hub acknowledged.
- getuser: GetUser requests/s from concurrent client loops. Ceiling: a raw grpc.aio unary
  echo of a pre-encoded User, called with the same serializers.
- idle: memory per idle Sync stream with 10000 open streams on one instance (4 processes x 10
  connections), each subscribed to a user nobody writes: RSS of the settled hub after minus
  before (taken after a warm-up of a few streams), over the streams. Ceiling: a raw grpc.aio
  server holding as many idle bidi streams, opened and measured the same way.

fanout and getuser run once with 1 worker per instance and once with one per core (`hub serve
--workers N`), when this checkout's `hub serve` has --workers (otherwise those rows say
"skipped"). The getuser ceiling runs as many raw server processes on one port (SO_REUSEPORT);
the fanout ceiling is one raw process, measured once. bulk, import and idle use 1 worker: one
client stream lands on one worker, and the idle figure is one process's memory.

bulk, import and getuser are short runs that one busy moment on a shared machine moves by a
third: each side (hub and ceiling) runs 3 times (getuser: 2) and its best run counts; the note
lists every run's rate.

Every row carries the CPU the load generators used (sum, and the busiest one process) and how
busy the machine was: a client process near 100% of a core, or a machine with no idle CPU,
means the figure is the harness's rather than the hub's.

Writes OUT/bench.json, OUT/bench.md (the table, also printed) and OUT/latency.png. Exit status
0 when every measurement was made with no loss, whether or not targets were met; 1 when a
measurement could not be made or events were lost (the table says which, with the message);
130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc.aio
import redis

from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_service_pb2_grpc as pb_grpc
from loadtest import fanout
from loadtest._bench_clients import build_users
from loadtest._bench_procs import (
    BenchError,
    Child,
    Children,
    CpuMeter,
    Hub,
    cpu_model,
    free_port,
    hub_supports_workers,
    log_summary,
    nproc,
    start_hub,
    start_redis,
    stop,
    tail,
    tree_rss,
    wait_hub,
)
from loadtest._bench_report import ERROR, OK, SKIPPED, Row, latency_chart, markdown
from loadtest._subscriber import MAX_MESSAGE_BYTES

SECTIONS = ("fanout", "latency", "bulk", "import", "getuser", "idle")
CLIENTS = "loadtest._bench_clients"
IDS_KEY = "hub:ids"
# Targets (2-core machine) the bench lets us check; see the module docstring.
FANOUT_TARGET = 300_000.0
LATENCY_TARGET_RATE = 200.0
LATENCY_TARGET_P50_MS, LATENCY_TARGET_P99_MS = 2.0, 5.0
BULK_TARGET_RATIO = 0.70
IMPORT_TARGET = 50_000.0
GETUSER_TARGET_RATIO = 0.70
IDLE_TARGET_RATIO = 1.5
# Above this rate the paced writer batches rows (see the docstring).
_PACED_CALLS_PER_S = 500
_SETTLE_S = 8.0

T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """How big each measurement is; `--quick` shrinks every one of them."""

    fanout_duration: float = 10.0
    fanout_ceiling_duration: float = 5.0
    subscribers: int = 100
    subscriber_processes: int = 4
    latency_rates: tuple[float, ...] = (200.0, 1000.0, 5000.0)
    latency_duration: float = 10.0
    latency_subscribers: int = 20
    bulk_users: int = 50_000
    # Client-stream runs last seconds, so one busy moment on a shared machine moves them by a
    # third: each side (hub and ceiling) is run this many times and its best run counts.
    stream_runs: int = 3
    redis_users: int = 100_000
    import_users: int = 100_000
    import_rows: int = 1000
    getuser_duration: float = 8.0
    getuser_runs: int = 2  # best of, as stream_runs
    getuser_users: int = 1000
    getuser_clients: int = 2  # processes
    getuser_concurrency: int = 32  # call loops per process
    getuser_channels: int = 8  # connections per process (spread over --workers by the kernel)
    idle_streams: int = 10_000
    idle_clients: int = 4  # processes
    idle_channels: int = 10  # connections per process
    drain_timeout: float = 30.0


QUICK = Plan(
    fanout_duration=1.5, fanout_ceiling_duration=1.0, latency_rates=(200.0, 2000.0),
    latency_duration=1.5, bulk_users=3_000, redis_users=20_000, import_users=20_000,
    import_rows=500, getuser_duration=1.5, getuser_users=200, idle_streams=500,
    idle_clients=2, idle_channels=4, drain_timeout=15.0, stream_runs=1,
    getuser_runs=1,
)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else \
        list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; known:"
                     f" {', '.join(SECTIONS)}")
    plan = QUICK if args.quick else Plan()
    if args.latency_rates:
        try:
            rates = tuple(float(r) for r in args.latency_rates.split(","))
        except ValueError:
            parser.error("--latency-rates: comma-separated numbers, e.g. 200,1000,5000")
        if not rates or not all(0 < r <= 10_000 for r in rates):
            parser.error("--latency-rates: each above 0 and at most 10000")
        plan = replace(plan, latency_rates=rates)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out: {exc}")
    try:
        report = run(plan, only, args.workers_per_core, quick=args.quick)
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    except BenchError as exc:  # Redis itself could not start: nothing was measured
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    return write_outputs(report, out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", default="bench-results",
        help="directory for bench.json, bench.md and latency.png (default bench-results)")
    add("--quick", action="store_true",
        help="a smoke test: every section shrunk to a few seconds")
    add("--only", default="", help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    add("--workers-per-core", action=argparse.BooleanOptionalAction, default=True,
        help="also measure fanout and getuser with one hub worker per core (needs `hub serve"
        " --workers`; default on)")
    add("--latency-rates", default="",
        help="comma-separated paced write rates of the latency section (default 200,1000,5000)")
    return parser


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[Row]
    machine: dict[str, Any]
    settings: dict[str, Any]
    latency_curve: list[dict[str, Any]]
    hub_logs: dict[str, list[str]]
    notes: list[str]
    seconds: float


def run(plan: Plan, only: list[str], per_core: bool, quick: bool = False) -> Report:
    """Starts Redis, runs each chosen section (a failing one becomes error rows), stops
    everything; BenchError only when Redis itself cannot start."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hub-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        redis_proc, redis_url = start_redis(workdir)
        stack.callback(stop, redis_proc)
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
        stack.callback(client.close)
        bench = Bench(plan, workdir, redis_proc, redis_url, client, per_core)
        asyncio.run(bench.run(only))
        info: dict[str, Any] = client.info("server")
    machine = {"nproc": nproc(), "cpu": cpu_model(), "python": platform.python_version(),
               "redis_version": str(info.get("redis_version", "?")),
               "platform": platform.platform()}
    settings = {**asdict(plan), "quick": quick, "sections": only,
                "workers_per_core": per_core, "multi_worker": bench.multi_worker_note,
                "section_seconds": bench.seconds}
    return Report(bench.rows, machine, settings, bench.curve, bench.hub_logs, bench.notes(),
                  round(time.monotonic() - started, 1))


class Bench:
    """One run: the shared Redis, the hubs and processes of the current measurement, and
    the rows so far."""

    def __init__(self, plan: Plan, workdir: Path, redis_proc: subprocess.Popen[bytes],
                 redis_url: str, redis_client: redis.Redis, per_core: bool) -> None:
        self.plan = plan
        self.workdir = workdir
        self.redis_proc = redis_proc
        self.redis_url = redis_url
        self.redis = redis_client
        self.rows: list[Row] = []
        self.curve: list[dict[str, Any]] = []
        self.hub_logs: dict[str, list[str]] = {}
        self.seconds: dict[str, float] = {}  # per section
        self.cores = nproc()
        self.multi_worker = per_core and self.cores > 1 and hub_supports_workers()
        if not per_core:
            self.multi_worker_note = "off (--no-workers-per-core)"
        elif self.cores == 1:
            self.multi_worker_note = "one core: 1 worker is one per core"
        elif not self.multi_worker:
            self.multi_worker_note = "`hub serve` has no --workers in this checkout"
        else:
            self.multi_worker_note = f"on: {self.cores} workers per instance"
        self._hub_serial = 0
        self._redis_ceiling: tuple[dict[str, Any] | None, str] | None = None

    async def run(self, only: list[str]) -> None:
        steps: dict[str, Callable[[], Awaitable[None]]] = {
            "fanout": self.run_fanout, "latency": self.run_latency, "bulk": self.run_bulk,
            "import": self.run_import, "getuser": self.run_getuser, "idle": self.run_idle,
        }
        for n, name in enumerate(only, 1):
            _say(f"[{n}/{len(only)}] {name}")
            before, started = len(self.rows), time.monotonic()
            try:
                await steps[name]()
            except Exception as exc:  # a bug in a section must not lose the other sections
                traceback.print_exc()
                self.rows.append(Row(name, name, status=ERROR,
                                     error=f"{type(exc).__name__}: {exc}"))
            if len(self.rows) == before:
                self.rows.append(Row(name, name, status=ERROR, error="no figure was produced"))
            self.seconds[name] = round(time.monotonic() - started, 1)
            _say(f"  ({self.seconds[name]:.0f} s)")

    def notes(self) -> list[str]:
        out = [f"Workers per core: {self.multi_worker_note}."]
        for label, lines in self.hub_logs.items():
            if lines:
                out.append(f"hub log ({label}): " + "; ".join(lines[:5]))
        return out

    def worker_counts(self) -> list[int]:
        return [1, self.cores] if self.multi_worker else [1]

    def skipped_per_core(self, section: str, measurement: str) -> None:
        if self.cores > 1 and not self.multi_worker:
            self.rows.append(Row(section, measurement, workers=self.cores, status=SKIPPED,
                                 note=f"skipped: {self.multi_worker_note}"))

    async def attempt(self, label: str, coro: Awaitable[T]) -> tuple[T | None, str]:
        """(result, "") or (None, why): a failed half of a measurement becomes an error in
        its row, never an exception that loses the section's other figures."""
        try:
            return await coro, ""
        except BenchError as exc:
            message = str(exc)
        except grpc.aio.AioRpcError as err:
            message = f"{err.code().name}: {err.details()}"
        except Exception as exc:
            traceback.print_exc()
            message = f"{type(exc).__name__}: {exc}"
        _say(f"  {label}: ERROR {message.splitlines()[0] if message else ''}")
        return None, message

    # -- processes ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def hubs(self, label: str, count: int = 1, workers: int = 1,
                   extra_env: dict[str, str] | None = None) -> AsyncIterator[list[Hub]]:
        """`count` fresh hubs on a flushed Redis, stopped (and their logs summarized) after."""
        await asyncio.to_thread(self.redis.flushall)
        hubs: list[Hub] = []
        try:
            for name in "ABCD"[:count]:
                self._hub_serial += 1
                hubs.append(start_hub(name, self.redis_url, self.workdir, extra_env or {},
                                      workers=workers, log_name=f"{self._hub_serial}-{name}"))
            try:
                await asyncio.gather(*(wait_hub(h) for h in hubs))
                yield hubs
            except BenchError as exc:
                tails = "\n".join(tail(h.log, 8, f"hub {h.name} log") for h in hubs)
                raise BenchError(f"{exc}\n{tails}") from None
        finally:
            await asyncio.gather(*(asyncio.to_thread(stop, h.proc) for h in hubs))
            lines = [f"hub {h.name}: {line}" for h in hubs for line in log_summary(h.log)]
            if lines:
                self.hub_logs[label] = lines

    @contextlib.asynccontextmanager
    async def children(self) -> AsyncIterator[Children]:
        children = Children(self.workdir)
        try:
            yield children
        finally:
            await children.close()

    async def raw_servers(self, children: Children, count: int,
                          *argv: str) -> tuple[str, list[Child]]:
        """`count` raw ceiling servers on one port (SO_REUSEPORT when more than one)."""
        port = free_port()
        flags = ["--reuseport"] if count > 1 else []
        servers = [await children.start(f"raw server {n + 1}", "raw-server", "--port", str(port),
                                        *flags, *argv) for n in range(count)]
        await children.ready(servers)
        return f"127.0.0.1:{port}", servers

    def base_pids(self, hubs: list[Hub]) -> dict[str, int]:
        return {**fanout.hub_pids(hubs), "redis": self.redis_proc.pid, "harness": os.getpid()}

    # -- fanout -------------------------------------------------------------------------------

    def _fanout_args(self) -> argparse.Namespace:
        p = self.plan
        return fanout._parser().parse_args([
            "--duration", str(p.fanout_duration),
            "--ceiling-duration", str(p.fanout_ceiling_duration),
            "--subscribers", str(p.subscribers), "--workers", str(p.subscriber_processes),
            "--latency-subscribers", str(p.latency_subscribers),
            "--drain-timeout", str(p.drain_timeout),
        ])

    async def run_fanout(self) -> None:
        args = self._fanout_args()
        name = f"fan-out events/s, {args.subscribers} subscribers on 2 instances"
        steps: list[tuple[int, fanout.FanoutStep | None, str]] = []
        for workers in self.worker_counts():
            _say(f"  hub run, {workers} worker(s) per instance")
            step, error = await self.attempt("hub", self._fanout_hub(args, workers))
            steps.append((workers, step, error))
        ref = next((step for _, step, _ in steps if step is not None), None)
        sample = ref.sample if ref else ("", "")
        batch = max(1, round(ref.delivery.mean_batch)) if ref else 50
        _say(f"  ceiling: raw grpc.aio server stream, {batch} events per message")
        ceiling, ceiling_error = await self.attempt(
            "ceiling", self._fanout_ceiling(args, batch, sample))
        for workers, step, error in steps:
            row = Row("fanout", name, unit="events/s", workers=workers,
                      target=f">= {FANOUT_TARGET:,.0f}/s, no loss")
            row.fail("hub", error)
            row.fail("ceiling", ceiling_error)
            if ceiling:
                row.ceiling, row.ceiling_label = ceiling[0].events_per_s, "1 raw process"
                row.details |= {"ceiling": asdict(ceiling[0]), "ceiling_cpu": ceiling[1],
                                "ceiling_message_bytes": ceiling[2]}
            if step is not None:
                d, w = step.delivery, step.writes
                problems = fanout.loss_problems("fan-out", d, w)
                row.hub = d.events_per_s
                row.met = d.events_per_s >= FANOUT_TARGET and not problems
                row.fail("loss", "; ".join(problems))
                row.note = (f"{w.created:,} creates + {w.updated:,} updates at {w.per_s:,.0f}/s;"
                            f" {d.total_events:,} events delivered, {d.expected:,} per"
                            f" subscriber, mean {d.mean_batch:.0f} per response, {d.cuts}"
                            " slow-consumer cuts (resumed)")
                row.details |= {"delivery": asdict(d), "writes": asdict(w), "cpu": step.cpu}
            row.cpu(step.cpu if step else {}, ceiling[1] if ceiling else None)
            self.rows.append(row.done())
        self.skipped_per_core("fanout", f"{name} (one worker per core)")

    async def _fanout_hub(self, args: argparse.Namespace, workers: int) -> fanout.FanoutStep:
        async with self.hubs(f"fanout {workers}w", 2, workers) as hubs, \
                self.children() as children:
            return await fanout.fanout_step(args, children, hubs, self.base_pids(hubs))

    async def _fanout_ceiling(self, args: argparse.Namespace, batch: int,
                              sample: tuple[str, str]) -> tuple[Any, dict[str, float], int]:
        async with self.children() as children:
            return await fanout.ceiling_step(args, children, batch, sample,
                                             {"harness": os.getpid()})

    # -- latency ------------------------------------------------------------------------------

    async def run_latency(self) -> None:
        p = self.plan
        async with self.hubs("latency", 2, 1) as hubs:
            for rate in p.latency_rates:
                rows = max(1, round(rate / _PACED_CALLS_PER_S)) if rate > _PACED_CALLS_PER_S \
                    else 1
                name = (f"write→delivery latency at {rate:,.0f} writes/s,"
                        f" {p.latency_subscribers} subscribers on 2 instances")
                _say(f"  {rate:,.0f} writes/s ({rows} row(s) per call)")
                step, error = await self.attempt("hub", self._latency_rate(hubs, rate, rows))
                if step is None:
                    self.rows.append(Row("latency", name, unit="ms", workers=1, status=ERROR,
                                         error=error))
                    continue
                self._latency_row(name, rate, rows, step)

    async def _latency_rate(self, hubs: list[Hub], rate: float,
                            rows: int) -> fanout.LatencyStep:
        args = self._fanout_args()
        args.latency_rate, args.latency_batch = rate, rows
        args.latency_duration = self.plan.latency_duration
        async with self.children() as children:
            return await fanout.latency_step(args, children, hubs, self.base_pids(hubs))

    def _latency_row(self, name: str, rate: float, rows: int, step: fanout.LatencyStep) -> None:
        ms = fanout.percentiles(step.samples)
        problems = fanout.loss_problems("latency", step.delivery, step.writes)
        targeted = rate == LATENCY_TARGET_RATE
        row = Row("latency", name, unit="ms", workers=1, hub=ms.get("p99"))
        if ms.get("samples"):
            row.hub_text = (f"p50 {ms['p50']:.2f} / p99 {ms['p99']:.2f} /"
                            f" p99.9 {ms['p99.9']:.2f} ms")
        if targeted:
            row.target = f"p50 <= {LATENCY_TARGET_P50_MS:g} ms, p99 <= {LATENCY_TARGET_P99_MS:g} ms"
            row.met = bool(ms.get("samples")) and ms["p50"] <= LATENCY_TARGET_P50_MS \
                and ms["p99"] <= LATENCY_TARGET_P99_MS
        row.cpu(step.cpu)
        w = step.writes
        row.note = (f"achieved {w.per_s:,.0f} writes/s of {rate:,.0f} ({w.created:,} creates,"
                    f" {rows} row(s) per call, writer up to {w.max_late_ms:,.0f} ms late);"
                    f" max {ms.get('max', 0):.1f} ms over {int(ms.get('samples', 0)):,} deliveries")
        if not ms.get("samples"):
            problems.append("no latency sample")
        row.fail("loss", "; ".join(problems + w.errors[:2]))
        row.details = {"percentiles_ms": ms, "writes": asdict(w),
                       "delivery": asdict(step.delivery), "cpu": step.cpu,
                       "rows_per_call": rows}
        self.rows.append(row.done())
        self.curve.append({"rate": rate, "achieved_rate": w.per_s, "rows_per_call": rows,
                           "p50": ms.get("p50"), "p99": ms.get("p99"),
                           "p99.9": ms.get("p99.9"), "max": ms.get("max"),
                           "samples": ms.get("samples", 0)})

    # -- bulk and import ----------------------------------------------------------------------

    async def run_bulk(self) -> None:
        p = self.plan
        name = f"BulkCreateUsers users/s (1 row per message, 1 stream, {p.bulk_users:,} users)"
        _say("  hub BulkCreateUsers")
        hub, error = await self.attempt(
            "hub", self._best(lambda: self._stream_hub("bulk", p.bulk_users)))
        _say("  ceiling: raw grpc.aio client stream")
        raw, raw_error = await self.attempt(
            "ceiling", self._best(lambda: self._stream_raw(p.bulk_users)))
        _say("  ceiling: pipelined Redis writes")
        redis_ceiling, redis_error = await self.redis_ceiling()
        row = Row("bulk", name, unit="users/s", workers=1,
                  target=f">= {BULK_TARGET_RATIO:.0%} of the raw client stream")
        row.fail("hub", error)
        row.fail("ceiling", raw_error)
        if raw:
            row.ceiling, row.ceiling_label = raw["per_s"], "raw client stream, msg/s"
        row.details = {"hub": hub, "raw": raw}
        if hub:
            row.hub, row.note = hub["per_s"], hub["note"]
        row.cpu(hub["cpu"] if hub else {}, raw["cpu"] if raw else None)
        row.done()
        if row.ratio is not None:
            row.met = row.ratio >= BULK_TARGET_RATIO
        self.rows.append(row)
        second = Row("bulk", "BulkCreateUsers against pipelined Redis writes of the same"
                     " records", unit="users/s", workers=1)
        second.fail("hub", error)
        second.fail("Redis ceiling", redis_error)
        if hub:
            second.hub = hub["per_s"]
        if redis_ceiling:
            second.ceiling, second.ceiling_label = redis_ceiling["per_s"], "pipelined Redis"
            second.note = redis_ceiling["note"]
        second.cpu(hub["cpu"] if hub else {}, redis_ceiling["cpu"] if redis_ceiling else None)
        second.details = {"redis_pipeline": redis_ceiling}
        self.rows.append(second.done())

    async def run_import(self) -> None:
        p = self.plan
        name = (f"ImportUsers users/s ({p.import_rows} rows per message, 1 stream,"
                f" {p.import_users:,} users, no passwords)")
        _say("  hub ImportUsers")
        hub, error = await self.attempt(
            "hub", self._best(lambda: self._stream_hub("import", p.import_users)))
        _say("  ceiling: pipelined Redis writes")
        redis_ceiling, redis_error = await self.redis_ceiling()
        row = Row("import", name, unit="users/s", workers=1,
                  target=f">= {IMPORT_TARGET:,.0f} users/s")
        row.fail("hub", error)
        row.fail("Redis ceiling", redis_error)
        if hub:
            row.hub, row.note = hub["per_s"], hub["note"]
            row.met = hub["per_s"] >= IMPORT_TARGET
        if redis_ceiling:
            row.ceiling, row.ceiling_label = redis_ceiling["per_s"], "pipelined Redis"
        row.cpu(hub["cpu"] if hub else {}, redis_ceiling["cpu"] if redis_ceiling else None)
        row.details = {"hub": hub, "redis_pipeline": redis_ceiling}
        self.rows.append(row.done())

    async def _best(
        self, run: Callable[[], Awaitable[dict[str, Any]]], times: int | None = None
    ) -> dict[str, Any]:
        """The best of `times` (default plan.stream_runs) runs, each of which must succeed;
        every run's rate is noted."""
        runs = [await run() for _ in range(times or self.plan.stream_runs)]
        best = max(runs, key=lambda r: r["per_s"])
        rates = ", ".join(f"{r['per_s']:,.0f}" for r in runs)
        note = best.get("note", "")
        return {**best, "runs": [r["per_s"] for r in runs],
                "note": f"{note}; best of {len(runs)} runs ({rates}/s)".lstrip("; ")}

    async def _stream_hub(self, kind: str, users: int) -> dict[str, Any]:
        """One client stream of `users` pre-built rows into a fresh hub; verified against the
        response and against Redis."""
        async with self.hubs(kind, 1, 1) as hubs, self.children() as children:
            client = await children.start(
                f"{kind} client", "stream", "--target", hubs[0].target, "--kind", kind,
                "--users", str(users), "--rows", str(self.plan.import_rows), module=CLIENTS)
            await children.ready([client], within=120)
            reply, cpu = await self._timed(client, {**self.base_pids(hubs), "client": client.pid},
                                           hubs)
            if "error" in reply:
                raise BenchError(f"{kind}: {reply['error']}")
            stored = int(await asyncio.to_thread(self.redis.zcard, IDS_KEY))
        problems = []
        if reply["created_count"] != users or reply["refused"]:
            problems.append(f"acknowledged {reply['created_count']:,} of {users:,} rows,"
                            f" {reply['refused']:,} refused ({reply['first_refusal']})")
        if reply["distinct_ids"] != reply["created_count"]:
            problems.append(f"{reply['distinct_ids']:,} distinct ids for"
                            f" {reply['created_count']:,} created")
        if stored != reply["created_count"]:
            problems.append(f"ZCARD {IDS_KEY} is {stored:,}, acknowledged"
                            f" {reply['created_count']:,}")
        if problems:
            raise BenchError(f"{kind}: " + "; ".join(problems))
        per_s = users / reply["seconds"]
        return {"per_s": round(per_s, 1), "seconds": round(reply["seconds"], 3), "users": users,
                "messages": reply["messages"], "stored": stored, "cpu": cpu,
                "note": f"{users:,} users in {reply['seconds']:.2f} s, {reply['messages']:,}"
                        f" messages; ZCARD {IDS_KEY} = {stored:,} = acknowledged"}

    async def _stream_raw(self, users: int) -> dict[str, Any]:
        async with self.children() as children:
            target, servers = await self.raw_servers(children, 1)
            client = await children.start(
                "raw stream client", "stream", "--target", target, "--kind", "raw",
                "--users", str(users), module=CLIENTS)
            await children.ready([client], within=120)
            reply, cpu = await self._timed(
                client, {"raw server": servers[0].pid, "client": client.pid,
                         "harness": os.getpid()}, [])
        if "error" in reply:
            raise BenchError(f"raw client stream: {reply['error']}")
        if reply["created_count"] != reply["messages"]:
            raise BenchError(f"raw client stream: counted {reply['created_count']:,} of"
                             f" {reply['messages']:,} messages")
        return {"per_s": round(reply["messages"] / reply["seconds"], 1),
                "seconds": round(reply["seconds"], 3), "messages": reply["messages"],
                "cpu": cpu}

    async def _timed(self, client: Child, pids: dict[str, int],
                     hubs: list[Hub]) -> tuple[dict[str, Any], dict[str, float]]:
        """Sends "go" and waits for the reply, with the CPU of `pids` over that window."""
        meter = CpuMeter(pids, clients=["client"], trees=fanout.hub_pids(hubs))
        async with meter.running():
            t0 = time.time()
            await client.send(cmd="go")
            reply = await client.recv(900)
            t1 = time.time()
        return reply, meter.percent(t0, t1)

    async def redis_ceiling(self) -> tuple[dict[str, Any] | None, str]:
        """Pipelined Redis writes of plan.redis_users records, measured once per run."""
        if self._redis_ceiling is None:
            self._redis_ceiling = await self.attempt("Redis ceiling", self._redis_pipeline())
        return self._redis_ceiling

    async def _redis_pipeline(self) -> dict[str, Any]:
        users = self.plan.redis_users
        await asyncio.to_thread(self.redis.flushall)
        try:
            async with self.children() as children:
                client = await children.start(
                    "redis pipeline", "redis-pipeline", "--url", self.redis_url,
                    "--users", str(users), module=CLIENTS)
                await children.ready([client], within=120)
                reply, cpu = await self._timed(
                    client, {"redis": self.redis_proc.pid, "client": client.pid,
                             "harness": os.getpid()}, [])
        finally:
            await asyncio.to_thread(self.redis.flushall)
        if reply["errors"]:
            raise BenchError(f"redis pipeline: error replies {reply['errors'][:3]}")
        if reply["ids"] != users:
            raise BenchError(f"redis pipeline: ZCARD {reply['ids']:,}, wrote {users:,}")
        per_s = users / reply["seconds"]
        return {"per_s": round(per_s, 1), "seconds": round(reply["seconds"], 3), "users": users,
                "cpu": cpu, "note": f"ceiling: {users:,} users (HSETNX, HSET, ZADD, XADD each,"
                                    " pre-encoded) in pipelines of 1000 users, 4 in flight,"
                                    f" {reply['seconds']:.2f} s"}

    # -- getuser ------------------------------------------------------------------------------

    async def run_getuser(self) -> None:
        p = self.plan
        name = (f"GetUser requests/s ({p.getuser_clients} client processes x"
                f" {p.getuser_concurrency} concurrent calls)")
        for workers in self.worker_counts():
            _say(f"  hub, {workers} worker(s)")
            hub, error = await self.attempt(
                "hub", self._best(functools.partial(self._getuser_hub, workers), p.getuser_runs))
            _say(f"  ceiling: raw grpc.aio unary echo, {workers} process(es)")
            user = hub["user"] if hub else ""
            raw, raw_error = await self.attempt(
                "ceiling", self._best(functools.partial(self._getuser_raw, workers, user),
                                      p.getuser_runs))
            row = Row("getuser", name, unit="req/s", workers=workers,
                      target=f">= {GETUSER_TARGET_RATIO:.0%} of the raw unary echo")
            row.fail("hub", error)
            row.fail("ceiling", raw_error)
            if hub:
                row.hub, row.note = hub["per_s"], hub["note"]
            if raw:
                row.ceiling = raw["per_s"]
                row.ceiling_label = f"{workers} raw process{'es' if workers > 1 else ''}"
            row.cpu(hub["cpu"] if hub else {}, raw["cpu"] if raw else None)
            row.details = {"hub": {k: v for k, v in (hub or {}).items() if k != "user"},
                           "raw": raw}
            row.done()
            if row.ratio is not None:
                row.met = row.ratio >= GETUSER_TARGET_RATIO
            self.rows.append(row)
        self.skipped_per_core("getuser", f"{name} (one worker per core)")

    async def _getuser_hub(self, workers: int) -> dict[str, Any]:
        async with self.hubs(f"getuser {workers}w", 1, workers) as hubs:
            ids, user = await self._seed_users(hubs[0].target, self.plan.getuser_users)
            result = await self._unary_load(hubs[0].target, ids, raw=False, hubs=hubs)
        if result["errors"]:
            raise BenchError(f"GetUser: {result['errors']:,} failed calls, first:"
                             f" {result['first_errors'][:2]}")
        return {**result, "user": user}

    async def _getuser_raw(self, workers: int, user: str) -> dict[str, Any]:
        async with self.children() as children:
            target, servers = await self.raw_servers(
                children, workers, *(["--user", user] if user else []))
            result = await self._unary_load(
                target, [], raw=True, hubs=[],
                extra={f"raw server {n + 1}": s.pid for n, s in enumerate(servers)})
        if result["errors"]:
            raise BenchError(f"raw echo: {result['errors']:,} failed calls, first:"
                             f" {result['first_errors'][:2]}")
        return result

    async def _seed_users(self, target: str, count: int) -> tuple[list[str], str]:
        """Creates `count` users to read; returns their ids and one of them, encoded."""
        async with grpc.aio.insecure_channel(target, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]) as channel:
            stub = pb_grpc.UserServiceStub(channel)
            response = await stub.BulkCreateUsers(iter(build_users("get", count)), timeout=60)
            if response.created_count != count:
                raise BenchError(f"seeding GetUser: created {response.created_count} of {count}")
            user = await stub.GetUser(pb.GetUserRequest(user_id=response.user_ids[0]),
                                      timeout=10)
        return list(response.user_ids), base64.b64encode(user.SerializeToString()).decode()

    async def _unary_load(self, target: str, ids: list[str], raw: bool, hubs: list[Hub],
                          extra: dict[str, int] | None = None) -> dict[str, Any]:
        p = self.plan
        async with self.children() as children:
            clients = [await children.start(
                f"unary client {n + 1}", "unary", "--target", target,
                "--concurrency", str(p.getuser_concurrency),
                "--channels", str(p.getuser_channels), *(["--raw"] if raw else []),
                module=CLIENTS) for n in range(p.getuser_clients)]
            await children.ready(clients)
            pids = {**(self.base_pids(hubs) if hubs else {"harness": os.getpid()}),
                    **(extra or {}), **{c.name: c.pid for c in clients}}
            meter = CpuMeter(pids, clients=[c.name for c in clients],
                             trees=fanout.hub_pids(hubs))
            async with meter.running():
                start_at = time.time() + 0.5
                for client in clients:
                    await client.send(cmd="go", start_at=start_at, duration=p.getuser_duration,
                                      ids=ids)
                replies = await asyncio.gather(
                    *(c.recv(p.getuser_duration + 60) for c in clients))
        ok = sum(r["ok"] for r in replies)
        started = min(r["started"] for r in replies)
        ended = max(r["ended"] for r in replies)
        per_s = ok / max(ended - started, 1e-9)
        return {"per_s": round(per_s, 1), "calls": ok, "errors": sum(r["errors"] for r in replies),
                "first_errors": [e for r in replies for e in r["first_errors"]][:5],
                "p50_ms": max(r["p50_ms"] for r in replies),
                "p99_ms": max(r["p99_ms"] for r in replies),
                "cpu": meter.percent(started, ended),
                "note": f"{ok:,} calls in {ended - started:.1f} s; call latency p50"
                        f" {max(r['p50_ms'] for r in replies):.1f} ms,"
                        f" p99 {max(r['p99_ms'] for r in replies):.1f} ms"}

    # -- idle ---------------------------------------------------------------------------------

    async def run_idle(self) -> None:
        p = self.plan
        name = f"memory per idle Sync stream ({p.idle_streams:,} streams on 1 instance)"
        _say(f"  hub: {p.idle_streams:,} idle Sync streams")
        hub, error = await self.attempt("hub", self._idle_hub())
        _say(f"  ceiling: raw grpc.aio server, {p.idle_streams:,} idle streams")
        raw, raw_error = await self.attempt("ceiling", self._idle_raw())
        row = Row("idle", name, unit="KB", workers=1,
                  target=f"<= {IDLE_TARGET_RATIO:g}x the raw server's")
        row.fail("hub", error)
        row.fail("ceiling", raw_error)
        if hub:
            row.hub, row.note = hub["per_stream_kb"], hub["note"]
        if raw:
            row.ceiling, row.ceiling_label = raw["per_stream_kb"], "raw grpc.aio server"
        row.cpu(hub["cpu"] if hub else {}, raw["cpu"] if raw else None)
        row.details = {"hub": hub, "raw": raw}
        row.done()
        if row.ratio is not None:
            row.met = row.ratio <= IDLE_TARGET_RATIO
        self.rows.append(row)

    async def _idle_hub(self) -> dict[str, Any]:
        async with self.hubs("idle", 1, 1) as hubs:
            return await self._idle_run(hubs[0].target, hubs[0].proc.pid, raw=False,
                                        pids=self.base_pids(hubs), hubs=hubs)

    async def _idle_raw(self) -> dict[str, Any]:
        async with self.children() as children:
            target, servers = await self.raw_servers(children, 1)
            return await self._idle_run(target, servers[0].pid, raw=True,
                                        pids={"raw server": servers[0].pid,
                                              "harness": os.getpid()}, hubs=[])

    async def _idle_run(self, target: str, server_pid: int, raw: bool, pids: dict[str, int],
                        hubs: list[Hub]) -> dict[str, Any]:
        """Warm the server up with a few streams, close them, take its RSS; open the streams,
        let it settle, take its RSS again: the difference over the streams."""
        p = self.plan
        per = -(-p.idle_streams // p.idle_clients)
        async with self.children() as children:
            clients = [await children.start(
                f"idle client {n + 1}", "idle", "--target", target,
                "--channels", str(p.idle_channels), *(["--raw"] if raw else []),
                module=CLIENTS) for n in range(p.idle_clients)]
            await children.ready(clients)
            # Warm-up: first-call costs (imports, caches, arenas) are not per-stream costs.
            await self._idle_command(clients, "open", count=min(50, per))
            await self._idle_command(clients, "close")
            before = await _settled_rss(server_pid)
            meter = CpuMeter({**pids, **{c.name: c.pid for c in clients}},
                             clients=[c.name for c in clients], trees=fanout.hub_pids(hubs))
            async with meter.running():
                t0 = time.time()
                opened = await self._idle_command(clients, "open", count=per, timeout=180)
                t1 = time.time()
                after = await _settled_rss(server_pid)
                t2 = time.time()
            streams = sum(r["opened"] for r in opened)
            await self._idle_command(clients, "close")
        if streams != per * p.idle_clients:
            errors = [e for r in opened for e in r["errors"]]
            raise BenchError(f"opened {streams:,} of {per * p.idle_clients:,} idle streams;"
                             f" {errors[:3]}")
        per_stream = (after - before) / streams
        open_s = t1 - t0
        cpu_open = meter.percent(t0, t1)
        idle_cpu = meter.percent(t1, t2)
        server = "hub" if not raw else "raw server"
        server_label = next((k for k in pids if k.startswith("hub")), "raw server")
        retries = sum(r["retries"] for r in opened)
        reasons = sorted({x for r in opened for x in r["retry_reasons"]})
        return {"per_stream_kb": round(per_stream / 1024, 2), "streams": streams,
                "rss_before_mb": round(before / 2**20, 1), "rss_after_mb": round(after / 2**20, 1),
                "open_seconds": round(open_s, 2), "cpu": cpu_open, "idle_cpu": idle_cpu,
                "open_retries": retries, "retry_reasons": reasons[:3],
                "note": f"{server} RSS {before / 2**20:,.0f} MB -> {after / 2**20:,.0f} MB with"
                        f" {streams:,} streams ({p.idle_clients} processes x"
                        f" {p.idle_channels} connections), opened in {open_s:.1f} s"
                        + (f" ({retries} opens retried after {reasons[0]})" if retries else "")
                        + f"; {idle_cpu.get(server_label, 0):.0f}% of a core while idle"}

    async def _idle_command(self, clients: list[Child], cmd: str,
                            **fields: Any) -> list[dict[str, Any]]:
        for client in clients:
            await client.send(cmd=cmd, **fields)
        within = float(fields.get("timeout", 60)) + 30
        replies = list(await asyncio.gather(*(c.recv(within) for c in clients)))
        return replies


async def _settled_rss(pid: int) -> int:
    """The process tree's RSS once it stops moving (two readings 0.5 s apart within 0.5%),
    or after _SETTLE_S."""
    deadline = time.monotonic() + _SETTLE_S
    last = tree_rss(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = tree_rss(pid)
        if abs(now - last) <= 0.005 * max(last, 1):
            return now
        last = now
    return last


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- outputs ----------------------------------------------------------------------------------


def write_outputs(report: Report, out: Path) -> int:
    """bench.json, bench.md and latency.png in `out`, the table on stdout; the exit status."""
    failed = [r for r in report.rows if r.status == ERROR]
    code = 1 if failed else 0
    notes = [*report.notes,
             f"Run took {report.seconds:.0f} s. Figures from one machine running Redis, the"
             " hubs, the ceilings and every client at once: compare ratios, not absolutes."]
    table = markdown(report.rows, report.machine, notes)
    sections: dict[str, Any] = {}
    for row in report.rows:
        entry = sections.setdefault(row.section, {"status": OK, "errors": [], "rows": []})
        entry["rows"].append(asdict(row))
        if row.status == ERROR:
            entry["status"] = ERROR
            entry["errors"].append(f"{row.measurement}: {row.error}")
        elif row.status == SKIPPED and entry["status"] == OK and \
                all(r["status"] == SKIPPED for r in entry["rows"]):
            entry["status"] = SKIPPED
    document = {
        "version": 1, "exit_code": code, "seconds": report.seconds,
        "machine": report.machine, "settings": report.settings,
        "sections": sections, "latency_curve": report.latency_curve,
        "hub_logs": report.hub_logs,
    }
    (out / "bench.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    (out / "bench.md").write_text(table)
    latency_chart(out / "latency.png", report.latency_curve, [
        (_chart_label(r), r.ratio, _target_ratio(r), r.met) for r in report.rows
        if r.ratio is not None and r.unit != "KB" and r.status != SKIPPED])
    print(table)
    print(f"bench: wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'latency.png'}",
          file=sys.stderr)
    if failed:
        print(f"bench: {len(failed)} measurement(s) failed: "
              + "; ".join(f"{r.measurement}: {r.error.splitlines()[0] if r.error else ''}"
                          for r in failed), file=sys.stderr)
    return code


def _chart_label(row: Row) -> str:
    against = {"bulk": "raw stream" if "raw" in row.ceiling_label else "Redis",
               "import": "Redis", "fanout": "raw stream", "getuser": "raw unary"}
    return f"{row.section} {row.workers}w vs {against.get(row.section, 'ceiling')}"


def _target_ratio(row: Row) -> float | None:
    return {"bulk": BULK_TARGET_RATIO, "getuser": GETUSER_TARGET_RATIO}.get(row.section) \
        if row.target and "%" in row.target else None


if __name__ == "__main__":
    raise SystemExit(main())
