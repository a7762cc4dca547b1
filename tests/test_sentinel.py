"""hub behind Redis Sentinel (issue 9): a primary, one replica and three Sentinels, real
processes, and hubs given `redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/hub`.

Writes go to whichever server the Sentinels name the primary. When the primary is killed
(kill -9) the Sentinels promote the replica, and within seconds writes work again and a live
feed goes on, never with a silent gap. With `--redis-replicas-ack 1`, a write is acknowledged
only once a replica has it, so none is lost with the primary; without a replica, a write
fails UNAVAILABLE and says its outcome is unknown.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import grpc
import pytest
import redis

from harness.hub import HubProcess
from harness.redis import (
    RedisProcess,
    SentinelProcess,
    sentinel_url,
    wait_for_master,
)
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.client import ContinuityLost, SyncBatch, SyncFeed
from tests.conftest import create_retrying

pytestmark = pytest.mark.anyio
FAST = {"HUB_HEARTBEAT_INTERVAL": "0.2"}
# From kill -9 of the primary to writes working again on the promoted replica.
FAILOVER_WITHIN = 15.0


@dataclass
class Sentinels:
    primary: RedisProcess
    replica: RedisProcess
    sentinels: list[SentinelProcess]

    @property
    def url(self) -> str:
        return sentinel_url(self.sentinels)


def _master_view(sentinel: SentinelProcess) -> dict[str, str]:
    with redis.Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=2,
                     decode_responses=True) as client:
        reply = client.execute_command("SENTINEL", "MASTER", sentinel.master_name)
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    return {str(k): str(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    """Primary + replica + 3 Sentinels (down after 1 s), each Sentinel knowing the replica and
    the two others (so a failover can be voted on at once)."""
    no_delay = ["--repl-diskless-sync-delay", "0"]
    primary = RedisProcess(tmp_path / "primary", args=no_delay)
    replica = RedisProcess(tmp_path / "replica", replicaof=primary, args=no_delay)
    watchers = [SentinelProcess(tmp_path / f"sentinel{i}", primary, down_after_ms=1000)
                for i in range(3)]
    try:
        primary.start()
        replica.start()
        replica.wait_synced()
        for s in watchers:
            s.start()
        deadline = time.monotonic() + 20
        while True:
            views = [_master_view(s) for s in watchers]
            if all(v.get("num-other-sentinels") == "2" and v.get("num-slaves") == "1"
                   for v in views):
                break
            assert time.monotonic() < deadline, f"Sentinels never met: {views}"
            time.sleep(0.1)
        yield Sentinels(primary, replica, watchers)
    finally:
        for s in watchers:
            s.kill()
        replica.kill()
        primary.kill()




def promoted_port(sentinels: Sentinels) -> int | None:
    """The port the first answering Sentinel names as the master."""
    for s in sentinels.sentinels:
        try:
            return s.master_port()
        except (redis.ConnectionError, redis.ResponseError, TypeError):
            continue
    return None


@pytest.mark.timeout(90)
async def test_writes_go_through_sentinel_to_the_primary(
    sentinels: Sentinels, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(sentinels.url, **FAST)
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        user = await stub.CreateUser(pb.CreateUserRequest(email="s@example.com"), timeout=5)
        got = await stub.GetUser(pb.GetUserRequest(user_id=user.id), timeout=5)
        assert got.email == "s@example.com"
    with sentinels.primary.client() as raw:
        assert raw.exists(f"hub:user:{user.id}") == 1, "the write did not reach the primary"


@pytest.mark.timeout(90)
async def test_primary_killed_writes_resume_on_the_promoted_replica_and_the_feed_follows(
    sentinels: Sentinels, hub_process: Callable[..., HubProcess],
) -> None:
    """kill -9 of the primary: the Sentinels promote the replica, writes work again within
    FAILOVER_WITHIN seconds, and a SyncFeed on the hub either gets every acknowledged create
    or says ContinuityLost (then snapshots): never a silent gap. Creates made after the
    failover all reach it."""
    hub = hub_process(sentinels.url, **FAST)
    seen: set[str] = set()  # ids delivered as creates or snapshots
    lost: list[ContinuityLost] = []
    acknowledged: list[str] = []
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        feed = SyncFeed(hub.target, backoff=(0.05, 0.5))

        async def consume() -> None:
            async for item in feed:
                if isinstance(item, ContinuityLost):
                    lost.append(item)
                    continue
                assert isinstance(item, SyncBatch)
                seen.update(e.user.id for e in item.events if e.type in (
                    common_pb2.EVENT_TYPE_CREATED, common_pb2.EVENT_TYPE_SNAPSHOT))

        async def until_seen(ids: list[str], within: float, what: str) -> None:
            with anyio.move_on_after(within):
                while not set(ids) <= seen:
                    await anyio.sleep(0.05)
            missing = set(ids) - seen
            assert not missing, (f"{what}: the feed never got {len(missing)} of {len(ids)}"
                                 f" creates; ContinuityLost: {lost}")

        async with feed, anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.sleep(0.5)  # subscribed by now (heartbeats every 0.2 s)
            for i in range(30):
                acknowledged.append((await create_retrying(stub, f"pre{i}@example.com", 5)).id)
            await until_seen(acknowledged, 10, "before the kill")

            sentinels.primary.kill()
            killed = time.monotonic()
            first = await create_retrying(stub, "during@example.com", FAILOVER_WITHIN + 5)
            recovered = time.monotonic() - killed
            assert recovered <= FAILOVER_WITHIN, f"writes came back after {recovered:.1f}s"
            assert wait_for_master(sentinels.sentinels, sentinels.primary.port, timeout=5) \
                == sentinels.replica.port
            after = [first.id]
            for i in range(30):
                after.append((await create_retrying(stub, f"post{i}@example.com", 10)).id)
            acknowledged.extend(after)
            await until_seen(after, 15, "after the failover")
            tg.cancel_scope.cancel()

    missing = [i for i in acknowledged if i not in seen]
    assert not missing or lost, (
        f"{len(missing)} acknowledged creates never reached the feed, and it was not told"
        " ContinuityLost")


@pytest.mark.timeout(90)
async def test_replicas_ack_keeps_every_acknowledged_write_across_failover(
    sentinels: Sentinels, hub_process: Callable[..., HubProcess],
) -> None:
    """--redis-replicas-ack 1: writers keep creating while the primary is killed; every
    create that was acknowledged is on the promoted replica (read back with GetUser). After
    the failover no replica is left, so later writes are refused: that is expected."""
    hub = hub_process(sentinels.url, HUB_REDIS_REPLICAS_ACK="1", **FAST)
    acknowledged: list[str] = []
    refused: dict[str, int] = {}
    stop = anyio.Event()
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)

        async def writer(tag: str) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    user = await stub.CreateUser(
                        pb.CreateUserRequest(email=f"{tag}-{i}@example.com"), timeout=3)
                    acknowledged.append(user.id)
                except grpc.aio.AioRpcError as err:
                    refused[err.code().name] = refused.get(err.code().name, 0) + 1
                    await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            for w in range(4):
                tg.start_soon(writer, f"w{w}")
            with anyio.fail_after(10):
                while len(acknowledged) < 100:
                    await anyio.sleep(0.02)
            sentinels.primary.kill()
            with anyio.fail_after(FAILOVER_WITHIN):  # the Sentinels promote the replica
                while promoted_port(sentinels) != sentinels.replica.port:
                    await anyio.sleep(0.1)
            await anyio.sleep(2)  # writers go on against the new primary (no replica left)
            stop.set()

        async def read_back(user_id: str) -> bool:
            with anyio.fail_after(10):
                while True:
                    try:
                        await stub.GetUser(pb.GetUserRequest(user_id=user_id), timeout=3)
                        return True
                    except grpc.aio.AioRpcError as err:
                        if err.code() == grpc.StatusCode.NOT_FOUND:
                            return False
                        if err.code() != grpc.StatusCode.UNAVAILABLE:
                            raise
                    await anyio.sleep(0.1)

        missing = []
        for user_id in acknowledged:
            if not await read_back(user_id):
                missing.append(user_id)
    assert not missing, (f"{len(missing)} of {len(acknowledged)} acknowledged creates are gone"
                         f" after the failover (refused meanwhile: {refused})")


@pytest.mark.timeout(90)
async def test_replicas_ack_without_a_replica_is_unavailable_outcome_unknown(
    sentinels: Sentinels, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(sentinels.url, HUB_REDIS_REPLICAS_ACK="1",
                      HUB_REDIS_REPLICAS_ACK_TIMEOUT="0.5", **FAST)
    async with grpc.aio.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        await stub.CreateUser(pb.CreateUserRequest(email="acked@example.com"), timeout=5)
        sentinels.replica.kill()
        with sentinels.primary.client() as raw:
            deadline = time.monotonic() + 10
            while raw.info("replication")["connected_slaves"] != 0:
                assert time.monotonic() < deadline, "the primary still counts its replica"
                await anyio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateUser(pb.CreateUserRequest(email="lonely@example.com"), timeout=5)
        elapsed = time.monotonic() - started
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "unknown" in (refused.value.details() or "").lower(), refused.value.details()
    assert 0.4 <= elapsed < 4, f"refused after {elapsed:.2f}s, not after the 0.5 s ack wait"
