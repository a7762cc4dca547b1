"""hub.client as a caller sees it: typed results and errors, retries, deadlines, channel lifetime.

AsyncUserClient runs against the in-process `hub` fixture (memory and Redis stores); the
blocking UserClient runs against a `python -m hub serve` subprocess so it cannot stall the
event loop that would serve it.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import anyio
import grpc
import pytest

from harness.hub import HubProcess
from harness.redis import free_port
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.client import (
    AlreadyExistsError,
    AsyncUserClient,
    ClientError,
    InvalidArgumentError,
    UnavailableError,
    UserClient,
    UserNotFoundError,
    VersionConflictError,
)
from hub.rpc.server import HubServer
from hub.settings import Settings

pytestmark = pytest.mark.anyio

UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
# Lets a refused connection be redialled quickly; gRPC's default first reconnect waits ~1 s.
# (Not grpc.min_reconnect_backoff_ms: gRPC also takes that as the connect timeout.)
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
)


def fields(err: ClientError) -> set[str]:
    return {field for field, _ in err.violations}


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections but never answers: every call there must time out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# -- AsyncUserClient, both stores ---------------------------------------------------------


async def test_async_round_trip(hub: HubServer) -> None:
    async with AsyncUserClient(f"127.0.0.1:{hub.port}") as users:
        ada = await users.create_user("ada@example.com", "Ada", password="analytical")
        assert (ada.email, ada.name, ada.version) == ("ada@example.com", "Ada", 1)
        assert ada.status == common_pb2.USER_STATUS_ACTIVE
        assert await users.get_user(ada.id) == ada

        renamed = await users.update_user(ada.id, name="Ada L.", expected_version=1)
        assert (renamed.name, renamed.email, renamed.version) == ("Ada L.", ada.email, 2)
        inactive = await users.update_user(ada.id, status=common_pb2.USER_STATUS_INACTIVE)
        assert (inactive.status, inactive.name, inactive.version) == (
            common_pb2.USER_STATUS_INACTIVE, "Ada L.", 3)
        assert await users.get_user(ada.id) == inactive

        bulk = await users.bulk_create(
            pb.CreateUserRequest(email=f"u{i}@example.com", name=f"U{i}") for i in range(3)
        )
        assert bulk.created_count == 3 and not bulk.errors
        listed = [u async for u in users.list_users(page_size=2)]
        assert [u.id for u in listed] == sorted([ada.id, *bulk.user_ids])
        assert {u.email for u in listed} == {"ada@example.com", *(f"u{i}@example.com"
                                                                  for i in range(3))}

        await users.delete_user(ada.id, expected_version=3)
        with pytest.raises(UserNotFoundError):
            await users.get_user(ada.id)
        assert [u.id async for u in users.list_users()] == sorted(bulk.user_ids)


async def test_async_list_resumes_after_page_token(hub: HubServer) -> None:
    async with AsyncUserClient(f"127.0.0.1:{hub.port}") as users:
        bulk = await users.bulk_create(
            [pb.CreateUserRequest(email=f"r{i}@example.com") for i in range(5)]
        )
        ids = sorted(bulk.user_ids)
        assert [u.id async for u in users.list_users(page_token=ids[1])] == ids[2:]


async def test_async_bulk_create_reports_refused_rows(hub: HubServer) -> None:
    async with AsyncUserClient(f"127.0.0.1:{hub.port}") as users:
        await users.create_user("taken@example.com")
        rows = [
            pb.CreateUserRequest(email="ok@example.com"),
            pb.CreateUserRequest(email="not-an-email"),
            pb.CreateUserRequest(email="TAKEN@example.com"),
        ]
        result = await users.bulk_create(rows)
        assert result.created_count == 1
        assert {(e.index, e.field) for e in result.errors} == {(1, "email"), (2, "email")}
        assert (await users.get_user(result.user_ids[0])).email == "ok@example.com"


async def test_async_import_users_batches_rows_and_reports_like_bulk(hub: HubServer) -> None:
    async def rows() -> AsyncIterator[pb.CreateUserRequest]:
        for i in range(7):
            yield pb.CreateUserRequest(email="bad" if i == 5 else f"imp{i}@example.com")

    async with AsyncUserClient(f"127.0.0.1:{hub.port}") as users:
        result = await users.import_users(rows(), batch_size=3)  # three messages: 3 + 3 + 1
        assert result.created_count == 6
        assert [(e.index, e.field) for e in result.errors] == [(5, "email")]

        def failing() -> Iterator[pb.CreateUserRequest]:
            yield pb.CreateUserRequest(email="first@example.com")
            raise KeyError("the source broke")

        with pytest.raises(KeyError, match="the source broke"):
            await users.import_users(failing(), batch_size=1)


async def test_async_typed_errors(hub: HubServer) -> None:
    async with AsyncUserClient(f"127.0.0.1:{hub.port}") as users:
        with pytest.raises(UserNotFoundError) as missing:
            await users.get_user(UNKNOWN_ID)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert UNKNOWN_ID in missing.value.details
        assert isinstance(missing.value.__cause__, grpc.RpcError)

        with pytest.raises(InvalidArgumentError) as bad:
            await users.create_user("not-an-email", password="short")
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert fields(bad.value) == {"email", "password"}

        with pytest.raises(InvalidArgumentError) as bad_id:
            await users.get_user("not-a-ulid")
        assert fields(bad_id.value) == {"user_id"}

        ada = await users.create_user("ada@example.com")
        with pytest.raises(AlreadyExistsError) as taken:
            await users.create_user("ADA@example.com")
        assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS

        with pytest.raises(VersionConflictError) as stale:
            await users.update_user(ada.id, name="X", expected_version=7)
        assert stale.value.code == grpc.StatusCode.ABORTED
        with pytest.raises(VersionConflictError):
            await users.delete_user(ada.id, expected_version=2)
        # Neither refused write was applied.
        assert await users.get_user(ada.id) == ada

        with pytest.raises(UserNotFoundError):
            await users.update_user(UNKNOWN_ID, name="X")
        with pytest.raises(UserNotFoundError):
            await users.delete_user(UNKNOWN_ID)


async def test_async_update_without_fields_is_refused_before_any_call() -> None:
    # Nothing listens on this address: reaching the network would be an UnavailableError.
    async with AsyncUserClient(f"127.0.0.1:{free_port()}") as users:
        with pytest.raises(ValueError, match="at least one of email, name or status"):
            await users.update_user(UNKNOWN_ID, expected_version=1)


# -- UserClient (blocking), against a hub subprocess --------------------------------------


def test_sync_round_trip(hub_process: Callable[..., HubProcess]) -> None:
    server = hub_process()
    with UserClient(server.target) as users:
        ada = users.create_user("ada@example.com", "Ada")
        assert (ada.email, ada.name, ada.version) == ("ada@example.com", "Ada", 1)
        assert users.get_user(ada.id) == ada

        renamed = users.update_user(ada.id, name="Ada L.", expected_version=1)
        assert (renamed.name, renamed.version) == ("Ada L.", 2)

        bulk = users.bulk_create(
            pb.CreateUserRequest(email=f"u{i}@example.com") for i in range(3)
        )
        assert bulk.created_count == 3 and not bulk.errors
        assert [u.id for u in users.list_users(page_size=2)] == sorted([ada.id, *bulk.user_ids])

        users.delete_user(ada.id)
        with pytest.raises(UserNotFoundError):
            users.get_user(ada.id)
        assert [u.id for u in users.list_users()] == sorted(bulk.user_ids)


def test_sync_import_users(hub_process: Callable[..., HubProcess]) -> None:
    server = hub_process()
    with UserClient(server.target) as users:
        rows = (pb.CreateUserRequest(email=f"s{i}@example.com") for i in range(1200))
        result = users.import_users(rows)
        assert result.created_count == 1200 and not result.errors
        assert len(list(users.list_users())) == 1200


def test_sync_typed_errors(hub_process: Callable[..., HubProcess]) -> None:
    server = hub_process()
    with UserClient(server.target) as users:
        with pytest.raises(UserNotFoundError) as missing:
            users.get_user(UNKNOWN_ID)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND

        with pytest.raises(InvalidArgumentError) as bad:
            users.create_user("bad", name="x\x00y")
        assert fields(bad.value) == {"email", "name"}

        ada = users.create_user("ada@example.com")
        with pytest.raises(AlreadyExistsError):
            users.create_user("ada@example.com")
        with pytest.raises(InvalidArgumentError) as bad_update:
            users.update_user(ada.id, email="nope")
        assert fields(bad_update.value) == {"user.email"}
        with pytest.raises(VersionConflictError):
            users.update_user(ada.id, name="X", expected_version=2)
        with pytest.raises(ValueError, match="at least one"):
            users.update_user(ada.id)
        assert users.get_user(ada.id) == ada


def test_sync_with_block_closes_the_channel(hub_process: Callable[..., HubProcess]) -> None:
    server = hub_process()
    with UserClient(server.target) as users:
        ada = users.create_user("ada@example.com")
    # What grpc raises for a call on a closed channel (before any network traffic).
    with pytest.raises(ValueError, match="Cannot invoke RPC on closed channel"):
        users.get_user(ada.id)
    with pytest.raises(ValueError, match="Channel closed"):
        list(users.list_users())


# -- retries ------------------------------------------------------------------------------


async def _get_while_hub_starts_late(options: tuple[tuple[str, int], ...] = ()) -> None:
    """get_user to a port where nothing listens yet; a hub binds that port 0.3 s later.

    Raises what get_user raised, outside the task group so it is not wrapped in a group.
    """
    port = free_port()
    outcome: ClientError | None = None
    hub_started, client_done = anyio.Event(), anyio.Event()

    async def start_hub_late() -> None:
        await anyio.sleep(0.3)
        # Left by returning, not by cancellation: HubServer's cleanup awaits, which a
        # cancelled anyio scope would cut short, leaking a live gRPC server into later tests.
        async with HubServer(Settings(port=port, shutdown_grace=0)):
            hub_started.set()
            await client_done.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(start_hub_late)
        try:
            async with AsyncUserClient(f"127.0.0.1:{port}", timeout=10,
                                       options=options) as users:
                await users.get_user(UNKNOWN_ID)
        except ClientError as err:
            outcome = err
        finally:
            client_done.set()
    assert hub_started.is_set()
    assert outcome is not None, "an unknown id cannot be found"
    raise outcome


async def test_read_waits_out_a_hub_that_starts_late() -> None:
    with pytest.raises(UserNotFoundError):
        await _get_while_hub_starts_late()


async def test_read_is_retried_once_the_channel_can_reconnect() -> None:
    # Same scenario, with the channel allowed to redial quickly: the retry policy then carries
    # the read over to the late hub, which answers NOT_FOUND rather than UNAVAILABLE.
    with pytest.raises(UserNotFoundError):
        await _get_while_hub_starts_late(FAST_RECONNECT)


async def test_write_to_a_dead_address_fails_fast_and_is_not_retried() -> None:
    async with AsyncUserClient(f"127.0.0.1:{free_port()}", timeout=10,
                               options=FAST_RECONNECT) as users:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as down:
            await users.create_user("ada@example.com")
        assert time.monotonic() - started < 5
    assert down.value.code == grpc.StatusCode.UNAVAILABLE


def test_sync_write_to_a_dead_address_raises_unavailable() -> None:
    with UserClient(f"127.0.0.1:{free_port()}", timeout=10) as users:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            users.create_user("ada@example.com")
        assert time.monotonic() - started < 5


# -- deadlines ----------------------------------------------------------------------------


async def test_default_deadlines() -> None:
    async with AsyncUserClient() as users:
        assert (users.timeout, users.stream_timeout) == (5.0, 300.0)
    with UserClient() as sync_users:
        assert (sync_users.timeout, sync_users.stream_timeout) == (5.0, 300.0)


async def test_every_async_call_carries_a_deadline() -> None:
    # The peer never answers, so only the deadline ends these calls.
    with silent_listener() as port:
        async with AsyncUserClient(f"127.0.0.1:{port}", timeout=0.3,
                                   stream_timeout=0.3) as users:
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "get_user": lambda: users.get_user(UNKNOWN_ID),
                "create_user": lambda: users.create_user("ada@example.com"),
                "update_user": lambda: users.update_user(UNKNOWN_ID, name="X"),
                "delete_user": lambda: users.delete_user(UNKNOWN_ID),
                "bulk_create": lambda: users.bulk_create([pb.CreateUserRequest()]),
            }
            for name, call in calls.items():
                with pytest.raises(ClientError) as late:
                    await call()
                assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, name
                assert type(late.value) is ClientError, name
            with pytest.raises(ClientError) as late_stream:
                [u async for u in users.list_users()]
            assert late_stream.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_per_call_timeout_overrides_the_default() -> None:
    with silent_listener() as port:
        async with AsyncUserClient(f"127.0.0.1:{port}", timeout=60) as users:
            started = time.monotonic()
            with pytest.raises(ClientError) as late:
                await users.get_user(UNKNOWN_ID, timeout=0.2)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 5


def test_sync_calls_carry_a_deadline() -> None:
    with silent_listener() as port, UserClient(f"127.0.0.1:{port}", timeout=0.3,
                                               stream_timeout=0.3) as users:
        with pytest.raises(ClientError) as late:
            users.get_user(UNKNOWN_ID)
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(ClientError) as late_stream:
            list(users.list_users())
        assert late_stream.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
