"""Sync fan-out: delivered events/s, loss, delivery latency, and a raw gRPC ceiling, in one run.

    .venv/bin/python -m loadtest.fanout [--duration 10] [--latency-duration 10] \\
        [--ceiling-duration 5] [--subscribers 100] [--workers 4] [--json]

Starts its own `redis-server` (free port, no RDB, no AOF) and two hubs on it
(`python -m hub serve`, HUB_LOG_LEVEL=WARNING, HUB_WRITE_RATE=0, --max-concurrent-streams
10000), all on 127.0.0.1, and stops everything at the end, on an error or on Ctrl-C. Its steps
(fanout_step, latency_step, ceiling_step) are also the fan-out and latency sections of
`loadtest.bench`. Clients run in worker processes (`loadtest._subscriber`), never in
this one. Three measurements:

1. Fan-out: --subscribers Sync streams for all users (--workers processes, half of them on hub
   A and half on hub B, one connection per stream) while a writer process creates users through
   hub A as fast as it can for --duration s (BulkCreateUsers batches, plus UpdateUser loops with
   --updaters). delivered events/s = events received by all subscribers / (last event received
   - first write). After a drain period every subscriber must have received exactly as many
   events as were written (LOSS otherwise). A subscriber cut with RESOURCE_EXHAUSTED resumes with
   its `hub-resume-token`; the cuts are counted. CPU% of every process is sampled (psutil).
2. Latency: --latency-subscribers streams (half per hub) while a writer creates users through
   hub A at a paced --latency-rate per second for --latency-duration s (--latency-batch rows
   per call); each subscriber records now - event.written_at (same machine clock):
   p50/p99/p99.9/max.
3. Ceiling: a bare grpc.aio server process streams pre-encoded SyncResponses (the mean batch size
   step 1's subscribers saw, made of an event step 1 delivered) to the same number of streams,
   read by the same worker code and deserializer, for --ceiling-duration s.

--json prints the result as JSON on stdout (the table then goes to stderr). Exit status 1 when
the run could not be made or a subscriber lost events.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from harness.redis import free_port
from hub.api.user.v1 import common_pb2
from loadtest.bench.procs import (
    BenchError,
    Child,
    Children,
    CpuMeter,
    Hub,
    cpu_model,
    log_summary,
    nproc,
    print_table,
    start_hub,
    start_redis,
    stop,
    tail,
    wait_hub,
)

_REPLY_TIMEOUT = 60.0
_MAX_DURATION = 120.0
_STALLED = 5.0


@dataclass(frozen=True)
class Delivery:
    """What a set of subscribers received in one step."""

    subscribers: int
    expected: int | None  # events every subscriber should have received (None: ceiling)
    total_events: int
    window_s: float  # first write (or first send) to the last event received
    events_per_s: float
    in_window_events_per_s: float  # received while writing / writing time
    delivered_by_end_pct: float  # of all events received, the share received while writing
    mean_batch: float  # events per response that carried events
    max_batch: int
    min_per_subscriber: int
    max_per_subscriber: int
    lost_subscribers: int  # received fewer than expected after the drain
    extra_subscribers: int  # received more (duplicates)
    cuts: int  # RESOURCE_EXHAUSTED endings, each resumed with its token
    cuts_without_token: int
    # Short of `expected` at the end of the drain, still open, and silent for 5 s or more.
    stalled_subscribers: int
    heartbeats: int  # responses without events
    errors: list[str]


@dataclass(frozen=True)
class Writes:
    created: int
    updated: int
    refused: int
    unknown: int
    seconds: float
    per_s: float
    max_late_ms: float
    errors: list[str]


@dataclass(frozen=True)
class Result:
    fanout: Delivery
    fanout_writes: Writes
    fanout_cpu: dict[str, float]  # label -> % of one core over the fan-out window
    ceiling: Delivery
    ceiling_cpu: dict[str, float]
    ceiling_batch: int
    ceiling_message_bytes: int
    ratio: float  # hub events/s / ceiling events/s
    latency: Delivery
    latency_writes: Writes
    latency_ms: dict[str, float]  # p50, p99, p99.9, max, samples
    loss: str  # "OK" or what was lost
    hub_log_warnings: list[str]  # counted records of WARNING and up
    nproc: int
    cpu: str
    python: str
    settings: dict[str, Any] = field(default_factory=dict)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("duration", "latency_duration", "ceiling_duration"):
        if not 0 < getattr(args, name) <= _MAX_DURATION:
            parser.error(f"--{name.replace('_', '-')} must be above 0 and at most {_MAX_DURATION}")
    if args.workers < 2 or args.workers % 2:
        parser.error("--workers must be even (half per hub) and at least 2")
    for name in ("subscribers", "latency_subscribers"):
        count = getattr(args, name)
        if count < args.workers or count % args.workers or count > 2_000:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of --workers,"
                         " at most 2000")
    if not 0 < args.latency_rate <= 10_000:
        parser.error("--latency-rate must be above 0 and at most 10000")
    if not 1 <= args.latency_batch <= 500:
        parser.error("--latency-batch must be 1 to 500")
    try:
        result = run(args)
    except BenchError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loadtest: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    if args.json:
        _print_table(result, sys.stderr)
        print(json.dumps(asdict(result), indent=2))
    else:
        _print_table(result, sys.stdout)
    return 0 if result.loss == "OK" else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.fanout", description=__doc__.splitlines()[0]
    )
    add = parser.add_argument
    add("--duration", type=float, default=10.0, help="fan-out write window in s (default 10)")
    add("--latency-duration", type=float, default=10.0,
        help="paced-write window of the latency step in s (default 10)")
    add("--ceiling-duration", type=float, default=5.0,
        help="send window of the raw ceiling server in s (default 5)")
    add("--subscribers", type=int, default=100,
        help="Sync streams in the fan-out and ceiling steps (default 100)")
    add("--workers", type=int, default=4, help="subscriber processes (even; default 4)")
    add("--latency-subscribers", type=int, default=20, help="Sync streams (default 20)")
    add("--latency-rate", type=float, default=200.0, help="paced writes/s (default 200)")
    add("--latency-batch", type=int, default=1,
        help="rows per paced write: 1 is CreateUser, more is one ImportUsers call of that"
        " many rows (default 1)")
    add("--bulk-streams", type=int, default=16,
        help="concurrent BulkCreateUsers calls of the fan-out writer (default 16)")
    add("--batch", type=int, default=500, help="rows per BulkCreateUsers call (default 500)")
    add("--updaters", type=int, default=4,
        help="concurrent UpdateUser loops of the fan-out writer (default 4)")
    add("--subscriber-max-events", type=int,
        help="the hubs' HUB_SUBSCRIBER_MAX_EVENTS (default: theirs); small values force"
        " RESOURCE_EXHAUSTED cuts, to exercise resuming")
    add("--drain-timeout", type=float, default=30.0,
        help="how long subscribers may take to catch up after the writes (default 30)")
    add("--json", action="store_true",
        help="print the result as JSON on stdout, the table on stderr")
    return parser


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Result:
    """Starts Redis and two hubs, measures, stops everything; BenchError if anything fails."""
    with tempfile.TemporaryDirectory(prefix="hub-fanout-") as tmp, \
            contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        redis_proc, redis_url = start_redis(workdir)
        stack.callback(stop, redis_proc)
        hubs: list[Hub] = []
        extra_env = {} if args.subscriber_max_events is None else \
            {"HUB_SUBSCRIBER_MAX_EVENTS": str(args.subscriber_max_events)}
        for name in "AB":
            hub = start_hub(name, redis_url, workdir, extra_env)
            stack.callback(stop, hub.proc)
            hubs.append(hub)
        try:
            result = asyncio.run(_measure(args, workdir, redis_proc, hubs))
        except BenchError as exc:
            tails = "\n".join(tail(h.log, what=f"hub {h.name} log") for h in hubs)
            raise BenchError(f"{exc}\n{tails}") from None
        warnings = [f"hub {h.name}: {line}" for h in hubs for line in log_summary(h.log)]
        return Result(**{**result, "hub_log_warnings": warnings})


async def _measure(args: argparse.Namespace, workdir: Path,
                   redis_proc: subprocess.Popen[bytes], hubs: list[Hub]) -> dict[str, Any]:
    for hub in hubs:
        await wait_hub(hub)
    children = Children(workdir)
    base_pids = hub_pids(hubs) | {"redis": redis_proc.pid, "harness": os.getpid()}
    try:
        fan = await fanout_step(args, children, hubs, base_pids)
        lat = await latency_step(args, children, hubs, base_pids)
        batch = max(1, round(fan.delivery.mean_batch))
        ceiling, ceil_cpu, message_bytes = await ceiling_step(
            args, children, batch, fan.sample, {"harness": os.getpid()})
    finally:
        await children.close()
    problems = [*loss_problems("fan-out", fan.delivery, fan.writes),
                *loss_problems("latency", lat.delivery, lat.writes)]
    return {
        "fanout": fan.delivery, "fanout_writes": fan.writes, "fanout_cpu": fan.cpu,
        "ceiling": ceiling, "ceiling_cpu": ceil_cpu, "ceiling_batch": batch,
        "ceiling_message_bytes": message_bytes,
        "ratio": round(fan.delivery.events_per_s / ceiling.events_per_s, 3)
        if ceiling.events_per_s else 0.0,
        "latency": lat.delivery, "latency_writes": lat.writes,
        "latency_ms": percentiles(lat.samples),
        "loss": "; ".join(problems) or "OK",
        "hub_log_warnings": [],
        "nproc": nproc(), "cpu": cpu_model(), "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }


def hub_pids(hubs: list[Hub]) -> dict[str, int]:
    """CpuMeter labels of the hubs (each counted with its --workers children)."""
    return {f"hub {h.name}": h.proc.pid for h in hubs}


def loss_problems(step: str, delivery: Delivery, writes: Writes) -> list[str]:
    """What a step lost, duplicated or could not account for; empty when every subscriber got
    exactly what was written."""
    problems = []
    if delivery.lost_subscribers:
        problems.append(f"{step}: {delivery.lost_subscribers} of {delivery.subscribers}"
                        f" subscribers got fewer than {delivery.expected} events"
                        f" (min {delivery.min_per_subscriber};"
                        f" {delivery.stalled_subscribers} of them stalled)")
    if delivery.extra_subscribers:
        problems.append(f"{step}: {delivery.extra_subscribers} subscribers got more than"
                        f" {delivery.expected} (max {delivery.max_per_subscriber})")
    if writes.unknown:
        problems.append(f"{step}: {writes.unknown} writes of unknown outcome")
    return problems


async def _start_subscribers(children: Children, count: int, workers: int,
                             targets: list[str], prefix: str, *flags: str) -> list[Child]:
    """`workers` processes of count/workers streams; the first half on targets[0]."""
    per = count // workers
    return [await children.start(
        f"{prefix} {n + 1}", "sub", "--target", targets[n * len(targets) // workers],
        "--streams", str(per), *flags) for n in range(workers)]


@dataclass(frozen=True)
class FanoutStep:
    delivery: Delivery
    writes: Writes
    cpu: dict[str, float]
    sample: tuple[str, str]  # a delivered event (base64) and a resume token, for the ceiling


async def fanout_step(args: argparse.Namespace, children: Children, hubs: list[Hub],
                      base_pids: dict[str, int]) -> FanoutStep:
    """args.subscribers streams over both hubs while one writer creates (and updates) through
    hubs[0] as fast as it can for args.duration s, then a drain and a count per subscriber."""
    subs = await _start_subscribers(children, args.subscribers, args.workers,
                                    [h.target for h in hubs], "sub")
    writer = await children.start(
        "writer", "writer", "--target", hubs[0].target, "--bulk-streams", str(args.bulk_streams),
        "--batch", str(args.batch), "--updaters", str(args.updaters))
    try:
        await children.ready([*subs, writer])
        meter = CpuMeter({**base_pids, "writer": writer.pid, **{c.name: c.pid for c in subs}},
                         trees=hub_pids(hubs))
        async with meter.running():
            start_at = time.time() + 0.5
            await writer.send(cmd="go", start_at=start_at, duration=args.duration)
            reply = await writer.recv(args.duration + 120)
            writes = _writes(reply)
            expected = writes.created + writes.updated
            stats = await _drain(subs, expected, args.drain_timeout)
    finally:
        await children.close()
    delivery = _delivery(stats, expected, reply["started"], reply["ended"])
    cpu = meter.percent(reply["started"], reply["started"] + delivery.window_s)
    sample = next(((s["sample_event"], s["sample_token"]) for s in stats if s["sample_event"]),
                  ("", ""))
    return FanoutStep(delivery, writes, cpu, sample)


@dataclass(frozen=True)
class LatencyStep:
    delivery: Delivery
    writes: Writes
    samples: list[float]  # ms, written_at -> received, one per event per subscriber
    cpu: dict[str, float]


async def latency_step(args: argparse.Namespace, children: Children, hubs: list[Hub],
                       base_pids: dict[str, int]) -> LatencyStep:
    """args.latency_subscribers streams over both hubs while a writer creates through hubs[0]
    at a paced args.latency_rate per second (args.latency_batch rows per call)."""
    subs = await _start_subscribers(children, args.latency_subscribers, args.workers,
                                    [h.target for h in hubs], "latency sub", "--latency")
    writer = await children.start(
        "latency writer", "writer", "--target", hubs[0].target,
        "--rate", str(args.latency_rate), "--rate-batch", str(args.latency_batch))
    try:
        await children.ready([*subs, writer])
        meter = CpuMeter({**base_pids, "writer": writer.pid,
                          **{c.name.removeprefix("latency "): c.pid for c in subs}},
                         trees=hub_pids(hubs))
        async with meter.running():
            start_at = time.time() + 0.5
            await writer.send(cmd="go", start_at=start_at, duration=args.latency_duration)
            reply = await writer.recv(args.latency_duration + 60)
            writes = _writes(reply)
            expected = writes.created
            stats = await _drain(subs, expected, args.drain_timeout)
    finally:
        await children.close()
    samples = [x for s in stats for x in s["samples"]]
    delivery = _delivery(stats, expected, reply["started"], reply["ended"])
    cpu = meter.percent(reply["started"], reply["ended"])
    return LatencyStep(delivery, writes, samples, cpu)


async def ceiling_step(
    args: argparse.Namespace, children: Children, batch: int, sample: tuple[str, str],
    base_pids: dict[str, int],
) -> tuple[Delivery, dict[str, float], int]:
    """The same subscriber code reading a bare grpc.aio server that streams pre-encoded
    SyncResponses of `batch` copies of the sample event to args.subscribers streams."""
    event, token = sample
    if not event:  # the fan-out step delivered nothing: a synthetic event of the same shape
        event = base64.b64encode(_synthetic_event()).decode()
    port = free_port()
    server = await children.start(
        "raw server", "raw-server", "--port", str(port), "--event", event,
        "--batch", str(batch), "--token", token)
    try:
        message_bytes = int((await children.ready([server]))[0]["message_bytes"])
        subs = await _start_subscribers(children, args.subscribers, args.workers,
                                        [f"127.0.0.1:{port}"], "ceiling sub", "--raw")
        await children.ready(subs)
        meter = CpuMeter({**base_pids, "raw server": server.pid,
                          **{c.name.removeprefix("ceiling "): c.pid for c in subs}})
        async with meter.running():
            start_at = time.time() + 0.5
            stop_at = start_at + args.ceiling_duration
            for sub in subs:
                await sub.send(cmd="start", start_at=start_at, stop_at=stop_at)
            stats = await _drain(subs, None, args.ceiling_duration + args.drain_timeout)
    finally:
        await children.close()
    delivery = _delivery(stats, None, start_at, stop_at)
    return delivery, meter.percent(start_at, start_at + delivery.window_s), message_bytes


def _synthetic_event() -> bytes:
    now = int(time.time())
    user = common_pb2.User(
        id="01J00000000000000000000000", email="fanout-00000000-1@example.com",
        name="Fanout 1", status=common_pb2.USER_STATUS_ACTIVE, version=1)
    user.created_at.seconds = user.updated_at.seconds = now
    event = common_pb2.UserEvent(type=common_pb2.EVENT_TYPE_CREATED, user=user)
    event.written_at.seconds = now
    return event.SerializeToString()


async def _drain(subs: list[Child], expected: int | None, within: float) -> list[dict[str, Any]]:
    for sub in subs:
        await sub.send(cmd="drain", expected=expected, timeout=within)
    return list(await asyncio.gather(*(s.recv(within + _REPLY_TIMEOUT) for s in subs)))


def _writes(reply: dict[str, Any]) -> Writes:
    seconds = max(reply["ended"] - reply["started"], 1e-9)
    written = reply["created"] + reply["updated"]
    return Writes(
        created=reply["created"], updated=reply["updated"], refused=reply["refused"],
        unknown=reply["unknown"], seconds=round(seconds, 3), per_s=round(written / seconds, 1),
        max_late_ms=round(reply["max_late_ms"], 1), errors=reply["errors"][:5],
    )


def _count_at(timeline: list[list[float]], t: float) -> float:
    """Events a worker had received at wall time t (linear between its samples)."""
    before = [p for p in timeline if p[0] <= t]
    after = [p for p in timeline if p[0] > t]
    if not before:
        return 0.0
    if not after:
        return before[-1][1]
    (t0, c0), (t1, c1) = before[-1], after[0]
    return c0 + (c1 - c0) * (t - t0) / (t1 - t0)


def _delivery(stats: list[dict[str, Any]], expected: int | None, start: float,
              end: float) -> Delivery:
    streams = [s for worker in stats for s in worker["streams"]]
    counts = [s["events"] for s in streams]
    total = sum(counts)
    responses = sum(s["responses"] for s in streams)
    last = max((s["last_event"] for s in streams if s["events"]), default=start)
    window = max(last - start, 1e-9)
    during = sum(_count_at(w["timeline"], end) - _count_at(w["timeline"], start) for w in stats)
    errors = sorted({e for s in streams for e in s["errors"]})
    return Delivery(
        subscribers=len(streams), expected=expected, total_events=total,
        window_s=round(window, 3), events_per_s=round(total / window, 1),
        in_window_events_per_s=round(during / max(end - start, 1e-9), 1),
        delivered_by_end_pct=round(during / total * 100, 1) if total else 0.0,
        mean_batch=round(total / responses, 2) if responses else 0.0,
        max_batch=max((s["max_batch"] for s in streams), default=0),
        min_per_subscriber=min(counts, default=0), max_per_subscriber=max(counts, default=0),
        lost_subscribers=sum(c < expected for c in counts) if expected is not None else 0,
        extra_subscribers=sum(c > expected for c in counts) if expected is not None else 0,
        cuts=sum(s["cuts"] for s in streams),
        cuts_without_token=sum(s["cuts_without_token"] for s in streams),
        stalled_subscribers=sum(
            not s["ended"] and s["idle_s"] >= _STALLED and s["events"] < expected
            for s in streams) if expected is not None else 0,
        heartbeats=sum(s["empty"] for s in streams), errors=errors[:10],
    )


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"samples": 0}
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"p50": rank(50), "p99": rank(99), "p99.9": rank(99.9), "max": ordered[-1],
            "samples": len(ordered)}


# -- report -----------------------------------------------------------------------------------


def _rows(r: Result) -> Iterator[tuple[str, str]]:
    f, c, lat, w = r.fanout, r.ceiling, r.latency, r.fanout_writes
    yield "FAN-OUT", f"{f.subscribers} Sync subscribers (all users), half on each hub"
    yield "  writes (hub A)", (f"{w.created:,} created + {w.updated:,} updated in {w.seconds:.2f}"
                               f" s = {w.per_s:,.0f}/s; refused {w.refused}, unknown {w.unknown}")
    yield "  hub events/s", (f"{f.events_per_s:,.0f} ({f.total_events:,} events /"
                             f" {f.window_s:.2f} s to the last delivery); while writing"
                             f" {f.in_window_events_per_s:,.0f}")
    yield "  ceiling events/s", (f"{c.events_per_s:,.0f} (raw grpc.aio server, 1 process,"
                                 f" {c.subscribers} streams, {r.ceiling_batch} events ="
                                 f" {r.ceiling_message_bytes:,} B per message)")
    yield "  hub / ceiling", f"{r.ratio:.1%}"
    yield "  events per response", f"mean {f.mean_batch:.1f}, max {f.max_batch:,}"
    yield "  per subscriber", (f"min {f.min_per_subscriber:,}, max {f.max_per_subscriber:,},"
                               f" expected {f.expected:,}")
    yield "  cuts (resumed)", (f"{f.cuts} RESOURCE_EXHAUSTED, {f.cuts_without_token} without"
                               f" a token; {f.heartbeats} responses without events")
    if f.stalled_subscribers:
        yield "  STALLED", (f"{f.stalled_subscribers} streams short of {f.expected:,}, still"
                            f" open, silent for {_STALLED:.0f}+ s at the end of the drain")
    if f.errors:
        yield "  stream errors", "; ".join(f.errors)
    if w.errors:
        yield "  writer errors", "; ".join(w.errors)
    yield "  backlog", (f"{f.delivered_by_end_pct:.1f}% of the events were delivered before"
                        " the writes ended")
    yield "CPU (fan-out window)", "% of one core; subscriber processes are 'sub N'"
    for label, value in r.fanout_cpu.items():
        yield f"  {label}", f"{value:.0f}%"
    subs = [v for k, v in r.fanout_cpu.items() if k.startswith("sub ")]
    busy = r.fanout_cpu.get("system busy (% of all cores)")
    if subs and busy is not None:
        yield "  headroom", (f"machine {max(0.0, 100 - busy):.0f}% idle; busiest subscriber"
                             f" process {max(subs):.0f}% of one core")
    yield "CPU (ceiling window)", ", ".join(f"{k} {v:.0f}%" for k, v in r.ceiling_cpu.items())
    ms, lw = r.latency_ms, r.latency_writes
    yield "LATENCY", (f"{lat.subscribers} subscribers, {lw.created:,} creates at"
                      f" {lw.per_s:,.0f}/s (target {r.settings['latency_rate']:.0f}/s,"
                      f" max {lw.max_late_ms:.0f} ms late)")
    if ms.get("samples"):
        yield "  written_at -> received", (
            f"p50 {ms['p50']:.2f} ms, p99 {ms['p99']:.2f} ms, p99.9 {ms['p99.9']:.2f} ms,"
            f" max {ms['max']:.2f} ms ({int(ms['samples']):,} samples)")
    yield "  per subscriber", (f"min {lat.min_per_subscriber:,}, max {lat.max_per_subscriber:,},"
                               f" expected {lat.expected:,}; mean batch {lat.mean_batch:.1f},"
                               f" cuts {lat.cuts}")
    if lat.errors:
        yield "  stream errors", "; ".join(lat.errors)
    yield "LOSS CHECK" if r.loss == "OK" else "LOSS", r.loss
    for line in r.hub_log_warnings:
        yield "hub log", line[:200]
    yield "machine", f"nproc {r.nproc}, {r.cpu}, Python {r.python}"


def _print_table(result: Result, out: TextIO) -> None:
    print_table("UserSyncService.Sync fan-out (2 hubs, 1 redis-server, all on this machine)",
                _rows(result), out)


if __name__ == "__main__":
    raise SystemExit(main())
