"""Idempotency keys as a client sees them: a keyed write is retried by the client when its
outcome is unknown, and the hub answers a retry with the first outcome, so a create whose
response was lost yields one user and one event; a key reused for another request is refused;
keys are forgotten after the window; every write says where it is (`Written.position`).

The retry policy is judged against a scripted gRPC server (it fails, hangs or answers as each
test says, and records what it got); the outcomes against `hub serve` on a real Redis that the
tests pause (SIGSTOP) while a write is on its way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import grpc
import grpc.aio
import pytest
from google.protobuf import empty_pb2

from harness.hub import HubProcess
from harness.redis import RedisProcess, dying_with_parent
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_service_pb2_grpc as pb_grpc
from hub.client import (
    IDEMPOTENCY_KEY,
    POSITION_KEY,
    AlreadyExistsError,
    AsyncUserClient,
    ClientError,
    InvalidArgumentError,
    SyncBatch,
    SyncFeed,
    UnavailableError,
    UserClient,
)

pytestmark = pytest.mark.anyio

FAST = {"HUB_HEARTBEAT_INTERVAL": "0.2"}


# -- a scripted server: what the client sends, and how often ----------------------------------


@dataclass
class Script:
    """How the scripted server answers: the first `fail` calls of each method with `code`
    (after `hang` seconds, or at once; a hang longer than the call's deadline is a lost
    response), then success with trailing `hub-position` "P<n>"."""

    fail: int = 0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    hang: float = 0.0
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, idempotency key)
    messages: list[pb.ImportUsersRequest] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


class Scripted(pb_grpc.UserServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def _answer(self, method: str, context: grpc.aio.ServicerContext) -> None:
        key = dict(context.invocation_metadata() or ()).get(IDEMPOTENCY_KEY, "")
        script = self.script
        script.calls.append((method, str(key)))
        script.times.append(time.monotonic())
        if sum(1 for m, _ in script.calls if m == method) <= script.fail:
            if script.hang:
                await anyio.sleep(script.hang)
            await context.abort(script.code, "scripted failure")
        context.set_trailing_metadata(((POSITION_KEY, f"P{len(script.calls)}"),))

    async def CreateUser(self, request: pb.CreateUserRequest,  # type: ignore[override]
                         context: grpc.aio.ServicerContext) -> common_pb2.User:
        await self._answer("CreateUser", context)
        return common_pb2.User(id="01ARZ3NDEKTSV4RRFFQ69G5FAV", email=request.email, version=1)

    async def UpdateUser(self, request: pb.UpdateUserRequest,  # type: ignore[override]
                         context: grpc.aio.ServicerContext) -> common_pb2.User:
        await self._answer("UpdateUser", context)
        return common_pb2.User(id=request.user.id, name=request.user.name, version=2)

    async def DeleteUser(self, request: pb.DeleteUserRequest,  # type: ignore[override]
                         context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._answer("DeleteUser", context)
        return empty_pb2.Empty()

    async def ImportUsers(self, request_iterator: AsyncIterator[pb.ImportUsersRequest],  # type: ignore[override]
                          context: grpc.aio.ServicerContext) -> pb.BulkCreateResponse:
        rows = 0
        async for message in request_iterator:
            self.script.messages.append(message)
            rows += len(message.users)
        await self._answer("ImportUsers", context)
        return pb.BulkCreateResponse(created_count=rows)


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_UserServiceServicer_to_server(Scripted(script), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_a_keyed_write_is_retried_on_unavailable_with_its_key() -> None:
    script = Script(fail=2)
    async with scripted(script) as target, AsyncUserClient(target) as users:
        written = await users.create_user_with_position("ada@example.com", idempotency_key="k1")
    assert written.result.email == "ada@example.com"
    assert script.calls == [("CreateUser", "k1")] * 3  # every attempt carries the key
    assert written.position == "P3"  # the answer's position, not an earlier attempt's


async def test_a_write_without_a_key_is_never_retried() -> None:
    script = Script(fail=1)
    async with scripted(script) as target, AsyncUserClient(target) as users:
        with pytest.raises(UnavailableError):
            await users.create_user("ada@example.com")
        with pytest.raises(UnavailableError):
            await users.update_user("01ARZ3NDEKTSV4RRFFQ69G5FAV", name="A", idempotency_key="")
    assert script.calls == [("CreateUser", ""), ("UpdateUser", "")]


async def test_keyed_retries_are_bounded_and_backed_off() -> None:
    script = Script(fail=100)
    async with scripted(script) as target, AsyncUserClient(target, timeout=30) as users:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await users.delete_user("01ARZ3NDEKTSV4RRFFQ69G5FAV", idempotency_key="k")
        elapsed = time.monotonic() - started
    assert len(script.calls) == 5  # DEFAULT_WRITE_ATTEMPTS
    gaps = [b - a for a, b in zip(script.times, script.times[1:], strict=False)]
    # 0.1, 0.2, 0.4, 0.8 s steps, each jittered to 50-100%.
    for gap, step in zip(gaps, (0.1, 0.2, 0.4, 0.8), strict=True):
        assert step * 0.5 - 0.02 <= gap <= step + 0.5, gaps
    assert elapsed < 5


async def test_write_attempts_is_a_client_option() -> None:
    script = Script(fail=100)
    async with scripted(script) as target:
        async with AsyncUserClient(target, write_attempts=2) as users:
            with pytest.raises(UnavailableError):
                await users.create_user("ada@example.com", idempotency_key="k")
        async with AsyncUserClient(target, write_attempts=1) as users:
            with pytest.raises(UnavailableError):
                await users.create_user("ada@example.com", idempotency_key="k")
    assert len(script.calls) == 3
    with pytest.raises(ValueError, match="write_attempts"):
        AsyncUserClient(write_attempts=0)


async def test_a_lost_response_is_retried_within_the_deadline() -> None:
    # The first attempt hangs past its own deadline (its response is lost); it gets half the
    # call's 2 s, so the retry, with the rest, still answers within the call's deadline.
    script = Script(fail=1, hang=30)
    async with scripted(script) as target, AsyncUserClient(target) as users:
        started = time.monotonic()
        written = await users.create_user_with_position("ada@example.com", timeout=2,
                                                        idempotency_key="k")
        elapsed = time.monotonic() - started
    assert written.result.version == 1 and written.position == "P2"
    assert [key for _, key in script.calls] == ["k", "k"]
    first_gap = script.times[1] - script.times[0]
    assert 0.95 <= first_gap <= 1.5, first_gap
    assert elapsed < 2


async def test_an_unkeyed_write_whose_response_is_lost_fails_deadline_exceeded() -> None:
    script = Script(fail=1, hang=30)
    async with scripted(script) as target, AsyncUserClient(target) as users:
        with pytest.raises(ClientError) as late:
            await users.create_user("ada@example.com", timeout=0.5)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(script.calls) == 1


async def test_a_refusal_is_not_retried() -> None:
    script = Script(fail=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    async with scripted(script) as target, AsyncUserClient(target) as users:
        with pytest.raises(InvalidArgumentError):
            await users.create_user("ada@example.com", idempotency_key="k")
    assert len(script.calls) == 1


async def test_the_blocking_client_retries_and_returns_positions_too() -> None:
    script = Script(fail=1)
    async with scripted(script) as target:

        def run() -> tuple[str, str, str]:
            with UserClient(target) as users:
                created = users.create_user_with_position("ada@example.com", idempotency_key="a")
                updated = users.update_user_with_position("01ARZ3NDEKTSV4RRFFQ69G5FAV",
                                                          name="Ada", idempotency_key="u")
                deleted = users.delete_user_with_position("01ARZ3NDEKTSV4RRFFQ69G5FAV",
                                                          idempotency_key="d")
                assert deleted.result is None
                return created.position, updated.position, deleted.position

        positions = await anyio.to_thread.run_sync(run)
    assert positions == ("P2", "P4", "P6")
    assert script.calls == [("CreateUser", "a"), ("CreateUser", "a"), ("UpdateUser", "u"),
                            ("UpdateUser", "u"), ("DeleteUser", "d"), ("DeleteUser", "d")]


async def test_import_sends_per_row_keys_beside_its_rows() -> None:
    script = Script()
    rows: list[pb.CreateUserRequest | tuple[pb.CreateUserRequest, str]] = [
        (pb.CreateUserRequest(email="a@example.com"), "row-a"),
        pb.CreateUserRequest(email="b@example.com"),  # no key of its own
        (pb.CreateUserRequest(email="c@example.com"), "row-c"),
        pb.CreateUserRequest(email="d@example.com"),
    ]
    async with scripted(script) as target, AsyncUserClient(target) as users:
        written = await users.import_users_with_position(rows, batch_size=2,
                                                         idempotency_key="stream")
        assert written.result.created_count == 4 and written.position == "P1"
        await users.import_users([pb.CreateUserRequest(email="e@example.com")])
    assert [list(m.idempotency_keys) for m in script.messages] == [
        ["row-a", ""], ["row-c", ""], []]  # parallel to the rows; none sent when none given
    assert script.calls == [("ImportUsers", "stream"), ("ImportUsers", "")]


async def test_a_keyed_import_of_a_list_is_sent_again_but_an_iterator_is_not() -> None:
    script = Script(fail=1)
    rows = [pb.CreateUserRequest(email=f"u{i}@example.com") for i in range(3)]
    async with scripted(script) as target, AsyncUserClient(target) as users:
        response = await users.import_users(rows, idempotency_key="s")
        assert response.created_count == 3
        assert [len(m.users) for m in script.messages] == [3, 3]  # the whole list, again

        script.calls.clear()
        script.messages.clear()
        script.fail = 2  # its next call fails
        with pytest.raises(UnavailableError):
            await users.import_users(iter(rows), idempotency_key="s")
        assert len(script.calls) == 1


# -- against a real hub on a real Redis ------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis of this test's own: it gets paused."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.asynccontextmanager
async def counting_events(target: str) -> AsyncIterator[list[common_pb2.UserEvent]]:
    """A SyncFeed of every user, live before the block runs, collecting its events."""
    events: list[common_pb2.UserEvent] = []
    live = anyio.Event()
    feed = SyncFeed(target, backoff=(0.05, 0.5))

    async def follow() -> None:
        async for item in feed:
            live.set()  # the first heartbeat: subscribed
            assert isinstance(item, SyncBatch)
            events.extend(item.events)

    async with feed, anyio.create_task_group() as tg:
        tg.start_soon(follow)
        with anyio.fail_after(20):
            await live.wait()
        yield events
        tg.cancel_scope.cancel()


async def settled(events: list[common_pb2.UserEvent], users: AsyncUserClient) -> None:
    """Until every event written so far has arrived: a marker write's event is last."""
    marker = await users.create_user(f"marker-{uuid.uuid4().hex[:8]}@example.com")
    with anyio.fail_after(20):
        while not any(e.user.id == marker.id for e in events):
            await anyio.sleep(0.05)


async def warm_up(users: AsyncUserClient) -> None:
    """One write first: the hub's first write loads its script into Redis (EVALSHA, NOSCRIPT,
    then the script), so a first write cut off while Redis is stopped would never land. After
    this one, a write sent to a stopped Redis runs once Redis runs again."""
    await users.create_user("warm-up@example.com")


async def with_email(users: AsyncUserClient, email: str) -> list[common_pb2.User]:
    return [u async for u in users.list_users() if u.email == email]


def created(events: list[common_pb2.UserEvent], email: str) -> list[common_pb2.UserEvent]:
    return [e for e in events
            if e.type == common_pb2.EVENT_TYPE_CREATED and e.user.email == email]


async def test_a_create_retried_by_the_client_while_redis_is_paused_lands_once(
    own_redis: RedisProcess, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(own_redis.url, **FAST)
    async with AsyncUserClient(hub.target) as users, counting_events(hub.target) as events:
        await warm_up(users)
        own_redis.pause()
        try:
            async with anyio.create_task_group() as tg:
                result: list[common_pb2.User] = []

                async def create() -> None:
                    # 6 s: the first attempt's 3 s pass while Redis is stopped (its create is
                    # sent to Redis and waits there; its response is lost), the retry waits
                    # with it and gets its answer once Redis runs again.
                    result.append(await users.create_user(
                        "ada@example.com", idempotency_key="create-ada", timeout=6))

                tg.start_soon(create)
                await anyio.sleep(4)
                own_redis.resume()
        finally:
            own_redis.resume()
        ada = result[0]
        listed = [u async for u in users.list_users() if u.email == "ada@example.com"]
        assert [u.id for u in listed] == [ada.id]
        await settled(events, users)
        assert [e.user.id for e in created(events, "ada@example.com")] == [ada.id]
    # It took two attempts: the first one's deadline passed while Redis was stopped.
    outcomes = re.findall(r"/user\.v1\.UserService/CreateUser (\w+)", hub.output())
    assert len(outcomes) == 4, outcomes  # the warm-up, two attempts, the marker
    assert outcomes[1] in ("CANCELLED", "DEADLINE_EXCEEDED") and outcomes[2] == "OK", outcomes


async def test_a_create_whose_response_was_lost_is_answered_with_it_again(
    own_redis: RedisProcess, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(own_redis.url, **FAST)
    async with AsyncUserClient(hub.target) as users, counting_events(hub.target) as events:
        await warm_up(users)
        own_redis.pause()
        try:
            # No retry within this call: its deadline passes while Redis is stopped.
            with pytest.raises(ClientError) as late:
                await users.create_user("bob@example.com", "Bob", idempotency_key="k-bob",
                                        timeout=1)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            own_redis.resume()
        # The create did land, after its caller had given up on it.
        with anyio.fail_after(10):
            while not (listed := await with_email(users, "bob@example.com")):
                await anyio.sleep(0.05)

        again = await users.create_user_with_position("bob@example.com", "Bob",
                                                      idempotency_key="k-bob")
        assert (again.result.id, again.result.version) == (listed[0].id, 1)
        assert again.position
        assert [u.id for u in await with_email(users, "bob@example.com")] == [listed[0].id]
        await settled(events, users)
        assert len(created(events, "bob@example.com")) == 1


async def test_a_key_reused_for_another_request_is_refused(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(redis_url)
    async with AsyncUserClient(hub.target) as users:
        cy = await users.create_user("cy@example.com", "Cy", idempotency_key="k-cy")
        assert (await users.create_user("cy@example.com", "Cy", idempotency_key="k-cy")) == cy
        with pytest.raises(InvalidArgumentError) as reused:
            await users.create_user("cy@example.com", "Cyril", idempotency_key="k-cy")
        assert "idempotency-key" in {f for f, _ in reused.value.violations}

        # Updates and deletes too: a repeat is not applied again, another body is refused.
        first = await users.update_user(cy.id, name="C.", idempotency_key="rename")
        again = await users.update_user(cy.id, name="C.", idempotency_key="rename")
        assert first == again and first.version == 2
        with pytest.raises(InvalidArgumentError):
            await users.update_user(cy.id, name="Other", idempotency_key="rename")
        await users.delete_user(cy.id, idempotency_key="drop")
        await users.delete_user(cy.id, idempotency_key="drop")  # the first outcome: done
        assert [u async for u in users.list_users()] == []


async def test_keys_are_forgotten_after_the_window(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(redis_url, args=["--idempotency-window", "1"])
    async with AsyncUserClient(hub.target) as users:
        dee = await users.create_user("dee@example.com", idempotency_key="k-dee")
        assert await users.create_user("dee@example.com", idempotency_key="k-dee") == dee
        await anyio.sleep(1.5)
        # Forgotten: the same request is a new create (refused: the email is taken), and the
        # key is free for another request.
        with pytest.raises(AlreadyExistsError):
            await users.create_user("dee@example.com", idempotency_key="k-dee")
        eve = await users.create_user("eve@example.com", idempotency_key="k-dee")
        assert eve.id != dee.id


async def test_every_write_returns_its_position(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(redis_url)
    async with AsyncUserClient(hub.target) as users:
        created = await users.create_user_with_position("fay@example.com")
        updated = await users.update_user_with_position(created.result.id, name="Fay")
        bulk = await users.import_users_with_position(
            [pb.CreateUserRequest(email="gus@example.com")], idempotency_key="gus")
        deleted = await users.delete_user_with_position(created.result.id)
        positions = [created.position, updated.position, bulk.position, deleted.position]
        assert all(positions) and len(set(positions)) == 4, positions
        # A repeat of a keyed write has its first outcome's position.
        again = await users.import_users_with_position(
            [pb.CreateUserRequest(email="gus@example.com")], idempotency_key="gus")
        assert again.position == bulk.position and again.result.user_ids == bulk.result.user_ids


async def test_a_feed_given_a_write_position_shows_the_write(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    a, b = hub_process(redis_url, **FAST), hub_process(redis_url, **FAST)
    async with AsyncUserClient(a.target) as users:
        written = await users.create_user_with_position("hal@example.com")
        updated = await users.update_user_with_position(written.result.id, name="Hal")
    # Written through A, watched on B: B's snapshot waits until B has routed the update.
    feed = SyncFeed(b.target, snapshot=True, min_position=updated.position)
    seen: list[common_pb2.UserEvent] = []
    with anyio.fail_after(20):
        async with feed:
            async for item in feed:
                assert isinstance(item, SyncBatch), item
                seen.extend(item.events)
                if item.snapshot_complete:
                    break
    assert [(e.user.email, e.user.name, e.user.version) for e in seen] == [
        ("hal@example.com", "Hal", 2)]

    # The position is sent: one that is not a token is refused, not waited for.
    with anyio.fail_after(20), pytest.raises(InvalidArgumentError):
        async with SyncFeed(b.target, min_position="not-a-token") as bad:
            async for _ in bad:
                pass


# -- the command line ------------------------------------------------------------------------


def hub_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    return subprocess.run([sys.executable, "-m", "hub", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_cli_writes_take_a_key_and_print_their_position_for_watch(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    a, b = hub_process(redis_url, **FAST), hub_process(redis_url, **FAST)
    create = ["user", "create", "--target", a.target, "--email", "ivy@example.com",
              "--idempotency-key", "ivy-1", "--position"]
    first, again = hub_cli(*create), hub_cli(*create)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert json.loads(first.stdout) == json.loads(again.stdout)  # run twice, created once
    position = re.search(r"^hub: position (\S+)$", first.stderr, re.MULTILINE)
    assert position, first.stderr
    other = hub_cli("user", "create", "--target", a.target, "--email", "ivy2@example.com",
                    "--idempotency-key", "ivy-1")
    assert other.returncode == 1 and "idempotency-key" in other.stderr

    # Watched on B from that position: the snapshot shows the create.
    watch = subprocess.Popen(
        dying_with_parent([sys.executable, "-m", "hub", "watch", "--target", b.target,
                           "--snapshot", "--min-position", position.group(1)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("HUB_")})
    try:
        assert watch.stdout is not None
        line = watch.stdout.readline()
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.communicate(timeout=30)
    event = json.loads(line)
    assert (event["type"], event["user"]["email"]) == ("EVENT_TYPE_SNAPSHOT", "ivy@example.com")
