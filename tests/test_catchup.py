"""In-server catch-up: a subscriber too slow for the live feed is not cut. Past its buffer bound
the engine stops buffering for it, its stream reads the history at its own pace when it reads
again, and it rejoins the live feed with every event exactly once, in order; only a position
that has left the history ends it (OUT_OF_RANGE, with its continuity details)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import grpc
import pytest
from google.protobuf import field_mask_pb2

from hub import metrics
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.api.user.v1.user_sync_service_pb2_grpc import UserSyncServiceStub
from hub.rpc.server import HubServer
from hub.settings import Settings
from hub.store.base import Store
from hub.store.memory import MemoryStore
from hub.store.redis import RedisStore
from tests.test_live import error_info

pytestmark = pytest.mark.anyio
Key = tuple[str, int]  # (user id, version): one event
BOUND = 200  # subscriber_max_events
# The stalled client's receive window stays small (no BDP growth), as a slow reader's would on
# a real network, so what it does not read backs up on the server.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65_536)]
FAT = "x" * 200  # names that fill a window quickly


def make_store(kind: str, request: pytest.FixtureRequest, history: int) -> Store:
    if kind == "memory":
        return MemoryStore(partitions=4, history_size=history)
    return RedisStore.from_url(request.getfixturevalue("redis_url"), partitions=4,
                               history_size=history)


def serving(store: Store) -> HubServer:
    settings = Settings(port=0, heartbeat_interval=0.2, partitions=4, bulk_batch_size=50,
                        subscriber_max_events=BOUND)
    return HubServer(settings, store=store)


@pytest.fixture(params=["memory", "redis"])
async def roomy(request: pytest.FixtureRequest) -> AsyncIterator[HubServer]:
    """A hub whose history keeps everything the tests write."""
    async with serving(make_store(request.param, request, 100_000)) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def tight(request: pytest.FixtureRequest) -> AsyncIterator[HubServer]:
    """A hub whose history keeps about 50 events per partition."""
    async with serving(make_store(request.param, request, 50)) as server:
        yield server


def metric(name: str) -> float:
    return metrics.REGISTRY.get_sample_value(name) or 0.0


def keys_of(events: list[common_pb2.UserEvent]) -> list[Key]:
    return [(e.user.id, e.user.version) for e in events]


def in_version_order(keys: list[Key]) -> bool:
    last: dict[str, int] = {}
    for user_id, version in keys:
        if version <= last.get(user_id, 0):
            return False
        last[user_id] = version
    return True


async def subscribed(stub: UserSyncServiceStub, **subscribe: object) -> grpc.aio.StreamStreamCall:
    """A Sync stream whose subscription is live (its first heartbeat has come)."""
    call = stub.Sync(timeout=120)
    await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(**subscribe)))  # type: ignore[arg-type]
    await call.read()
    return call


async def read_until(call: grpc.aio.StreamStreamCall, want: int,
                     seen: list[common_pb2.UserEvent]) -> None:
    with anyio.fail_after(60):
        while len(seen) < want:
            response = await call.read()
            assert response is not grpc.aio.EOF
            seen.extend(response.events)


async def write(stub: UserServiceStub, users: int, updated: int, tag: str) -> list[Key]:
    """`users` creates (fat rows, in bulk), then two renames of each of the first `updated`
    of them; every event written, as (id, version)."""
    rows = [pb.CreateUserRequest(email=f"{tag}{i}@example.com", name=FAT) for i in range(users)]
    created = await stub.BulkCreateUsers(iter(rows), timeout=60)
    assert created.created_count == users
    ids = list(created.user_ids)
    mask = field_mask_pb2.FieldMask(paths=["name"])
    for n in range(2):
        # 50 at a time: well within a connection's concurrent streams (100).
        for start in range(0, updated, 50):
            await asyncio.gather(*(stub.UpdateUser(pb.UpdateUserRequest(
                user=common_pb2.User(id=i, name=f"{FAT[:190]}{n}"), update_mask=mask), timeout=10)
                for i in ids[start:min(start + 50, updated)]))
    return sorted([(i, 1) for i in ids] + [(i, v) for i in ids[:updated] for v in (2, 3)])


async def test_stalled_subscriber_catches_up_without_loss_or_duplicates(
    roomy: HubServer,
) -> None:
    target = f"127.0.0.1:{roomy.port}"
    before = {name: metric(name) for name in (
        "hub_catchup_subscribers", "hub_catchups_completed_total",
        "hub_slow_consumer_disconnects_total")}
    async with grpc.aio.insecure_channel(target) as channel, \
            grpc.aio.insecure_channel(target) as writes, \
            grpc.aio.insecure_channel(target, options=SMALL_WINDOW) as slow:
        sync = UserSyncServiceStub(channel)
        healthy = [await subscribed(sync) for _ in range(20)]
        stalled = await subscribed(UserSyncServiceStub(slow))
        seen: list[list[common_pb2.UserEvent]] = [[] for _ in healthy]
        # 3,000 creates and 300 updates: over 16 times the stalled one's buffer bound.
        async with anyio.create_task_group() as tg:
            for call, events in zip(healthy, seen, strict=True):
                tg.start_soon(read_until, call, 3300, events)
            written = await write(UserServiceStub(writes), 3000, 150, "c")
        for events in seen:  # the others got everything, once each, in order
            assert sorted(keys_of(events)) == written and in_version_order(keys_of(events))
        # The stalled one fell past its bound, and is still there: not cut, not buffered.
        assert metric("hub_catchup_subscribers") >= before["hub_catchup_subscribers"] + 1

        late: list[common_pb2.UserEvent] = []
        await read_until(stalled, len(written), late)
        assert sorted(keys_of(late)) == written  # every event exactly once
        assert in_version_order(keys_of(late))
        # Back on the live feed: a new write reaches it like everyone else.
        probe = await UserServiceStub(channel).CreateUser(
            pb.CreateUserRequest(email="probe@example.com"), timeout=5)
        for call, events in [*zip(healthy, seen, strict=True), (stalled, late)]:
            await read_until(call, len(events) + 1, events)
            assert keys_of(events)[-1] == (probe.id, 1)
            call.cancel()
    assert metric("hub_catchups_completed_total") >= before["hub_catchups_completed_total"] + 1
    assert metric("hub_slow_consumer_disconnects_total") == \
        before["hub_slow_consumer_disconnects_total"]


async def test_stalled_user_updates_stream_catches_up_too(roomy: HubServer) -> None:
    target = f"127.0.0.1:{roomy.port}"
    async with grpc.aio.insecure_channel(target) as channel, \
            grpc.aio.insecure_channel(target, options=SMALL_WINDOW) as slow:
        stub = UserServiceStub(channel)
        stalled = UserServiceStub(slow).UserUpdates(timeout=120)
        probe = await stub.CreateUser(pb.CreateUserRequest(email="p@example.com"), timeout=5)
        await stalled.write(pb.UserUpdateRequest(subscribe=common_pb2.Subscribe()))
        # UserUpdates has no heartbeat: Subscribes are acted on in order, so the snapshot a
        # second one asks for proves the first is live.
        await stalled.write(pb.UserUpdateRequest(subscribe=common_pb2.Subscribe(
            user_ids=[probe.id], snapshot=True)))
        assert (await stalled.read()).id == probe.id
        caught_up = metric("hub_catchups_completed_total")
        written = await write(stub, 2000, 100, "u")
        got: list[Key] = []
        with anyio.fail_after(60):
            while len(got) < len(written):
                user = await stalled.read()
                got.append((user.id, user.version))
        assert sorted(got) == written and in_version_order(got)
        last = await stub.CreateUser(pb.CreateUserRequest(email="last@example.com"), timeout=5)
        assert (await stalled.read()).id == last.id  # live again
        assert metric("hub_catchups_completed_total") >= caught_up + 1
        stalled.cancel()




async def test_subscriber_that_falls_out_of_the_history_is_cut_with_details(
    tight: HubServer,
) -> None:
    target = f"127.0.0.1:{tight.port}"
    cuts = metric("hub_slow_consumer_disconnects_total")
    async with grpc.aio.insecure_channel(target) as channel, \
            grpc.aio.insecure_channel(target, options=SMALL_WINDOW) as slow:
        stalled = await subscribed(UserSyncServiceStub(slow))
        written = await write(UserServiceStub(channel), 3000, 0, "t")
        got: list[common_pb2.UserEvent] = []
        token = ""
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            with anyio.fail_after(60):
                while True:
                    response = await stalled.read()
                    got.extend(response.events)
                    token = response.resume_token
        err = cut.value
        assert err.code() == grpc.StatusCode.OUT_OF_RANGE
        info = error_info(err)
        assert info.reason == "HISTORY_EXPIRED"
        assert info.metadata["action"] == "RESYNC_BY_STATE"
        assert info.metadata["epoch"] and info.metadata["earliest_position"]
        # What it did get came once each, and its last token says where it stands: the
        # trailing metadata has it too.
        keys = keys_of(got)
        assert len(set(keys)) == len(keys) < len(written)
        assert dict(err.trailing_metadata() or ())["hub-resume-token"] == token
    assert metric("hub_slow_consumer_disconnects_total") == cuts + 1


async def test_subscriber_that_falls_out_of_the_history_resyncs_by_state_if_it_asked(
    tight: HubServer,
) -> None:
    target = f"127.0.0.1:{tight.port}"
    cuts = metric("hub_slow_consumer_disconnects_total")
    async with grpc.aio.insecure_channel(target) as channel, \
            grpc.aio.insecure_channel(target, options=SMALL_WINDOW) as slow:
        stalled = await subscribed(UserSyncServiceStub(slow), catch_up=common_pb2.CATCH_UP_STATE)
        stub = UserServiceStub(channel)
        written = await write(stub, 3000, 100, "r")
        # What it gets: the live events it had been sent, the rest as resync events, then
        # resync_complete, then live again.
        view: dict[str, int] = {}
        resynced = 0
        with anyio.fail_after(60):
            while True:
                response = await stalled.read()
                for e in response.events:
                    assert e.user.version > view.get(e.user.id, 0)  # never older, never twice
                    view[e.user.id] = e.user.version
                    resynced += e.resync
                if response.resync_complete:
                    break
        assert resynced > 0
        assert view == {i: v for i, v in written if (i, v + 1) not in written}
        probe = await stub.CreateUser(pb.CreateUserRequest(email="probe@example.com"), timeout=5)
        with anyio.fail_after(10):
            while not (response := await stalled.read()).events:
                pass
        assert [(e.user.id, e.resync) for e in response.events] == [(probe.id, False)]
        stalled.cancel()
    assert metric("hub_slow_consumer_disconnects_total") == cuts
