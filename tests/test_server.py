"""The server process: readiness follows the store, reflection, access logs, shutdown, settings."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness.hub import HubProcess
from harness.redis import RedisProcess, free_port
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.rpc.server import SYNC_SERVICE, USER_SERVICE, HubServer
from hub.settings import Settings
from hub.store.redis import RedisStore
from tests.conftest import create_retrying

pytestmark = pytest.mark.anyio
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def wait_health(channel: grpc.aio.Channel, want: int, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while await health_of(channel, USER_SERVICE) != want:
            await anyio.sleep(0.05)




async def test_readiness_follows_redis_and_writes_fail_unavailable(tmp_path: Path) -> None:
    redis_proc = RedisProcess(tmp_path)
    redis_proc.start()
    store = RedisStore.from_url(redis_proc.url)
    try:
        async with HubServer(Settings(port=0), store=store) as hub, \
                grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
            stub = UserServiceStub(channel)
            assert await health_of(channel, "") == SERVING
            assert await health_of(channel, USER_SERVICE) == SERVING
            await stub.CreateUser(pb.CreateUserRequest(email="before@example.com"), timeout=5)

            redis_proc.stop()
            await wait_health(channel, NOT_SERVING)
            assert await health_of(channel, "") == SERVING  # liveness: the process is fine
            assert await health_of(channel, SYNC_SERVICE) == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CreateUser(pb.CreateUserRequest(email="during@example.com"),
                                      timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetUser(pb.GetUserRequest(user_id="01ARZ3NDEKTSV4RRFFQ69G5FAV"),
                                   timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

            redis_proc.start()  # same port; hub reconnects by itself
            await wait_health(channel, SERVING)
            user = await create_retrying(stub, "after@example.com")
            got = await stub.GetUser(pb.GetUserRequest(user_id=user.id), timeout=5)
            assert got.email == "after@example.com"
    finally:
        redis_proc.stop()


async def test_reflection_lists_services(hub: HubServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        reply = await call.read()
        names = {s.name for s in reply.list_services_response.service}
        assert {"user.v1.UserService", "grpc.health.v1.Health"} <= names


def test_process_logs_calls_and_drains_on_sigterm(
    hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process()
    first_line = hub.output().splitlines()[0]
    assert "embedded in-memory store" in first_line
    with grpc.insecure_channel(hub.target) as channel:
        stub = UserServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.GetUser(pb.GetUserRequest(user_id="01ARZ3NDEKTSV4RRFFQ69G5FAV"), timeout=5)
        stub.CreateUser(pb.CreateUserRequest(email="log@example.com", password="s3cret-pass"),
                        timeout=10)
    hub.proc.send_signal(signal.SIGTERM)
    assert hub.proc.wait(timeout=15) == 0
    log = hub.output()
    assert "/user.v1.UserService/GetUser NOT_FOUND" in log
    assert "/user.v1.UserService/CreateUser OK" in log
    assert "s3cret-pass" not in log and "argon2" not in log
    assert "hub stopped" in log


def test_process_with_redis_says_so(
    hub_process: Callable[..., HubProcess], redis_url: str
) -> None:
    hub = hub_process(redis_url.replace("redis://", "redis://:pw-not-logged@"))
    # The URL carries a password Redis does not need; it must never reach the log.
    assert "Redis store redis://***@127.0.0.1" in hub.output().splitlines()[0]
    assert "pw-not-logged" not in hub.output()


def test_settings_flags_win_over_environment() -> None:
    env = {"HUB_PORT": "7000", "HUB_HOST": "0.0.0.0", "HUB_REDIS_URL": "redis://r:1/0",
           "HUB_INSECURE": "true"}
    s = Settings.load({"port": 7001, "host": None}, environ=env)
    assert (s.port, s.host, s.redis_url, s.insecure) == (7001, "0.0.0.0", "redis://r:1/0", True)
    assert Settings.load(environ={}).redis_url == ""
    with pytest.raises(ValueError, match="HUB_PORT"):
        Settings.load(environ={"HUB_PORT": "many"})


def test_open_non_loopback_bind_needs_auth_or_insecure() -> None:
    with pytest.raises(ValueError, match="without authentication"):
        Settings.load(environ={"HUB_HOST": "0.0.0.0"})
    assert Settings.load(environ={"HUB_HOST": "0.0.0.0", "HUB_JWT_SECRET": "s"}).auth_enabled
    assert Settings.load(environ={"HUB_HOST": "::1"}).loopback


def test_busy_port_is_an_error(hub_process: Callable[..., HubProcess]) -> None:
    hub = hub_process()
    # A second server on the same port must fail, not share it (no SO_REUSEPORT by default).
    second = hub_process(port=hub.port, start=False)
    started = time.monotonic()
    assert second.run(timeout=30) != 0
    assert time.monotonic() - started < 30


async def test_redis_restart_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Redis stops mid-test (SIGKILL): writes fail UNAVAILABLE meanwhile, and after it
    restarts every write hub acknowledged is there, and the feed goes on."""
    redis_proc = RedisProcess(tmp_path, persistent=True)
    redis_proc.start()
    store = RedisStore.from_url(redis_proc.url)
    acknowledged: list[str] = []
    try:
        async with HubServer(Settings(port=0), store=store) as hub, \
                grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
            stub = UserServiceStub(channel)
            for i in range(50):
                user = await stub.CreateUser(pb.CreateUserRequest(email=f"k{i}@example.com"),
                                             timeout=5)
                acknowledged.append(user.id)
            redis_proc.stop()
            refused = 0
            for i in range(5):
                try:
                    user = await stub.CreateUser(
                        pb.CreateUserRequest(email=f"down{i}@example.com"), timeout=5)
                    acknowledged.append(user.id)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
                    refused += 1
            assert refused == 5
            redis_proc.start()
            await wait_health(channel, SERVING)
            user = await create_retrying(stub, "after@example.com")
            acknowledged.append(user.id)
            listed = [u.id async for u in stub.ListUsers(pb.ListUsersRequest(), timeout=10)]
            assert listed == acknowledged
    finally:
        redis_proc.stop()


async def test_metrics_bind_loopback_unless_metrics_host_says_otherwise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """/metrics has no authentication: serving gRPC on every interface must not open it to the
    network too. It binds --metrics-host (loopback by default), with a warning elsewhere."""
    public = Settings(host="0.0.0.0", port=0, insecure=True, metrics_port=free_port())
    async with HubServer(public) as hub:
        assert hub._metrics is not None
        assert hub._metrics._server.server_address[0] == "127.0.0.1"
    assert not [r for r in caplog.records if "--metrics-host" in r.getMessage()]
    opened = Settings(port=0, metrics_port=free_port(), metrics_host="0.0.0.0")
    with caplog.at_level("WARNING"):
        async with HubServer(opened) as hub:
            assert hub._metrics is not None
            assert hub._metrics._server.server_address[0] == "0.0.0.0"
    assert any("--metrics-host 0.0.0.0" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
