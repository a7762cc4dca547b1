"""Every configured limit ends the offending call with a clear status and changes nothing; and
the Prometheus endpoint reports what happened."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.api.user.v1.user_sync_service_pb2_grpc import UserSyncServiceStub
from hub.rpc.server import HubServer
from hub.settings import Settings
from hub.store.memory import MemoryStore
from tests.conftest import free_port

pytestmark = pytest.mark.anyio

# A receive window that does not grow: what a client does not read backs up on the server.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65_536)]
USER_IDS = ["01ARZ3NDEKTSV4RRFFQ69G5FA" + c for c in "ABCDEFGHJK"]


@asynccontextmanager
async def serving(**settings: Any) -> AsyncIterator[tuple[HubServer, grpc.aio.Channel]]:
    async with HubServer(Settings(port=0, **settings), store=MemoryStore(partitions=4)) as hub, \
            grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        yield hub, channel


async def all_emails(stub: UserServiceStub) -> list[str]:
    return sorted([u.email async for u in stub.ListUsers(pb.ListUsersRequest(), timeout=5)])


async def failing(coro: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


def details_of(err: grpc.aio.AioRpcError, kind: Any) -> list[Any]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    found = []
    for detail in status.details:
        message = kind()
        if detail.Unpack(message):
            found.append(message)
    return found


async def first_response(call: grpc.aio.StreamStreamCall) -> Any:
    with anyio.fail_after(5):
        return await call.read()


async def stream_error(call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError:
    """Reads a stream to its end, which must be an error status."""
    with anyio.fail_after(10):
        while True:
            try:
                response = await call.read()
            except grpc.aio.AioRpcError as err:
                return err
            assert response is not grpc.aio.EOF, "the stream ended OK"


# -- message size ---------------------------------------------------------------------------


async def test_oversized_request_is_resource_exhausted_and_creates_nothing() -> None:
    async with serving(max_message_bytes=4096) as (_, channel):
        stub = UserServiceStub(channel)
        err = await failing(stub.CreateUser(
            pb.CreateUserRequest(email="big@example.com", name="n" * 10_000), timeout=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (err.details() or "")
        # One oversized row of a bulk stream ends the stream the same way.
        rows = [pb.CreateUserRequest(email="ok@example.com"),
                pb.CreateUserRequest(email="big@example.com", name="n" * 10_000)]
        err = await failing(stub.BulkCreateUsers(iter(rows), timeout=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # A request under the limit still works on the same channel.
        await stub.CreateUser(pb.CreateUserRequest(email="small@example.com"), timeout=5)
        assert "big@example.com" not in await all_emails(stub)


# -- field and page limits ------------------------------------------------------------------


async def test_page_size_over_the_maximum_is_invalid_argument() -> None:
    async with serving(max_page_size=10) as (_, channel):
        stub = UserServiceStub(channel)
        for size in (11, 1_000_000, -1):
            call = stub.ListUsers(pb.ListUsersRequest(page_size=size), timeout=5)
            err = await failing(call.read())
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            (bad,) = details_of(err, error_details_pb2.BadRequest)
            assert [v.field for v in bad.field_violations] == ["page_size"]
            assert "10" in bad.field_violations[0].description
        for i in range(12):
            await stub.CreateUser(pb.CreateUserRequest(email=f"p{i}@example.com"), timeout=5)
        # At the limit is fine, and the stream still carries every user.
        users = [u async for u in stub.ListUsers(pb.ListUsersRequest(page_size=10), timeout=5)]
        assert len(users) == 12


@pytest.mark.parametrize(("request_", "field"), [
    (pb.CreateUserRequest(email="a" * 60 + "@" + "b" * 190 + ".com"), "email"),  # 255 chars
    (pb.CreateUserRequest(email="long@example.com", name="n" * 201), "name"),
    (pb.CreateUserRequest(email="pw@example.com", password="p" * 1025), "password"),
])
async def test_over_long_create_fields_are_invalid_argument(
    request_: pb.CreateUserRequest, field: str
) -> None:
    async with serving() as (_, channel):
        stub = UserServiceStub(channel)
        err = await failing(stub.CreateUser(request_, timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        (bad,) = details_of(err, error_details_pb2.BadRequest)
        assert [v.field for v in bad.field_violations] == [field]
        assert await all_emails(stub) == []


async def test_field_lengths_at_the_limit_are_accepted_and_over_it_refused_on_update() -> None:
    async with serving() as (_, channel):
        stub = UserServiceStub(channel)
        email = "a" * 64 + "@" + ".".join(c * 61 for c in "bcd") + ".com"
        assert len(email) == 254
        user = await stub.CreateUser(pb.CreateUserRequest(email=email, name="n" * 200),
                                     timeout=5)
        too_long = pb.UpdateUserRequest(
            user=common_pb2.User(id=user.id, email="c" + email, name="m" * 201),
            update_mask={"paths": ["email", "name"]})
        err = await failing(stub.UpdateUser(too_long, timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        (bad,) = details_of(err, error_details_pb2.BadRequest)
        assert sorted(v.field for v in bad.field_violations) == ["user.email", "user.name"]
        after = await stub.GetUser(pb.GetUserRequest(user_id=user.id), timeout=5)
        assert (after.email, after.name, after.version) == (email, "n" * 200, user.version)


# -- subscription limits --------------------------------------------------------------------


@pytest.mark.parametrize("batched", [True, False], ids=["Sync", "UserUpdates"])
async def test_too_many_ids_in_one_subscribe_is_invalid_argument(batched: bool) -> None:
    async with serving(max_subscription_users=3) as (_, channel):
        if batched:
            call = UserSyncServiceStub(channel).Sync(timeout=10)
            make = spb.SyncRequest
        else:
            call = UserServiceStub(channel).UserUpdates(timeout=10)
            make = pb.UserUpdateRequest
        await call.write(make(subscribe=common_pb2.Subscribe(user_ids=USER_IDS[:4])))
        err = await stream_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        (bad,) = details_of(err, error_details_pb2.BadRequest)
        assert [v.field for v in bad.field_violations] == ["subscribe.user_ids"]
        # Exactly the limit is fine.
        ok = UserSyncServiceStub(channel).Sync(timeout=10)
        await ok.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(user_ids=USER_IDS[:3],
                                                                      snapshot=True)))
        while not (await first_response(ok)).snapshot_complete:
            pass
        ok.cancel()


@pytest.mark.parametrize("batched", [True, False], ids=["Sync", "UserUpdates"])
async def test_too_many_subscribes_on_one_stream_is_resource_exhausted(batched: bool) -> None:
    async with serving(max_subscribes_per_stream=2) as (_, channel):
        users = UserServiceStub(channel)
        if batched:
            call = UserSyncServiceStub(channel).Sync(timeout=10)
            make = spb.SyncRequest
        else:
            call = users.UserUpdates(timeout=10)
            make = pb.UserUpdateRequest
        for user_id in USER_IDS[:2]:
            await call.write(make(subscribe=common_pb2.Subscribe(user_ids=[user_id])))
        # The third Subscribe is refused; a change sent after it is never applied.
        await call.write(make(subscribe=common_pb2.Subscribe(user_ids=[USER_IDS[2]])))
        await call.write(make(change=pb.UserChange(
            create=pb.CreateUserRequest(email="after@example.com"))))
        err = await stream_error(call)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        (quota,) = details_of(err, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject == "subscribe"
        assert await all_emails(users) == []


@pytest.mark.parametrize("batched", [True, False], ids=["Sync", "UserUpdates"])
async def test_a_stream_past_max_stream_users_is_resource_exhausted(batched: bool) -> None:
    """The stream's distinct followed ids count, Subscribes added up: an id named twice counts
    once, an unsubscribed one no longer counts."""
    async with serving(max_stream_users=3) as (_, channel):
        users = UserServiceStub(channel)
        ids = [(await users.CreateUser(pb.CreateUserRequest(email=f"t{i}@example.com"),
                                       timeout=5)).id for i in range(4)]
        if batched:
            call = UserSyncServiceStub(channel).Sync(timeout=10)
            make = spb.SyncRequest
        else:
            call = users.UserUpdates(timeout=10)
            make = pb.UserUpdateRequest
        for request in (common_pb2.Subscribe(user_ids=ids[:2]),
                        common_pb2.Subscribe(user_ids=[ids[1], ids[2], ids[2]])):  # 3 in all
            await call.write(make(subscribe=request))
        await call.write(make(unsubscribe=common_pb2.Unsubscribe(user_ids=[ids[0]])))
        await call.write(make(subscribe=common_pb2.Subscribe(user_ids=[ids[0]])))  # 3 again
        await anyio.sleep(0.3)
        await users.UpdateUser(pb.UpdateUserRequest(
            user=common_pb2.User(id=ids[0], name="still followed"),
            update_mask={"paths": ["name"]}), timeout=5)
        with anyio.fail_after(5):
            while True:
                response = await call.read()
                names = ([e.user.name for e in response.events] if batched
                         else [response.name])
                if names:
                    break
        assert names == ["still followed"]
        await call.write(make(subscribe=common_pb2.Subscribe(user_ids=[ids[3]])))
        err = await stream_error(call)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        (quota,) = details_of(err, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject == "subscribe.user_ids"
        assert "at most 3 users" in (err.details() or "")
        assert "would make it 4" in (err.details() or "")


async def test_a_first_subscribe_past_max_stream_users_is_refused() -> None:
    async with serving(max_stream_users=3) as (_, channel):
        call = UserSyncServiceStub(channel).Sync(timeout=10)
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(user_ids=USER_IDS[:4])))
        err = await stream_error(call)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "would make it 4" in (err.details() or "")


# -- bulk rows ------------------------------------------------------------------------------


async def test_bulk_stream_over_bulk_max_rows_stops_at_the_limit() -> None:
    async with serving(bulk_max_rows=5, bulk_batch_size=2) as (_, channel):
        stub = UserServiceStub(channel)
        rows = [pb.CreateUserRequest(email=f"b{i}@example.com") for i in range(9)]
        response = await stub.BulkCreateUsers(iter(rows), timeout=10)
        assert response.created_count == 5 == len(response.user_ids)
        (stop,) = response.errors
        assert (stop.index, stop.code) == (5, code_pb2.RESOURCE_EXHAUSTED)
        assert "5 rows" in stop.message
        assert await all_emails(stub) == sorted(f"b{i}@example.com" for i in range(5))


# -- write rate -----------------------------------------------------------------------------


async def test_write_rate_limit_is_resource_exhausted_with_retry_info() -> None:
    async with serving(write_rate=5, write_burst=5) as (_, channel):
        stub = UserServiceStub(channel)
        first = [await stub.CreateUser(pb.CreateUserRequest(email=f"r{i}@example.com"),
                                       timeout=5) for i in range(5)]
        err = await failing(stub.CreateUser(pb.CreateUserRequest(email="r5@example.com"),
                                            timeout=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        (retry,) = details_of(err, error_details_pb2.RetryInfo)
        delay = retry.retry_delay.ToTimedelta().total_seconds()
        assert 0 < delay <= 0.2 + 1e-6  # one token at 5/s
        # Updates and deletes count as writes too, and a refused one changes nothing.
        err = await failing(stub.DeleteUser(pb.DeleteUserRequest(user_id=first[0].id),
                                            timeout=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Reads are not limited.
        await stub.GetUser(pb.GetUserRequest(user_id=first[0].id), timeout=5)
        assert "r5@example.com" not in await all_emails(stub)

        await anyio.sleep(delay + 0.05)
        await stub.CreateUser(pb.CreateUserRequest(email="r5@example.com"), timeout=5)
        assert len(await all_emails(stub)) == 6


async def test_bulk_is_slowed_to_the_write_rate_not_refused() -> None:
    async with serving(write_rate=40, write_burst=5, bulk_batch_size=4) as (_, channel):
        stub = UserServiceStub(channel)
        started = time.monotonic()
        rows = (pb.CreateUserRequest(email=f"s{i}@example.com") for i in range(15))
        response = await stub.BulkCreateUsers(rows, timeout=10)
        assert response.created_count == 15 and not response.errors
        assert time.monotonic() - started >= (15 - 5) / 40 * 0.8


# -- concurrent streams per connection ------------------------------------------------------


async def test_a_stream_over_max_concurrent_streams_waits_for_a_free_slot() -> None:
    async with serving(max_concurrent_streams=2) as (_, channel):
        sync = UserSyncServiceStub(channel)
        users = UserServiceStub(channel)
        await users.CreateUser(pb.CreateUserRequest(email="c@example.com"), timeout=5)
        open_ = []
        for _ in range(2):
            call = sync.Sync(timeout=30)
            await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(snapshot=True)))
            while not (await first_response(call)).snapshot_complete:
                pass
            open_.append(call)

        listed: list[str] = []

        async def third() -> None:
            async for user in users.ListUsers(pb.ListUsersRequest(), timeout=20):
                listed.append(user.email)

        async with anyio.create_task_group() as tg:
            tg.start_soon(third)
            await anyio.sleep(0.7)
            assert listed == [], "the third stream ran although two were open"
            open_[0].cancel()
            with anyio.fail_after(5):
                while not listed:
                    await anyio.sleep(0.02)
        assert listed == ["c@example.com"]
        # The second stream was never disturbed.
        await users.CreateUser(pb.CreateUserRequest(email="d@example.com"), timeout=5)
        with anyio.fail_after(5):
            while True:
                response = await open_[1].read()
                if [e.user.email for e in response.events] == ["d@example.com"]:
                    break
        open_[1].cancel()


# -- responses and the message limit --------------------------------------------------------


async def test_a_caught_up_subscriber_never_gets_a_response_over_the_message_limit() -> None:
    async with serving(max_message_bytes=65_536, bulk_batch_size=100) as (hub, channel), \
            grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}", options=SMALL_WINDOW) as slow:
        call = UserSyncServiceStub(slow).Sync(timeout=30)
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(snapshot=True)))
        assert (await first_response(call)).snapshot_complete
        stub = UserServiceStub(channel)
        total = 1500
        for start in range(0, total, 100):
            rows = [pb.CreateUserRequest(email=f"w{i}@example.com", name="x" * 200)
                    for i in range(start, start + 100)]
            assert (await stub.BulkCreateUsers(iter(rows), timeout=10)).created_count == 100
        await anyio.sleep(0.3)
        seen = 0
        try:
            with anyio.fail_after(10):
                while seen < total:
                    seen += len((await call.read()).events)
        except grpc.aio.AioRpcError as err:
            # Being cut as a slow consumer is fine, but then with a token to resume from.
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "hub-resume-token" in dict(err.trailing_metadata() or ()), err.details()
        call.cancel()


async def test_a_snapshot_never_exceeds_the_message_limit() -> None:
    async with serving(max_message_bytes=16_384, bulk_batch_size=100) as (_, channel):
        rows = [pb.CreateUserRequest(email=f"s{i}@example.com", name="x" * 200)
                for i in range(100)]
        stub = UserServiceStub(channel)
        assert (await stub.BulkCreateUsers(iter(rows), timeout=10)).created_count == 100
        call = UserSyncServiceStub(channel).Sync(timeout=10)
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(snapshot=True)))
        seen = 0
        with anyio.fail_after(10):
            while True:
                response = await call.read()
                seen += len(response.events)
                if response.snapshot_complete:
                    break
        assert seen == 100
        call.cancel()


# -- metrics --------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def metrics_of(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return await anyio.to_thread.run_sync(scrape, port)


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


CREATE = "/user.v1.UserService/CreateUser"
GET = "/user.v1.UserService/GetUser"


async def test_metrics_endpoint_reports_rpcs_streams_events_and_catch_ups() -> None:
    port = free_port()
    async with serving(metrics_port=port, subscriber_max_events=50, bulk_batch_size=10) \
            as (hub, channel), \
            grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}", options=SMALL_WINDOW) as slow:
        assert hub.metrics_port == port
        before = await metrics_of(port)
        stub = UserServiceStub(channel)
        await stub.CreateUser(pb.CreateUserRequest(email="m@example.com"), timeout=5)
        await failing(stub.GetUser(pb.GetUserRequest(user_id=USER_IDS[0]), timeout=5))
        await failing(stub.GetUser(pb.GetUserRequest(user_id="bad"), timeout=5))

        stalled = UserSyncServiceStub(slow).Sync(timeout=60)
        await stalled.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(snapshot=True)))
        while not (await first_response(stalled)).snapshot_complete:
            pass
        during = await metrics_of(port)
        assert value(during, "hub_rpcs_total", method=CREATE, code="OK") == \
            value(before, "hub_rpcs_total", method=CREATE, code="OK") + 1
        assert value(during, "hub_rpcs_total", method=GET, code="NOT_FOUND") == \
            value(before, "hub_rpcs_total", method=GET, code="NOT_FOUND") + 1
        assert value(during, "hub_rpcs_total", method=GET, code="INVALID_ARGUMENT") == \
            value(before, "hub_rpcs_total", method=GET, code="INVALID_ARGUMENT") + 1
        assert value(during, "hub_rpc_seconds_count", method=GET) == \
            value(before, "hub_rpc_seconds_count", method=GET) + 2
        assert value(during, "hub_rpc_seconds_sum", method=CREATE) > 0
        assert ("hub_rpc_seconds_bucket", (("le", "+Inf"), ("method", CREATE))) in during
        assert value(during, "hub_events_routed_total") > value(before, "hub_events_routed_total")
        assert value(during, "hub_active_streams", method="sync") == \
            value(before, "hub_active_streams", method="sync") + 1
        assert ("hub_subscriber_queued_events", ()) in during

        # A stalled subscriber: fat rows fill its receive window, then its buffer (50 events):
        # it is not cut, but catches up from the history once it reads again.
        for start in range(0, 1000, 250):
            rows = (pb.CreateUserRequest(email=f"f{i}@example.com", name="x" * 200)
                    for i in range(start, start + 250))
            assert (await stub.BulkCreateUsers(rows, timeout=20)).created_count == 250
        lagging = await metrics_of(port)
        assert value(lagging, "hub_catchup_subscribers") == 1
        seen: set[str] = set()
        with anyio.fail_after(20):
            while len(seen) < 1000:  # the 1000 fat rows (the first create came in the snapshot)
                response = await stalled.read()
                assert response is not grpc.aio.EOF
                seen.update(e.user.id for e in response.events
                            if e.type != common_pb2.EVENT_TYPE_SNAPSHOT)
        with anyio.fail_after(5):
            while True:
                after = await metrics_of(port)
                if value(after, "hub_catchups_completed_total") == \
                        value(before, "hub_catchups_completed_total") + 1:
                    break
                await anyio.sleep(0.05)
        assert value(after, "hub_catchup_subscribers") == 0
        assert ("hub_catchup_lag_events_count", ()) in after
        assert value(after, "hub_slow_consumer_disconnects_total") == \
            value(before, "hub_slow_consumer_disconnects_total")
        stalled.cancel()
        with anyio.fail_after(5):
            while True:
                after = await metrics_of(port)
                if value(after, "hub_active_streams", method="sync") == \
                        value(before, "hub_active_streams", method="sync"):
                    break
                await anyio.sleep(0.05)
        assert value(after, "hub_rpcs_total", method="/user.v1.UserSyncService/Sync",
                     code="RESOURCE_EXHAUSTED") == \
            value(before, "hub_rpcs_total", method="/user.v1.UserSyncService/Sync",
                  code="RESOURCE_EXHAUSTED")


async def test_stopping_the_hub_releases_the_metrics_port() -> None:
    port = free_port()
    async with serving(metrics_port=port):
        await metrics_of(port)
    with pytest.raises(urllib.error.URLError):
        await metrics_of(port)
