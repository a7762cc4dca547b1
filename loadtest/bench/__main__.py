"""hub bench: every headline figure of hub, each beside a ceiling measured in the same run.

    .venv/bin/python -m loadtest.bench [--out bench-results] [--quick]
        [--only fanout,latency,bulk,import,getuser,idle,resync] [--no-workers-per-core]
        [--latency-rates 200,1000,5000]
    .venv/bin/python -m loadtest.bench --only access-log [--access-log-before DIR]
    .venv/bin/python -m loadtest.bench --only cluster [--cluster-replicas 1]
    .venv/bin/python -m loadtest.bench --only catchup

Starts its own `redis-server` (free port, no persistence) and `python -m hub serve`
subprocesses (HUB_LOG_LEVEL=WARNING, write rate limit off, 10000 streams per connection), all
on 127.0.0.1, and stops everything at the end, on an error or on Ctrl-C. Redis is flushed
before each measurement, and every hub is started fresh for it. Clients and ceilings run in
their own processes (`loadtest._subscriber`, `loadtest.bench.clients`), never in this one.

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
- resync: what a subscriber whose token has left the history costs when it resumes by state
  (Subscribe.catch_up = CATCH_UP_STATE) against a full snapshot (Subscribe.snapshot), on one
  hub (1 worker, --history-max-age 3) with 100,000 imported users of which 1% were changed
  after the token (90% renamed, 10% deleted) and the history then expired whole: users sent,
  SyncResponse bytes and seconds to resync_complete beside snapshot_complete's, with the
  hub's and Redis's CPU for each (best of 3, alternating). The resync must send every changed
  user exactly once (updated as EVENT_TYPE_SNAPSHOT, deleted as EVENT_TYPE_DELETED, both
  resync=true) and nothing else. The client is `loadtest.resync_probe`.
- access-log (only with --only: not in the default run): the getuser load against a
  1-worker hub with the access log off (--no-access-log), on in text, on in JSON and sampled
  (1%), all at --log-level INFO with the hub's output in a file; 3 alternating rounds, each
  state beside off, with the hub's CPU per call and the log bytes per call.
  --access-log-before DIR adds another checkout's hub (e.g. a git worktree of an older
  commit) in the same rounds: the access log's cost before and after a change.
- cluster (only with --only: not in the default run; about 2 1/2 minutes): the fanout load
  (1 worker per instance) and the latency load at 200 and 1000 writes/s against the run's
  redis-server and against a Redis Cluster of 3 masters (`--cluster-replicas`, default 0) with
  the hubs on its redis+cluster:// URL (128 partitions), each store's row beside the other's;
  the fanout load also on the single node with --partitions 128. Every row gives the CPU each
  Redis node (per master and summed) and the hubs spent per event written, and which process
  (client, hub or Redis) was at a core's limit or waited for a CPU.
- catchup (only with --only: not in the default run; 2 1/2 to 4 minutes on 2 cores, where
  the writer keeps about a third of its pace, --quick under one): the latency load at 1000
  writes/s on hubs with --subscriber-max-events 2000, without (A) and with (B) one more
  subscriber on the first instance that stops reading until 60% of the writes are made, so
  its buffer overflows and it catches up from the history, then reads everything; 2 rounds
  of A then B. Rows: the 20's p50/p99 in B beside A, over the
  whole run and over its catch-up; it must not be cut and must get every event exactly once.
  The stalled client is `loadtest.stall_probe`.

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
import contextlib
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import redis

from loadtest.bench.access_log import AccessLogSection
from loadtest.bench.base import _say
from loadtest.bench.bulk import BulkSection
from loadtest.bench.catchup import CatchupSection
from loadtest.bench.cluster import ClusterSection
from loadtest.bench.fanout import FanoutSection
from loadtest.bench.getuser import GetUserSection
from loadtest.bench.idle import IdleSection
from loadtest.bench.importing import ImportSection
from loadtest.bench.latency import LatencySection
from loadtest.bench.plan import EXTRA_SECTIONS, QUICK, SECTIONS, Plan
from loadtest.bench.procs import BenchError, cpu_model, nproc, start_redis, stop
from loadtest.bench.report import ERROR, Report, Row, write_outputs
from loadtest.bench.resync import ResyncSection


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else \
        list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS + EXTRA_SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; known:"
                     f" {', '.join(SECTIONS + EXTRA_SECTIONS)}")
    before = Path(args.access_log_before).resolve() if args.access_log_before else None
    if before is not None:
        if "access-log" not in only:
            parser.error("--access-log-before: only the access-log section uses it"
                         " (--only access-log)")
        if not (before / "hub" / "__main__.py").is_file():
            parser.error(f"--access-log-before: {before} is not a hub checkout (no"
                         " hub/__main__.py)")
    plan = QUICK if args.quick else Plan()
    if args.latency_rates:
        try:
            rates = tuple(float(r) for r in args.latency_rates.split(","))
        except ValueError:
            parser.error("--latency-rates: comma-separated numbers, e.g. 200,1000,5000")
        if not rates or not all(0 < r <= 10_000 for r in rates):
            parser.error("--latency-rates: each above 0 and at most 10000")
        plan = replace(plan, latency_rates=rates)
    if args.cluster_replicas is not None:
        if "cluster" not in only:
            parser.error("--cluster-replicas: only the cluster section uses it (--only cluster)")
        plan = replace(plan, cluster_replicas=args.cluster_replicas)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out: {exc}")
    try:
        report = run(plan, only, args.workers_per_core, quick=args.quick, before=before)
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
    add("--only", default="", help=f"comma-separated sections (default all: {','.join(SECTIONS)};"
        f" also {','.join(EXTRA_SECTIONS)}, which only --only runs)")
    add("--workers-per-core", action=argparse.BooleanOptionalAction, default=True,
        help="also measure fanout and getuser with one hub worker per core (needs `hub serve"
        " --workers`; default on)")
    add("--latency-rates", default="",
        help="comma-separated paced write rates of the latency section (default 200,1000,5000)")
    add("--access-log-before", default="", metavar="DIR",
        help="the access-log section also measures the hub of this checkout (e.g. `git"
        " worktree add /tmp/hub-old REV`) in the same rounds: the cost before and after")
    add("--cluster-replicas", type=int, choices=(0, 1), default=None,
        help="replicas per master of the cluster section's cluster (default 0: on a small"
        " machine each replica's copy of the writes takes CPU from everything measured)")
    return parser


# -- the run ----------------------------------------------------------------------------------


def run(plan: Plan, only: list[str], per_core: bool, quick: bool = False,
        before: Path | None = None) -> Report:
    """Starts Redis, runs each chosen section (a failing one becomes error rows), stops
    everything; BenchError only when Redis itself cannot start."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hub-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        redis_proc, redis_url = start_redis(workdir)
        stack.callback(stop, redis_proc)
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
        stack.callback(client.close)
        bench = Bench(plan, workdir, redis_proc, redis_url, client, per_core, before)
        asyncio.run(bench.run(only))
        info: dict[str, Any] = client.info("server")
    machine = {"nproc": nproc(), "cpu": cpu_model(), "python": platform.python_version(),
               "redis_version": str(info.get("redis_version", "?")),
               "platform": platform.platform()}
    settings = {**asdict(plan), "quick": quick, "sections": only,
                "workers_per_core": per_core, "multi_worker": bench.multi_worker_note,
                "access_log_before": str(before) if before else None,
                "section_seconds": bench.seconds}
    return Report(bench.rows, machine, settings, bench.curve, bench.hub_logs, bench.notes(),
                  round(time.monotonic() - started, 1))


class Bench(FanoutSection, LatencySection, BulkSection, ImportSection, AccessLogSection,
            GetUserSection, IdleSection, ClusterSection, ResyncSection, CatchupSection):
    """One run: every section (each a class over BenchBase, in its own module; the access-log
    section over the getuser one, whose load it reuses), run in the order --only names them."""

    async def run(self, only: list[str]) -> None:
        steps: dict[str, Callable[[], Awaitable[None]]] = {
            "fanout": self.run_fanout, "latency": self.run_latency, "bulk": self.run_bulk,
            "import": self.run_import, "getuser": self.run_getuser, "idle": self.run_idle,
            "access-log": self.run_access_log, "cluster": self.run_cluster,
            "resync": self.run_resync, "catchup": self.run_catchup,
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


if __name__ == "__main__":
    raise SystemExit(main())
