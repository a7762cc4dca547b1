"""Fixtures that start real things: redis-server processes on free ports, hub servers on port 0
(in-process) or as `python -m hub serve` subprocesses, and real gRPC channels to them."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import anyio
import grpc
import pytest
import redis

from harness.hub import HubProcess
from harness.redis import REDIS_SERVER, ClusterProcess, RedisProcess, free_port
from hub.api.user.v1 import common_pb2, user_service_pb2_grpc
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.rpc.server import HubServer
from hub.settings import Settings
from hub.store.base import Store
from hub.store.cluster import ClusterStore
from hub.store.memory import MemoryStore
from hub.store.redis import RedisStore

# The harness's, for modules that import them from here.
__all__ = ["REDIS_SERVER", "HubProcess", "free_port", "wait_for_redis"]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def one_event_loop(anyio_backend: str) -> Iterator[None]:
    """Holds a lease on anyio's test runner, so every test of the session shares one event
    loop: grpc.aio binds its completion queue to the loop it first ran on, and a late
    callback of a call from an earlier, since closed loop fails whichever test is running."""
    from anyio.pytest_plugin import get_runner

    with get_runner(anyio_backend, {}):
        yield


def wait_for_redis(
    client: redis.Redis, proc: subprocess.Popen[bytes], on_exit: Callable[[], None] | None = None
) -> None:
    """Until `client` gets an answer; `on_exit` (default: fail) if the server dies first."""
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            if on_exit is not None:
                on_exit()
            pytest.fail(f"redis-server exited with {proc.returncode}")
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The session's Redis, emptied for this test."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()  # a test killed it
    with redis_server.client() as c:
        c.flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcess]:
    """A Redis Cluster of 3 masters with a replica each, shared by the session's tests."""
    cluster = ClusterProcess(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: ClusterProcess) -> str:
    """The session's cluster, emptied for this test (a test that killed a master gets the
    cluster repaired first)."""
    redis_cluster.wait_ready()
    for node in redis_cluster.masters():
        with node.client() as c:
            c.flushall()
    return redis_cluster.url


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each contract test runs on every store: embedded, one Redis, Redis Cluster."""
    s: Store
    if request.param == "memory":
        s = MemoryStore(partitions=8, history_size=1000)
    elif request.param == "redis":
        s = RedisStore.from_url(request.getfixturevalue("redis_url"), partitions=8,
                                history_size=1000)
    else:
        s = ClusterStore.from_url(request.getfixturevalue("cluster_url"), partitions=8,
                                  history_size=1000)
    yield s
    await s.aclose()


@pytest.fixture
async def hub(store: Store) -> AsyncIterator[HubServer]:
    """A hub server (in this process, port 0) on the parametrized store."""
    # Short heartbeats: a test reads the first one to know its subscription is live.
    settings = Settings(port=0, bulk_batch_size=50, heartbeat_interval=0.2)
    async with HubServer(settings, store=store) as server:
        yield server


@pytest.fixture
async def stub(hub: HubServer) -> AsyncIterator[user_service_pb2_grpc.UserServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        yield user_service_pb2_grpc.UserServiceStub(channel)


@pytest.fixture
def hub_process(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """Starts `python -m hub serve` (harness.hub.HubProcess, its log in tmp_path) and returns
    once it serves; every one it made is killed after the test.

        hub_process(redis_url, HUB_HEARTBEAT_INTERVAL="0.2")   # HUB_* variables
        hub_process(url, workers=2, port=0, args=["--shutdown-grace", "2"])
        hub_process(url, start=False)   # not started: .spawn(), .run() or .start() it
    """
    made: list[HubProcess] = []

    def make(redis_url: str = "", *, args: Sequence[str] = (), workers: int = 1,
             port: int | None = None, start: bool = True, **env: str) -> HubProcess:
        hub = HubProcess(tmp_path, redis_url, env=env, args=args, workers=workers,
                         port=free_port() if port is None else port)
        made.append(hub)
        if start:
            hub.start()
        return hub

    yield make
    for hub in made:
        hub.kill()


async def create_retrying(stub: UserServiceStub, email: str, within: float = 10
                          ) -> common_pb2.User:
    """CreateUser, repeated while it fails UNAVAILABLE: the first write after Redis came back
    may meet a pooled connection Redis closed when it went down, and fails UNAVAILABLE (never
    silently); a write is never repeated by hub itself, so the caller's retry goes through."""
    with anyio.fail_after(within):
        while True:
            try:
                return await stub.CreateUser(pb.CreateUserRequest(email=email),
                                             timeout=min(5.0, within / 2))
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            await anyio.sleep(0.1)
