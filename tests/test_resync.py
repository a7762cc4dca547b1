"""Lost continuity is typed, and resumable by state: every OUT_OF_RANGE carries in its
google.rpc.ErrorInfo what a client in any language acts on (the action, the current epoch, the
earliest position left), and a subscriber whose token has left the history resumes by state
(Subscribe.catch_up = CATCH_UP_STATE) with only what changed since, deletions included."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

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


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of a status, read as any gRPC client reads it (grpc-status-details-bin)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo")


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
