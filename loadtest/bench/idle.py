"""The idle section: memory per idle Sync stream, thousands of streams on one instance,
beside a raw grpc.aio server holding as many idle streams."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from loadtest import fanout
from loadtest.bench.base import CLIENTS, BenchBase, _say
from loadtest.bench.plan import IDLE_TARGET_RATIO
from loadtest.bench.procs import BenchError, Child, CpuMeter, Hub, tree_rss
from loadtest.bench.report import Row

_SETTLE_S = 8.0


class IdleSection(BenchBase):
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
