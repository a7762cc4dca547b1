"""The fanout section: delivered events/s of 100 Sync subscribers on 2 instances, every
subscriber getting every event, beside a raw grpc.aio server streaming pre-encoded
SyncResponses of the same batch size to the same subscriber code (`loadtest.fanout`'s
steps)."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from typing import Any

from loadtest import fanout
from loadtest.bench.base import BenchBase, _say
from loadtest.bench.plan import FANOUT_TARGET
from loadtest.bench.report import Row


class FanoutSection(BenchBase):
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
