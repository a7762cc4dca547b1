"""Live sync across instances, on real Redis with `hub serve` processes: UserUpdates and Sync
deliver every change, in order per user, through disconnects, crashes, pub/sub loss and slow
consumers; what cannot be continued is said explicitly."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
import grpc
import pytest
import redis
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from harness.hub import HubProcess
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.api.user.v1.user_sync_service_pb2_grpc import UserSyncServiceStub
from hub.client import ContinuityLost, SyncBatch, SyncFeed

pytestmark = pytest.mark.anyio
Key = tuple[str, int]  # (user id, version): one event
FAST = {"HUB_HEARTBEAT_INTERVAL": "0.2"}


@dataclass
class Written:
    """What the writers did: every event they caused, in order per user."""

    by_user: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def add(self, user: common_pb2.User) -> None:
        self.by_user[user.id].append(user.version)

    @property
    def keys(self) -> list[Key]:
        return sorted((u, v) for u, vs in self.by_user.items() for v in vs)


async def write_mix(stub: UserServiceStub, written: Written, count: int, tag: str) -> None:
    """`count` creates, updates and deletes (about 3:5:2), through one instance."""
    rng = random.Random(tag)
    alive: list[str] = []
    for i in range(count):
        roll = rng.random()
        if not alive or roll < 0.3:
            user = await stub.CreateUser(
                pb.CreateUserRequest(email=f"{tag}{i}@example.com", name=f"U{i}"), timeout=5)
            alive.append(user.id)
        elif roll < 0.8:
            user = await stub.UpdateUser(pb.UpdateUserRequest(
                user=common_pb2.User(id=rng.choice(alive), name=f"N{i}"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"])), timeout=5)
        else:
            victim = alive.pop(rng.randrange(len(alive)))
            before = await stub.GetUser(pb.GetUserRequest(user_id=victim), timeout=5)
            await stub.DeleteUser(pb.DeleteUserRequest(user_id=victim), timeout=5)
            user = common_pb2.User(id=victim, version=before.version + 1)
        written.add(user)


def keys_of(events: list[common_pb2.UserEvent]) -> list[Key]:
    return [(e.user.id, e.user.version) for e in events if
            e.type != common_pb2.EVENT_TYPE_SNAPSHOT]


def in_version_order(keys: list[Key]) -> bool:
    last: dict[str, int] = {}
    for user_id, version in keys:
        if version <= last.get(user_id, 0):
            return False
        last[user_id] = version
    return True


async def subscribed_sync(stub: UserSyncServiceStub, **subscribe: object
                          ) -> grpc.aio.StreamStreamCall:
    """A Sync stream whose subscription is live: the first response (a heartbeat at least)
    comes only after the server has set it up."""
    call = stub.Sync(timeout=120)
    await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(**subscribe)))  # type: ignore[arg-type]
    return call


async def read_until(call: grpc.aio.StreamStreamCall, want: int, seen: list[common_pb2.UserEvent],
                     deadline: float = 30) -> str:
    """Reads responses into `seen` until it holds `want` change events; returns the last token."""
    token = ""
    with anyio.fail_after(deadline):
        while len(keys_of(seen)) < want:
            response = await call.read()
            assert response is not grpc.aio.EOF
            seen.extend(response.events)
            token = response.resume_token
    return token


@pytest.fixture
def two(hub_process: Callable[..., HubProcess], redis_url: str) -> tuple[HubProcess, HubProcess]:
    return hub_process(redis_url, **FAST), hub_process(redis_url, **FAST)


@pytest.fixture
async def channels(two: tuple[HubProcess, HubProcess]
                   ) -> AsyncIterator[tuple[grpc.aio.Channel, grpc.aio.Channel]]:
    a, b = two
    async with grpc.aio.insecure_channel(a.target) as ca, \
            grpc.aio.insecure_channel(b.target) as cb:
        yield ca, cb


async def test_thousand_mixed_writes_reach_sync_and_user_updates_on_the_other_instance(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel],
) -> None:
    ca, cb = channels
    sync = await subscribed_sync(UserSyncServiceStub(cb))
    await sync.read()  # the heartbeat: subscribed
    updates = UserServiceStub(cb).UserUpdates(timeout=120)
    await updates.write(pb.UserUpdateRequest(subscribe=common_pb2.Subscribe()))
    # UserUpdates has no heartbeat: a probe user proves its subscription is live.
    probe = await UserServiceStub(ca).CreateUser(
        pb.CreateUserRequest(email="probe@example.com"), timeout=5)
    first = await updates.read()
    assert first.id == probe.id
    sync_seen: list[common_pb2.UserEvent] = []
    await read_until(sync, 1, sync_seen)

    written = Written()
    await write_mix(UserServiceStub(ca), written, 1000, "mix")
    await read_until(sync, 1001, sync_seen)
    user_updates: list[Key] = []
    deleted: set[str] = set()
    with anyio.fail_after(30):
        while len(user_updates) < 1000:
            user = await updates.read()
            user_updates.append((user.id, user.version))
            if user.HasField("deleted_at"):
                deleted.add(user.id)

    expected = written.keys
    sync_keys = keys_of(sync_seen)[1:]  # after the probe
    assert sorted(sync_keys) == expected  # complete, no duplicates
    assert sorted(user_updates) == expected
    assert in_version_order(sync_keys) and in_version_order(user_updates)
    deletes = [e.user.id for e in sync_seen if e.type == common_pb2.EVENT_TYPE_DELETED]
    assert set(deletes) == deleted and len(deletes) == len(deleted) > 0
    sync.cancel()
    updates.cancel()


async def test_resume_on_the_other_instance_gets_exactly_what_was_written(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel],
) -> None:
    ca, cb = channels
    call = await subscribed_sync(UserSyncServiceStub(cb))
    await call.read()
    written = Written()
    writer = asyncio.create_task(write_mix(UserServiceStub(ca), written, 600, "resume"))
    seen: list[common_pb2.UserEvent] = []
    token = await read_until(call, 150, seen)
    call.cancel()  # mid-stream, with writes still going on
    await writer

    resumed = await subscribed_sync(UserSyncServiceStub(ca), resume_token=token)
    await read_until(resumed, 600, seen)
    resumed.cancel()
    keys = keys_of(seen)
    assert sorted(keys) == written.keys  # exactly: nothing lost, nothing twice
    assert in_version_order(keys)


async def test_feed_resumes_on_a_when_b_is_killed_under_writes(
    two: tuple[HubProcess, HubProcess], channels: tuple[grpc.aio.Channel, grpc.aio.Channel],
) -> None:
    a, b = two
    ca, _ = channels
    feed = SyncFeed([b.target, a.target], backoff=(0.05, 0.5))
    seen: list[common_pb2.UserEvent] = []
    written = Written()

    async def consume() -> None:
        async for item in feed:
            assert isinstance(item, SyncBatch), item
            seen.extend(item.events)
            if len(keys_of(seen)) >= 500:
                return

    async def write_and_kill() -> None:
        await anyio.sleep(0.5)  # the feed is subscribed on B by now (heartbeats every 0.2 s)
        stub = UserServiceStub(ca)
        await write_mix(stub, written, 150, "kill1")
        b.proc.send_signal(signal.SIGKILL)
        await write_mix(stub, written, 350, "kill2")

    with anyio.fail_after(60):
        async with feed, anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(write_and_kill)
    assert b.proc.wait(timeout=5) == -signal.SIGKILL
    assert feed.reconnects >= 1
    keys = keys_of(seen)
    assert sorted(keys) == written.keys
    assert in_version_order(keys)


async def test_killed_pubsub_connections_lose_nothing(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel], redis_url: str,
) -> None:
    ca, cb = channels
    calls = [await subscribed_sync(UserSyncServiceStub(c)) for c in (ca, cb)]
    for call in calls:
        await call.read()
    written = Written()
    raw = redis.Redis.from_url(redis_url)

    async def kill_pubsub() -> None:
        for _ in range(5):
            await anyio.sleep(0.15)
            assert raw.client_kill_filter(_type="pubsub") >= 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(kill_pubsub)
        tg.start_soon(write_mix, UserServiceStub(ca), written, 500, "pubsub")
    raw.close()
    for call in calls:
        seen: list[common_pb2.UserEvent] = []
        await read_until(call, 500, seen)
        call.cancel()
        assert sorted(keys_of(seen)) == written.keys
        assert in_version_order(keys_of(seen))


async def test_stalled_subscriber_catches_up_without_loss(
    hub_process: Callable[..., HubProcess], redis_url: str,
) -> None:
    """A subscriber that stops reading is not cut: past its buffer bound it reads the history
    at its own pace once it reads again, and gets every event exactly once, in order."""
    hub = hub_process(redis_url, HUB_SUBSCRIBER_MAX_EVENTS="2000", **FAST)
    # The stalled client's receive window stays small (no BDP growth), as a slow reader's
    # would on a real network, so what it does not read backs up on the server.
    small_window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65_536)]
    async with grpc.aio.insecure_channel(hub.target) as healthy_ch, \
            grpc.aio.insecure_channel(hub.target, options=small_window) as stalled_ch:
        healthy = await subscribed_sync(UserSyncServiceStub(healthy_ch))
        stalled = await subscribed_sync(UserSyncServiceStub(stalled_ch))
        await healthy.read()
        await stalled.read()
        # Fat rows fill the stalled stream's flow-control window, then its buffer (2000
        # events) several times over.
        total = 10000
        rows = [pb.CreateUserRequest(email=f"s{i}@example.com", name="x" * 200)
                for i in range(total)]
        stub = UserServiceStub(healthy_ch)
        healthy_seen: list[common_pb2.UserEvent] = []

        async def write() -> None:
            for start in range(0, total, 500):
                response = await stub.BulkCreateUsers(iter(rows[start:start + 500]), timeout=30)
                assert response.created_count == 500

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            tg.start_soon(read_until, healthy, total, healthy_seen)
        assert len(keys_of(healthy_seen)) == total  # the healthy one never slowed down

        # Reading again, the stalled one gets the rest from the history: not cut, no gap,
        # no duplicate.
        stalled_seen: list[common_pb2.UserEvent] = []
        await read_until(stalled, total, stalled_seen)
        stalled.cancel()
        healthy.cancel()
        keys = keys_of(stalled_seen)
        assert len(keys) == len(set(keys)) == total
        assert sorted(keys) == sorted(keys_of(healthy_seen))


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of a status, read as any gRPC client reads it (grpc-status-details-bin)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo")


def error_reason(err: grpc.aio.AioRpcError) -> str:
    return str(error_info(err).reason)


async def test_expired_token_and_reset_history_are_explicit(
    hub_process: Callable[..., HubProcess], redis_url: str,
) -> None:
    hub = hub_process(redis_url, HUB_PARTITIONS="1", HUB_HISTORY_SIZE="10", **FAST)
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub, sync = UserServiceStub(channel), UserSyncServiceStub(channel)
        _, first = await list_with_token(stub)
        rows = [pb.CreateUserRequest(email=f"e{i}@example.com") for i in range(400)]
        await stub.BulkCreateUsers(iter(rows), timeout=30)

        call = await subscribed_sync(sync, resume_token=first)
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await call.read()
        assert expired.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error_reason(expired.value) == "HISTORY_EXPIRED"

        _, recent = await list_with_token(stub)
        live = await subscribed_sync(sync)
        await live.read()
        redis.Redis.from_url(redis_url).flushall()  # Redis "restarted empty"
        with pytest.raises(grpc.aio.AioRpcError) as reset:
            with anyio.fail_after(10):
                while True:
                    await live.read()
        assert reset.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error_reason(reset.value) == "EPOCH_CHANGED"
        call = await subscribed_sync(sync, resume_token=recent)
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await call.read()
        assert error_reason(stale.value) == "EPOCH_CHANGED"


async def list_with_token(stub: UserServiceStub) -> tuple[list[common_pb2.User], str]:
    call = stub.ListUsers(pb.ListUsersRequest(), timeout=10)
    users = [u async for u in call]
    token = dict(await call.trailing_metadata())["hub-resume-token"]
    return users, str(token)


async def test_list_then_watch_misses_nothing(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel],
) -> None:
    ca, cb = channels
    stub = UserServiceStub(ca)
    early = Written()
    await write_mix(stub, early, 100, "before")
    users, token = await list_with_token(stub)
    assert len(users) > 0
    later = Written()
    await write_mix(stub, later, 200, "after")
    call = await subscribed_sync(UserSyncServiceStub(cb), resume_token=token)
    seen: list[common_pb2.UserEvent] = []
    await read_until(call, 200, seen)
    call.cancel()
    assert sorted(keys_of(seen)) == later.keys


async def test_snapshot_then_live_in_one_stream(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel],
) -> None:
    ca, cb = channels
    stub = UserServiceStub(ca)
    before = Written()
    await write_mix(stub, before, 120, "snap")
    users, _ = await list_with_token(stub)
    call = await subscribed_sync(UserSyncServiceStub(cb), snapshot=True)
    snapshot: dict[str, int] = {}
    with anyio.fail_after(10):
        while True:
            response = await call.read()
            for e in response.events:
                assert e.type == common_pb2.EVENT_TYPE_SNAPSHOT
                snapshot[e.user.id] = e.user.version
            if response.snapshot_complete:
                break
    assert snapshot == {u.id: u.version for u in users}
    after = Written()
    await write_mix(stub, after, 50, "snap-live")
    seen: list[common_pb2.UserEvent] = []
    await read_until(call, 50, seen)
    call.cancel()
    assert sorted(keys_of(seen)) == after.keys


async def test_user_filter_conflation_and_change_results(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel],
) -> None:
    ca, cb = channels
    stub = UserServiceStub(ca)
    watched = await stub.CreateUser(pb.CreateUserRequest(email="w@example.com"), timeout=5)
    other = await stub.CreateUser(pb.CreateUserRequest(email="o@example.com"), timeout=5)
    call = await subscribed_sync(UserSyncServiceStub(cb), user_ids=[watched.id], conflate=True)
    await call.read()
    mask = field_mask_pb2.FieldMask(paths=["name"])
    for i in range(50):
        for user in (watched, other):
            await stub.UpdateUser(pb.UpdateUserRequest(
                user=common_pb2.User(id=user.id, name=f"v{i}"), update_mask=mask), timeout=5)
    # Changes sent on the stream get results matched by request id.
    await call.write(spb.SyncRequest(change=pb.UserChange(
        request_id="bad", create=pb.CreateUserRequest(email="nope"))))
    await call.write(spb.SyncRequest(change=pb.UserChange(
        request_id="good", update=pb.UpdateUserRequest(
            user=common_pb2.User(id=watched.id, name="final"), update_mask=mask))))
    results = {}
    events: list[common_pb2.UserEvent] = []
    with anyio.fail_after(10):
        while len(results) < 2 or not events or events[-1].user.name != "final":
            response = await call.read()
            events.extend(response.events)
            results.update({r.request_id: r for r in response.results})
    call.cancel()
    assert results["bad"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results["bad"].violations[0].field == "email"
    assert results["good"].code == 0 and results["good"].user.version == 52
    assert {e.user.id for e in events} == {watched.id}  # the filter holds
    # Conflated: at most one event per user per response, versions only ever increase.
    assert in_version_order(keys_of(events))
    assert events[-1].user.version == 52


async def test_feed_signals_lost_continuity_then_snapshots(
    two: tuple[HubProcess, HubProcess],
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel], redis_url: str,
) -> None:
    ca, _ = channels
    stub = UserServiceStub(ca)
    await stub.CreateUser(pb.CreateUserRequest(email="a@example.com"), timeout=5)
    _, token = await list_with_token(stub)
    redis.Redis.from_url(redis_url).flushall()
    await stub.CreateUser(pb.CreateUserRequest(email="b@example.com"), timeout=5)
    feed = SyncFeed(two[1].target, resume_token=token)
    items: list[SyncBatch | ContinuityLost] = []
    with anyio.fail_after(20):
        async with feed:
            async for item in feed:
                items.append(item)
                if isinstance(item, SyncBatch) and item.snapshot_complete:
                    break
    assert isinstance(items[0], ContinuityLost) and items[0].reason == "EPOCH_CHANGED"
    snapshot = [e.user.email for i in items[1:] if isinstance(i, SyncBatch) for e in i.events]
    assert snapshot == ["b@example.com"]
