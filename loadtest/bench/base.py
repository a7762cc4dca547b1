"""What every section of the bench shares: the run's Redis, fresh hubs per measurement,
worker and raw ceiling processes, failed halves turned into row errors, best-of runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc.aio
import redis

from harness.hub import ROOT
from harness.redis import free_port
from loadtest import fanout
from loadtest.bench.plan import Plan
from loadtest.bench.procs import (
    HUB_FLAGS,
    BenchError,
    Child,
    Children,
    Hub,
    hub_supports_workers,
    log_summary,
    nproc,
    start_hub,
    stop,
    tail,
    wait_hub,
)
from loadtest.bench.report import SKIPPED, Row

CLIENTS = "loadtest.bench.clients"

T = TypeVar("T")


class BenchBase:
    """One run: the shared Redis, the hubs and processes of the current measurement, and
    the rows so far."""

    def __init__(self, plan: Plan, workdir: Path, redis_proc: subprocess.Popen[bytes],
                 redis_url: str, redis_client: redis.Redis, per_core: bool,
                 before: Path | None = None) -> None:
        self.plan = plan
        self.before = before  # another checkout whose hub the access-log section also runs
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
                   extra_env: dict[str, str] | None = None, flags: Sequence[str] = (),
                   source: Path = ROOT, redis_url: str = "",
                   flush: Callable[[], object] | None = None) -> AsyncIterator[list[Hub]]:
        """`count` fresh hubs on a flushed Redis, stopped (and their logs summarized) after;
        `flags` are added to HUB_FLAGS, `source` is the checkout they run from. `redis_url`
        and `flush` pick another store than the run's redis-server (the cluster section's
        cluster) and how it is emptied."""
        await asyncio.to_thread(flush or self.redis.flushall)
        hubs: list[Hub] = []
        try:
            for name in "ABCD"[:count]:
                self._hub_serial += 1
                hubs.append(start_hub(name, redis_url or self.redis_url, self.workdir,
                                      extra_env or {},
                                      flags=[*HUB_FLAGS, *flags], workers=workers,
                                      log_name=f"{self._hub_serial}-{name}", source=source))
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

    def base_pids(self, hubs: list[Hub],
                  redis_pids: dict[str, int] | None = None) -> dict[str, int]:
        """CpuMeter labels: the hubs, Redis (the run's redis-server, or `redis_pids`: label ->
        pid of each node, labels starting "redis") and this process."""
        redis_pids = {"redis": self.redis_proc.pid} if redis_pids is None else redis_pids
        return {**fanout.hub_pids(hubs), **redis_pids, "harness": os.getpid()}

    def _fanout_args(self) -> argparse.Namespace:
        p = self.plan
        return fanout._parser().parse_args([
            "--duration", str(p.fanout_duration),
            "--ceiling-duration", str(p.fanout_ceiling_duration),
            "--subscribers", str(p.subscribers), "--workers", str(p.subscriber_processes),
            "--latency-subscribers", str(p.latency_subscribers),
            "--drain-timeout", str(p.drain_timeout),
        ])

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


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
