"""The latency section: write→delivery p50/p99/p99.9 at paced write rates, 20 subscribers
on 2 instances (`loadtest.fanout`'s latency step)."""

from __future__ import annotations

from dataclasses import asdict

from loadtest import fanout
from loadtest.bench.base import BenchBase, _say
from loadtest.bench.plan import LATENCY_TARGET_P50_MS, LATENCY_TARGET_P99_MS, LATENCY_TARGET_RATE
from loadtest.bench.procs import Hub
from loadtest.bench.report import ERROR, Row

# Above this rate the paced writer batches rows (see the docstring of __main__.py).
_PACED_CALLS_PER_S = 500


class LatencySection(BenchBase):
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
