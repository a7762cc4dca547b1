"""Read-your-writes across instances: a stream subscribed on B with Subscribe.min_position (a
write's hub-position from A) shows the write from its first response on; a position B cannot
reach in time is UNAVAILABLE, one of another epoch OUT_OF_RANGE, a malformed one
INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import grpc
import pytest
from google.protobuf import field_mask_pb2

from harness.hub import HubProcess
from hub import resume
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.api.user.v1.user_sync_service_pb2_grpc import UserSyncServiceStub
from hub.domain import EventBatch, Position
from hub.rpc.server import HubServer
from hub.settings import Settings
from hub.store.memory import MemoryStore
from tests.test_live import error_reason as reason

pytestmark = pytest.mark.anyio
WORKERS, TRIES = 10, 100  # 1,000 tries, 10 at a time
MASK = field_mask_pb2.FieldMask(paths=["name"])


@pytest.fixture
def two(hub_process: Callable[..., HubProcess], redis_url: str) -> tuple[HubProcess, HubProcess]:
    return hub_process(redis_url), hub_process(redis_url)


async def token_of(stub: UserServiceStub) -> str:
    """A resume token from ListUsers' trailing metadata."""
    call = stub.ListUsers(pb.ListUsersRequest(), timeout=10)
    _ = [u async for u in call]
    return str(dict(await call.trailing_metadata())["hub-resume-token"])


async def renamed(stub: UserServiceStub, user_id: str, name: str) -> tuple[common_pb2.User, str]:
    """UpdateUser, and the write's position (trailing hub-position)."""
    call = stub.UpdateUser(pb.UpdateUserRequest(
        user=common_pb2.User(id=user_id, name=name), update_mask=MASK), timeout=5)
    user = await call
    return user, str(dict(await call.trailing_metadata())["hub-position"])


async def test_a_write_on_a_is_in_the_first_response_on_b_every_time(
    two: tuple[HubProcess, HubProcess],
) -> None:
    a, b = two
    async with grpc.aio.insecure_channel(a.target) as ca, \
            grpc.aio.insecure_channel(b.target) as cb:
        on_a, sync_b = UserServiceStub(ca), UserSyncServiceStub(cb)
        users = [await on_a.CreateUser(pb.CreateUserRequest(email=f"w{n}@example.com"),
                                       timeout=5) for n in range(WORKERS)]
        start = await token_of(UserServiceStub(cb))
        missed: list[tuple[int, int]] = []

        async def worker(user: common_pb2.User) -> None:
            token = start
            for n in range(TRIES):
                written, position = await renamed(on_a, user.id, f"try {n}")
                # Resume on B from the last token it gave, waiting for the write: the replay
                # that makes the first response must hold it.
                call = sync_b.Sync(timeout=10)
                await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(
                    user_ids=[user.id], resume_token=token, min_position=position)))
                first = await call.read()
                if (user.id, written.version) not in [(e.user.id, e.user.version)
                                                      for e in first.events]:
                    missed.append((n, written.version))
                token = first.resume_token
                call.cancel()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for user in users:
                    tg.start_soon(worker, user)
        assert missed == []


class GatedStore(MemoryStore):
    """A memory store whose event bus delivers nothing until `gate` is set: an instance whose
    fan-out is behind the store."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[AsyncIterator[EventBatch]]:
        async with super().listen() as batches:

            async def gated() -> AsyncIterator[EventBatch]:
                async for batch in batches:
                    await self.gate.wait()
                    yield batch

            yield gated()


async def test_the_first_response_waits_for_an_instance_that_is_behind() -> None:
    store = GatedStore()
    store.gate.set()
    settings = Settings(port=0, heartbeat_interval=0.05)
    async with HubServer(settings, store=store) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = UserServiceStub(channel)
        user = await stub.CreateUser(pb.CreateUserRequest(email="g@example.com"), timeout=5)
        with anyio.fail_after(5):
            while server.fanout.position().offsets != (await store.position()).offsets:
                await anyio.sleep(0.01)
        token = await token_of(stub)
        store.gate.clear()  # from now on this instance's fan-out hears of no write
        written, position = await renamed(stub, user.id, "after")
        call = UserSyncServiceStub(channel).Sync(timeout=10)
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(
            resume_token=token, min_position=position)))
        # Without min_position its first response would be a heartbeat without the write.
        await anyio.sleep(0.2)
        store.gate.set()
        first = await call.read()
        assert [(e.user.id, e.user.version) for e in first.events] == [
            (user.id, written.version)]
        call.cancel()


@pytest.fixture
async def hub() -> AsyncIterator[HubServer]:
    settings = Settings(port=0, heartbeat_interval=0.2, min_position_timeout=0.3)
    async with HubServer(settings, store=MemoryStore()) as server:
        yield server


@pytest.fixture
async def channel(hub: HubServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as ch:
        yield ch


async def ended(call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        with anyio.fail_after(10):
            while True:
                await call.read()
    return err.value




async def test_streamed_changes_return_a_position_that_user_updates_can_wait_for(
    channel: grpc.aio.Channel,
) -> None:
    sync = UserSyncServiceStub(channel).Sync(timeout=10)
    await sync.write(spb.SyncRequest(change=pb.UserChange(
        request_id="c", create=pb.CreateUserRequest(email="c@example.com"))))
    response = await sync.read()
    (result,) = response.results
    assert result.code == 0 and result.position
    sync.cancel()
    # The position is a token of this deployment, at the write: a UserUpdates stream's
    # snapshot held until it is routed shows the user.
    updates = UserServiceStub(channel).UserUpdates(timeout=10)
    await updates.write(pb.UserUpdateRequest(subscribe=common_pb2.Subscribe(
        user_ids=[result.user.id], snapshot=True, min_position=result.position)))
    first = await updates.read()
    assert (first.id, first.version) == (result.user.id, 1)
    updates.cancel()


async def test_a_position_not_reached_in_time_is_unavailable(
    channel: grpc.aio.Channel,
) -> None:
    stub = UserServiceStub(channel)
    user = await stub.CreateUser(pb.CreateUserRequest(email="u@example.com"), timeout=5)
    _, position = await renamed(stub, user.id, "x")
    at = resume.decode(position, 16)
    ahead = resume.encode(Position(at.epoch, tuple(o + 1000 for o in at.offsets)))
    call = UserSyncServiceStub(channel).Sync(timeout=10)
    await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(min_position=ahead)))
    err = await ended(call)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "min_position" in (err.details() or "")


async def test_a_position_of_another_epoch_is_out_of_range(channel: grpc.aio.Channel) -> None:
    other = resume.encode(Position("another-epoch", (1,) * 16))
    call = UserSyncServiceStub(channel).Sync(timeout=10)
    await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(min_position=other)))
    err = await ended(call)
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    assert reason(err) == "EPOCH_CHANGED"


@pytest.mark.parametrize("requests", [
    [common_pb2.Subscribe(min_position="not a token")],
    [common_pb2.Subscribe(), common_pb2.Subscribe(min_position=resume.encode(
        Position("", (0,) * 16)))],
], ids=["malformed", "not-first"])
async def test_a_bad_min_position_is_invalid(
    channel: grpc.aio.Channel, requests: list[common_pb2.Subscribe],
) -> None:
    call = UserSyncServiceStub(channel).Sync(timeout=10)
    for request in requests:
        await call.write(spb.SyncRequest(subscribe=request))
    err = await ended(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "subscribe.min_position" in (err.details() or "")
