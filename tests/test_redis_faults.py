"""Redis misbehaving under hub (issue 9), on real `redis-server` and `hub serve` processes.

- History identity: Redis coming back with OLDER data under the same epoch (a restart from an
  older RDB, a lagging replica promoted) is a new history. Live subscribers of the old one end
  with OUT_OF_RANGE / EPOCH_CHANGED, old resume tokens are refused the same way, and nothing of
  the new history is ever delivered as a continuation of the old one.
- Writes never half-apply: with `hub:offsets` gone (as eviction would do it) a create lands
  whole or not at all; an evicting `maxmemory-policy` is refused at start-up.
- Refusals get their codes, never INTERNAL: OOM is RESOURCE_EXHAUSTED, a read-only replica,
  BUSY and LOADING are UNAVAILABLE, and reads neither write nor stall behind a write pause.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from harness.hub import HubProcess
from harness.redis import RedisProcess, dying_with_parent
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.api.user.v1.user_sync_service_pb2_grpc import UserSyncServiceStub
from tests.conftest import create_retrying

pytestmark = pytest.mark.anyio
FAST = {"HUB_HEARTBEAT_INTERVAL": "0.2"}
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
USER_SERVICE = "user.v1.UserService"
# "Within a few seconds": the bound a live subscriber gets to be told its history is gone.
TOLD_WITHIN = 8.0


# -- processes -------------------------------------------------------------------------------


@pytest.fixture
def redis_procs(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """Starts RedisProcess(tmp_path / name, **kwargs); all are killed at the end."""
    started: list[RedisProcess] = []

    def start(name: str, **kwargs: object) -> RedisProcess:
        proc = RedisProcess(tmp_path / name, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        proc.start()
        return proc

    yield start
    for proc in started:
        proc.kill()


# -- calls -----------------------------------------------------------------------------------


def reason_of(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return "(no ErrorInfo)"


def describe(err: grpc.aio.AioRpcError | None) -> str:
    if err is None:
        return "no error"
    return f"{err.code().name} {reason_of(err)} {err.details()!r}"


async def live_sync(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    """A Sync stream of all users, live: its first response (a heartbeat) has come."""
    call = UserSyncServiceStub(channel).Sync(timeout=80)
    await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe()))
    with anyio.fail_after(10):
        await call.read()
    return call


async def resumed_sync(channel: grpc.aio.Channel, token: str) -> grpc.aio.StreamStreamCall:
    call = UserSyncServiceStub(channel).Sync(timeout=80)
    await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(resume_token=token)))
    return call


async def ending(call: grpc.aio.StreamStreamCall, within: float
                 ) -> tuple[list[common_pb2.UserEvent], grpc.aio.AioRpcError | None, str]:
    """Reads `call` for up to `within` seconds: (the events it delivered, the error that ended
    it, how it ended: "error", "ended OK" or "still open")."""
    events: list[common_pb2.UserEvent] = []
    with anyio.move_on_after(within):
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return events, None, "ended OK"
                events.extend(response.events)
        except grpc.aio.AioRpcError as err:
            return events, err, "error"
    call.cancel()
    return events, None, "still open"


def created_ids(events: list[common_pb2.UserEvent]) -> set[str]:
    return {e.user.id for e in events if e.type == common_pb2.EVENT_TYPE_CREATED}


async def collect_creates(call: grpc.aio.StreamStreamCall, want: set[str], within: float
                          ) -> tuple[set[str], str]:
    """Reads until every id of `want` was delivered as a create (or `within` passed, or the
    stream ended): (the ids of `want` delivered, how the stream stands)."""
    got: set[str] = set()
    with anyio.move_on_after(within):
        try:
            while not want <= got:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return got, "ended OK"
                got |= created_ids(list(response.events)) & want
            return got, "open"
        except grpc.aio.AioRpcError as err:
            return got, f"ended {describe(err)}"
    return got, "open"




async def create_users(stub: UserServiceStub, tag: str, count: int) -> list[str]:
    return [(await create_retrying(stub, f"{tag}{i}@example.com")).id for i in range(count)]


async def import_users(stub: UserServiceStub, tag: str, count: int) -> list[str]:
    rows = [pb.CreateUserRequest(email=f"{tag}{i}@example.com") for i in range(count)]
    response = await stub.ImportUsers(iter([pb.ImportUsersRequest(users=rows)]), timeout=30)
    assert response.created_count == count, response.errors[:3]
    return list(response.user_ids)


async def list_users(stub: UserServiceStub, timeout: float = 10) -> list[common_pb2.User]:
    return [u async for u in stub.ListUsers(pb.ListUsersRequest(), timeout=timeout)]


async def list_token(stub: UserServiceStub) -> str:
    call = stub.ListUsers(pb.ListUsersRequest(), timeout=10)
    async for _ in call:
        pass
    return str(dict(await call.trailing_metadata())["hub-resume-token"])


async def health_of(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


def code_name(err: grpc.aio.AioRpcError) -> str:
    return err.code().name


# -- Redis states ----------------------------------------------------------------------------


def fill_to_oom(proc: RedisProcess) -> None:
    """maxmemory reached under noeviction: SETs of 64 KiB until Redis refuses one, then
    maxmemory lowered below what is used, so even a small write is refused (a big SET is
    refused while its own query buffer counts, which leaves room for small ones)."""
    with proc.client() as client:
        i = 0
        try:
            while i < 1000:
                client.set(f"filler:{i}", b"x" * 65536)
                i += 1
        except redis.ResponseError as exc:
            assert "maxmemory" in str(exc), exc
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", max(used - 256 * 1024, 1024 * 1024))
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            client.set("filler:probe", "x")


def relieve(proc: RedisProcess) -> None:
    with proc.client() as client:
        client.config_set("maxmemory", 0)


# =============================================================================================
# 1. History identity
# =============================================================================================


@pytest.mark.timeout(90)
async def test_restart_from_older_snapshot_ends_every_live_subscriber_epoch_changed(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    """Redis restarted from an older RDB (same epoch key, smaller offsets), and no write after
    it: each live subscriber on each instance is told EPOCH_CHANGED within a few seconds."""
    store = redis_procs("r", snapshots=True)
    a, b = hub_process(store.url, **FAST), hub_process(store.url, **FAST)
    async with grpc.aio.insecure_channel(a.target) as ca, \
            grpc.aio.insecure_channel(b.target) as cb:
        stub = UserServiceStub(ca)
        await create_users(stub, "old", 20)
        old = store.snapshot("old")
        await create_users(stub, "later", 30)
        subs = {"A": await live_sync(ca), "B": await live_sync(cb)}

        store.restart_from(old)
        outcomes: dict[str, tuple[list[common_pb2.UserEvent], grpc.aio.AioRpcError | None,
                                  str]] = {}

        async def watch(name: str, call: grpc.aio.StreamStreamCall) -> None:
            outcomes[name] = await ending(call, TOLD_WITHIN)

        async with anyio.create_task_group() as tg:
            for name, call in subs.items():
                tg.start_soon(watch, name, call)

    problems = []
    for name, (_, err, how) in sorted(outcomes.items()):
        if err is None or err.code() != grpc.StatusCode.OUT_OF_RANGE \
                or reason_of(err) != "EPOCH_CHANGED":
            problems.append(f"subscriber on {name}: {how}, {describe(err)}, "
                            f"{TOLD_WITHIN:.0f}s after Redis came back with older data")
    assert not problems, problems


@pytest.mark.timeout(90)
async def test_after_rollback_a_new_subscriber_gets_every_new_create(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    """After the rollback, offsets already handed out are handed out again: a subscriber that
    starts afterwards must still get every new create (today it silently gets almost none)."""
    store = redis_procs("r", snapshots=True)
    hub = hub_process(store.url, **FAST)
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        await create_users(stub, "old", 20)
        old = store.snapshot("old")
        await import_users(stub, "later", 300)
        before = await live_sync(channel)

        store.restart_from(old)
        await ending(before, TOLD_WITHIN)  # the old one is told (tested above), or not
        after = await live_sync(channel)
        new = set(await create_users(stub, "new", 50))
        got, state = await collect_creates(after, new, 15)
        after.cancel()
    assert len(got) == len(new), (
        f"a subscriber started after the rollback got {len(got)} of {len(new)} new creates"
        f" (stream {state})")


@pytest.mark.timeout(90)
async def test_writes_right_after_rollback_never_continue_the_old_feed(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    """Writes racing the detection: a subscriber of the old history never gets an event of
    the new one as if it followed on (same offsets, other events); it is told EPOCH_CHANGED."""
    store = redis_procs("r", snapshots=True)
    hub = hub_process(store.url, **FAST)
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        await create_users(stub, "old", 20)
        old = store.snapshot("old")
        await create_users(stub, "later", 16)  # a few offsets the new history will reuse
        before = await live_sync(channel)

        store.restart_from(old)
        new = set(await create_users(stub, "new", 50))
        events, err, how = await ending(before, TOLD_WITHIN)
    leaked = created_ids(events) & new
    problems = []
    if leaked:
        problems.append(f"the old history's subscriber got {len(leaked)} of the {len(new)}"
                        " new history's creates as a continuation of its feed")
    if err is None or err.code() != grpc.StatusCode.OUT_OF_RANGE \
            or reason_of(err) != "EPOCH_CHANGED":
        problems.append(f"the old history's subscriber: {how}, {describe(err)}")
    assert not problems, problems


@pytest.mark.timeout(90)
async def test_token_from_before_rollback_is_refused_epoch_changed(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    """A token from the old history is refused EPOCH_CHANGED: right after the rollback (its
    offsets are ahead of Redis's) and once new writes have pushed Redis's offsets past it
    (where today its offsets look valid and the new history is replayed onto it)."""
    store = redis_procs("r", snapshots=True)
    hub = hub_process(store.url, **FAST)
    problems = []
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        await create_users(stub, "old", 20)
        old = store.snapshot("old")
        await create_users(stub, "later", 30)
        token = await list_token(stub)
        watcher = await live_sync(channel)

        store.restart_from(old)
        await ending(watcher, TOLD_WITHIN)  # gives the hub time to notice, if it does

        async def resume(when: str) -> None:
            call = await resumed_sync(channel, token)
            events, err, how = await ending(call, 3)
            if err is None or err.code() != grpc.StatusCode.OUT_OF_RANGE \
                    or reason_of(err) != "EPOCH_CHANGED":
                problems.append(f"{when}: resume from a pre-rollback token: {how},"
                                f" {describe(err)}, {len(created_ids(events))} creates"
                                " delivered")

        await resume("right after the rollback")
        # 300 creates over 16 partitions put ~19 in each: every partition's offset passes
        # the token's (~3 each), where today the token looks valid again.
        await import_users(stub, "past", 300)
        await resume("after new writes passed the token's offsets")
    assert not problems, problems


@pytest.mark.timeout(90)
async def test_promoted_lagging_replica_is_a_new_history(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    """The replica stopped following (it lags), the primary took more writes, then the
    lagging replica was promoted and the old primary resynced from it: the hub's address now
    serves older data under the same epoch, with no restart at all. Live subscribers are told
    EPOCH_CHANGED, and a new subscriber gets every new create."""
    no_delay = ["--repl-diskless-sync-delay", "0"]
    primary = redis_procs("p", args=no_delay)
    replica = redis_procs("r", replicaof=primary, args=no_delay)
    replica.wait_synced()
    hub = hub_process(primary.url, **FAST)
    problems = []
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        await create_users(stub, "old", 20)
        replica.wait_synced()
        replica.promote()  # from here on it lags
        await import_users(stub, "later", 300)
        before = await live_sync(channel)

        primary.follow(replica)  # resyncs: the primary now holds the replica's older data
        primary.wait_synced()
        primary.promote()
        _, err, how = await ending(before, TOLD_WITHIN)
        if err is None or err.code() != grpc.StatusCode.OUT_OF_RANGE \
                or reason_of(err) != "EPOCH_CHANGED":
            problems.append(f"live subscriber after the lagging replica took over: {how},"
                            f" {describe(err)}")
        after = await live_sync(channel)
        new = set(await create_users(stub, "new", 50))
        got, state = await collect_creates(after, new, 15)
        after.cancel()
        if len(got) != len(new):
            problems.append(f"a new subscriber got {len(got)} of {len(new)} new creates"
                            f" (stream {state})")
    assert not problems, problems


# =============================================================================================
# 2. Writes never half-apply
# =============================================================================================


@pytest.mark.timeout(90)
async def test_create_with_offsets_evicted_lands_whole_or_not_at_all(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    """`hub:offsets` deleted (what allkeys-lru eviction does): a create either succeeds whole
    (readable, listed, its event delivered or the subscriber explicitly cut) or fails with
    nothing written, never INTERNAL; a retry never says ALREADY_EXISTS for a user that is not
    there."""
    store = redis_procs("r")
    hub = hub_process(store.url, HUB_PARTITIONS="1", **FAST)
    email = "evicted@example.com"
    problems: list[str] = []
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        await create_users(stub, "before", 5)
        sub = await live_sync(channel)
        with store.client() as raw:
            assert raw.delete("hub:offsets") == 1

        for attempt in range(3):
            try:
                user = await stub.CreateUser(pb.CreateUserRequest(email=email), timeout=5)
            except grpc.aio.AioRpcError as err:
                listed = [u.email for u in await list_users(stub)]
                with store.client() as raw:
                    indexed = raw.hget("hub:emails", email)
                if err.code() == grpc.StatusCode.INTERNAL:
                    problems.append(f"attempt {attempt}: INTERNAL {err.details()!r}")
                if err.code() == grpc.StatusCode.ALREADY_EXISTS and email not in listed:
                    problems.append(f"attempt {attempt}: ALREADY_EXISTS, yet ListUsers does"
                                    " not have the user")
                if err.code() != grpc.StatusCode.ALREADY_EXISTS and (
                        email in listed or indexed is not None):
                    problems.append(f"attempt {attempt} failed {code_name(err)} but wrote:"
                                    f" listed={email in listed}, email index={indexed!r}")
                continue
            got = await stub.GetUser(pb.GetUserRequest(user_id=user.id), timeout=5)
            if got.email != email:
                problems.append(f"created {user.id} reads back as {got.email!r}")
            if user.id not in [u.id for u in await list_users(stub)]:
                problems.append(f"created {user.id} is missing from ListUsers")
            delivered, state = await collect_creates(sub, {user.id}, 5)
            if not delivered and "OUT_OF_RANGE" not in state:
                problems.append(f"created {user.id}: its event never reached the live"
                                f" subscriber, which was not told either (stream {state})")
            break
        sub.cancel()
    assert not problems, problems


@pytest.mark.timeout(90)
def test_serve_refuses_an_evicting_redis(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    store = redis_procs("r", args=["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])
    hub = hub_process(store.url, start=False)  # it must refuse to start: no wait for health
    hub.spawn()
    code = hub.wait_exit(20)
    output = hub.output()
    assert code is not None, f"hub kept running on an allkeys-lru Redis:\n{output[-3000:]}"
    assert code != 0, output[-3000:]
    lines = [line for line in output.splitlines()
             if "allkeys-lru" in line and "--allow-evicting-redis" in line]
    assert lines, f"no line names the policy and --allow-evicting-redis:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.timeout(90)
def test_allow_evicting_redis_starts_with_a_warning(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    store = redis_procs("r", args=["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])
    hub = hub_process(store.url, HUB_ALLOW_EVICTING_REDIS="1")
    warnings = [line for line in hub.output().splitlines()
                if "WARNING" in line and "allkeys-lru" in line]
    assert warnings, f"no warning about allkeys-lru:\n{hub.output()[-3000:]}"


# =============================================================================================
# 3. Refusals get their codes, never INTERNAL
# =============================================================================================


@pytest.mark.timeout(90)
async def test_out_of_memory_create_is_resource_exhausted_and_reads_still_work(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    store = redis_procs("r", args=["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"])
    hub = hub_process(store.url, **FAST)
    problems = []
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        ids = await create_users(stub, "fits", 5)
        fill_to_oom(store)

        try:
            await stub.CreateUser(pb.CreateUserRequest(email="oom@example.com"), timeout=5)
            problems.append("CreateUser succeeded past maxmemory")
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                problems.append(f"CreateUser past maxmemory: {describe(err)}")
        try:
            with anyio.fail_after(5):
                listed = [u.id for u in await list_users(stub, timeout=3)]
            if listed != ids:
                problems.append(f"ListUsers past maxmemory listed {len(listed)} of 5")
        except grpc.aio.AioRpcError as err:
            problems.append(f"ListUsers (a read) past maxmemory: {describe(err)}")
        try:
            await stub.GetUser(pb.GetUserRequest(user_id=ids[0]), timeout=3)
        except grpc.aio.AioRpcError as err:
            problems.append(f"GetUser past maxmemory: {describe(err)}")

        relieve(store)
        try:  # the refused create changed nothing: the email is free
            await create_retrying(stub, "oom@example.com")
        except grpc.aio.AioRpcError as err:
            problems.append(f"CreateUser once memory is back: {describe(err)}")
    assert not problems, problems


@pytest.mark.timeout(90)
async def test_out_of_memory_mid_import_reports_every_row(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    """ImportUsers of three messages; Redis reaches maxmemory after the first one has landed.
    The call returns a response (not INTERNAL) listing exactly the rows that landed, and
    every other row as an error with code 8 (RESOURCE_EXHAUSTED)."""
    store = redis_procs("r", args=["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"])
    hub = hub_process(store.url, **FAST)
    per_message = 20
    emails = [f"imp{i}@example.com" for i in range(3 * per_message)]

    async def messages() -> AsyncIterator[pb.ImportUsersRequest]:
        for m in range(3):
            if m == 1:
                with anyio.fail_after(10):  # the first message's rows have landed
                    while len(await list_users(stub)) < per_message:
                        await anyio.sleep(0.05)
                fill_to_oom(store)
            chunk = emails[m * per_message:(m + 1) * per_message]
            yield pb.ImportUsersRequest(users=[pb.CreateUserRequest(email=e) for e in chunk])

    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        try:
            response = await stub.ImportUsers(messages(), timeout=30)
        except grpc.aio.AioRpcError as err:
            pytest.fail(f"ImportUsers hitting maxmemory mid-way ended {describe(err)}")
        finally:
            relieve(store)
        landed = {u.email: u.id for u in await list_users(stub)}

    landed_rows = [i for i, e in enumerate(emails) if e in landed]
    assert list(response.user_ids) == [landed[emails[i]] for i in landed_rows]
    assert landed_rows == list(range(per_message)), "the first message was written whole"
    errors = {e.index: e.code for e in response.errors}
    assert sorted(errors) == [i for i in range(len(emails)) if i not in landed_rows]
    assert set(errors.values()) == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}


@pytest.mark.timeout(90)
async def test_read_only_replica_gives_unavailable_not_serving_and_no_traceback_loop(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    primary = redis_procs("p")
    replica = redis_procs("r", replicaof=primary)
    replica.wait_synced()
    hub = hub_process(replica.url, start=False, **FAST)  # it stays NOT_SERVING
    hub.spawn()
    hub.wait_serving(20, service="")  # liveness: the process answers, whatever its readiness
    await anyio.sleep(4)  # health checks and the fan-out's retries run meanwhile
    problems = []
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        try:
            await stub.CreateUser(pb.CreateUserRequest(email="ro@example.com"), timeout=5)
            problems.append("CreateUser on a read-only replica succeeded")
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                problems.append(f"CreateUser on a read-only replica: {describe(err)}")
        status = await health_of(channel, USER_SERVICE)
        if status != NOT_SERVING:
            problems.append(f"health of {USER_SERVICE} on a read-only replica:"
                            f" {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    tracebacks = hub.output().count("Traceback")
    if tracebacks > 1:
        problems.append(f"{tracebacks} tracebacks in the hub's log within ~5 s")
    assert not problems, (problems, hub.output()[-2000:])


@pytest.mark.timeout(90)
async def test_list_users_is_not_held_by_a_write_pause(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    """CLIENT PAUSE WRITE holds writes only (a failover's switch-over does this): ListUsers,
    a read, still answers at once, its position read included."""
    store = redis_procs("r")
    hub = hub_process(store.url, **FAST)
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        ids = await create_users(stub, "p", 10)
        with store.client() as raw:
            raw.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
        started = time.monotonic()
        try:
            listed = [u.id for u in await list_users(stub, timeout=2)]
        except grpc.aio.AioRpcError as err:
            pytest.fail(f"ListUsers during CLIENT PAUSE WRITE: {describe(err)} after"
                        f" {time.monotonic() - started:.1f}s")
        elapsed = time.monotonic() - started
    assert listed == ids
    assert elapsed < 1.0, f"ListUsers took {elapsed:.1f}s during a write pause"


@pytest.mark.timeout(90)
async def test_busy_script_gives_unavailable(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    """A script running past busy-reply-threshold makes Redis answer BUSY to everyone else
    (PING included) until SCRIPT KILL: reads and writes are UNAVAILABLE, then work again."""
    store = redis_procs("r", args=["--busy-reply-threshold", "100"])
    hub = hub_process(store.url, **FAST)
    problems = []
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        (existing,) = await create_users(stub, "busy", 1)

        def spin() -> None:
            # Ended by SCRIPT KILL.
            with redis.Redis(host="127.0.0.1", port=store.port) as spinner, \
                    contextlib.suppress(redis.ResponseError):
                spinner.eval("while true do end", 0)

        spinning = threading.Thread(target=spin, daemon=True)
        spinning.start()
        try:
            with store.client() as raw:
                deadline = time.monotonic() + 5
                while True:
                    try:
                        raw.ping()
                    except redis.ResponseError as exc:
                        assert str(exc).startswith("BUSY"), exc
                        break
                    assert time.monotonic() < deadline, "Redis never became BUSY"
                    await anyio.sleep(0.05)
            calls = {
                "CreateUser": stub.CreateUser(pb.CreateUserRequest(email="b2@example.com"),
                                              timeout=5),
                "GetUser": stub.GetUser(pb.GetUserRequest(user_id=existing), timeout=5),
            }
            for name, call in calls.items():
                try:
                    await call
                    problems.append(f"{name} succeeded while Redis was BUSY")
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        problems.append(f"{name} while Redis was BUSY: {describe(err)}")
        finally:
            with store.client() as raw:
                raw.execute_command("SCRIPT", "KILL")
            spinning.join(timeout=5)
        await create_retrying(stub, "after-busy@example.com")
    assert not problems, problems


def restart_loading(store: RedisProcess, snapshot: Path) -> None:
    """kill -9, then start from `snapshot` WITHOUT waiting: Redis answers LOADING meanwhile
    (its args slow loading down). From the caller's thread: the process dies with it."""
    store.kill()
    shutil.copyfile(snapshot, store.rdb)
    store.proc = subprocess.Popen(dying_with_parent(store.argv()),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def loading(store: RedisProcess) -> bool:
    """Whether Redis answers LOADING now (a fresh connection, no client-side retry: redis-py
    would otherwise retry LOADING until it ends)."""
    with redis.Redis(host="127.0.0.1", port=store.port, socket_timeout=1, retry=None) as raw:
        try:
            raw.ping()
        except redis.BusyLoadingError:
            return True
        except redis.ConnectionError:
            pass  # not listening yet
    return False


@pytest.mark.timeout(90)
async def test_loading_redis_gives_unavailable(
    redis_procs: Callable[..., RedisProcess], hub_process: Callable[..., HubProcess],
) -> None:
    """A Redis restarting from a large RDB answers LOADING for seconds: reads and writes are
    UNAVAILABLE meanwhile (key-load-delay stretches 3000 keys to ~3 s of loading)."""
    store = redis_procs("r", snapshots=True, args=[
        "--key-load-delay", "1000", "--loading-process-events-interval-bytes", "1024"])
    hub = hub_process(store.url, **FAST)
    problems = []
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        (existing,) = await create_users(stub, "load", 1)
        with store.client() as raw, raw.pipeline(transaction=False) as pipe:
            for i in range(3000):
                pipe.set(f"ballast:{i}", "x")
            pipe.execute()
        snapshot = store.snapshot("now")
        restart_loading(store, snapshot)
        with anyio.fail_after(5):
            while not loading(store):
                await anyio.sleep(0.02)
        for attempt in range(3):  # past any pooled connection the kill left dead
            for name, call in (
                ("CreateUser", stub.CreateUser(
                    pb.CreateUserRequest(email=f"l{attempt}@example.com"), timeout=2)),
                ("GetUser", stub.GetUser(pb.GetUserRequest(user_id=existing), timeout=2)),
            ):
                try:
                    await call
                    problems.append(f"{name} succeeded while Redis was LOADING")
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        problems.append(f"{name} while Redis was LOADING: {describe(err)}")
        assert loading(store), "loading ended before the calls did: slow it down more"
        store.wait_answering()
        await create_retrying(stub, "after-load@example.com")
    assert not problems, problems
