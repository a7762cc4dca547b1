"""Which Redis Cluster client for hub (issue 12): redis-py's asyncio RedisCluster, coredis or
valkey-glide, chosen by measurement on a real cluster (harness.redis.ClusterProcess).

    python3 -m venv /tmp/probe-venv
    /tmp/probe-venv/bin/pip install redis==8.1.0 hiredis coredis valkey-glide uvloop
    /tmp/probe-venv/bin/python -m loadtest.cluster_clients [--runs 3] [--only pubsub|cpu]

The three libraries live in a venv of their own: hub's .venv keeps only what hub uses. Nothing
here is imported by the tests.

**pubsub**: a fresh cluster per run (3 masters, a replica each), 16 hash-tagged shard channels
`hub:{pN}:ev` spread over the masters, one subscriber per library SSUBSCRIBEd to all 16, and
one publisher (redis-py) doing 800 SPUBLISHes round-robin over them, a few ms apart:

* `move`: at the 200th and 400th SPUBLISH, the slot of one channel moves live to another master
  (migrate_slot: IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE). Redis then drops the shard
  subscriptions of that slot on the old owner (it sends them SUNSUBSCRIBE); the client has to
  subscribe again on the new one by itself.
* `failover`: at the 200th SPUBLISH, kill -9 of the master of one channel; its replica is
  promoted about two node timeouts later.

Counted per subscriber within 8 s after the last SPUBLISH: messages received of those the
publisher had acknowledged, duplicates, and for each channel the fault touched, how many of
the messages published after the fault was over arrived (`recovered` when the last 10 did,
`dead` when none did). redis-py runs twice: `redis-py` on a client of its own, as a listener
that only listens would; `redis-py/shared` on the publisher's client, whose MOVED replies
refresh its slot map and so reconcile the subscriptions (hub's store and bus could share one).

**cpu**: on a cluster of 3 masters (no replicas), each library in a fresh subprocess does
20,000 HGETALLs of small hashes spread over the slots, then 20,000 EVALSHAs of a small script
touching 2 keys of one slot, both from 32 concurrent tasks; client CPU (the process's user +
system time, every thread: glide's Rust core runs in threads of its own) per op, and ops/s.

This machine has 2 cores shared with other work: every run is printed, never only a mean.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from harness.redis import ClusterProcess, key_slot

LIBS = ("redis-py", "redis-py/shared", "coredis", "coredis/shared", "glide", "glide/shared")
CPU_LIBS = ("redis-py", "coredis", "glide")
CHANNELS = [f"hub:{{p{i}}}:ev" for i in range(16)]
MESSAGES = 800
GAP = 0.004  # between SPUBLISHes: 800 of them take ~4-5 s, time for the faults to land
AFTER_WAIT = 8.0
LATE = 65.0  # glide's periodic topology check runs every 60 s by default
LATE_SEQ = 100_000  # sequence numbers of the late probe's messages
SCRIPT = """
redis.call('HINCRBY', KEYS[1], 'n', 1)
return redis.call('HGET', KEYS[2], 'v')
"""


# -- subscribers -----------------------------------------------------------------------------


@dataclass
class Subscriber:
    """What one library's subscriber got: per channel, the sequence numbers, in order."""

    name: str
    got: dict[str, list[int]] = field(default_factory=lambda: {c: [] for c in CHANNELS})
    dropped_by_server: int = 0  # SUNSUBSCRIBEs it did not ask for (a slot left its node)
    errors: Counter[str] = field(default_factory=Counter)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, channel: bytes | str, data: bytes | str) -> None:
        ch = channel.decode() if isinstance(channel, bytes) else channel
        self.got[ch].append(int(data))

    def error(self, e: BaseException) -> None:
        self.errors[type(e).__name__] += 1


def seeds(cluster: ClusterProcess) -> list[tuple[str, int]]:
    return cluster.startup_nodes


def redispy_client(cluster: ClusterProcess, **kwargs: Any) -> Any:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds(cluster)],
                        **kwargs)


async def redispy_subscriber(sub: Subscriber, client: Any, stop: asyncio.Event,
                             own: bool) -> None:
    """redis-py 8.1: ClusterPubSub.ssubscribe (one PubSub per node) and a polling reader,
    get_sharded_message round-robin over the nodes' connections. `own`: the client is this
    subscriber's alone (closed here)."""
    await client.initialize()  # the slot map: ssubscribe routes by it, and does not load it
    ps = client.pubsub()
    try:
        await ps.ssubscribe(*CHANNELS)
        sub.ready.set()
        while not stop.is_set():
            if not ps.node_pubsub_mapping:  # every subscription gone: nothing to poll
                await asyncio.sleep(0.05)
                continue
            try:
                msg = await ps.get_sharded_message(timeout=0.05)
            except (redis.RedisError, OSError, RuntimeError) as e:
                sub.error(e)
                await asyncio.sleep(0.05)
                continue
            if msg is None:
                continue
            kind = msg["type"].decode() if isinstance(msg["type"], bytes) else msg["type"]
            if kind == "smessage":
                sub.record(msg["channel"], msg["data"])
            elif kind == "sunsubscribe":
                sub.dropped_by_server += 1
    finally:
        with contextlib.suppress(Exception):
            await ps.aclose()
        if own:
            with contextlib.suppress(Exception):
                await client.aclose()


async def coredis_subscriber(sub: Subscriber, cluster: ClusterProcess,
                             stop: asyncio.Event, shared: bool) -> None:
    """coredis: RedisCluster.sharded_pubsub (a connection per primary) read with
    get_message. `shared`: the client also carries keyed traffic (`store_traffic`)."""
    import coredis

    client = coredis.RedisCluster(startup_nodes=[{"host": h, "port": p}
                                                 for h, p in seeds(cluster)])
    async with (client, client.sharded_pubsub(channels=CHANNELS) as ps,
                store_traffic(sub, client.get if shared else None, stop)):
        sub.ready.set()
        while not stop.is_set():
            try:
                msg = await ps.get_message(timeout=0.1)
            except (coredis.exceptions.RedisError, OSError) as e:
                sub.error(e)
                await asyncio.sleep(0.05)
                continue
            if msg is None:
                continue
            if msg["type"] in ("message", "smessage"):
                sub.record(msg["channel"], msg["data"])
            elif msg["type"] == "sunsubscribe":
                sub.dropped_by_server += 1


async def glide_subscriber(sub: Subscriber, cluster: ClusterProcess,
                           stop: asyncio.Event, shared: bool) -> None:
    """valkey-glide: the subscriptions are part of the client's configuration (the Rust core
    keeps them across reconnects and topology changes); messages come to a push callback.
    `shared`: the client also carries keyed traffic (`store_traffic`)."""
    from glide import (
        GlideClusterClient,
        GlideClusterClientConfiguration,
        NodeAddress,
    )

    modes = GlideClusterClientConfiguration.PubSubChannelModes

    def on_message(msg: Any, context: Any) -> None:
        sub.record(msg.channel, msg.message)

    config = GlideClusterClientConfiguration(
        [NodeAddress(h, p) for h, p in seeds(cluster)],
        pubsub_subscriptions=GlideClusterClientConfiguration.PubSubSubscriptions(
            channels_and_patterns={modes.Sharded: set(CHANNELS)},
            callback=on_message, context=None))
    client = await GlideClusterClient.create(config)
    try:
        async with store_traffic(sub, client.get if shared else None, stop):
            sub.ready.set()
            await stop.wait()
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def store_traffic(sub: Subscriber, get: Callable[[str], Awaitable[Any]] | None,
                        stop: asyncio.Event) -> AsyncIterator[None]:
    """With `get`, a GET every 10 ms on the next channel's hash tag, through the subscriber's
    own client: what hub's store would send on a client it shares with the bus. A MOVED or a
    broken connection on that traffic is how a client learns that the topology changed."""
    async def run() -> None:
        i = 0
        while not stop.is_set():
            tag = CHANNELS[i % len(CHANNELS)].split(":")[1]
            i += 1
            try:
                await get(f"hub:{tag}:probe")  # type: ignore[misc]
            except Exception as e:  # every library's errors, counted, never fatal here
                sub.errors[f"traffic {type(e).__name__}"] += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(run()) if get is not None else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- the pub/sub run -------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    channels: list[str]
    at_seq: int
    done_seq: int = -1  # the first SPUBLISH sent after the fault was over
    done_t: float = 0.0  # when it was over (time.monotonic)
    detail: str = ""


async def pubsub_run(scenario: str, dir: Path) -> dict[str, Any]:
    with ClusterProcess(dir, masters=3, replicas_per_master=1) as cluster:
        owners = {c: cluster.master_of_key(c).port for c in CHANNELS}
        spread = Counter(owners.values())
        publisher = redispy_client(cluster, socket_timeout=2, socket_connect_timeout=1)
        stop = asyncio.Event()
        subs = {name: Subscriber(name) for name in LIBS}
        starters: dict[str, Callable[[], Awaitable[None]]] = {
            "redis-py": lambda: redispy_subscriber(
                subs["redis-py"], redispy_client(cluster), stop, own=True),
            "redis-py/shared": lambda: redispy_subscriber(
                subs["redis-py/shared"], publisher, stop, own=False),
            "coredis": lambda: coredis_subscriber(subs["coredis"], cluster, stop, False),
            "coredis/shared": lambda: coredis_subscriber(
                subs["coredis/shared"], cluster, stop, True),
            "glide": lambda: glide_subscriber(subs["glide"], cluster, stop, False),
            "glide/shared": lambda: glide_subscriber(subs["glide/shared"], cluster, stop, True),
        }
        tasks = {name: asyncio.create_task(start(), name=name)
                 for name, start in starters.items()}
        await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in subs.values())), 15)
        await wait_subscribed(cluster, len(subs))

        faults = plan_faults(scenario, cluster, owners)
        acked: dict[str, list[int]] = {c: [] for c in CHANNELS}
        failed: Counter[str] = Counter()
        fault_tasks: list[asyncio.Task[None]] = []
        seq_now = 0
        sent_at: dict[int, float] = {}  # seq -> when its SPUBLISH was sent

        async def inject(fault: Fault) -> None:
            if fault.kind == "move":
                slot = key_slot(fault.channels[0])
                source = cluster.master_of_slot(slot)
                target = next(m for m in cluster.masters() if m.port != source.port)
                await asyncio.to_thread(cluster.migrate_slot, slot, target)
                fault.detail = f"slot {slot} {source.port} -> {target.port}"
            else:
                victim = cluster.master_of_key(fault.channels[0])
                t0 = time.monotonic()
                await asyncio.to_thread(cluster.kill_master, victim)
                new = await asyncio.to_thread(cluster.wait_failover)
                fault.detail = (f"master {victim.port} killed, {new.port} promoted in "
                                f"{time.monotonic() - t0:.1f}s")
            fault.done_seq, fault.done_t = seq_now + 1, time.monotonic()

        started = time.monotonic()
        for seq in range(MESSAGES):
            seq_now = seq
            for fault in faults:
                if fault.at_seq == seq:
                    fault_tasks.append(asyncio.create_task(inject(fault)))
            channel = CHANNELS[seq % len(CHANNELS)]
            sent_at[seq] = time.monotonic()
            try:
                await publisher.spublish(channel, str(seq))
                acked[channel].append(seq)
            except (redis.RedisError, OSError) as e:
                failed[type(e).__name__] += 1
            await asyncio.sleep(GAP)
        publish_s = time.monotonic() - started
        await asyncio.gather(*fault_tasks)

        expected = sum(len(v) for v in acked.values())
        # Polled, not awaited on an event: "everything arrived" is what is being measured.
        for _ in range(int(AFTER_WAIT / 0.1)):
            if all(received(s, acked) >= expected for s in subs.values()):
                break
            await asyncio.sleep(0.1)
        counted = {name: summarize(s, acked, faults) for name, s in subs.items()}
        await late_probe(publisher, subs, faults, sent_at, LATE)
        back = {name: back_after(s, faults, sent_at) for name, s in subs.items()}
        stop.set()
        done, pending = await asyncio.wait(tasks.values(), timeout=10)
        for task in pending:
            task.cancel()
        for name, task in tasks.items():
            if task in done and task.exception() is not None:
                subs[name].error(task.exception())  # type: ignore[arg-type]
        with contextlib.suppress(Exception):
            await publisher.aclose()

        return {
            "scenario": scenario,
            "spread": sorted(spread.values()),
            "publish_s": round(publish_s, 2),
            "acked": expected,
            "publish_failed": dict(failed),
            "faults": [{"kind": f.kind, "channels": f.channels, "detail": f.detail,
                        "at_seq": f.at_seq, "done_seq": f.done_seq} for f in faults],
            "subscribers": {name: {**counted[name], "back_after": back[name]}
                            for name in subs},
        }


async def late_probe(publisher: Any, subs: dict[str, Subscriber], faults: list[Fault],
                     sent_at: dict[int, float], within: float) -> None:
    """After the counted window: one SPUBLISH a second on each channel a fault touched, for
    up to `within` s, until every subscriber has had a message sent after the fault on each.
    A subscription that comes back late (a periodic topology check, a reconnect's backoff)
    shows here; one that died for good never does."""
    marker = LATE_SEQ
    started = time.monotonic()
    while not all(back_after(sub, faults, sent_at, final=False) for sub in subs.values()):
        if time.monotonic() - started > within:
            return
        for fault in faults:
            for channel in fault.channels:
                sent_at[marker] = time.monotonic()
                with contextlib.suppress(redis.RedisError, OSError):
                    await publisher.spublish(channel, str(marker))
                marker += 1
        await asyncio.sleep(1)


def back_after(sub: Subscriber, faults: list[Fault], sent_at: dict[int, float],
               final: bool = True) -> dict[str, str]:
    """Per channel a fault touched: how long after the fault was over the first message sent
    after it was sent that reached `sub` ("never": none did). With final=False, {} unless
    every such channel is back."""
    out: dict[str, str] = {}
    for fault in faults:
        for channel in fault.channels:
            later = [s for s in sub.got[channel] if s >= fault.done_seq]
            if later:
                out[channel] = f"{max(0.0, sent_at[min(later)] - fault.done_t):.1f}s"
            elif final:
                out[channel] = f"never ({LATE:.0f}s)"
            else:
                return {}
    return out


def plan_faults(scenario: str, cluster: ClusterProcess, owners: dict[str, int]) -> list[Fault]:
    if scenario == "move":
        # Two channels on different masters, each moving to another one.
        first = CHANNELS[0]
        second = next(c for c in CHANNELS[1:] if owners[c] != owners[first])
        return [Fault("move", [first], 200), Fault("move", [second], 400)]
    victim = owners[CHANNELS[2]]
    return [Fault("failover", [c for c in CHANNELS if owners[c] == victim], 200)]


async def wait_subscribed(cluster: ClusterProcess, n: int, within: float = 10) -> None:
    """Until every channel has `n` shard subscribers on its master."""
    def counts() -> list[int]:
        out = []
        for channel in CHANNELS:
            with cluster.master_of_key(channel).client() as client:
                reply = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            out.append(int(reply[1]))
        return out

    deadline = time.monotonic() + within
    while (got := await asyncio.to_thread(counts)) != [n] * len(CHANNELS):
        if time.monotonic() > deadline:
            raise RuntimeError(f"shard subscribers per channel: {got}, wanted {n}")
        await asyncio.sleep(0.05)


def received(sub: Subscriber, acked: dict[str, list[int]]) -> int:
    # Only what the counted window published; the late probe's messages are apart.
    return sum(len(set(sub.got[c]) & set(acked[c])) for c in CHANNELS)


def summarize(sub: Subscriber, acked: dict[str, list[int]],
              faults: list[Fault]) -> dict[str, Any]:
    touched: dict[str, str] = {}
    for fault in faults:
        for channel in fault.channels:
            after = [s for s in acked[channel] if s >= fault.done_seq]
            got = set(sub.got[channel])
            n = sum(1 for s in after if s in got)
            state = ("recovered" if after and all(s in got for s in after[-10:])
                     else "dead" if n == 0 else "partial")
            touched[channel] = f"{state} {n}/{len(after)}"
    return {
        "received": received(sub, acked),
        "duplicates": sum(len(v) - len(set(v)) for v in sub.got.values()),
        "out_of_order": sum(1 for v in sub.got.values() if v != sorted(v)),  # channels
        "after_fault": touched,
        "server_sunsubscribes": sub.dropped_by_server,
        "errors": dict(sub.errors),
    }


# -- the CPU run (one library per subprocess) -----------------------------------------------


HASHES = [f"bench:{{u{i}}}" for i in range(64)]
PAIRS = [(f"bench:{{p{i}}}:a", f"bench:{{p{i}}}:b") for i in range(64)]


def seed_data(cluster: ClusterProcess) -> None:
    from redis.cluster import ClusterNode, RedisCluster

    with RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds(cluster)]) as c:
        for key in HASHES:
            c.hset(key, mapping={"id": key, "email": "a@example.com", "name": "Ada",
                                 "version": "3"})
        for a, b in PAIRS:
            c.hset(a, "n", 0)
            c.hset(b, "v", "x" * 32)


async def drive(op: Callable[[int], Awaitable[Any]], ops: int, concurrency: int
                ) -> dict[str, float]:
    async def worker(w: int) -> None:
        for i in range(w, ops, concurrency):
            await op(i)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {"cpu_us_per_op": round(cpu / ops * 1e6, 1), "ops_s": round(ops / wall)}


async def cpu_child(lib: str, addrs: list[tuple[str, int]], ops: int,
                    concurrency: int) -> dict[str, Any]:
    # The warm-up pass is a tenth of the measured one.
    warm = max(ops // 10, concurrency)
    out: dict[str, Any] = {}
    if lib == "redis-py":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in addrs])
        script = client.register_script(SCRIPT)
        await client.initialize()
        hget = lambda i: client.hgetall(HASHES[i % 64])  # noqa: E731
        ev = lambda i: script(keys=list(PAIRS[i % 64]), args=[])  # noqa: E731
        await drive(hget, warm, concurrency)
        out["hgetall"] = await drive(hget, ops, concurrency)
        await drive(ev, warm, concurrency)
        out["evalsha"] = await drive(ev, ops, concurrency)
        await client.aclose()
    elif lib == "coredis":
        import coredis

        client = coredis.RedisCluster(startup_nodes=[{"host": h, "port": p}
                                                     for h, p in addrs])
        async with client:
            cscript = client.register_script(SCRIPT)
            hget = lambda i: client.hgetall(HASHES[i % 64])  # noqa: E731
            ev = lambda i: cscript(keys=list(PAIRS[i % 64]), args=[])  # noqa: E731
            await drive(hget, warm, concurrency)
            out["hgetall"] = await drive(hget, ops, concurrency)
            await drive(ev, warm, concurrency)
            out["evalsha"] = await drive(ev, ops, concurrency)
    else:
        from glide import (
            GlideClusterClient,
            GlideClusterClientConfiguration,
            NodeAddress,
            Script,
        )

        gclient = await GlideClusterClient.create(GlideClusterClientConfiguration(
            [NodeAddress(h, p) for h, p in addrs], request_timeout=5000))
        gscript = Script(SCRIPT)
        hget = lambda i: gclient.hgetall(HASHES[i % 64])  # noqa: E731
        ev = lambda i: gclient.invoke_script(gscript, keys=list(PAIRS[i % 64]))  # noqa: E731
        await drive(hget, warm, concurrency)
        out["hgetall"] = await drive(hget, ops, concurrency)
        await drive(ev, warm, concurrency)
        out["evalsha"] = await drive(ev, ops, concurrency)
        await gclient.close()
    return out


def run_child(lib: str, cluster: ClusterProcess, ops: int, concurrency: int,
              loop: str) -> dict[str, Any]:
    addrs = ",".join(f"{h}:{p}" for h, p in seeds(cluster))
    argv = [sys.executable, "-m", "loadtest.cluster_clients", "--child", lib,
            "--addrs", addrs, "--ops", str(ops), "--concurrency", str(concurrency),
            "--loop", loop]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["?"]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- main ------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for dist in ("redis", "hiredis", "coredis", "valkey-glide", "uvloop"):
        try:
            out[dist] = version(dist)
        except Exception:
            out[dist] = "-"
    return out


def quiet_glide() -> None:
    """glide's Rust core logs WARN to the console (every disconnect, every MOVED): errors
    only, so the figures stay readable."""
    from glide import Logger, LogLevel

    Logger.set_logger_config(LogLevel.ERROR)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["pubsub", "cpu"])
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--loops", nargs="+", default=["asyncio", "uvloop"],
                        choices=["asyncio", "uvloop"], help="event loops of the CPU runs")
    parser.add_argument("--json", type=Path, help="write every figure here too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--addrs", help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    args = parser.parse_args()

    quiet_glide()
    if args.child:
        addrs = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in args.addrs.split(",")]
        coro = cpu_child(args.child, addrs, args.ops, args.concurrency)
        if args.loop == "uvloop":
            import uvloop

            result = uvloop.run(coro)
        else:
            result = asyncio.run(coro)
        print(json.dumps(result))
        return 0

    print(f"versions: {versions()}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}")
    results: dict[str, Any] = {"versions": versions(), "pubsub": [], "cpu": []}
    with tempfile.TemporaryDirectory(prefix="cluster-clients-") as tmp:
        if args.only in (None, "pubsub"):
            for run in range(args.runs):
                for scenario in ("move", "failover"):
                    r = asyncio.run(pubsub_run(scenario, Path(tmp) / f"ps-{scenario}-{run}"))
                    r["run"] = run + 1
                    r["load"] = round(os.getloadavg()[0], 1)
                    results["pubsub"].append(r)
                    print_pubsub(r)
        if args.only in (None, "cpu"):
            with ClusterProcess(Path(tmp) / "cpu", masters=3, replicas_per_master=0) as c:
                seed_data(c)
                print(f"\ncpu: {args.ops} ops per kind at concurrency {args.concurrency}, "
                      "3 masters")
                for loop in args.loops:
                    for run in range(args.runs):
                        for lib in CPU_LIBS:  # interleaved: the machine's noise hits all
                            r = run_child(lib, c, args.ops, args.concurrency, loop)
                            row = {"lib": lib, "loop": loop, "run": run + 1,
                                   "load": round(os.getloadavg()[0], 1), **r}
                            results["cpu"].append(row)
                            print_cpu(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def print_pubsub(r: dict[str, Any]) -> None:
    print(f"\npubsub run {r['run']} {r['scenario']} (load {r['load']}): "
          f"{r['acked']} of {MESSAGES} SPUBLISHes acknowledged in {r['publish_s']}s "
          f"(failed: {r['publish_failed'] or 'none'}); "
          f"channels per master {r['spread']}")
    for f in r["faults"]:
        print(f"  fault {f['kind']} at #{f['at_seq']}, over by #{f['done_seq']}: "
              f"{f['detail']}; channels {', '.join(f['channels'])}")
    for name, s in r["subscribers"].items():
        after = ", ".join(f"{c.split(':')[1]} {v}" for c, v in s["after_fault"].items())
        late = ", ".join(f"{c.split(':')[1]} {v}" for c, v in s["back_after"].items())
        print(f"  {name:16} received {s['received']:4}/{r['acked']}  dup {s['duplicates']}  "
              f"server-sunsub {s['server_sunsubscribes']}\n"
              f"      after the fault: {after}\n      back after: {late}"
              + (f"\n      errors {s['errors']}" if s["errors"] else ""))
    sys.stdout.flush()


def print_cpu(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"  {row['lib']:9} {row['loop']:8} run {row['run']}: ERROR {row['error']}")
    else:
        h, e = row["hgetall"], row["evalsha"]
        print(f"  {row['lib']:9} {row['loop']:8} run {row['run']}: "
              f"HGETALL {h['cpu_us_per_op']:6.1f} us/op {h['ops_s']:6}/s   "
              f"EVALSHA {e['cpu_us_per_op']:6.1f} us/op {e['ops_s']:6}/s   "
              f"(load {row['load']})")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
