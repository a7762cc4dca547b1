"""Lost continuity is typed, and resumable by state: every OUT_OF_RANGE carries in its
google.rpc.ErrorInfo what a client in any language acts on (the action, the current epoch, the
earliest position left), and a subscriber whose token has left the history resumes by state
(Subscribe.catch_up = CATCH_UP_STATE) with only what changed since, deletions included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import grpc
import pytest
from google.protobuf import field_mask_pb2

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
HISTORY = 10  # events kept per partition


@pytest.fixture(params=["memory", "redis"])
async def small(request: pytest.FixtureRequest) -> AsyncIterator[HubServer]:
    """A hub (in this process) whose one partition keeps about HISTORY events."""
    store: Store
    if request.param == "memory":
        store = MemoryStore(partitions=1, history_size=HISTORY)
    else:
        store = RedisStore.from_url(request.getfixturevalue("redis_url"), partitions=1,
                                    history_size=HISTORY)
    settings = Settings(port=0, heartbeat_interval=0.2, partitions=1, history_size=HISTORY)
    async with HubServer(settings, store=store) as server:  # it closes the store
        yield server


@pytest.fixture
async def channel(small: HubServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{small.port}") as ch:
        yield ch




async def list_with_token(stub: UserServiceStub) -> tuple[list[common_pb2.User], str]:
    call = stub.ListUsers(pb.ListUsersRequest(), timeout=10)
    users = [u async for u in call]
    return users, str(dict(await call.trailing_metadata())["hub-resume-token"])


async def sync_error(sync: UserSyncServiceStub, **subscribe: object) -> grpc.aio.AioRpcError:
    """The status a Sync stream subscribed so ends with (reading what comes before it)."""
    call = sync.Sync(timeout=20)
    await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(**subscribe)))  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        with anyio.fail_after(15):
            while True:
                await call.read()
    return err.value


async def create(stub: UserServiceStub, n: int, tag: str) -> list[common_pb2.User]:
    rows = [pb.CreateUserRequest(email=f"{tag}{i}@example.com") for i in range(n)]
    await stub.BulkCreateUsers(iter(rows), timeout=30)
    users, _ = await list_with_token(stub)
    return [u for u in users if u.email.startswith(tag)]


async def test_expired_token_says_resync_by_state_and_where_the_history_starts(
    channel: grpc.aio.Channel,
) -> None:
    stub, sync = UserServiceStub(channel), UserSyncServiceStub(channel)
    _, old = await list_with_token(stub)
    await create(stub, 300, "e")
    _, now = await list_with_token(stub)

    err = await sync_error(sync, resume_token=old)
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(err)
    assert info.reason == "HISTORY_EXPIRED" and info.domain == "hub.user.v1"
    assert info.metadata["action"] == "RESYNC_BY_STATE"
    # The epoch is the one current tokens carry; the earliest position is a token the history
    # still reaches back to: resuming from it replays what is left, up to now, with no error.
    earliest = info.metadata["earliest_position"]
    assert info.metadata["epoch"] and earliest
    call = sync.Sync(timeout=20)
    await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(resume_token=earliest)))
    replayed: list[str] = []
    with anyio.fail_after(10):
        while True:
            response = await call.read()
            replayed += [e.user.email for e in response.events]
            if response.resume_token == now:
                break
    call.cancel()
    assert HISTORY <= len(replayed) < 300  # what the history keeps, nothing more
    assert replayed == [f"e{i}@example.com" for i in range(300 - len(replayed), 300)]


async def test_epoch_change_says_snapshot_with_the_new_epoch(
    small: HubServer, channel: grpc.aio.Channel,
) -> None:
    stub, sync = UserServiceStub(channel), UserSyncServiceStub(channel)
    await create(stub, 3, "before")
    _, old = await list_with_token(stub)
    live = sync.Sync(timeout=20)
    await live.write(spb.SyncRequest(subscribe=common_pb2.Subscribe()))
    await live.read()  # a heartbeat: subscribed
    before = (await small.store.position()).epoch
    await small.store.rotate_epoch(before)  # the history was replaced

    with pytest.raises(grpc.aio.AioRpcError) as cut:
        with anyio.fail_after(10):
            while True:
                await live.read()
    for err in (cut.value, await sync_error(sync, resume_token=old)):
        assert err.code() == grpc.StatusCode.OUT_OF_RANGE
        info = error_info(err)
        assert info.reason == "EPOCH_CHANGED"
        assert info.metadata["action"] == "SNAPSHOT"
        assert info.metadata["epoch"] != before
        assert info.metadata["epoch"] == (await small.store.position()).epoch
        assert info.metadata["earliest_position"]


def make_store(kind: str, request: pytest.FixtureRequest, **options: float) -> Store:
    if kind == "memory":
        return MemoryStore(partitions=2, history_size=HISTORY, **options)  # type: ignore[arg-type]
    return RedisStore.from_url(request.getfixturevalue("redis_url"), partitions=2,
                               history_size=HISTORY, **options)


def serving(store: Store) -> HubServer:
    return HubServer(Settings(port=0, heartbeat_interval=0.2, partitions=2,
                              history_size=HISTORY), store=store)


@pytest.fixture(params=["memory", "redis"])
async def resyncing(request: pytest.FixtureRequest) -> AsyncIterator[HubServer]:
    """A hub whose two partitions keep about HISTORY events each."""
    async with serving(make_store(request.param, request)) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def forgetful(request: pytest.FixtureRequest) -> AsyncIterator[HubServer]:
    """A hub that keeps tombstones for a tenth of a second."""
    async with serving(make_store(request.param, request, tombstone_retention=0.1)) as server:
        yield server


View = dict[str, tuple[str, str, int, int]]  # id: (email, name, status, version)


def state(user: common_pb2.User) -> tuple[str, str, int, int]:
    return user.email, user.name, user.status, user.version


async def resync(call: grpc.aio.StreamStreamCall, view: View, token: str
                 ) -> tuple[list[common_pb2.UserEvent], str]:
    """Applies a resync's events to `view` until resync_complete; the events, and the token
    of the response that completed it. Every response before it keeps `token`."""
    events: list[common_pb2.UserEvent] = []
    with anyio.fail_after(20):
        while True:
            response = await call.read()
            for e in response.events:
                assert e.resync
                events.append(e)
                if e.type == common_pb2.EVENT_TYPE_DELETED:
                    assert e.user.HasField("deleted_at")
                    view.pop(e.user.id, None)
                else:
                    assert e.type == common_pb2.EVENT_TYPE_SNAPSHOT
                    view[e.user.id] = state(e.user)
            if response.resync_complete:
                return events, response.resume_token
            assert response.resume_token == token  # a cut here resyncs again from it


async def test_resume_by_state_sends_only_what_changed_and_ends_equal_to_the_store(
    resyncing: HubServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{resyncing.port}") as channel:
        stub, sync = UserServiceStub(channel), UserSyncServiceStub(channel)
        await create(stub, 1000, "a")
        users, token = await list_with_token(stub)
        view: View = {u.id: state(u) for u in users}  # the client's view, and its token

        # While it is away: 100 users renamed four times each, 30 deleted, 50 created; far
        # more than the history keeps.
        changed = [u.id for u in users[:130]]
        for n in range(4):
            for start in range(0, 100, 50):
                await asyncio.gather(*(stub.UpdateUser(pb.UpdateUserRequest(
                    user=common_pb2.User(id=i, name=f"n{n}"),
                    update_mask=field_mask_pb2.FieldMask(paths=["name"])), timeout=10)
                    for i in changed[start:start + 50]))
        for i in changed[100:]:
            await stub.DeleteUser(pb.DeleteUserRequest(user_id=i), timeout=10)
        changed += [u.id for u in await create(stub, 50, "b")]
        plain = await sync_error(sync, resume_token=token)
        assert error_info(plain).reason == "HISTORY_EXPIRED"  # the history is gone

        call = sync.Sync(timeout=30)
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(
            resume_token=token, catch_up=common_pb2.CATCH_UP_STATE)))
        events, live_token = await resync(call, view, token)
        now, _ = await list_with_token(stub)
        assert view == {u.id: state(u) for u in now}  # user by user, deletions applied
        # Only the users that changed, each once: not a snapshot of the 1,050 there are.
        sent = [e.user.id for e in events]
        assert sorted(sent) == sorted(changed) and len(now) == 1020
        deleted = {e.user.id for e in events if e.type == common_pb2.EVENT_TYPE_DELETED}
        assert deleted == set(changed[100:130])

        # Then live, from the token of the completing response.
        later = await stub.UpdateUser(pb.UpdateUserRequest(
            user=common_pb2.User(id=changed[0], name="later"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"])), timeout=10)
        with anyio.fail_after(10):
            while not (response := await call.read()).events:
                pass
        assert [(e.type, e.resync, state(e.user)) for e in response.events] == [
            (common_pb2.EVENT_TYPE_UPDATED, False, state(later))]
        call.cancel()
        assert live_token != token


async def test_resync_is_refused_beyond_the_tombstone_retention_and_on_an_epoch_change(
    forgetful: HubServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{forgetful.port}") as channel:
        stub, sync = UserServiceStub(channel), UserSyncServiceStub(channel)
        users = await create(stub, 300, "r")
        _, token = await list_with_token(stub)
        await stub.DeleteUser(pb.DeleteUserRequest(user_id=users[0].id), timeout=10)
        await create(stub, 300, "s")  # the delete leaves the history
        await anyio.sleep(0.3)  # past the tombstone retention
        await stub.DeleteUser(pb.DeleteUserRequest(user_id=users[1].id), timeout=10)
        await create(stub, 300, "t")
        beyond = await sync_error(sync, resume_token=token, catch_up=common_pb2.CATCH_UP_STATE)
        assert beyond.code() == grpc.StatusCode.OUT_OF_RANGE
        info = error_info(beyond)
        assert (info.reason, info.metadata["action"]) == ("HISTORY_EXPIRED", "SNAPSHOT")
        assert info.metadata["earliest_position"]

        _, recent = await list_with_token(stub)
        await forgetful.store.rotate_epoch((await forgetful.store.position()).epoch)
        with anyio.fail_after(10):
            while True:  # until the fan-out has seen the new epoch (its audit: 1 s)
                err = await sync_error(sync, resume_token=recent,
                                       catch_up=common_pb2.CATCH_UP_STATE)
                if error_info(err).reason == "EPOCH_CHANGED":
                    break
                await anyio.sleep(0.1)
        assert err.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error_info(err).metadata["action"] == "SNAPSHOT"
