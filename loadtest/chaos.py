"""Fault injection with a checker: real Redis and hub processes, a randomized schedule of faults,
writers and Sync subscribers recording everything, then a pure check of what they recorded.

    .venv/bin/python -m loadtest.chaos --duration 600 --seed 1 [--sentinel] [--replicas-ack]
    .venv/bin/python -m loadtest.chaos --cluster --duration 600 --seed 1 [--replicas-ack]

What runs (all on 127.0.0.1, every process dying with this one):

* Redis: a primary and one replica. With --sentinel, 3 Sentinels too, and the hubs use a
  `redis+sentinel://.../hub` URL; otherwise a plain `redis://` URL to the primary. With
  --cluster, a Redis Cluster instead (harness.redis.ClusterProcess: 3 masters, a replica
  each) and a `redis+cluster://` URL, the hubs on 128 partitions.
* Two `hub serve` (HUB_HEARTBEAT_INTERVAL=0.5, HUB_WRITE_RATE=0, HUB_SHUTDOWN_GRACE=1,
  HUB_REDIS_REPLICAS_ACK=1 with --replicas-ack).
* Writers: creates, updates and deletes through both hubs. Each writer owns its users, so it
  knows their versions and sends `expected_version` on every update and delete. Every outcome
  is recorded: acknowledged (with its version), failed (its status code), or unknown
  (DEADLINE_EXCEEDED and the like: it may or may not have landed, and is never counted as
  acknowledged).
* Subscribers: `hub.client.SyncFeed([A, B])`, some following everyone, some a subset, most
  from a snapshot, one live from before the first write. Each records, in order, the batches it
  got, every `ContinuityLost` and every time its stream started over.

Faults, one every 1.5-4 s, drawn from `random.Random(seed)` before the run starts (a failing
seed replays the same schedule; only timing differs): kill -9 or SIGTERM of a hub, then a
restart on the same port; the Redis primary restarted from an older RDB snapshot (a
rollback); with --sentinel, kill -9 of the primary so the Sentinels promote the replica, the
old primary coming back as a replica; `CLIENT KILL TYPE pubsub`; `CLIENT PAUSE <ms> WRITE` and
`ALL`; a subscriber stalled (reads nothing for seconds), slowed (sleeps between responses), or
moved (closes its stream and resumes from its token on the other hub).

With --cluster the Redis faults are the cluster's own: kill -9 of a master (the cluster
promotes its replica; the old master, restarted after a while, comes back as that one's
replica), a live slot move (the slot of a random partition migrated to another master, keys
and all, in small batches so writes meet it half-moved), and `CLIENT KILL TYPE pubsub`,
`CLIENT PAUSE WRITE` / `ALL` on one master. Rollbacks and Sentinel promotions are not drawn.

Then faults stop, writers stop, the feeds catch up, the store is read with ListUsers, and
`check()` (a pure function of the recorded data, see its docstring) lists the violations.
The output gives the seed, the faults by kind, the counts and the first violations in
detail; the exit status is 0 iff there were none (1: violations, 2: the run itself failed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import redis
from redis.crc import key_slot

from harness.hub import ROOT, HubProcess
from harness.redis import (
    ClusterNode,
    ClusterProcess,
    HarnessError,
    RedisProcess,
    SentinelProcess,
    sentinel_url,
    wait_for_master,
)
from hub.api.user.v1 import common_pb2
from hub.client import AsyncUserClient, ClientError, ContinuityLost, SyncFeed
from hub.store.cluster import partition_tags

# ================================================================================================
# What a run records. Plain data, so the checker below is a pure function and its unit tests
# can fabricate histories.
# ================================================================================================

# A UserEvent reduced to what the checker reads. `kind`: created/updated/deleted/snapshot.
Kind = Literal["created", "updated", "deleted", "snapshot"]
_KINDS: dict[int, Kind] = {
    common_pb2.EVENT_TYPE_CREATED: "created", common_pb2.EVENT_TYPE_UPDATED: "updated",
    common_pb2.EVENT_TYPE_DELETED: "deleted", common_pb2.EVENT_TYPE_SNAPSHOT: "snapshot",
}


@dataclass(frozen=True, slots=True)
class Ev:
    user: str
    version: int
    kind: Kind


@dataclass(frozen=True, slots=True)
class Batch:
    """One SyncResponse as received (heartbeats without events are not kept)."""

    t: float
    events: tuple[Ev, ...]
    snapshot_complete: bool = False


@dataclass(frozen=True, slots=True)
class Lost:
    """A `ContinuityLost` from the feed (the stream ended OUT_OF_RANGE): the explicit signal
    that events were lost. A snapshot follows."""

    t: float
    reason: str


@dataclass(frozen=True, slots=True)
class Restart:
    """The subscriber's stream started over: the feed reconnected by itself, or the
    subscriber was moved to the other hub. Mid-snapshot, that snapshot starts again."""

    t: float
    why: str


Item = Batch | Lost | Restart


@dataclass
class SubscriberLog:
    name: str
    users: frozenset[str] | None  # None: all users
    snapshot: bool  # subscribed with snapshot=True (else live from before the first write)
    items: list[Item] = field(default_factory=list)


Outcome = Literal["ack", "failed", "unknown"]
# Outcome unknown: the call ended without the server's answer. The write may have landed.
UNKNOWN_CODES = frozenset({"DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN"})
# Failed, yet possibly applied: a hub killed mid-call, or a write whose replica
# acknowledgement timed out (README: UNAVAILABLE writes may have been applied).
MAYBE_APPLIED_CODES = frozenset({"UNAVAILABLE", "INTERNAL"})


@dataclass(frozen=True, slots=True)
class Write:
    t0: float
    t1: float
    writer: str
    target: str
    op: Literal["create", "update", "delete"]
    user: str  # "" for a create that was not acknowledged (its id is unknown)
    version: int  # the version the write makes (a delete: the deleting version, last + 1)
    outcome: Outcome
    code: str = "OK"

    @property
    def maybe_applied(self) -> bool:
        return self.outcome != "failed" or self.code in MAYBE_APPLIED_CODES


@dataclass
class Fault:
    t0: float
    t1: float
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recording:
    seed: int
    duration: float
    sentinel: bool
    replicas_ack: bool
    subscribers: list[SubscriberLog]
    writes: list[Write]
    faults: list[Fault]
    store: dict[str, int]  # user id -> version, read with ListUsers at the end (hub A)
    # The same listing through every hub: all must agree, or a hub serves another history.
    listings: dict[str, dict[str, int]] = field(default_factory=dict)
    cluster: bool = False  # over a Redis Cluster (--cluster)


# ================================================================================================
# The checker: pure functions of a Recording.
# ================================================================================================


@dataclass(frozen=True, slots=True)
class Violation:
    subscriber: str  # "" for violations of the store (lost acknowledged writes)
    kind: str
    t: float
    detail: str

    def __str__(self) -> str:
        who = self.subscriber or "store"
        return f"[{self.kind}] {who} at {self.t:.2f}s: {self.detail}"


@dataclass
class _UserState:
    """One user within one chain of one subscriber."""

    snap: int | None = None  # version given by the chain's snapshot
    last: int | None = None  # last live event's version
    seen: set[int] = field(default_factory=set)  # live versions received
    deleted: bool = False


@dataclass
class SubscriberStats:
    events: int = 0  # change events (not snapshot events)
    snapshot_events: int = 0
    continuity_signals: int = 0
    restarts: int = 0
    covered_by_snapshot: int = 0  # live events at or below the snapshot's version (allowed)
    chains: int = 1


def check_stream(log: SubscriberLog) -> tuple[list[Violation], SubscriberStats]:
    """Checks one subscriber's stream, split into chains by explicit continuity signals.

    Within a chain, per user:
      1. versions of live events strictly increase;
      2. no live event comes twice;
      3. no silent gap: after the chain's first sighting of the user (a snapshot event or a
         live event), each live event is exactly the next version; nothing comes after a
         delete. Every write bumps the version by one, so a skipped version is an event the
         subscriber should have had (acknowledged or not, it landed).
    A `Lost` item starts a new chain (and the snapshot that follows it). A snapshot event
    resets the user's baseline. Live events at or below the snapshot's version are allowed:
    a snapshot is read after its subscription went live, so changes it already shows may
    still arrive (README, "List, then watch"). A `Restart` while a snapshot is incomplete
    means the snapshot starts over from a fresh subscription: the chain's state is reset.
    Also flagged: a live event before snapshot_complete, an event for a user not followed.
    """
    out: list[Violation] = []
    stats = SubscriberStats()
    state: dict[str, _UserState] = {}
    in_snapshot = log.snapshot

    def flag(kind: str, t: float, detail: str) -> None:
        out.append(Violation(log.name, kind, t, f"chain {stats.chains}: {detail}"))

    for item in log.items:
        if isinstance(item, Lost):
            stats.continuity_signals += 1
            stats.chains += 1
            state.clear()
            in_snapshot = True  # SyncFeed snapshots again after OUT_OF_RANGE
            continue
        if isinstance(item, Restart):
            stats.restarts += 1
            if in_snapshot:
                state.clear()
            continue
        for ev in item.events:
            if log.users is not None and ev.user not in log.users:
                flag("unfollowed", item.t, f"event for {ev.user} v{ev.version}, not followed")
                continue
            if ev.kind == "snapshot":
                stats.snapshot_events += 1
                if not in_snapshot:
                    flag("protocol", item.t, f"snapshot event {ev.user} v{ev.version} after"
                         " snapshot_complete")
                state[ev.user] = _UserState(snap=ev.version)
                continue
            stats.events += 1
            if in_snapshot:
                flag("protocol", item.t, f"live event {ev.user} v{ev.version} ({ev.kind})"
                     " before snapshot_complete")
            st = state.get(ev.user)
            if st is None:  # first sighting in this chain: the baseline
                state[ev.user] = _UserState(last=ev.version, seen={ev.version},
                                            deleted=ev.kind == "deleted")
                continue
            v = ev.version
            if v in st.seen:
                flag("duplicate", item.t, f"{ev.user} v{v} ({ev.kind}) delivered again")
                continue
            if st.last is not None and v < st.last:
                flag("backwards", item.t, f"{ev.user} v{v} ({ev.kind}) after v{st.last}")
                # Re-based on it: one report per incident, not one per later event.
                state[ev.user] = _UserState(last=v, seen={v}, deleted=ev.kind == "deleted")
                continue
            if st.snap is not None and v <= st.snap:
                stats.covered_by_snapshot += 1
            else:
                base = max(st.snap or 0, st.last or 0)
                if st.deleted:
                    flag("after_delete", item.t, f"{ev.user} v{v} ({ev.kind}) after its"
                         f" delete at v{base}")
                elif v != base + 1:
                    missing = f"v{base + 1}" if v == base + 2 else f"v{base + 1}..v{v - 1}"
                    flag("gap", item.t, f"{ev.user} jumped from v{base} to v{v} ({ev.kind}):"
                         f" {missing} never delivered, no continuity signal")
            st.last = v
            st.seen.add(v)
            st.deleted = st.deleted or ev.kind == "deleted"
        if item.snapshot_complete:
            in_snapshot = False
    return out, stats


def final_view(log: SubscriberLog) -> tuple[dict[str, int], bool]:
    """What a client applying this stream holds at its end (user id -> version), as the
    README's SyncFeed loop builds it: a snapshot replaces the view once complete, a live event
    applies if newer than what the view has, a delete removes the user. Also returns whether
    the stream ended inside a snapshot (the view is then the one before it)."""
    view: dict[str, int] = {}
    gone: dict[str, int] = {}  # deleted users: their deleting version
    pending: dict[str, int] | None = {} if log.snapshot else None  # a snapshot being read
    for item in log.items:
        if isinstance(item, Lost):
            pending = {}
            continue
        if isinstance(item, Restart):
            if pending is not None:
                pending = {}
            continue
        for ev in item.events:
            if ev.kind == "snapshot":
                if pending is not None:
                    pending[ev.user] = ev.version
                continue
            if ev.version <= max(view.get(ev.user, 0), gone.get(ev.user, 0)):
                continue
            if ev.kind == "deleted":
                view.pop(ev.user, None)
                gone[ev.user] = ev.version
            else:
                view[ev.user] = ev.version
        if item.snapshot_complete and pending is not None:
            view, gone, pending = pending, {}, None
    return view, pending is not None


def followed(log: SubscriberLog, users: Mapping[str, int]) -> dict[str, int]:
    return dict(users) if log.users is None else {
        u: v for u, v in users.items() if u in log.users}


def check_final(log: SubscriberLog, store: Mapping[str, int], t: float) -> list[Violation]:
    """4. The subscriber's final view equals the store, for the users it follows."""
    view, mid_snapshot = final_view(log)
    view, want = followed(log, view), followed(log, store)
    if mid_snapshot:
        return [Violation(log.name, "final_view", t, "the stream ended inside a snapshot")]
    if view == want:
        return []
    missing = sorted(set(want) - set(view))
    extra = sorted(set(view) - set(want))
    stale = sorted(u for u in set(want) & set(view) if want[u] != view[u])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]} v{want[missing[0]]})")
    if extra:
        parts.append(f"{len(extra)} not in the store (e.g. {extra[0]} v{view[extra[0]]})")
    if stale:
        u = stale[0]
        parts.append(f"{len(stale)} at another version (e.g. {u}: view v{view[u]},"
                     f" store v{want[u]})")
    return [Violation(log.name, "final_view", t, "; ".join(parts))]


def loss_windows(faults: Sequence[Fault], replicas_ack: bool) -> list[tuple[float, float, str]]:
    """When acknowledged writes may legitimately be lost, as (from, to, why).

    A rollback restarts the primary from an RDB taken at `snapshot_at`; its replica resyncs
    from it, so what was acknowledged after that RDB is gone from every copy, replica acks or
    not. Even where the Sentinels then fail over to the replica (`failover`), the replica may
    have resynced from the restored node first (seen: seed 21, 2,315 writes acknowledged with
    --replicas-ack gone after a rollback with failover): a restore from an older backup is a
    loss no client-side ack prevents. A promotion without replica acks loses whatever the
    replica had not yet received when its primary was killed: a Sentinel's (`promote`), or
    a Redis Cluster's after a master's kill -9 (`master_kill`)."""
    windows = []
    for f in faults:
        if f.kind == "rollback":
            windows.append((float(f.detail["snapshot_at"]), f.t1, "rollback"))
        elif f.kind in ("promote", "master_kill") and not replicas_ack:
            windows.append((f.t0 - 10.0, f.t1, "promotion"))
    return windows


def check_durability(writes: Sequence[Write], faults: Sequence[Fault],
                     store: Mapping[str, int], replicas_ack: bool, t: float
                     ) -> tuple[list[Violation], int]:
    """5. Every acknowledged write is in the final store: its user at that version or later,
    or gone after a delete that may have applied. Writes acknowledged inside a loss window
    (see `loss_windows`) are exempt; they are counted and returned."""
    windows = loss_windows(faults, replicas_ack)
    deletes: dict[str, list[int]] = {}
    for w in writes:
        if w.op == "delete" and w.maybe_applied:
            deletes.setdefault(w.user, []).append(w.version)
    out: list[Violation] = []
    exempt = 0
    for w in writes:
        if w.outcome != "ack":
            continue
        have = store.get(w.user)
        if w.op == "delete":
            if have is None:
                continue
        elif have is not None and have >= w.version:
            continue
        elif have is None and any(d > w.version for d in deletes.get(w.user, ())):
            continue  # deleted later by a write that may have landed
        if any(lo <= w.t1 <= hi for lo, hi, _ in windows):
            exempt += 1
            continue
        now = "absent" if have is None else f"at v{have}"
        out.append(Violation("", "lost_write", w.t1,
                             f"{w.op} {w.user} v{w.version} acknowledged by {w.target} at"
                             f" {w.t1:.2f}s, but the store has it {now}"))
    return out, exempt


def check_listings(listings: Mapping[str, Mapping[str, int]], t: float) -> list[Violation]:
    """The hubs list the same users at the same versions (one store, one history)."""
    out = []
    items = list(listings.items())
    for (ta, a), (tb, b) in itertools.pairwise(items):
        if a == b:
            continue
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        other = sorted(u for u in set(a) & set(b) if a[u] != b[u])
        out.append(Violation("", "split_store", t,
                             f"{ta} and {tb} list different stores: {len(only_a)} users only"
                             f" on {ta}, {len(only_b)} only on {tb}, {len(other)} at other"
                             f" versions" + (f" (e.g. {other[0]}: v{a[other[0]]} vs"
                                             f" v{b[other[0]]})" if other else "")))
    return out


@dataclass
class Report:
    violations: list[Violation]
    stats: dict[str, SubscriberStats]
    exempt_losses: int


# Codes a write may get from hub for a fault it did not cause; anything else a fault
# provokes (INTERNAL above all: "INTERNAL means a bug") is hub's own failure.
BUG_CODES = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})


def check_codes(writes: Sequence[Write]) -> list[Violation]:
    """6. No write was answered with a code that means a bug in hub."""
    return [Violation("", "bug_status", w.t1, f"{w.op} {w.user or '(new user)'} through"
                      f" {w.target} was answered {w.code}")
            for w in writes if w.code in BUG_CODES]


def check(rec: Recording) -> Report:
    """All checks (1-6) over a finished run."""
    end = max([rec.duration, *(f.t1 for f in rec.faults)])
    violations: list[Violation] = []
    stats: dict[str, SubscriberStats] = {}
    for log in rec.subscribers:
        found, stats[log.name] = check_stream(log)
        violations += found
        violations += check_final(log, rec.store, end)
    lost, exempt = check_durability(rec.writes, rec.faults, rec.store, rec.replicas_ack, end)
    violations += lost
    violations += check_listings(rec.listings, end)
    violations += check_codes(rec.writes)
    return Report(violations, stats, exempt)


# ================================================================================================
# The schedule: drawn from the seed alone, before anything runs.
# ================================================================================================

# Relative weights. A rollback needs a snapshot taken earlier: when none is left, its turn
# takes one instead. The cluster's kinds come last, so the other modes draw as they did
# before there were any.
WEIGHTS: dict[str, int] = {
    "hub_kill": 3, "hub_term": 1, "rollback": 3, "promote": 2, "pubsub_kill": 2,
    "pause_write": 2, "pause_all": 2, "stall": 2, "slow": 2, "move": 3,
    "master_kill": 2, "slot_move": 3,
}
SENTINEL_ONLY = frozenset({"promote"})
CLUSTER_ONLY = frozenset({"master_kill", "slot_move"})
# One history restored from an older RDB, one primary a Sentinel names: not a cluster's.
NOT_ON_CLUSTER = frozenset({"rollback", "promote"})
# The partitions of a cluster run (the default on a redis+cluster:// URL). Partition p's
# keys carry the hash tag partition_tags(128)[p]: a slot move of its slot moves all of them.
CLUSTER_PARTITIONS = 128


def kinds_for(sentinel: bool, cluster: bool) -> list[str]:
    """The fault kinds a mode draws from, in WEIGHTS order."""
    if cluster:
        return [k for k in WEIGHTS if k not in NOT_ON_CLUSTER]
    return [k for k in WEIGHTS if k not in CLUSTER_ONLY and (sentinel or k not in SENTINEL_ONLY)]


@dataclass(frozen=True, slots=True)
class Planned:
    at: float  # seconds after the fault phase began
    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def param(self, name: str) -> Any:
        return dict(self.params)[name]


def plan(seed: int, duration: float, sentinel: bool, subscribers: int,
         kinds: Iterable[str] | None = None, cluster: bool = False) -> list[Planned]:
    """The faults of a run: one every 1.5-4 s for `duration` seconds, each with its
    parameters, from `random.Random(seed)` only. On a cluster, a fault on "a master" names
    it by its index among the masters of the moment (in start order), a slot move the
    partition whose slot moves and the index of its new owner among the other masters."""
    rng = random.Random(seed)
    mode = kinds_for(sentinel, cluster)
    allowed = [k for k in (kinds or WEIGHTS) if k in mode]
    weights = [WEIGHTS[k] for k in allowed]
    # The first snapshot comes right away: writes made after it are what a rollback loses.
    out = [Planned(0.0, "snapshot")] if "rollback" in allowed else []
    have_snapshot = bool(out)
    at = rng.uniform(1.0, 2.0)
    while at < duration and allowed:
        kind = rng.choices(allowed, weights)[0]
        params: dict[str, Any] = {}
        if kind == "rollback" and not have_snapshot:
            kind = "snapshot"
        if kind in ("hub_kill", "hub_term"):
            params = {"hub": rng.randrange(2), "down": round(rng.uniform(0.2, 2.0), 2)}
        elif kind in ("rollback", "promote"):
            params = {"down": round(rng.uniform(0.2, 3.0), 2)}
        elif kind in ("pause_write", "pause_all"):
            params = {"ms": rng.randrange(300, 3000)}
            if cluster:
                params["master"] = rng.randrange(3)
        elif kind == "pubsub_kill" and cluster:
            params = {"master": rng.randrange(3)}
        elif kind == "master_kill":
            params = {"master": rng.randrange(3), "down": round(rng.uniform(0.5, 3.0), 2),
                      # Half the kills find the replica behind: it was stopped for `lag` s
                      # while the master took writes, so its promotion loses them.
                      "lag": rng.choice((0.0, round(rng.uniform(0.5, 1.5), 2)))}
        elif kind == "slot_move":
            params = {"partition": rng.randrange(CLUSTER_PARTITIONS), "to": rng.randrange(2),
                      "pause": round(rng.uniform(0.0, 0.2), 3)}
        elif kind == "stall":
            params = {"sub": rng.randrange(subscribers), "secs": round(rng.uniform(2, 6), 2)}
        elif kind == "slow":
            params = {"sub": rng.randrange(subscribers), "secs": round(rng.uniform(2, 6), 2),
                      "delay": round(rng.uniform(0.05, 0.3), 3)}
        elif kind == "move":
            params = {"sub": rng.randrange(subscribers)}
        have_snapshot = (have_snapshot or kind == "snapshot") and kind != "rollback"
        out.append(Planned(round(at, 2), kind, tuple(sorted(params.items()))))
        at += rng.uniform(1.5, 4.0)
    return out


# ================================================================================================
# The run: processes, writers, subscribers, the fault injector.
# ================================================================================================

WRITE_TIMEOUT = 2.0  # shorter than the longest CLIENT PAUSE: some writes end unknown
HUB_ENV = {
    "HUB_HEARTBEAT_INTERVAL": "0.5", "HUB_WRITE_RATE": "0", "HUB_SHUTDOWN_GRACE": "1",
    # A stalled subscriber is cut (RESOURCE_EXHAUSTED) after a few seconds of this load, so the
    # slow-consumer resume is part of the run; single writes only, so no batch exceeds it.
    "HUB_SUBSCRIBER_MAX_EVENTS": "100",
}
# A small receive window, as a slow reader on a real network has: what a stalled subscriber
# does not read backs up on the hub instead of in this process's gRPC buffers.
SMALL_WINDOW = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16_384))


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def now(self) -> float:
        return round(time.monotonic() - self.start, 3)


class Servers:
    """Redis (primary + replica, Sentinels) and the two hubs, and the faults done to them."""

    def __init__(self, workdir: Path, sentinel: bool, replicas_ack: bool, source: Path,
                 log_level: str) -> None:
        self.sentinel = sentinel
        # No background saves: the RDB a rollback restores is the one `take_snapshot` SAVEd.
        self.nodes = [RedisProcess(workdir / "redis-0")]
        self.nodes.append(RedisProcess(workdir / "redis-1", replicaof=self.nodes[0]))
        self.sentinels = ([SentinelProcess(workdir / f"sentinel-{i}", self.nodes[0])
                           for i in range(3)] if sentinel else [])
        url = sentinel_url(self.sentinels) if sentinel else self.nodes[0].url
        env = {**HUB_ENV, "HUB_LOG_LEVEL": log_level}
        if replicas_ack:
            env["HUB_REDIS_REPLICAS_ACK"] = "1"
        self.hubs = [HubProcess(workdir / f"hub-{n}", url, env=env, source=source)
                     for n in "ab"]
        self.snapshot: tuple[Path, float] | None = None  # the RDB a rollback restores, its time

    @property
    def targets(self) -> list[str]:
        return [h.target for h in self.hubs]

    async def start(self) -> None:
        for node in self.nodes:
            await asyncio.to_thread(node.start)
        await asyncio.to_thread(self.nodes[1].wait_synced)
        for s in self.sentinels:
            await asyncio.to_thread(s.start)
        await asyncio.gather(*(h.astart() for h in self.hubs))

    def stop(self) -> None:
        for hub in self.hubs:
            hub.kill()
        for sentinel in self.sentinels:
            sentinel.kill()
        for node in self.nodes:
            node.kill()

    def primary(self) -> RedisProcess:
        """The node that is primary now: the Sentinels' word, else the first node's."""
        if not self.sentinel:
            return self.nodes[0]
        for s in self.sentinels:
            with contextlib.suppress(redis.RedisError, TypeError):
                port = s.master_port()
                return next(n for n in self.nodes if n.port == port)
        raise HarnessError("no Sentinel names a primary")

    def _roles(self, primary: RedisProcess) -> None:
        """Records who replicates whom, so a node started again comes back in its role."""
        primary.replicaof = None
        for n in self.nodes:
            if n is not primary:
                n.replicaof = primary

    async def take_snapshot(self, clock: Clock) -> dict[str, Any]:
        node = self.primary()
        at = clock.now()
        path = await asyncio.to_thread(node.snapshot, f"snapshot-{at:.0f}")
        self.snapshot = (path, at)
        return {"node": node.port, "at": at}

    async def rollback(self, down: float) -> dict[str, Any]:
        assert self.snapshot is not None
        path, at = self.snapshot
        self.snapshot = None
        node = self.primary()
        await asyncio.to_thread(node.kill)
        await asyncio.sleep(down)
        await asyncio.to_thread(node.restart_from, path)
        failover = False
        if self.sentinel:
            # The Sentinels may have promoted the replica while the node was down (down
            # after 1 s, then an election): then the restored node is demoted and resyncs
            # from it, and nothing acknowledged with replica acks may be lost.
            now = node
            for _ in range(8):
                await asyncio.sleep(0.5)
                now = await asyncio.to_thread(self.primary)
                if now is not node:
                    break
            failover = now is not node
            self._roles(now)
        return {"node": node.port, "snapshot_at": at, "down": down, "failover": failover}

    async def promote(self, down: float) -> dict[str, Any]:
        old = self.primary()
        await asyncio.to_thread(old.kill)
        # Beyond Sentinel's TILT (30 s without failovers, entered when a busy machine makes
        # its timer jump): a wait of exactly 30 s failed a run on this 2-core machine.
        port = await asyncio.to_thread(wait_for_master, self.sentinels, old.port, 75.0)
        new = next(n for n in self.nodes if n.port == port)
        self._roles(new)
        await asyncio.sleep(down)
        await asyncio.to_thread(old.start)  # as a replica of the new primary
        with contextlib.suppress(HarnessError):
            await asyncio.to_thread(old.wait_synced, 20.0)
        return {"old": old.port, "new": new.port, "down": down}

    async def redis_command(self, step: Planned, *args: Any) -> tuple[Any, dict[str, Any]]:
        """`args` run on the primary: the reply, and where it ran (nothing to say here)."""
        def run() -> Any:
            with self.primary().client() as client:
                return client.execute_command(*args)
        return await asyncio.to_thread(run), {}

    async def ensure_up(self) -> None:
        """After the faults: every process running again, the replica in sync."""
        for node in self.nodes:
            if not node.running:
                await asyncio.to_thread(node.start)
        for h in self.hubs:
            if not h.running:
                await h.astart()
            await h.await_serving()


class ClusterServers:
    """A Redis Cluster (3 masters, a replica each) and the two hubs on its redis+cluster://
    URL, and the faults done to them. The cluster's failure detection (node timeout 2 s)
    promotes a killed master's replica in about 3-5 s."""

    def __init__(self, workdir: Path, replicas_ack: bool, source: Path, log_level: str) -> None:
        self.redis = ClusterProcess(workdir / "redis-cluster")
        self.slots = [key_slot(t.encode()) for t in partition_tags(CLUSTER_PARTITIONS)]
        env = {**HUB_ENV, "HUB_LOG_LEVEL": log_level, "HUB_PARTITIONS": str(CLUSTER_PARTITIONS)}
        if replicas_ack:
            env["HUB_REDIS_REPLICAS_ACK"] = "1"
        self.hubs = [HubProcess(workdir / f"hub-{n}", self.redis.url, env=env, source=source)
                     for n in "ab"]

    @property
    def targets(self) -> list[str]:
        return [h.target for h in self.hubs]

    async def start(self) -> None:
        await asyncio.to_thread(self.redis.start)
        await asyncio.gather(*(h.astart() for h in self.hubs))

    def stop(self) -> None:
        for hub in self.hubs:
            hub.kill()
        self.redis.stop()

    def _master(self, index: int) -> ClusterNode:
        masters = self.redis.masters()
        return masters[index % len(masters)]

    def _partitions_of(self, node: ClusterNode) -> int:
        owners = self.redis.slot_owners()
        return sum(owners.get(slot) == node.port for slot in self.slots)

    async def kill_master(self, index: int, down: float, lag: float = 0.0) -> dict[str, Any]:
        """kill -9 of a master (its replica stopped for `lag` s first, so it is behind and
        its promotion loses what the master took meanwhile: the history goes back); once the
        replica has taken over, `down` s more, then the old one is started again (it rejoins
        as the new master's replica) and the cluster is waited for: every slot served, every
        replica in sync."""
        def kill() -> tuple[ClusterNode, int]:
            node = self._master(index)
            partitions = self._partitions_of(node)
            self.redis.kill_master(node, lag=lag)
            return node, partitions
        start = time.monotonic()
        old, partitions = await asyncio.to_thread(kill)
        new = await asyncio.to_thread(self.redis.wait_failover)
        failover = round(time.monotonic() - start, 2)
        await asyncio.sleep(down)
        await asyncio.to_thread(old.restart)
        await asyncio.to_thread(self.redis.wait_ready)
        return {"old": old.port, "new": new.port, "partitions": partitions,
                "failover_s": failover, "down": down, "lag": lag}

    async def move_slot(self, partition: int, to: int, pause: float) -> dict[str, Any]:
        """The slot of `partition` migrated live to another master, two keys per MIGRATE
        with `pause` s between them (writes meet the slot half-moved: ASK, TRYAGAIN)."""
        def move() -> dict[str, Any]:
            slot = self.slots[partition]
            source = self.redis.master_of_slot(slot)
            others = [m for m in self.redis.masters() if m.port != source.port]
            target = others[to % len(others)]
            self.redis.migrate_slot(slot, target, batch=2, pause=pause)
            return {"partition": partition, "slot": slot, "from": source.port,
                    "to": target.port}
        return await asyncio.to_thread(move)

    async def redis_command(self, step: Planned, *args: Any) -> tuple[Any, dict[str, Any]]:
        """`args` run on the master the step names: the reply, and that master's port."""
        def run() -> tuple[Any, dict[str, Any]]:
            node = self._master(step.param("master"))
            with node.client() as client:
                return client.execute_command(*args), {"node": node.port}
        return await asyncio.to_thread(run)

    async def ensure_up(self) -> None:
        """After the faults: every node running again, the cluster ready, the hubs serving."""
        for node in self.redis.nodes:
            if not node.running:
                await asyncio.to_thread(node.restart)
        await asyncio.to_thread(self.redis.wait_ready)
        for h in self.hubs:
            if not h.running:
                await h.astart()
            await h.await_serving()


class Writer:
    """Creates, updates and deletes its own users through both hubs, recording every outcome."""

    def __init__(self, name: str, rng: random.Random, clients: Sequence[AsyncUserClient],
                 targets: Sequence[str], clock: Clock, writes: list[Write]) -> None:
        self.name = name
        self.rng = rng
        self.clients = clients
        self.targets = targets
        self.clock = clock
        self.writes = writes
        # Owned users: id -> the version this writer believes it is at; None: unknown (a
        # write's outcome is unknown, or refused as stale), so re-read it before writing.
        self.users: dict[str, int | None] = {}
        self.initial: list[str] = []  # the users created before the subscribers started
        self.created = 0

    def _record(self, t0: float, target: int, op: Any, user: str, version: int,
                err: ClientError | None) -> None:
        if err is None:
            outcome: Outcome = "ack"
            code = "OK"
        else:
            code = err.code.name
            outcome = "unknown" if code in UNKNOWN_CODES else "failed"
        self.writes.append(Write(t0, self.clock.now(), self.name, self.targets[target], op, user,
                                 version, outcome, code))

    async def create(self) -> str | None:
        target = self.rng.randrange(2)
        self.created += 1
        t0 = self.clock.now()
        try:
            user = await self.clients[target].create_user(
                f"{self.name}-{self.created}@example.com", name=f"{self.name} {self.created}",
                timeout=WRITE_TIMEOUT)
        except ClientError as err:
            self._record(t0, target, "create", "", 1, err)
            return None
        self._record(t0, target, "create", user.id, user.version, None)
        self.users[user.id] = user.version
        return user.id

    async def _resync(self, user_id: str) -> bool:
        """Re-reads a user whose version is unknown; False when it is gone or unreachable."""
        try:
            user = await self.clients[self.rng.randrange(2)].get_user(user_id, timeout=2.0)
        except ClientError as err:
            if err.code is grpc.StatusCode.NOT_FOUND:
                del self.users[user_id]  # deleted by a write of unknown outcome, or rolled back
            return False
        self.users[user_id] = user.version
        return True

    async def change(self, delete: bool) -> None:
        pool = [u for u in self.users if u not in self.initial] if delete else list(self.users)
        if delete and (not pool or self.rng.random() < 0.05):
            pool = list(self.users)  # now and then an initial user goes too
        if not pool:
            return
        user_id = self.rng.choice(pool)
        if self.users[user_id] is None and not await self._resync(user_id):
            return
        version = self.users[user_id]
        assert version is not None
        target = self.rng.randrange(2)
        t0 = self.clock.now()
        try:
            if delete:
                await self.clients[target].delete_user(
                    user_id, expected_version=version, timeout=WRITE_TIMEOUT)
            else:
                await self.clients[target].update_user(
                    user_id, name=f"{self.name} v{version + 1}", expected_version=version,
                    timeout=WRITE_TIMEOUT)
        except ClientError as err:
            self._record(t0, target, "delete" if delete else "update", user_id, version + 1,
                         err)
            if err.code is grpc.StatusCode.NOT_FOUND:
                self.users.pop(user_id, None)
            elif err.code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.users[user_id] = None  # landed or not, stale or not: re-read it first
            return
        self._record(t0, target, "delete" if delete else "update", user_id, version + 1, None)
        if delete:
            del self.users[user_id]
        else:
            self.users[user_id] = version + 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            roll = self.rng.random()
            if len(self.users) < 4 or roll < 0.3:
                await self.create()
            elif roll < 0.85:
                await self.change(delete=False)
            else:
                await self.change(delete=True)
            # Paced: the load is a steady stream, not what a saturated 2-core box can take.
            await asyncio.sleep(self.rng.uniform(0.01, 0.05))


class Subscriber:
    """One SyncFeed, recording what it yields; the injector can stall, slow or move it."""

    def __init__(self, log: SubscriberLog, targets: Sequence[str], clock: Clock) -> None:
        self.log = log
        self.targets = list(targets)
        self.clock = clock
        self.subscribed = asyncio.Event()  # the first response came: the subscription is live
        self.stall_for = 0.0
        self.slow_until = 0.0
        self.slow_delay = 0.0
        self.move = False
        self.feed: SyncFeed | None = None

    async def run(self, stop: asyncio.Event) -> None:
        token, first = "", True
        while not stop.is_set():
            # resync=False: the checker holds every feed to every event, in order; a resync by
            # state (which skips to current states) is checked by tests/test_feed_resync.py.
            feed = self.feed = SyncFeed(
                self.targets, self.log.users or (), resume_token=token,
                snapshot=self.log.snapshot if first else not token, backoff=(0.05, 1.0),
                options=SMALL_WINDOW, resync=False)
            first = False
            reconnects = 0
            async with feed:
                async for item in feed:
                    self.subscribed.set()
                    now = self.clock.now()
                    if feed.reconnects != reconnects:
                        reconnects = feed.reconnects
                        self.log.items.append(Restart(now, "reconnected"))
                    if isinstance(item, ContinuityLost):
                        self.log.items.append(Lost(now, item.reason))
                    elif item.events or item.snapshot_complete:
                        self.log.items.append(Batch(now, tuple(
                            Ev(e.user.id, e.user.version, _KINDS[e.type]) for e in item.events),
                            item.snapshot_complete))
                    if stop.is_set():
                        return
                    if self.move:
                        # Close this stream; resume from its token on the other hub (a
                        # snapshot not yet complete has no token yet: it starts over).
                        self.move = False
                        token = feed.resume_token
                        self.targets = self.targets[1:] + self.targets[:1]
                        self.log.items.append(Restart(self.clock.now(), "moved"))
                        break
                    if self.stall_for:
                        stall, self.stall_for = self.stall_for, 0.0
                        await asyncio.sleep(stall)
                    elif time.monotonic() < self.slow_until:
                        await asyncio.sleep(self.slow_delay)
                else:
                    return  # the feed never ends by itself; if it did, stop recording


@dataclass
class Options:
    duration: float
    seed: int
    sentinel: bool = False
    replicas_ack: bool = False
    cluster: bool = False
    subscribers: int = 6
    writers: int = 4
    faults: tuple[str, ...] = ()  # empty: all kinds
    settle: float = 20.0  # longest wait for the feeds to catch up at the end
    workdir: Path | None = None
    source: Path = ROOT
    log_level: str = "INFO"


async def read_store(client: AsyncUserClient) -> dict[str, int]:
    for attempt in range(20):
        try:
            return {u.id: u.version async for u in client.list_users(page_size=1000,
                                                                   timeout=30)}
        except ClientError:
            if attempt == 19:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


async def record(opts: Options, workdir: Path, out: Any = sys.stdout) -> Recording:
    """Runs the processes, writers, subscribers and the schedule; returns what was seen."""
    schedule = plan(opts.seed, opts.duration, opts.sentinel, opts.subscribers,
                    opts.faults or None, cluster=opts.cluster)
    servers = (ClusterServers(workdir, opts.replicas_ack, opts.source, opts.log_level)
               if opts.cluster else
               Servers(workdir, opts.sentinel, opts.replicas_ack, opts.source, opts.log_level))
    clock = Clock()
    writes: list[Write] = []
    faults: list[Fault] = []
    try:
        await servers.start()
        a, b = servers.targets
        clients = [AsyncUserClient(t, timeout=WRITE_TIMEOUT) for t in (a, b)]
        try:
            rng = random.Random(f"{opts.seed}:clients")
            writers = [Writer(f"w{i}", random.Random(f"{opts.seed}:w{i}"), clients,
                              servers.targets, clock, writes) for i in range(opts.writers)]
            # One subscriber follows everyone live from before the first write, with no
            # snapshot: its view must hold every user without one.
            early = Subscriber(SubscriberLog("s0-all-live", None, False), [a, b], clock)
            stop_subs = asyncio.Event()
            tasks = [asyncio.create_task(early.run(stop_subs))]
            await asyncio.wait_for(early.subscribed.wait(), 20)
            for w in writers:
                for _ in range(6):
                    user = await w.create()
                    if user is not None:
                        w.initial.append(user)
            initial = [u for w in writers for u in w.initial]
            subs = [early]
            for i in range(1, opts.subscribers):
                # Never empty: a Subscribe naming no users follows everyone.
                subset = (frozenset(u for j, u in enumerate(initial)
                                    if j % 7 == i or rng.random() < 0.25)
                          if i % 2 == 0 else None)
                name = f"s{i}-{'subset' if subset is not None else 'all'}"
                order = [a, b] if i % 2 else [b, a]
                subs.append(Subscriber(SubscriberLog(name, subset, True), order, clock))
            tasks += [asyncio.create_task(s.run(stop_subs)) for s in subs[1:]]
            for s in subs:
                await asyncio.wait_for(s.subscribed.wait(), 20)
            stop_writes = asyncio.Event()
            write_tasks = [asyncio.create_task(w.run(stop_writes)) for w in writers]
            print(f"chaos: {len(schedule)} faults planned over {opts.duration:.0f}s;"
                  f" logs in {workdir}", file=out, flush=True)

            begin = time.monotonic()
            for step in schedule:
                await asyncio.sleep(max(0.0, begin + step.at - time.monotonic()))
                t0 = clock.now()
                detail = await inject(step, servers, subs, clock)
                faults.append(Fault(t0, clock.now(), step.kind, detail))
                print(f"  {t0:7.2f}s {step.kind:<11} {_brief(detail)}", file=out, flush=True)
            await asyncio.sleep(max(0.0, begin + opts.duration - time.monotonic()))
            await servers.ensure_up()
            for s in subs:
                s.stall_for, s.slow_until = 0.0, 0.0
            stop_writes.set()
            await asyncio.gather(*write_tasks)
            # The quiet period: until every view equals the store (or `settle` runs out).
            deadline = time.monotonic() + opts.settle
            await asyncio.sleep(2.0)
            while True:
                store = await read_store(clients[0])
                if all(followed(s.log, final_view(s.log)[0]) == followed(s.log, store)
                       for s in subs) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            stop_subs.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            listings = {t: await read_store(c) for t, c in zip(servers.targets, clients,
                                                               strict=True)}
            store = listings[a]
        finally:
            for c in clients:
                await c.close()
    finally:
        servers.stop()
    return Recording(opts.seed, opts.duration, opts.sentinel, opts.replicas_ack,
                     [s.log for s in subs], writes, faults, store, listings, opts.cluster)


async def inject(step: Planned, servers: Servers | ClusterServers,
                 subs: Sequence[Subscriber], clock: Clock) -> dict[str, Any]:
    """Does one planned fault; returns what was done (for the log and the checker)."""
    kind = step.kind
    if kind in CLUSTER_ONLY:
        assert isinstance(servers, ClusterServers), f"{kind} needs --cluster"
        if kind == "master_kill":
            return await servers.kill_master(step.param("master"), step.param("down"),
                                             step.param("lag"))
        return await servers.move_slot(step.param("partition"), step.param("to"),
                                       step.param("pause"))
    if kind in ("snapshot", "rollback", "promote"):
        assert isinstance(servers, Servers), f"{kind} is not a cluster's fault"
        if kind == "snapshot":
            return await servers.take_snapshot(clock)
        if kind == "rollback":
            return await servers.rollback(step.param("down"))
        return await servers.promote(step.param("down"))
    if kind in ("hub_kill", "hub_term"):
        hub = servers.hubs[step.param("hub")]
        if kind == "hub_kill":
            hub.kill()
        else:
            await asyncio.to_thread(hub.terminate)
        await asyncio.sleep(step.param("down"))
        await hub.astart()
        return {"hub": "ab"[step.param("hub")], "down": step.param("down")}
    if kind == "pubsub_kill":
        killed, where = await servers.redis_command(step, "CLIENT", "KILL", "TYPE", "pubsub")
        return {**where, "killed": killed}
    if kind in ("pause_write", "pause_all"):
        ms = step.param("ms")
        _, where = await servers.redis_command(step, "CLIENT", "PAUSE", ms,
                                               kind.removeprefix("pause_").upper())
        await asyncio.sleep(ms / 1000)
        return {**where, "ms": ms}
    sub = subs[step.param("sub")]
    if kind == "stall":
        sub.stall_for = step.param("secs")
        return {"sub": sub.log.name, "secs": step.param("secs")}
    if kind == "slow":
        sub.slow_until = time.monotonic() + step.param("secs")
        sub.slow_delay = step.param("delay")
        return {"sub": sub.log.name, "secs": step.param("secs"), "delay": step.param("delay")}
    if kind == "move":
        sub.move = True
        return {"sub": sub.log.name}
    raise ValueError(f"unknown fault {kind!r}")


def _brief(detail: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in detail.items())


# ================================================================================================
# The summary.
# ================================================================================================


def summarize(rec: Recording, report: Report) -> dict[str, Any]:
    """The counts the output and --report give."""
    outcomes = Counter(w.outcome for w in rec.writes)
    stats = report.stats.values()
    reasons = Counter(i.reason for s in rec.subscribers for i in s.items if isinstance(i, Lost))
    return {
        "seed": rec.seed, "duration": rec.duration, "sentinel": rec.sentinel,
        "cluster": rec.cluster, "replicas_ack": rec.replicas_ack,
        "faults": dict(Counter(f.kind for f in rec.faults)),
        "writes": {
            "attempted": len(rec.writes), "acknowledged": outcomes["ack"],
            "failed": outcomes["failed"], "unknown": outcomes["unknown"],
            "codes": dict(Counter(w.code for w in rec.writes if w.outcome != "ack")),
        },
        "events_delivered": sum(s.events for s in stats),
        "snapshot_events": sum(s.snapshot_events for s in stats),
        "continuity_signals": sum(s.continuity_signals for s in stats),
        "continuity_reasons": dict(reasons),
        "stream_restarts": sum(s.restarts for s in stats),
        "covered_by_snapshot": sum(s.covered_by_snapshot for s in stats),
        "store_users": len(rec.store),
        "exempt_lost_writes": report.exempt_losses,
        "violations": len(report.violations),
        "violation_kinds": dict(Counter(v.kind for v in report.violations)),
        "first_violations": [str(v) for v in report.violations[:20]],
    }


def print_summary(summary: Mapping[str, Any], out: Any = sys.stdout) -> None:
    w = summary["writes"]
    mode = ("redis+cluster://" if summary.get("cluster") else
            "redis+sentinel://" if summary["sentinel"] else "redis://")
    print(f"\nchaos seed {summary['seed']}: {summary['duration']:.0f}s of faults, {mode},"
          f" replicas-ack {'on' if summary['replicas_ack'] else 'off'}", file=out)
    faults = ", ".join(f"{k} {n}" for k, n in sorted(summary["faults"].items())) or "none"
    print(f"faults:     {faults}", file=out)
    codes = ", ".join(f"{k} {n}" for k, n in sorted(w["codes"].items()))
    print(f"writes:     attempted {w['attempted']}, acknowledged {w['acknowledged']},"
          f" failed {w['failed']}, unknown {w['unknown']}" + (f" ({codes})" if codes else ""),
          file=out)
    reasons = ", ".join(f"{k} {n}" for k, n in sorted(summary["continuity_reasons"].items()))
    print(f"events:     delivered {summary['events_delivered']} (+ {summary['snapshot_events']}"
          f" snapshot), explicit continuity signals {summary['continuity_signals']}"
          + (f" ({reasons})" if reasons else "")
          + f", stream restarts {summary['stream_restarts']},"
          f" covered by a snapshot {summary['covered_by_snapshot']}", file=out)
    print(f"store:      {summary['store_users']} users; acknowledged writes a fault was"
          f" allowed to lose and did: {summary['exempt_lost_writes']}", file=out)
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(summary["violation_kinds"].items()))
    print(f"violations: {summary['violations']}" + (f" ({kinds})" if kinds else ""), file=out)
    for line in summary["first_violations"][:10]:
        print(f"  {line}", file=out)


def dump(rec: Recording, path: Path) -> None:
    """Everything recorded, for a look at a failing run (JSON, one object)."""
    def item(i: Item) -> dict[str, Any]:
        return {"type": type(i).__name__, **asdict(i)}
    data = {
        "seed": rec.seed, "store": rec.store, "faults": [asdict(f) for f in rec.faults],
        "writes": [asdict(w) for w in rec.writes],
        "subscribers": [{"name": s.name, "users": sorted(s.users) if s.users else None,
                         "snapshot": s.snapshot, "items": [item(i) for i in s.items]}
                        for s in rec.subscribers],
    }
    path.write_text(json.dumps(data))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of faults (default 600)")
    parser.add_argument("--seed", type=int, default=1, help="the schedule's seed (default 1)")
    parser.add_argument("--sentinel", action="store_true",
                        help="3 Sentinels, hubs on redis+sentinel://, promotion faults")
    parser.add_argument("--cluster", action="store_true",
                        help="a Redis Cluster (3 masters, a replica each), hubs on"
                             " redis+cluster://, master kills and slot moves")
    parser.add_argument("--replicas-ack", action="store_true",
                        help="hubs acknowledge writes once a replica has them")
    parser.add_argument("--subscribers", type=int, default=6)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--faults", default="",
                        help=f"comma-separated kinds to draw from (default all: "
                             f"{','.join(WEIGHTS)})")
    parser.add_argument("--workdir", type=Path,
                        help="logs and RDB files here (default: a new temporary directory)")
    parser.add_argument("--hub-source", type=Path, default=ROOT,
                        help="run `hub serve` from this checkout (e.g. a worktree of another"
                             " commit; default: this one)")
    parser.add_argument("--report", type=Path, help="also write the summary here as JSON")
    parser.add_argument("--dump", type=Path, help="also write everything recorded here (JSON)")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.faults.split(",") if k)
    if unknown := set(kinds) - set(WEIGHTS):
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    if args.cluster and args.sentinel:
        parser.error("--cluster and --sentinel are two different deployments: one of them")
    if foreign := set(kinds) - set(kinds_for(args.sentinel, args.cluster)):
        mode = "--cluster" if args.cluster else "--sentinel" if args.sentinel else "redis://"
        parser.error(f"not drawn in {mode} mode: {', '.join(sorted(foreign))}")
    if args.subscribers < 2 or args.writers < 1:
        parser.error("at least 2 subscribers and 1 writer")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hub-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    opts = Options(args.duration, args.seed, args.sentinel, args.replicas_ack, args.cluster,
                   args.subscribers, args.writers, kinds, workdir=workdir,
                   source=args.hub_source)
    try:
        rec = asyncio.run(record(opts, workdir))
    except (HarnessError, ClientError, TimeoutError) as exc:
        print(f"chaos: the run failed: {exc}\n(logs in {workdir})", file=sys.stderr)
        return 2
    report = check(rec)
    summary = summarize(rec, report)
    print_summary(summary)
    if args.report:
        args.report.write_text(json.dumps(summary, indent=2))
    if args.dump:
        dump(rec, args.dump)
    if report.violations:
        print(f"(logs in {workdir}; rerun: python -m loadtest.chaos --duration"
              f" {args.duration:g} --seed {args.seed}"
              + (" --sentinel" if args.sentinel else "")
              + (" --cluster" if args.cluster else "")
              + (" --replicas-ack" if args.replicas_ack else "") + ")")
    return 1 if report.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
