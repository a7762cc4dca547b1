"""Live sync on Redis Cluster (issue 12), real processes: 3 masters with a replica each (the
session's `redis_cluster`) and two `hub serve` on `redis+cluster://...` (128 partitions, the
cluster's default).

test_live.py's tests that do not touch Redis themselves run here unchanged (imported below,
they use this module's fixtures: `redis_url` is the cluster's here). Then the cluster's own
faults: slots moved live under writes, a master killed -9 under writes with
--redis-replicas-ack 1, and a hub whose partition count is not the keyspace's.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import anyio
import grpc
import pytest
from google.protobuf import field_mask_pb2
from redis.crc import key_slot

from harness.hub import HubProcess
from harness.redis import ClusterNode, ClusterProcess
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.api.user.v1.user_sync_service_pb2_grpc import UserSyncServiceStub
from hub.client import ContinuityLost, SyncFeed
from hub.domain import partition_of
from hub.store.cluster import partition_tags
from tests import test_live as live
from tests.test_live import Key

pytestmark = pytest.mark.anyio
FAST = live.FAST


@pytest.fixture
def redis_url(cluster_url: str) -> str:
    """The session's cluster, emptied for this test: test_live's tests that take `redis_url`
    (for their hubs only) run on it."""
    return cluster_url


@pytest.fixture
def two(hub_process: Callable[..., HubProcess], cluster_url: str) -> tuple[HubProcess, HubProcess]:
    return hub_process(cluster_url, **FAST), hub_process(cluster_url, **FAST)


@pytest.fixture
async def channels(two: tuple[HubProcess, HubProcess]
                   ) -> AsyncIterator[tuple[grpc.aio.Channel, grpc.aio.Channel]]:
    a, b = two
    async with grpc.aio.insecure_channel(a.target) as ca, \
            grpc.aio.insecure_channel(b.target) as cb:
        yield ca, cb


# test_live's tests that reach Redis only through the hubs, on the cluster.
test_thousand_mixed_writes_on_the_cluster = \
    live.test_thousand_mixed_writes_reach_sync_and_user_updates_on_the_other_instance
test_resume_on_the_other_instance_on_the_cluster = \
    live.test_resume_on_the_other_instance_gets_exactly_what_was_written
test_feed_resumes_on_a_when_b_is_killed_on_the_cluster = \
    live.test_feed_resumes_on_a_when_b_is_killed_under_writes
test_stalled_subscriber_catches_up_on_the_cluster = \
    live.test_stalled_subscriber_catches_up_without_loss
test_list_then_watch_misses_nothing_on_the_cluster = live.test_list_then_watch_misses_nothing
test_snapshot_then_live_on_the_cluster = live.test_snapshot_then_live_in_one_stream
test_user_filter_conflation_and_change_results_on_the_cluster = \
    live.test_user_filter_conflation_and_change_results


# -- the cluster's own faults ---------------------------------------------------------------

PARTITIONS = 128  # what hub runs with on a cluster when HUB_PARTITIONS is unset
TAGS = partition_tags(PARTITIONS)
CHANGE = (common_pb2.EVENT_TYPE_CREATED, common_pb2.EVENT_TYPE_UPDATED,
          common_pb2.EVENT_TYPE_DELETED)
NAME = field_mask_pb2.FieldMask(paths=["name"])


def partition_slot(p: int) -> int:
    """The hash slot of partition p's keys (they all carry its hash tag)."""
    return key_slot(TAGS[p].encode())


def view_of(base: dict[str, common_pb2.User], events: Iterable[common_pb2.UserEvent]
            ) -> dict[str, common_pb2.User]:
    """What a subscriber holds after `events`, starting from `base`."""
    view = dict(base)
    for event in events:
        if event.type == common_pb2.EVENT_TYPE_DELETED:
            view.pop(event.user.id, None)
        elif event.type in CHANGE:
            view[event.user.id] = event.user
    return view


def breaks(base: dict[str, common_pb2.User], events: Iterable[common_pb2.UserEvent]
           ) -> list[str]:
    """Where a user's change events do not follow one another by exactly one version: a
    silent gap, a repeat or a reorder (every write makes one event, version + 1; a user the
    subscriber does not know yet starts at version 1)."""
    last = {user_id: user.version for user_id, user in base.items()}
    out = []
    for event in events:
        if event.type not in CHANGE:
            continue
        user_id, version = event.user.id, event.user.version
        if version != last.get(user_id, 0) + 1:
            out.append(f"{user_id} v{version} after v{last.get(user_id, 0)}")
        last[user_id] = version
    return out


def differences(view: dict[str, common_pb2.User], final: dict[str, common_pb2.User]
                ) -> list[str]:
    """The users a subscriber's view has otherwise than ListUsers (id and versions)."""
    out = []
    for user_id in sorted(view.keys() | final.keys()):
        mine, theirs = view.get(user_id), final.get(user_id)
        if mine != theirs:
            out.append(f"{user_id}: view v{mine.version if mine else '-'}, ListUsers"
                       f" v{theirs.version if theirs else '-'}")
    return out


@dataclass
class Watcher:
    """What one raw Sync stream (all users, no snapshot) delivered, and how it ended."""

    name: str
    events: list[common_pb2.UserEvent] = field(default_factory=list)
    ended: str = ""  # why the stream ended before the test cancelled it

    async def watch(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    self.ended = "EOF"
                    return
                self.events.extend(response.events)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.ended = f"{err.code().name}: {err.details()}"

    @property
    def keys(self) -> list[Key]:
        return live.keys_of(self.events)

    def caught_up(self, acknowledged: set[Key], final: dict[str, common_pb2.User]) -> bool:
        return bool(self.ended) or (acknowledged <= set(self.keys)
                                    and view_of({}, self.events) == final)


def move_partition(cluster: ClusterProcess, p: int, batch: int, pause: float
                   ) -> tuple[int, int, int, int, float]:
    """Migrates partition p's slot live to the next master: (slot, from port, to port, keys
    moved, seconds)."""
    slot = partition_slot(p)
    source = cluster.master_of_slot(slot)
    masters = cluster.masters()
    target = masters[(masters.index(source) + 1) % len(masters)]
    with source.client() as client:
        keys = int(client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
    started = time.monotonic()
    cluster.migrate_slot(slot, target, batch=batch, pause=pause)
    elapsed = time.monotonic() - started
    assert cluster.master_of_slot(slot).port == target.port
    return slot, source.port, target.port, keys, elapsed


@pytest.mark.timeout(60)
async def test_slots_moved_under_writes_lose_and_repeat_nothing(
    redis_cluster: ClusterProcess, channels: tuple[grpc.aio.Channel, grpc.aio.Channel],
) -> None:
    """Sync subscribers on both instances while instance A takes a mix of creates, updates and
    deletes and the slots of 3 partitions (written to all along) move to other masters, key
    by key: each subscriber gets every acknowledged write exactly once, in version order per
    user, never a silent gap, and ends with ListUsers' view. A write refused UNAVAILABLE while
    its slot is half-moved is not acknowledged: it may or may not have happened."""
    ca, cb = channels
    calls = [await live.subscribed_sync(UserSyncServiceStub(c)) for c in (ca, cb)]
    for call in calls:
        await call.read()  # the heartbeat: subscribed
    watchers = [Watcher("A"), Watcher("B")]
    stub = UserServiceStub(ca)
    written = live.Written()
    # Refused writes by writer and status: any is unacknowledged (it may have happened).
    refused: Counter[str] = Counter()
    said: list[str] = []  # each refusal: which write, its status and details
    maybe: Counter[str] = Counter()  # refusals by user id, or by write_mix round's tag
    hot: dict[int, str] = {}  # partition -> a user in it, updated all along
    hot_ready, stop = anyio.Event(), anyio.Event()
    moves: list[tuple[int, int, int, int, float]] = []

    async def mix() -> None:
        # write_mix raises at its first failure: each round is short, and a refused one ends
        # (its last write unacknowledged) and the next starts with users of its own.
        rounds = 0
        while not stop.is_set():
            rounds += 1
            try:
                await live.write_mix(stub, written, 40, f"m{rounds}-")
            except grpc.aio.AioRpcError as err:
                refused[f"mix {err.code().name}"] += 1
                said.append(f"mix round m{rounds}-: {err.code().name}: {err.details()}")
                maybe[f"m{rounds}-"] += 1
                await anyio.sleep(0.02)

    async def hammer() -> None:
        # Users in 3 partitions, then updates to them for as long as the writes go on.
        i = 0
        while len(hot) < 3:
            i += 1
            user = await stub.CreateUser(pb.CreateUserRequest(email=f"hot{i}@example.com"),
                                         timeout=5)
            written.add(user)
            hot.setdefault(partition_of(user.id, PARTITIONS), user.id)
        hot_ready.set()
        while not stop.is_set():
            i += 1
            user_id = list(hot.values())[i % len(hot)]
            try:
                user = await stub.UpdateUser(pb.UpdateUserRequest(
                    user=common_pb2.User(id=user_id, name=f"h{i}"), update_mask=NAME),
                    timeout=5)
                written.add(user)
            except grpc.aio.AioRpcError as err:
                refused[f"moving {err.code().name}"] += 1
                said.append(f"moving {user_id}: {err.code().name}: {err.details()}")
                maybe[user_id] += 1
                await anyio.sleep(0.01)

    async def move() -> None:
        await hot_ready.wait()
        await anyio.sleep(0.5)
        for p in hot:
            # Two keys at a time, 0.2 s apart: the slot stays half-moved for a while.
            moves.append(await anyio.to_thread.run_sync(
                move_partition, redis_cluster, p, 2, 0.2))
            await anyio.sleep(0.3)
        await anyio.sleep(1.0)  # writes go on after the last move
        stop.set()

    started = time.monotonic()
    async with anyio.create_task_group() as readers:
        for watcher, call in zip(watchers, calls, strict=True):
            readers.start_soon(watcher.watch, call)
        with anyio.fail_after(40):
            async with anyio.create_task_group() as writers:
                writers.start_soon(mix)
                writers.start_soon(hammer)
                writers.start_soon(move)
        users, _ = await live.list_with_token(stub)
        final = {u.id: u for u in users}
        acknowledged = set(written.keys)
        with anyio.move_on_after(20):
            while not all(w.caught_up(acknowledged, final) for w in watchers):
                await anyio.sleep(0.1)
        await anyio.sleep(0.5)  # a repeat after catching up would show here
        readers.cancel_scope.cancel()
    for call in calls:
        call.cancel()

    attempted = len(acknowledged) + sum(refused.values())
    print(f"\nslot moves (slot, from, to, keys, seconds): {moves}")
    print(f"writes: {attempted} attempted, {len(acknowledged)} acknowledged, refused"
          f" {dict(refused)}; {len(final)} users at the end; {time.monotonic() - started:.1f}s")
    for line in said:
        print(f"  refused: {line}")
    for w in watchers:
        keys = w.keys
        print(f"subscriber on {w.name}: {len(keys)} events delivered, {len(set(keys))} distinct,"
              f" {len(set(keys) - acknowledged)} of unacknowledged writes, explicit signals:"
              f" {w.ended or 'none'}")
        for e in w.events:
            if (e.user.id, e.user.version) not in acknowledged and e.type in CHANGE:
                print(f"  unacknowledged, delivered: {common_pb2.EventType.Name(e.type)}"
                      f" {e.user.id} v{e.user.version} {e.user.email}")
    assert len(moves) == 3
    for w in watchers:
        keys = w.keys
        assert not w.ended, f"{w.name}'s stream ended: {w.ended}"
        missing = acknowledged - set(keys)
        assert not missing, (
            f"{w.name} never got {len(missing)} acknowledged events, of partitions"
            f" {sorted({partition_of(u, PARTITIONS) for u, _ in missing})} (moved: {list(hot)}):"
            f" {sorted(missing)[:3]}")
        assert len(keys) == len(set(keys)), f"{w.name} got events twice"
        assert live.in_version_order(keys)
        assert not breaks({}, w.events), f"{w.name}: {breaks({}, w.events)[:5]}"
        assert not differences(view_of({}, w.events), final), \
            f"{w.name}: {differences(view_of({}, w.events), final)[:5]}"
    # A write the move got in the way of is refused UNAVAILABLE ("not now, nothing or maybe
    # something written"), never INTERNAL, nor ALREADY_EXISTS or NOT_FOUND for a write that
    # happened; and each event no acknowledgement accounts for is a refused write's (that one
    # may have happened): one at most per refusal, of its user (or its write_mix round's).
    odd = [line for line in said if ": UNAVAILABLE: " not in line]
    unexplained = []
    for e in watchers[0].events:
        if e.type not in CHANGE or (e.user.id, e.user.version) in acknowledged:
            continue
        round_tag = e.user.email.split("-", 1)[0] + "-"
        for who in (e.user.id, round_tag):
            if maybe[who]:
                maybe[who] -= 1
                break
        else:
            after = next((f.user.name for f in watchers[0].events if f.user.id == e.user.id
                          and f.user.version == e.user.version + 1), "-")
            unexplained.append(f"{common_pb2.EventType.Name(e.type)} {e.user.id}"
                               f" v{e.user.version} {e.user.email} name {e.user.name!r},"
                               f" v{e.user.version + 1}'s {after!r}")
    assert not odd and not unexplained, (
        f"writes refused otherwise than UNAVAILABLE: {odd}; events no acknowledgement or"
        f" refusal accounts for (a write applied twice?): {unexplained}")


@dataclass
class Ledger:
    """What the writers of the kill test were told: per user, the acknowledged versions and
    whether the acknowledged delete is among them; the writes refused (their outcome may be
    either), by user and by status."""

    acked: dict[str, list[int]] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    unsure: Counter[str] = field(default_factory=Counter)  # refused writes by user ("" create)
    refused: Counter[str] = field(default_factory=Counter)
    said: dict[str, str] = field(default_factory=dict)  # the first refusal of each status
    acked_at: list[tuple[float, int]] = field(default_factory=list)  # (time, partition)

    def ack(self, user_id: str, version: int, deleted: bool = False) -> None:
        self.acked.setdefault(user_id, []).append(version)
        if deleted:
            self.deleted.add(user_id)
        self.acked_at.append((time.monotonic(), partition_of(user_id, PARTITIONS)))

    def refuse(self, user_id: str, err: grpc.aio.AioRpcError) -> None:
        self.unsure[user_id] += 1
        self.refused[err.code().name] += 1
        self.said.setdefault(err.code().name, err.details() or "")

    @property
    def keys(self) -> set[Key]:
        return {(u, v) for u, vs in self.acked.items() for v in vs}


async def churn(stub: UserServiceStub, ledger: Ledger, tag: str, stop: anyio.Event) -> None:
    """Creates, updates and deletes (about 3:5:2) of users of its own until `stop`; a refused
    write, whatever its status, is noted and the next one tried (a user whose delete was
    refused is left alone)."""
    rng = random.Random(tag)
    alive: list[str] = []
    i = 0
    while not stop.is_set():
        i += 1
        roll = rng.random()
        user_id = ""
        try:
            if not alive or roll < 0.3:
                user = await stub.CreateUser(
                    pb.CreateUserRequest(email=f"{tag}{i}@example.com"), timeout=5)
                alive.append(user.id)
                ledger.ack(user.id, user.version)
            elif roll < 0.8:
                user_id = rng.choice(alive)
                user = await stub.UpdateUser(pb.UpdateUserRequest(
                    user=common_pb2.User(id=user_id, name=f"{tag}{i}"), update_mask=NAME),
                    timeout=5)
                ledger.ack(user.id, user.version)
            else:
                user_id = alive.pop(rng.randrange(len(alive)))
                before = await stub.GetUser(pb.GetUserRequest(user_id=user_id), timeout=5)
                await stub.DeleteUser(pb.DeleteUserRequest(user_id=user_id), timeout=5)
                ledger.ack(user_id, before.version + 1, deleted=True)
        except grpc.aio.AioRpcError as err:
            ledger.refuse(user_id, err)
            await anyio.sleep(0.05)


@dataclass
class Stretch:
    """A feed's events between two ContinuityLost (the first from the start): the snapshot it
    began with (none for the first) and the changes after it."""

    snapshot: dict[str, common_pb2.User] = field(default_factory=dict)
    changes: list[common_pb2.UserEvent] = field(default_factory=list)


@dataclass
class FeedLog:
    """What one SyncFeed (all users) gave, cut at each explicit ContinuityLost."""

    name: str
    stretches: list[Stretch] = field(default_factory=lambda: [Stretch()])
    lost: list[ContinuityLost] = field(default_factory=list)
    batches: int = 0

    async def follow(self, feed: SyncFeed) -> None:
        async for item in feed:
            if isinstance(item, ContinuityLost):
                self.lost.append(item)
                self.stretches.append(Stretch())
                continue
            self.batches += 1
            for event in item.events:
                if event.type == common_pb2.EVENT_TYPE_SNAPSHOT:
                    self.stretches[-1].snapshot[event.user.id] = event.user
                else:
                    self.stretches[-1].changes.append(event)

    @property
    def keys(self) -> list[Key]:
        return [k for s in self.stretches for k in live.keys_of(s.changes)]

    def view(self) -> dict[str, common_pb2.User]:
        last = self.stretches[-1]
        return view_of(last.snapshot, last.changes)

    def caught_up(self, acknowledged: set[Key], final: dict[str, common_pb2.User]) -> bool:
        return self.view() == final and (bool(self.lost) or acknowledged <= set(self.keys))


def restart_node(cluster: ClusterProcess, node: ClusterNode) -> None:
    if not node.running:
        node.restart()
    cluster.wait_ready()


@pytest.mark.timeout(60)
async def test_master_killed_under_writes_keeps_every_acknowledged_write(
    redis_cluster: ClusterProcess, hub_process: Callable[..., HubProcess], cluster_url: str,
) -> None:
    """--redis-replicas-ack 1 on both hubs; writers on A, a SyncFeed on A and one on B; kill -9
    of the master owning partition 0 (and a third of the others), its replica promoted, the
    old master back as its replica. Every acknowledged write is there afterwards (GetUser: at
    its version or later, or gone if its delete was acknowledged), and no feed takes a reused
    offset for a continuation: between explicit ContinuityLost signals each user's events
    follow one another version by version, and a feed never told ContinuityLost got every
    acknowledged write; every feed ends with ListUsers' view."""
    ack = {"HUB_REDIS_REPLICAS_ACK": "1", **FAST}
    a, b = hub_process(cluster_url, **ack), hub_process(cluster_url, **ack)
    victim = redis_cluster.master_of_slot(partition_slot(0))
    owners = redis_cluster.slot_owners()
    victims = {p for p in range(PARTITIONS) if owners[partition_slot(p)] == victim.port}
    ledger = Ledger()
    logs = [FeedLog("A"), FeedLog("B")]
    feeds = [SyncFeed(h.target, backoff=(0.05, 0.5)) for h in (a, b)]
    stop = anyio.Event()
    times: dict[str, float] = {}
    started = time.monotonic()
    try:
        async with grpc.aio.insecure_channel(a.target) as channel, \
                feeds[0], feeds[1], anyio.create_task_group() as readers:
            stub = UserServiceStub(channel)
            for log, feed in zip(logs, feeds, strict=True):
                readers.start_soon(log.follow, feed)
            with anyio.fail_after(10):
                while not all(log.batches for log in logs):  # a heartbeat: subscribed
                    await anyio.sleep(0.05)
            with anyio.fail_after(45):
                async with anyio.create_task_group() as writers:
                    for w in range(4):
                        writers.start_soon(churn, stub, ledger, f"k{w}-", stop)
                    await anyio.sleep(1.5)
                    await anyio.to_thread.run_sync(redis_cluster.kill_master, victim)
                    times["kill"] = time.monotonic()  # it has exited by now
                    new = await anyio.to_thread.run_sync(redis_cluster.wait_failover)
                    times["promoted"] = time.monotonic()
                    await anyio.sleep(1.0)  # writes go on against the replica-less new master
                    await anyio.to_thread.run_sync(restart_node, redis_cluster, victim)
                    times["rejoined"] = time.monotonic()
                    await anyio.sleep(1.5)
                    stop.set()

            async def read_back(user_id: str) -> common_pb2.User | None:
                with anyio.fail_after(10):
                    while True:
                        try:
                            return await stub.GetUser(pb.GetUserRequest(user_id=user_id),
                                                      timeout=3)
                        except grpc.aio.AioRpcError as err:
                            if err.code() == grpc.StatusCode.NOT_FOUND:
                                return None
                            if err.code() != grpc.StatusCode.UNAVAILABLE:
                                raise
                        await anyio.sleep(0.1)

            lost_writes = []
            for user_id, versions in ledger.acked.items():
                got = await read_back(user_id)
                if user_id in ledger.deleted:
                    if got is not None:
                        lost_writes.append(f"{user_id}: deleted (acknowledged), yet"
                                           f" v{got.version}")
                elif got is None:
                    if not ledger.unsure[user_id]:
                        lost_writes.append(f"{user_id}: v{max(versions)} acknowledged, gone")
                elif got.version < max(versions):
                    lost_writes.append(f"{user_id}: v{max(versions)} acknowledged,"
                                       f" v{got.version} now")
            users, _ = await live.list_with_token(stub)
            final = {u.id: u for u in users}
            acknowledged = ledger.keys
            with anyio.move_on_after(20):
                while not all(log.caught_up(acknowledged, final) for log in logs):
                    await anyio.sleep(0.1)
            await anyio.sleep(0.5)  # a repeat after catching up would show here
            readers.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(restart_node, redis_cluster, victim)

    # Acknowledged writes on the killed master's partitions, by phase.
    edges = [started, times["kill"], times["promoted"], times["rejoined"], float("inf")]
    phases = [sum(1 for t, p in ledger.acked_at if p in victims and lo <= t < hi)
              for lo, hi in itertools.pairwise(edges)]

    writes = sum(len(v) for v in ledger.acked.values())
    print(f"\nkilled master {victim.port} ({len(victims)} of {PARTITIONS} partitions), replica"
          f" {new.port} promoted {times['promoted'] - times['kill']:.1f}s later, old master"
          f" back as its replica {times['rejoined'] - times['kill']:.1f}s after the kill")
    print(f"writes: {writes + sum(ledger.refused.values())} attempted, {writes} acknowledged,"
          f" refused {dict(ledger.refused)}; acknowledged on the killed master's partitions"
          f" before the kill / until the promotion / until the rejoin / after: {phases};"
          f" {len(final)} users at the end; {time.monotonic() - started:.1f}s")
    for log in logs:
        keys = log.keys
        print(f"feed on {log.name}: {len(keys)} events delivered,"
              f" {len(set(keys) - acknowledged)} of unacknowledged writes, explicit signals:"
              f" {[f'{x.reason}' for x in log.lost] or 'none'}")
    assert not lost_writes, f"{len(lost_writes)} acknowledged writes lost: {lost_writes[:5]}"
    for log in logs:
        for n, stretch in enumerate(log.stretches):
            wrong = breaks(stretch.snapshot, stretch.changes)
            assert not wrong, (f"{log.name}, after {n} ContinuityLost: a user's events do not"
                               f" follow one another (a reused offset taken for a"
                               f" continuation?): {wrong[:5]}")
        if not log.lost:
            missing = acknowledged - set(log.keys)
            assert not missing, (f"{log.name} never got {len(missing)} acknowledged writes and"
                                 f" was never told ContinuityLost: {sorted(missing)[:5]}")
        assert not differences(log.view(), final), \
            f"{log.name}: {differences(log.view(), final)[:5]}"
    # A write the failover got in the way of is refused UNAVAILABLE (or, stuck past its
    # deadline, DEADLINE_EXCEEDED): its outcome unknown, said so; never INTERNAL. And each
    # event no acknowledgement accounts for is a refused write's: one at most per refusal, of
    # its user (or any, for a refused create).
    odd = {code: said for code, said in ledger.said.items()
           if code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED")}
    unexplained = []
    for log in logs:
        unsure = Counter(ledger.unsure)
        for stretch in log.stretches:
            for e in stretch.changes:
                if (e.user.id, e.user.version) in acknowledged:
                    continue
                who = e.user.id if unsure[e.user.id] else ""
                if unsure[who] and (who or e.type == common_pb2.EVENT_TYPE_CREATED):
                    unsure[who] -= 1
                else:
                    unexplained.append(f"{log.name}: {common_pb2.EventType.Name(e.type)}"
                                       f" {e.user.id} v{e.user.version} {e.user.name!r}")
    assert not odd and not unexplained, (
        f"writes refused otherwise than UNAVAILABLE: {dict(ledger.refused)}, {odd}; events no"
        f" acknowledgement or refusal accounts for (a write applied twice?): {unexplained}")


def test_a_hub_with_another_partition_count_is_refused_at_start_up(
    hub_process: Callable[..., HubProcess], cluster_url: str,
) -> None:
    """The keyspace remembers the partition count it was made with (128, the cluster's
    default): a hub started with --partitions 16 on it exits at start-up with one line that
    names both counts, and serves nothing."""
    hub_process(cluster_url, **FAST)  # makes the keyspace, with 128 partitions
    refused = hub_process(cluster_url, args=["--partitions", "16"], start=False, **FAST)
    assert refused.run() == 2, refused.output()
    output = refused.output()
    said = [line for line in output.splitlines() if "cannot start" in line]
    assert len(said) == 1, output
    assert "made with 128 partitions" in said[0] and "runs with 16" in said[0], said[0]
    assert "--partitions 128" in said[0]  # and what to do about it
    assert "Traceback" not in output
    assert "hub listening" not in output
    print(f"\n{said[0]}")
