"""The cluster section (`--only cluster`; not in the default run): the fanout and latency
sections' loads, in one run, against the run's redis-server (the single-node store) and
against a Redis Cluster of 3 masters (`harness.redis.ClusterProcess`, no replicas by default)
whose hubs run on `--redis-url redis+cluster://...` (128 partitions, their default there),
each store's row beside the other's, with the CPU each Redis node and the hubs spent per
event written.

- fan-out: delivered events/s of 100 Sync subscribers on 2 instances (1 worker each), the
  writer creating and updating as fast as it can; every subscriber must get every event. Also
  run on the single node with `--partitions 128`, which tells what the partition count costs
  apart from the cluster. Those two rows have the usual single node's figure as their
  "ceiling" and the ratio to it.
- latency: write->delivery p50/p99/p99.9 at paced rates (default 200 and 1000 writes/s), 20
  subscribers on 2 instances, one row per store and rate.

CPU per event: each redis-server's and each hub's CPU time over the write window (the
fanout and latency steps' CpuMeter: psutil every 0.25 s; fan-out: first write to last
delivery, latency: the paced writes), divided by the events written (fan-out: creates +
updates; latency: creates). For the cluster per master and summed over the nodes. Each row
also says which process was at a core's limit: a client (a subscriber process or the
writer), a hub or a Redis node, or none; which hubs and Redis nodes waited for a CPU a fifth
or more of the time they could run (/proc schedstat: held back by the machine, not by what
they wait on); and whether the machine had no idle CPU left. The latency rows' notes give the
hubs' and Redis's CPU with nothing to do, which a paced row's CPU per event includes.

No replicas by default (`--cluster-replicas 1` adds one per master): each replica replays its
master's writes on the same two cores the masters, hubs and clients share, which would
charge the cluster for copies the single node it is compared with does not make.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import redis

from harness.redis import ClusterProcess
from loadtest import fanout
from loadtest.bench.base import BenchBase, _say
from loadtest.bench.procs import CpuMeter, Hub
from loadtest.bench.report import _SATURATED, ERROR, Row

# Above this rate the paced writer batches rows, as in the latency section.
_PACED_CALLS_PER_S = 500
_MACHINE_FULL = 95.0  # % of all cores: no idle CPU left for anyone
# % of its runnable time a process spent waiting for a CPU: held back by the machine.
_STARVED = 20.0


@dataclass
class Store:
    """One side of the comparison: where the hubs' --redis-url points, how it is emptied
    before each measurement, and the CpuMeter label and pid of each of its redis-servers."""

    key: str  # "node", "node 128" (the node with the cluster's partition count), "cluster"
    label: str
    url: str
    flush: Callable[[], object]
    nodes: dict[str, int]  # label -> pid; every label starts with "redis"
    read_partitions: Callable[[], int | None]  # the count the hubs made the keyspace with
    connect: dict[str, Callable[[], redis.Redis]]  # label -> a new client, per node
    flags: tuple[str, ...] = ()  # more `hub serve` flags
    partitions: int | None = None  # as read after the last measurement


class ClusterSection(BenchBase):
    async def run_cluster(self) -> None:
        p = self.plan
        node = Store("node", "1 redis-server", self.redis_url, self.redis.flushall,
                     {"redis": self.redis_proc.pid},
                     lambda: _partitions(self.redis, "hub:config"),
                     {"redis": lambda: redis.Redis.from_url(self.redis_url, socket_timeout=5)})
        # The same node with the cluster's partition count: what the count costs, apart
        # from what the cluster does (fan-out only: a paced row writes one partition a call).
        spread = [replace(node, key=f"node {p.cluster_node_partitions}",
                          flags=("--partitions", str(p.cluster_node_partitions)))] \
            if p.cluster_node_partitions else []
        async with self._cluster() as (cluster, error):
            on_cluster = _cluster_store(cluster) if cluster else None  # None: it failed
            fan: dict[str, tuple[_Run | None, str]] = {}
            for store in [node, *spread, on_cluster]:
                if store is not None:
                    _say(f"  fan-out, {store.label} {' '.join(store.flags)}".rstrip())
                    fan[store.key] = await self.attempt(
                        f"fan-out {store.key}", self._cluster_fanout(store))
            for store in [node, *spread, on_cluster]:
                if store is None:
                    self.rows.append(Row("cluster", self._cluster_fanout_name(
                        self._cluster_where(None)), unit="events/s", workers=1,
                        status=ERROR, error=f"cluster: {error}"))
                else:
                    self.rows.append(self._cluster_fanout_row(store, fan, node))
            for store in [node, on_cluster]:
                if store is not None:
                    await self._cluster_latency(store)
                else:
                    for rate in p.cluster_latency_rates:
                        self.rows.append(Row("cluster", self._cluster_latency_name(
                            rate, self._cluster_where(None)), unit="ms", workers=1,
                            status=ERROR, error=f"cluster: {error}"))

    @contextlib.asynccontextmanager
    async def _cluster(self) -> AsyncIterator[tuple[ClusterProcess | None, str]]:
        p = self.plan
        _say(f"  starting a cluster of {p.cluster_masters} masters,"
             f" {p.cluster_replicas} replica(s) each")
        cluster = ClusterProcess(self.workdir / "cluster", masters=p.cluster_masters,
                                 replicas_per_master=p.cluster_replicas)
        try:
            _, error = await self.attempt("cluster", asyncio.to_thread(cluster.start))
            yield (None if error else cluster), error
        finally:
            await asyncio.to_thread(cluster.stop)

    def _cluster_where(self, store: Store | None) -> str:
        if store is None:
            return (f"cluster of {self.plan.cluster_masters} masters,"
                    f" {self.plan.cluster_replicas} replica(s) each")
        return store.label + (f" ({store.partitions} partitions)" if store.partitions else "")

    # -- fan-out ------------------------------------------------------------------------------

    def _cluster_fanout_name(self, where: str) -> str:
        return f"fan-out events/s, {self.plan.subscribers} subscribers on 2 instances: {where}"

    async def _cluster_fanout(self, store: Store) -> _Run:
        args = self._fanout_args()
        async with self.hubs(f"cluster fanout {store.key}", 2, 1, redis_url=store.url,
                             flush=store.flush, flags=store.flags) as hubs, \
                self.children() as children:
            pids = self.base_pids(hubs, store.nodes)
            await asyncio.to_thread(_command_stats, store, reset=True)
            sched = SchedMeter(pids)
            step = await fanout.fanout_step(args, children, hubs, pids)
            waited = sched.waited()
            commands = await asyncio.to_thread(_command_stats, store)
            store.partitions = await asyncio.to_thread(store.read_partitions)
            return _Run(step, waited, commands)

    def _cluster_fanout_row(self, store: Store, fan: dict[str, tuple[_Run | None, str]],
                            baseline: Store) -> Row:
        row = Row("cluster", self._cluster_fanout_name(self._cluster_where(store)),
                  unit="events/s", workers=1)
        run, error = fan[store.key]
        row.fail("hub", error)
        row.details |= {"store": store.key, "partitions": store.partitions}
        if run is None or not isinstance(run.step, fanout.FanoutStep):
            return row
        d, w = run.step.delivery, run.step.writes
        events = w.created + w.updated
        cost = _costs(store, run.step.cpu, d.window_s, events)
        limit = at_limit(run.step.cpu, run.waited)
        row.hub = d.events_per_s
        row.hub_text = (f"{d.events_per_s:,.0f} events/s; {_cost_text(cost)}"
                        f"{_scripts_text(run.commands, events)}; at its limit: {limit}")
        node = fan.get(baseline.key, (None, ""))[0]
        if store is not baseline and node is not None and \
                isinstance(node.step, fanout.FanoutStep):
            row.ceiling = node.step.delivery.events_per_s
            row.ceiling_label = self._cluster_where(baseline)
            row.details["chart_label"] = f"fan-out, {store.key} vs node"
        row.fail("loss", "; ".join(fanout.loss_problems("fan-out", d, w)))
        row.note = (f"{w.created:,} creates + {w.updated:,} updates at {w.per_s:,.0f}/s;"
                    f" {d.total_events:,} events delivered, {d.expected:,} per subscriber, mean"
                    f" {d.mean_batch:.0f} per response, {d.cuts} slow-consumer cuts (resumed);"
                    f" {_cost_note(cost)}; {_waited_note(run.waited)};"
                    f" {_commands_note(run.commands, events)}")
        row.details |= {"delivery": asdict(d), "writes": asdict(w), "cpu": run.step.cpu,
                        "events_written": events, "window_s": d.window_s, "cost_us": cost,
                        "waited_pct": run.waited, "at_limit": limit,
                        "redis_commands": run.commands}
        row.cpu(run.step.cpu)
        return row.done()

    # -- latency ------------------------------------------------------------------------------

    def _cluster_latency_name(self, rate: float, where: str) -> str:
        return (f"write→delivery latency at {rate:,.0f} writes/s,"
                f" {self.plan.latency_subscribers} subscribers on 2 instances: {where}")

    async def _cluster_latency(self, store: Store) -> None:
        """Both rates on one pair of hubs, after the CPU they and Redis use idle."""
        p = self.plan
        started = len(self.rows)
        try:
            async with self.hubs(f"cluster latency {store.key}", 2, 1, redis_url=store.url,
                                 flush=store.flush) as hubs:
                idle = await _idle_cpu(self.base_pids(hubs, store.nodes), p.cluster_idle)
                for rate in p.cluster_latency_rates:
                    rows = max(1, round(rate / _PACED_CALLS_PER_S)) \
                        if rate > _PACED_CALLS_PER_S else 1
                    _say(f"  latency, {store.label}: {rate:,.0f} writes/s ({rows} row(s) per"
                         " call)")
                    run, error = await self.attempt(
                        f"latency {store.key}", self._cluster_paced(store, hubs, rate, rows))
                    self.rows.append(self._cluster_latency_row(store, rate, rows, run, error,
                                                               idle))
        except Exception as exc:  # the hubs did not start: every rate's row says why
            message = str(exc) or type(exc).__name__
            _say(f"  latency {store.key}: ERROR {message.splitlines()[0]}")
            for rate in p.cluster_latency_rates[len(self.rows) - started:]:
                self.rows.append(Row("cluster", self._cluster_latency_name(
                    rate, self._cluster_where(store)), unit="ms", workers=1, status=ERROR,
                    error=f"hub: {message}"))

    async def _cluster_paced(self, store: Store, hubs: list[Hub], rate: float,
                             rows: int) -> _Run:
        args = self._fanout_args()
        args.latency_rate, args.latency_batch = rate, rows
        args.latency_duration = self.plan.latency_duration
        pids = self.base_pids(hubs, store.nodes)
        await asyncio.to_thread(_command_stats, store, reset=True)
        async with self.children() as children:
            sched = SchedMeter(pids)
            step = await fanout.latency_step(args, children, hubs, pids)
            waited = sched.waited()
        commands = await asyncio.to_thread(_command_stats, store)
        store.partitions = await asyncio.to_thread(store.read_partitions)
        return _Run(step, waited, commands)

    def _cluster_latency_row(self, store: Store, rate: float, rows: int, run: _Run | None,
                             error: str, idle: dict[str, float]) -> Row:
        row = Row("cluster", self._cluster_latency_name(rate, self._cluster_where(store)),
                  unit="ms", workers=1)
        row.details |= {"store": store.key, "rate": rate, "rows_per_call": rows,
                        "partitions": store.partitions, "idle_cpu": idle}
        row.fail("hub", error)
        if run is None or not isinstance(run.step, fanout.LatencyStep):
            return row
        step = run.step
        ms = fanout.percentiles(step.samples)
        w = step.writes
        cost = _costs(store, step.cpu, w.seconds, w.created)
        limit = at_limit(step.cpu, run.waited)
        row.hub = ms.get("p99")
        if ms.get("samples"):
            row.hub_text = (f"p50 {ms['p50']:.2f} / p99 {ms['p99']:.2f} / p99.9"
                            f" {ms['p99.9']:.2f} ms; {_cost_text(cost)}"
                            f"{_scripts_text(run.commands, w.created)}; at its limit: {limit}")
        problems = fanout.loss_problems("latency", step.delivery, w)
        if not ms.get("samples"):
            problems.append("no latency sample")
        row.fail("loss", "; ".join(problems + w.errors[:2]))
        row.note = (f"achieved {w.per_s:,.0f} writes/s of {rate:,.0f} ({w.created:,} creates,"
                    f" {rows} row(s) per call, writer up to {w.max_late_ms:,.0f} ms late);"
                    f" max {ms.get('max', 0):.1f} ms over {int(ms.get('samples', 0)):,}"
                    f" deliveries; {_cost_note(cost)}; {_idle_note(idle)};"
                    f" {_waited_note(run.waited)}; {_commands_note(run.commands, w.created)}")
        row.details |= {"percentiles_ms": ms, "writes": asdict(w),
                        "delivery": asdict(step.delivery), "cpu": step.cpu,
                        "events_written": w.created, "window_s": w.seconds, "cost_us": cost,
                        "waited_pct": run.waited, "at_limit": limit,
                        "redis_commands": run.commands}
        row.cpu(step.cpu)
        return row.done()


@dataclass(frozen=True)
class _Run:
    step: fanout.FanoutStep | fanout.LatencyStep
    waited: dict[str, float]  # SchedMeter.waited over the step
    commands: dict[str, dict[str, int]]  # _command_stats over the step


async def _idle_cpu(pids: Mapping[str, int], seconds: float) -> dict[str, float]:
    """% of one core each hub and Redis node uses with no subscriber and no write: the
    audits, heartbeats and (on a cluster) the cluster bus, which a paced row's CPU per
    event includes."""
    labels = {k: v for k, v in pids.items() if _kind(k)}
    trees = [k for k in labels if k.startswith("hub ")]
    meter = CpuMeter(labels, trees=trees)
    async with meter.running():
        await asyncio.sleep(seconds)
    return {k: v for k, v in meter.percent(meter.samples[0][0], meter.samples[-1][0]).items()
            if k in labels}


def _idle_note(idle: dict[str, float]) -> str:
    if not idle:
        return "idle CPU not measured"
    return "idle beforehand (% of one core): " + ", ".join(
        f"{k} {v:.1f}%" for k, v in idle.items())


def _waited_note(waited: dict[str, float]) -> str:
    if not waited:
        return "run-queue wait not measured"
    return "waited for a CPU (% of runnable time): " + ", ".join(
        f"{k} {v:.0f}%" for k, v in waited.items() if _kind(k))


# -- the stores -------------------------------------------------------------------------------


def _cluster_store(cluster: ClusterProcess) -> Store:
    masters = cluster.masters()
    nodes = {f"redis {n}": m.proc.pid for n, m in enumerate(masters, 1) if m.proc}
    for n, m in enumerate(masters, 1):
        for r, replica in enumerate(cluster.replicas_of(m), 1):
            if replica.proc:
                nodes[f"redis {n} replica {r}"] = replica.proc.pid

    def flush() -> None:
        for master in masters:  # the replicas follow their masters
            with master.client() as client:
                client.flushall()

    def partitions() -> int | None:
        with cluster.master_of_key("hub:{config}").client() as client:
            return _partitions(client, "hub:{config}")

    connect: dict[str, Callable[[], redis.Redis]] = {
        f"redis {n}": m.client for n, m in enumerate(masters, 1)}
    replicas = len(nodes) - len(masters)
    label = f"cluster of {len(masters)} masters" + (f" + {replicas} replicas" if replicas else "")
    return Store("cluster", label, cluster.url, flush, nodes, partitions, connect)


def _command_stats(store: Store, reset: bool = False) -> dict[str, dict[str, int]]:
    """Calls and µs per command (INFO commandstats) summed over the store's masters, since
    the last reset (CONFIG RESETSTAT, with reset=True). Redis's own timing of each command,
    not its networking: less than its CPU, but it says which commands the CPU went to."""
    out: dict[str, dict[str, int]] = {}
    for connect in store.connect.values():
        with contextlib.suppress(redis.RedisError), connect() as client:
            if reset:
                client.config_resetstat()
                continue
            stats: dict[str, Any] = client.info("commandstats")
            for key, value in stats.items():
                name = key.removeprefix("cmdstat_")
                entry = out.setdefault(name, {"calls": 0, "usec": 0})
                entry["calls"] += int(value.get("calls", 0))
                entry["usec"] += int(value.get("usec", 0))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["usec"]))


def _scripts_text(commands: dict[str, dict[str, int]], events: int) -> str:
    """Script calls (EVALSHA) per event written: a create on the cluster is three (reserve
    the email, write the partition, confirm), each one per partition or email bucket a batch
    touches, where one node writes a whole batch in one."""
    calls = commands.get("evalsha", {}).get("calls")
    return "" if calls is None or events <= 0 else f", {calls / events:.2f} script calls/event"


def _commands_note(commands: dict[str, dict[str, int]], events: int) -> str:
    """The commands Redis spent most time on, per event written."""
    if not commands or events <= 0:
        return "no Redis command stats"
    top = list(commands.items())[:4]
    return "Redis commands per event written (calls, µs): " + ", ".join(
        f"{name} {c['calls'] / events:.2f}, {c['usec'] / events:.1f}" for name, c in top)


def _partitions(client: redis.Redis, key: str) -> int | None:
    """The partition count the hubs made the keyspace with (their config hash)."""
    with contextlib.suppress(redis.RedisError, ValueError, TypeError):
        value = client.hget(key, "partitions")
        return int(value) if value is not None else None
    return None


# -- CPU per event and what was at its limit --------------------------------------------------


def sched_ns(pid: int) -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one) of a process, all its threads summed
    (/proc/PID/task/*/schedstat); None where the kernel does not say."""
    run = wait = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (task / "schedstat").read_text().split()
            run, wait = run + int(fields[0]), wait + int(fields[1])
    return (run, wait) if run else None


class SchedMeter:
    """How long each process waited for a CPU while it could run, over a measurement:
    wait / (run + wait), from /proc schedstat before and after. A process at half a core
    that waited as long as it ran was held back by the machine, not by what it waits on."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.before = {label: sched_ns(pid) for label, pid in self.pids.items()}

    def waited(self) -> dict[str, float]:
        out = {}
        for label, pid in self.pids.items():
            a, b = self.before.get(label), sched_ns(pid)
            if a is None or b is None:
                continue
            run, wait = b[0] - a[0], b[1] - a[1]
            if run + wait > 0:
                out[label] = round(wait / (run + wait) * 100, 1)
        return out




def _costs(store: Store, cpu: dict[str, float], seconds: float,
           events: int) -> dict[str, float]:
    """µs of CPU per event written: each Redis node, "redis (sum)" over them, each hub and
    "hubs (sum)". `cpu` is % of one core over a window of `seconds`."""
    if events <= 0 or seconds <= 0:
        return {}

    def us(percent: float) -> float:
        return round(percent / 100 * seconds / events * 1e6, 2)

    out = {label: us(cpu[label]) for label in store.nodes if label in cpu}
    if len(out) > 1:
        out["redis (sum)"] = round(sum(out.values()), 2)
    hubs = {label: us(v) for label, v in cpu.items() if label.startswith("hub ")}
    out |= hubs
    if hubs:
        out["hubs (sum)"] = round(sum(hubs.values()), 2)
    return out


def _redis_total(cost: dict[str, float]) -> float | None:
    return cost.get("redis (sum)", cost.get("redis"))


def _cost_text(cost: dict[str, float]) -> str:
    redis_total, hubs = _redis_total(cost), cost.get("hubs (sum)")
    nodes = [(k, v) for k, v in cost.items() if k.startswith("redis ") and k != "redis (sum)"]
    text = "Redis —" if redis_total is None else f"Redis {redis_total:.1f} µs/event"
    if len(nodes) > 1:
        masters = [f"{v:.1f}" for k, v in nodes if "replica" not in k]
        replicas = [f"{v:.1f}" for k, v in nodes if "replica" in k]
        text += " (" + " + ".join(masters) + \
            (f"; replicas {' + '.join(replicas)}" if replicas else "") + ")"
    return text + ("" if hubs is None else f", hubs {hubs:.1f} µs/event")


def _cost_note(cost: dict[str, float]) -> str:
    if not cost:
        return "no CPU per event (nothing written)"
    return "CPU per event written: " + ", ".join(f"{k} {v:.1f} µs" for k, v in cost.items())


def _kind(label: str) -> str:
    if label.startswith("redis") and "(sum)" not in label:
        return "Redis"
    if label.startswith("hub "):
        return "hub"
    if label == "writer" or label.startswith("sub "):
        return "client"
    return ""


def at_limit(cpu: dict[str, float], waited: Mapping[str, float] | None = None) -> str:
    """Which processes used a core's worth (>= 85%) in a window of CpuMeter.percent figures,
    by kind (client, hub, Redis), or the busiest one when none did; the hubs and Redis nodes
    that waited for a CPU a fifth or more of the time they could run; and whether the
    machine had no idle CPU left."""
    procs = {label: v for label, v in cpu.items() if _kind(label)}
    full = sorted(((v, label) for label, v in procs.items() if v >= _SATURATED), reverse=True)
    if full:
        text = ", ".join(f"{_kind(label)} ({label} {v:.0f}%)" for v, label in full)
    elif procs:
        label = max(procs, key=lambda k: procs[k])
        text = f"no process (busiest: {_kind(label)}, {label} {procs[label]:.0f}%)"
    else:
        text = "not measured"
    starved = sorted(((v, k) for k, v in (waited or {}).items()
                      if _kind(k) and v >= _STARVED), reverse=True)
    if starved:
        text += "; waited for a CPU " + ", ".join(f"{k} {v:.0f}%" for v, k in starved) + \
            " of their runnable time"
    busy = cpu.get("system busy (% of all cores)")
    if busy is not None and busy >= _MACHINE_FULL:
        text += f"; the machine {busy:.0f}% busy (all cores)"
    return text
