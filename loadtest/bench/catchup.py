"""The catchup section: what one stalled subscriber costs the others. A subscriber whose buffer
passes --subscriber-max-events is not cut: it reads the history at its own pace and rejoins
the live feed (hub.fanout). Its catch-up must not move the healthy subscribers' latency.

The latency section's load (plan.latency_subscribers Sync streams in plan.subscriber_processes
processes, half on each of 2 hubs; a writer creating users through the first hub paced at
plan.catchup_rate writes/s for plan.catchup_duration s), on 2 hubs started fresh on the
flushed Redis with --subscriber-max-events plan.catchup_max_events, twice per round:

- A, the reference: just that.
- B: the same with one more subscriber on the first hub (`loadtest.stall_probe`, its own
  process and connection, subscribed to all users, live) that stops reading from its subscribe
  until the store holds plan.catchup_stall of the run's writes (counted in writes, not
  seconds: a writer behind its pace on a busy machine leaves the same share after it), so
  HTTP/2 flow control stalls its stream, its buffer on the hub passes the bound and the hub
  drops it; then it reads everything while the writer goes on. The history (the default
  10,000 events per partition) holds far more than the run writes, so its position never
  leaves it: it must not be cut, and it must get every user created (the store's hub:ids,
  checked against the writer's count) once, at version 1, and nothing else.

A then B, plan.catchup_rounds rounds (a busy moment on a shared machine falls on one run, not
on one side). Two rows, each the 20's write→delivery p50/p99 in B beside A (samples pooled
over the rounds), target B p99 <= CATCHUP_TARGET_RATIO x A p99: over every delivery of the
runs, and over the stalled subscriber's catch-up only: from its reading again until it had
received as many events as the slowest of the 20 (within 50 ms of writes; the window at least
1 s), the same deliveries (by index in each subscriber process's order, so the same writes)
taken from its round's A run. The notes give each round's figures, the stalled subscriber's
outcome (cut or not, events received against expected, duplicates, gaps, how far behind it
was and how long it took to catch up) and what the first hub's /metrics said (subscribers in
catch-up when it read again, catch-ups completed, slow-consumer cuts). A cut, a duplicate or
a gap, a loss among the 20, or a stalled subscriber whose buffer never overflowed (the stall
would have measured nothing) fails both rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from harness.redis import free_port
from loadtest import fanout
from loadtest.bench.base import BenchBase, _say
from loadtest.bench.plan import CATCHUP_TARGET_RATIO
from loadtest.bench.procs import (
    HUB_FLAGS,
    BenchError,
    Child,
    CpuMeter,
    Hub,
    log_summary,
    nproc,
    start_hub,
    stop,
    tail,
    wait_hub,
)
from loadtest.bench.report import Row

PROBE = "loadtest.stall_probe"
IDS_KEY = "hub:ids"
_PACED_CALLS_PER_S = 500  # as the latency section: above it the writer batches rows
_MIN_WINDOW = 1.0  # s: the shortest catch-up window the latency is taken over
_CAUGHT_UP_SLACK = 0.05  # s of writes: caught up once this close to the other subscribers
_SLOW_PACE = 0.8  # of catchup_rate: a writer below it says the machine was saturated
_POLL = 0.05  # s between the store's user counts while the stalled subscriber waits
_SETTLE = 1.0  # s the probe reads on after its last expected event (a late duplicate)
_METRICS = ("hub_catchups_completed_total", "hub_slow_consumer_disconnects_total",
            "hub_catchup_subscribers", "hub_subscriber_queued_events",
            "hub_catchup_lag_events_count", "hub_catchup_lag_events_sum")


@dataclass
class _Run:
    """One run of the load, with (B) or without (A) the stalled subscriber."""

    stalled: bool
    start_at: float
    writes: fanout.Writes
    delivery: fanout.Delivery
    cpu: dict[str, float]
    workers: list[dict[str, Any]]  # per subscriber process: samples (ms) and timeline
    samples: list[float]
    probe: dict[str, Any] = field(default_factory=dict)  # its drain reply (B)
    metrics_at_read: dict[str, float] = field(default_factory=dict)  # hub A's, B only
    metrics_after: dict[str, float] = field(default_factory=dict)
    ids: int = 0  # users in the store after the run
    caught_up: float | None = None  # when the stalled subscriber had caught up (B)
    meter: CpuMeter | None = None  # its CPU samples, for the catch-up window's
    load: tuple[float, float] = (0.0, 0.0)  # the machine's 1-minute load average, start/end


class CatchupSection(BenchBase):
    async def run_catchup(self) -> None:
        p = self.plan
        rows = max(1, round(p.catchup_rate / _PACED_CALLS_PER_S)) \
            if p.catchup_rate > _PACED_CALLS_PER_S else 1
        runs: list[tuple[_Run | None, _Run | None]] = []
        errors: list[str] = []
        for n in range(p.catchup_rounds):
            pair: list[_Run | None] = []
            for stalled in (False, True):
                _say(f"  round {n + 1}/{p.catchup_rounds}:"
                     f" {'B, one subscriber stalled' if stalled else 'A, without it'}")
                run, error = await self.attempt(
                    "catchup", self._run(stalled, rows, f"catchup {'B' if stalled else 'A'}"
                                         f" {n + 1}"))
                if error:
                    errors.append(f"round {n + 1} {'B' if stalled else 'A'}: {error}")
                pair.append(run)
            runs.append((pair[0], pair[1]))
        self.rows += _rows(p, rows, runs, errors)

    async def _run(self, stalled: bool, rows: int, label: str) -> _Run:
        p = self.plan
        flags = ["--subscriber-max-events", str(p.catchup_max_events)]
        load = os.getloadavg()[0]
        async with self._metered_hubs(label, flags) as (hubs, ports), \
                self.children() as children:
            targets = [h.target for h in hubs]
            subs = await fanout._start_subscribers(
                children, p.latency_subscribers, p.subscriber_processes, targets,
                "latency sub", "--latency")
            writer = await children.start(
                "latency writer", "writer", "--target", targets[0],
                "--rate", str(p.catchup_rate), "--rate-batch", str(rows))
            probe = await children.start("stall probe", "--target", targets[0],
                                         module=PROBE) if stalled else None
            await children.ready([*subs, writer, *([probe] if probe else [])])
            pids = {**self.base_pids(hubs), "writer": writer.pid,
                    **{c.name.removeprefix("latency "): c.pid for c in subs}}
            if probe:
                pids["stall probe"] = probe.pid
            meter = CpuMeter(pids, clients={"stall probe"}, trees=fanout.hub_pids(hubs))
            planned = int(p.catchup_rate * p.catchup_duration / rows) * rows
            async with meter.running():
                start_at = time.time() + 0.5
                await writer.send(cmd="go", start_at=start_at, duration=p.catchup_duration)
                reading = asyncio.create_task(
                    self._read_later(probe, round(planned * p.catchup_stall), ports[0],
                                     p.catchup_duration + 60)) \
                    if probe else None
                try:
                    reply = await writer.recv(p.catchup_duration + 60)
                finally:
                    at_read = await reading if reading else {}
                writes = fanout._writes(reply)
                # Every acknowledged create is in the store by now: its users are what the
                # stalled subscriber must get (the paced writer does not keep the ids).
                ids = [i.decode() for i in cast(list[bytes], await asyncio.to_thread(
                    self.redis.zrange, IDS_KEY, 0, -1))]
                stats, outcome = await asyncio.gather(
                    fanout._drain(subs, writes.created, p.drain_timeout),
                    _probe_drain(probe, ids, p.drain_timeout))
            after = await asyncio.to_thread(_scrape, ports[0])
        samples = [x for s in stats for x in s["samples"]]
        run = _Run(stalled, start_at, writes,
                   fanout._delivery(stats, writes.created, reply["started"], reply["ended"]),
                   meter.percent(reply["started"], reply["ended"]),
                   [{"samples": s["samples"], "timeline": s["timeline"]} for s in stats],
                   samples, outcome, at_read, after, len(ids))
        run.meter, run.load = meter, (load, os.getloadavg()[0])
        if outcome:
            run.caught_up = _caught_up(run, p.latency_subscribers // p.subscriber_processes,
                                       p.catchup_rate * _CAUGHT_UP_SLACK)
        return run

    async def _read_later(self, probe: Child, writes: int, metrics_port: int,
                          within: float) -> dict[str, float]:
        """Once the store holds `writes` users, the first hub's metrics (what the stall left),
        then the probe reads again. Counted in writes, not seconds: a writer that falls behind
        its pace on a busy machine still leaves the same share of the writes after it. After
        `within` s it reads anyway (a writer that failed)."""
        for _ in range(int(within / _POLL)):
            if await asyncio.to_thread(self.redis.zcard, IDS_KEY) >= writes:
                break
            await asyncio.sleep(_POLL)
        metrics = await asyncio.to_thread(_scrape, metrics_port)
        await probe.send(cmd="read")
        reply = await probe.recv()
        return {**metrics, "reading_at": float(reply["reading_at"])}

    @contextlib.asynccontextmanager
    async def _metered_hubs(self, label: str, flags: list[str]) -> AsyncIterator[
            tuple[list[Hub], list[int]]]:
        """Two fresh hubs (1 worker) on the flushed Redis, as BenchBase.hubs, each with its
        own /metrics port (hubs() gives every hub the same flags)."""
        await asyncio.to_thread(self.redis.flushall)
        hubs: list[Hub] = []
        ports: list[int] = []
        try:
            for name in "AB":
                self._hub_serial += 1
                ports.append(free_port())
                hubs.append(start_hub(
                    name, self.redis_url, self.workdir, {},
                    flags=[*HUB_FLAGS, *flags, "--metrics-port", str(ports[-1])],
                    log_name=f"{self._hub_serial}-{name}"))
            try:
                await asyncio.gather(*(wait_hub(h) for h in hubs))
                yield hubs, ports
            except BenchError as exc:
                tails = "\n".join(tail(h.log, 8, f"hub {h.name} log") for h in hubs)
                raise BenchError(f"{exc}\n{tails}") from None
        finally:
            await asyncio.gather(*(asyncio.to_thread(stop, h.proc) for h in hubs))
            lines = [f"hub {h.name}: {line}" for h in hubs for line in log_summary(h.log)]
            if lines:
                self.hub_logs[label] = lines


async def _probe_drain(probe: Child | None, ids: list[str],
                       within: float) -> dict[str, Any]:
    """The stalled subscriber's report once it has every user created (version 1), has
    ended, or `within` has passed."""
    if probe is None:
        return {}
    await probe.send(cmd="drain", expected=[[i, 1] for i in ids], timeout=within,
                     settle=_SETTLE)
    return await probe.recv(within + _SETTLE + 60)


def _scrape(port: int) -> dict[str, float]:
    """The catch-up figures of a hub's /metrics (empty if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _METRICS:
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


# -- rows -------------------------------------------------------------------------------------


def _caught_up(run: _Run, streams: int, slack: float) -> float | None:
    """When the stalled subscriber had caught up: the first of its responses after reading
    again that brought it as far as the slowest of the other subscribers then (less `slack`
    events: their counts are sampled every 0.1 s); None if it never did."""
    for t, events in run.probe.get("timeline", ()):
        others = min((fanout._count_at(w["timeline"], t) / streams for w in run.workers),
                     default=0.0)
        if events >= others - slack:
            return float(t)
    return None


def _window(run: _Run, caught_up: float | None) -> tuple[float, float] | None:
    """The stalled subscriber's catch-up, in seconds from its run's first write: from its
    reading again until it had caught up (at least _MIN_WINDOW); None if it never read."""
    read = run.probe.get("reading_at") or run.metrics_at_read.get("reading_at")
    if not read:
        return None
    return read - run.start_at, max(caught_up or 0.0, read + _MIN_WINDOW) - run.start_at


def _spans(run: _Run, window: tuple[float, float]) -> list[tuple[int, int]]:
    """Per subscriber process, which of its deliveries fell within `window` (seconds from the
    run's first write), as (first, last) indexes: its samples are in the order it received
    them, and its timeline says how many it had received when. Its streams all get every
    event, so an index range is a range of writes, which the A run of the round is measured
    over too (its writer may have kept another pace)."""
    start, end = (run.start_at + w for w in window)
    return [(round(fanout._count_at(w["timeline"], start)),
             round(fanout._count_at(w["timeline"], end))) for w in run.workers]


def _in_spans(run: _Run, spans: list[tuple[int, int]]) -> list[float]:
    return [x for worker, (first, last) in zip(run.workers, spans, strict=False)
            for x in worker["samples"][first:last]]


def _when(run: _Run, spans: list[tuple[int, int]]) -> tuple[float, float]:
    """The wall-clock times the run's subscriber processes were at `spans` (the mean over
    them of when each had received its first and its last delivery of its span)."""
    def at(timeline: list[list[float]], count: int) -> float:
        for t, c in timeline:
            if c >= count:
                return t
        return timeline[-1][0] if timeline else run.start_at
    firsts = [at(w["timeline"], f) for w, (f, _) in zip(run.workers, spans, strict=False)]
    lasts = [at(w["timeline"], t) for w, (_, t) in zip(run.workers, spans, strict=False)]
    return sum(firsts) / max(len(firsts), 1), sum(lasts) / max(len(lasts), 1)


def _hub_cpu(a: _Run, b: _Run, spans: list[tuple[int, int]]) -> str:
    """Hub A's and hub B's CPU over the catch-up's deliveries, in B and over the same
    deliveries in A (% of one core, from 0.25 s samples)."""
    out = []
    for run in (a, b):
        cpu = run.meter.percent(*_when(run, spans)) if run.meter else {}
        out.append(f"{cpu.get('hub A', math.nan):.0f} / {cpu.get('hub B', math.nan):.0f}%")
    return f"CPU of hub A / hub B: A {out[0]}, B {out[1]}"


def _per_hub(a: _Run, b: _Run, spans: list[tuple[int, int]] | None = None) -> str:
    """p99 of the subscribers on hub A (beside the stalled one, in B) and on hub B, in A and
    in B: a busy moment of the machine moves both, the catch-up's cost on its hub only hub
    A's. The first half of the subscriber processes are on hub A."""
    half = len(a.workers) // 2
    out = []
    for run in (a, b):
        whole = [(0, len(w["samples"])) for w in run.workers]
        chosen = spans or whole
        on_a = [x for w, (f, t) in zip(run.workers[:half], chosen[:half], strict=False)
                for x in w["samples"][f:t]]
        on_b = [x for w, (f, t) in zip(run.workers[half:], chosen[half:], strict=False)
                for x in w["samples"][f:t]]
        pa, pb = fanout.percentiles(on_a), fanout.percentiles(on_b)
        out.append(f"{pa.get('p99', math.nan):.1f} / {pb.get('p99', math.nan):.1f}")
    return f"p99 on hub A / hub B: A {out[0]}, B {out[1]} ms"


def _ms(ms: dict[str, float]) -> str:
    if not ms.get("samples"):
        return "no samples"
    return f"p50 {ms['p50']:.2f} / p99 {ms['p99']:.2f} ms"


def _outcome(run: _Run, max_events: int) -> tuple[str, list[str]]:
    """What the stalled subscriber of a B run went through, and what is wrong with it."""
    o, problems = run.probe, []
    if not o:
        return "no report from the stalled subscriber", ["no report from it"]
    cut = o["cut"]
    if cut:
        problems.append(f"it was cut ({o['status']})")
    if o["duplicates"]:
        problems.append(f"{o['duplicates']:,} duplicates"
                        f" (e.g. {', '.join(o['duplicate_examples'][:2])})")
    if o["gaps"]:
        problems.append(f"{o['gaps']:,} of {o['expected']:,} users never came"
                        f" (e.g. {', '.join(o['gap_examples'][:2])})")
    if o["unexpected"]:
        problems.append(f"{o['unexpected']:,} events of no user created"
                        f" (e.g. {', '.join(o['unexpected_examples'][:2])})")
    if o["expected"] != run.writes.created:
        problems.append(f"the store has {o['expected']:,} users, the writer created"
                        f" {run.writes.created:,}")
    m, after = run.metrics_at_read, run.metrics_after
    overflowed = m.get("hub_catchup_subscribers", 0) >= 1 or \
        after.get("hub_catchups_completed_total", 0) >= 1 or \
        after.get("hub_slow_consumer_disconnects_total", 0) >= 1 or cut
    if not overflowed:
        problems.append(f"its buffer never passed {max_events:,} events on the hub (no catch-up"
                        " and no cut in the hub's metrics): the stall measured nothing")
    read = o["reading_at"] - run.start_at
    took = f"caught up with the others {run.caught_up - o['reading_at']:.2f} s later" \
        if run.caught_up else "never caught up with the others"
    text = (f"{'CUT: ' + o['status'] if cut else 'not cut'}; {o['events']:,} events"
            f" ({o['unique']:,} distinct) of {o['expected']:,} expected, {o['duplicates']:,}"
            f" duplicates, {o['gaps']:,} gaps; read again {read:.1f} s into the writes,"
            f" {o['behind_at_read']:,} events behind; {took}")
    if m or after:
        text += (f"; hub A at its read: {m.get('hub_catchup_subscribers', 0):.0f} in catch-up,"
                 f" {m.get('hub_subscriber_queued_events', 0):,.0f} queued; after:"
                 f" {after.get('hub_catchups_completed_total', 0):.0f} catch-ups completed,"
                 f" {after.get('hub_slow_consumer_disconnects_total', 0):.0f} cut")
    return text, problems


def _rows(p: Any, rows_per_call: int, runs: list[tuple[_Run | None, _Run | None]],
          errors: list[str]) -> list[Row]:
    """The whole-run row and the catch-up row, each B beside A."""
    base = (f"{p.latency_subscribers} subscribers' write→delivery latency at"
            f" {p.catchup_rate:,.0f} writes/s (2 instances), one more stalled for"
            f" {p.catchup_stall:.0%} of the {p.catchup_rate * p.catchup_duration:,.0f} writes")
    target = f"B p99 <= {CATCHUP_TARGET_RATIO:g} x A p99"
    whole = Row("catchup", f"{base}: whole run", unit="ms", workers=1, target=target)
    during = Row("catchup", f"{base}: during its catch-up", unit="ms", workers=1,
                 target=target)
    a_runs = [a for a, _ in runs if a is not None]
    b_runs = [b for _, b in runs if b is not None]
    problems: list[str] = []
    outcomes: list[str] = []
    pooled: dict[str, list[float]] = {"A": [], "B": [], "A in": [], "B in": []}
    lines: dict[str, list[str]] = {"whole": [], "during": []}
    for n, (a, b) in enumerate(runs, 1):
        for side, run in (("A", a), ("B", b)):
            if run is not None:
                problems += fanout.loss_problems(f"round {n} {side}", run.delivery,
                                                 run.writes)
                problems += [f"round {n} {side}: {e}" for e in run.writes.errors[:2]]
                pooled[side] += run.samples
        if b is not None:
            text, wrong = _outcome(b, p.catchup_max_events)
            outcomes.append(f"round {n}: {text}")
            problems += [f"round {n}: {w}" for w in wrong]
        if a is None or b is None:
            continue
        lines["whole"].append(f"round {n}: A {_ms(fanout.percentiles(a.samples))},"
                              f" B {_ms(fanout.percentiles(b.samples))} ({_per_hub(a, b)})")
        window = _window(b, b.caught_up)
        if window is not None:
            spans = _spans(b, window)
            wa, wb = _in_spans(a, spans), _in_spans(b, spans)
            pooled["A in"] += wa
            pooled["B in"] += wb
            lines["during"].append(
                f"round {n}: {window[0]:.1f}-{window[1]:.1f} s into B's writes, A"
                f" {_ms(fanout.percentiles(wa))}, B {_ms(fanout.percentiles(wb))}"
                f" ({_per_hub(a, b, spans)}; {_hub_cpu(a, b, spans)})")
    writes = [r.writes for r in a_runs + b_runs]
    rate = (f"achieved {min(w.per_s for w in writes):,.0f}-{max(w.per_s for w in writes):,.0f}"
            f" writes/s of {p.catchup_rate:,.0f} ({rows_per_call} row(s) per call, writer up to"
            f" {max(w.max_late_ms for w in writes):,.0f} ms late)") if writes else ""
    slow = [w.per_s for w in writes if w.per_s < _SLOW_PACE * p.catchup_rate]
    if slow:  # the pace was not kept: the machine was short of CPU, for the hub or not
        loads = ", ".join(f"{r.load[0]:.1f}-{r.load[1]:.1f}" for r in a_runs + b_runs)
        rate += (f"; BELOW {_SLOW_PACE:.0%} OF THE PACE in {len(slow)} of {len(writes)} runs:"
                 f" the machine was saturated (1-minute load average over the runs: {loads}"
                 f" on {nproc()} cores), so these latencies are mostly the machine's")
    for row, key, label, what in (
            (whole, "whole", "without it", "every delivery of the runs"),
            (during, "during", "the same writes without it",
             "the deliveries from its reading again until it had caught up with them (at"
             f" least {_MIN_WINDOW:g} s)")):
        a_ms = fanout.percentiles(pooled["A" if row is whole else "A in"])
        b_ms = fanout.percentiles(pooled["B" if row is whole else "B in"])
        row.fail("run", "; ".join(errors))
        if a_ms.get("samples") and b_ms.get("samples"):
            row.hub, row.ceiling = b_ms["p99"], a_ms["p99"]
            row.hub_text, row.ceiling_label = _ms(b_ms), f"{label}: {_ms(a_ms)}"
            row.done()
            row.met = row.ratio is not None and row.ratio <= CATCHUP_TARGET_RATIO
        else:
            row.fail("latency", "no latency sample in A or B")
        row.note = "; ".join(t for t in (
            f"B: {what}, pooled over {len(b_runs)} B run(s) ({int(b_ms.get('samples', 0)):,}"
            f" deliveries) and {len(a_runs)} A run(s) ({int(a_ms.get('samples', 0)):,})",
            rate, *lines[key], *outcomes,
            "CPU of the last round (B; ceiling: A)" if b_runs else "") if t)
        row.fail("stalled subscriber or loss", "; ".join(problems))
        if b_runs:
            row.cpu(b_runs[-1].cpu, a_runs[-1].cpu if a_runs else None)
        row.details = {
            "chart_label": f"catchup: p99 with a stalled subscriber vs without ({key})",
            "percentiles_ms": {"A": a_ms, "B": b_ms},
            "max_events": p.catchup_max_events, "stall_share": p.catchup_stall}
    whole.details["runs"] = [_detail(r) for pair in runs for r in pair if r is not None]
    return [whole.done(), during.done()]


def _detail(run: _Run) -> dict[str, Any]:
    return {"stalled": run.stalled, "writes": asdict(run.writes),
            "delivery": asdict(run.delivery), "cpu": run.cpu,
            "percentiles_ms": fanout.percentiles(run.samples),
            "probe": {k: v for k, v in run.probe.items() if k != "timeline"},
            "caught_up_s": round(run.caught_up - run.probe["reading_at"], 3)
            if run.caught_up and run.probe else None,
            "metrics_at_read": run.metrics_at_read, "metrics_after": run.metrics_after,
            "store_users": run.ids, "load_average": run.load}
