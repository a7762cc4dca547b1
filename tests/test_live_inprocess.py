"""Live-stream semantics on both stores (in-process hub): the embedded memory store behaves
like Redis; bad stream requests get clear statuses."""

from __future__ import annotations

import asyncio
import itertools

import anyio
import grpc
import pytest

from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.api.user.v1.user_sync_service_pb2_grpc import UserSyncServiceStub
from hub.rpc.server import HubServer

pytestmark = pytest.mark.anyio


async def next_events(call: grpc.aio.StreamStreamCall, want: int) -> tuple[list[str], str]:
    """Emails of the next `want` events, and the last token seen."""
    emails: list[str] = []
    token = ""
    with anyio.fail_after(10):
        while len(emails) < want:
            response = await call.read()
            emails += [e.user.email for e in response.events]
            token = response.resume_token
    return emails, token


async def test_resume_gives_exactly_the_missed_events(hub: HubServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        users, sync = UserServiceStub(channel), UserSyncServiceStub(channel)
        call = sync.Sync(timeout=30)
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe()))
        await call.read()  # a heartbeat: the subscription is live, no write can slip past it
        await users.CreateUser(pb.CreateUserRequest(email="a@example.com"), timeout=5)
        got, token = await next_events(call, 1)
        assert got == ["a@example.com"]
        call.cancel()
        for email in ("b@example.com", "c@example.com"):
            await users.CreateUser(pb.CreateUserRequest(email=email), timeout=5)
        resumed = sync.Sync(timeout=30)
        await resumed.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(resume_token=token)))
        got, _ = await next_events(resumed, 2)
        # Order is per user (partition), not across users.
        assert sorted(got) == ["b@example.com", "c@example.com"]
        await users.CreateUser(pb.CreateUserRequest(email="d@example.com"), timeout=5)
        got, _ = await next_events(resumed, 1)
        assert got == ["d@example.com"]  # and live after the replay
        resumed.cancel()


async def test_unsubscribe_stops_events(hub: HubServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        users, sync = UserServiceStub(channel), UserSyncServiceStub(channel)
        a = await users.CreateUser(pb.CreateUserRequest(email="a@example.com"), timeout=5)
        b = await users.CreateUser(pb.CreateUserRequest(email="b@example.com"), timeout=5)
        call = sync.Sync(timeout=30)
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(user_ids=[a.id, b.id])))
        await call.write(spb.SyncRequest(unsubscribe=common_pb2.Unsubscribe(user_ids=[a.id])))
        await anyio.sleep(0.2)
        await call.read()  # a heartbeat after both requests were acted on
        for user in (a, b):
            await users.DeleteUser(pb.DeleteUserRequest(user_id=user.id), timeout=5)
        got, _ = await next_events(call, 1)
        assert got == ["b@example.com"]
        call.cancel()


@pytest.mark.parametrize(("request_", "field"), [
    (spb.SyncRequest(subscribe=common_pb2.Subscribe(user_ids=["nope"])),
     "subscribe.user_ids[0]"),
    (spb.SyncRequest(subscribe=common_pb2.Subscribe(resume_token="garbage!")),
     "subscribe.resume_token"),
    (spb.SyncRequest(), "request"),
])
async def test_bad_sync_requests_end_the_stream_invalid(
    hub: HubServer, request_: spb.SyncRequest, field: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        call = UserSyncServiceStub(channel).Sync(timeout=10)
        await call.write(request_)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (err.value.details() or "")


async def test_token_only_on_the_first_subscribe(hub: HubServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        users, sync = UserServiceStub(channel), UserSyncServiceStub(channel)
        call = users.ListUsers(pb.ListUsersRequest(), timeout=5)
        _ = [u async for u in call]
        token = dict(await call.trailing_metadata())["hub-resume-token"]
        stream = sync.Sync(timeout=10)
        await stream.write(spb.SyncRequest(subscribe=common_pb2.Subscribe()))
        await stream.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(resume_token=token)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while True:
                await stream.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_user_updates_applies_changes_and_ends_on_a_bad_one(hub: HubServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        call = UserServiceStub(channel).UserUpdates(timeout=10)
        await call.write(pb.UserUpdateRequest(subscribe=common_pb2.Subscribe()))
        await anyio.sleep(0.2)
        await call.write(pb.UserUpdateRequest(change=pb.UserChange(
            create=pb.CreateUserRequest(email="u@example.com"))))
        created = await call.read()
        assert (created.email, created.version) == ("u@example.com", 1)
        await call.write(pb.UserUpdateRequest(change=pb.UserChange(
            delete=pb.DeleteUserRequest(user_id=created.id))))
        gone = await call.read()
        assert gone.version == 2 and gone.HasField("deleted_at")
        await call.write(pb.UserUpdateRequest(change=pb.UserChange(
            create=pb.CreateUserRequest(email="not an email"))))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_idle_stream_gets_heartbeats_with_a_token(store: object) -> None:
    from hub.settings import Settings

    settings = Settings(port=0, heartbeat_interval=0.1)
    async with HubServer(settings, store=store) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # type: ignore[arg-type]
        call = UserSyncServiceStub(channel).Sync(timeout=10)
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe()))
        with anyio.fail_after(5):
            beats = [await call.read() for _ in range(3)]
        assert all(not b.events and b.resume_token for b in beats)
        call.cancel()



async def test_each_idle_stream_keeps_its_own_heartbeat_interval(hub: HubServer) -> None:
    # One timer serves every stream of the process: streams that subscribed at different
    # moments must each still get a beat per interval (0.2 s here), none starved or doubled.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        sync = UserSyncServiceStub(channel)
        calls = []
        for _ in range(3):
            call = sync.Sync(timeout=30)
            await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe()))
            calls.append(call)
            await anyio.sleep(0.07)
        beats: dict[int, list[float]] = {}

        async def collect(n: int, call: grpc.aio.StreamStreamCall) -> None:
            beats[n] = []
            for _ in range(4):
                response = await call.read()
                assert not response.events and response.resume_token
                beats[n].append(anyio.current_time())

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n, call in enumerate(calls):
                    tg.start_soon(collect, n, call)
        for times in beats.values():
            gaps = [b - a for a, b in itertools.pairwise(times)]
            # The mean: a beat the client read late (a busy machine) shortens the next gap
            # without any beat being doubled; a doubled timer halves the mean, a starved one
            # doubles it, and two beats at once show as a gap near zero.
            mean = (times[-1] - times[0]) / len(gaps)
            assert 0.15 < mean < 0.35 and min(gaps) > 0.03, gaps
        for call in calls:
            call.cancel()


async def test_ended_streams_leave_no_task_behind(hub: HubServer) -> None:
    # Counted once the fan-out listens: the cluster store's listener has a reader task per
    # master, which start() does not wait for.
    with anyio.fail_after(10):
        await hub.fanout.ready.wait()
    before = len(asyncio.all_tasks())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        sync = UserSyncServiceStub(channel)
        calls = [sync.Sync(timeout=30) for _ in range(20)]
        for call in calls:
            await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(snapshot=True)))
            while not (await call.read()).snapshot_complete:
                pass
        refused = sync.Sync(timeout=30)  # and one the server ends, with a status
        await refused.write(spb.SyncRequest())
        with pytest.raises(grpc.aio.AioRpcError):
            await refused.read()
        for call in calls:
            call.cancel()
    with anyio.fail_after(5):
        while len(asyncio.all_tasks()) > before:
            await anyio.sleep(0.05)
