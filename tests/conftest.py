"""Fixtures that start real things: redis-server processes on free ports, hub servers on port 0
(in-process) or as `python -m hub serve` subprocesses, and real gRPC channels to them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from harness.redis import REDIS_SERVER, RedisProcess, dying_with_parent, free_port
from hub.api.user.v1 import user_service_pb2_grpc
from hub.rpc.server import HubServer
from hub.settings import Settings
from hub.store.base import Store
from hub.store.memory import MemoryStore
from hub.store.redis import RedisStore

__all__ = ["REDIS_SERVER", "HubProcess", "RedisProcess", "dying_with_parent", "free_port",
           "wait_for_redis"]


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


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each contract test runs on both stores."""
    s: Store
    if request.param == "memory":
        s = MemoryStore(partitions=8, history_size=1000)
    else:
        s = RedisStore.from_url(request.getfixturevalue("redis_url"), partitions=8,
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


@dataclass
class HubProcess:
    """`python -m hub serve` in a subprocess: what an operator runs, killable for fault tests."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def hub_process(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    started: list[HubProcess] = []

    def start(redis_url: str = "", **env: str) -> HubProcess:
        port = free_port()
        log = tmp_path / f"hub-{port}.log"
        environ = {**os.environ, "HUB_PORT": str(port), "HUB_REDIS_URL": redis_url, **env}
        with log.open("wb") as out:
            proc = subprocess.Popen(dying_with_parent([sys.executable, "-m", "hub", "serve"]),
                                    env=environ, stdout=out, stderr=subprocess.STDOUT)
        hub = HubProcess(port, proc, log)
        started.append(hub)
        _wait_serving(hub)
        return hub

    yield start
    for hub in started:
        if hub.proc.poll() is None:
            hub.proc.kill()
            hub.proc.wait()


def _wait_serving(hub: HubProcess, timeout: float = 20) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(hub.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if hub.proc.poll() is not None:
                raise RuntimeError(f"hub exited early:\n{hub.output()}")
            try:
                # Readiness of the live feed: store reachable and event bus connected.
                reply = health.Check(
                    health_pb2.HealthCheckRequest(service="user.v1.UserSyncService"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"hub on {hub.target} not SERVING:\n{hub.output()}")
