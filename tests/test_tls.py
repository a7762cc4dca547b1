"""Transport security: the gRPC server over TLS and mTLS (certificates made with trustme), and
the Redis store over TLS (rediss://) and with an ACL user (redis://user:password@...)."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import trustme

from harness.redis import REDIS_SERVER, RedisProcess, free_port
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.client import AsyncUserClient, Credentials, UnavailableError, UserNotFoundError
from hub.domain import NewUser, UserStatus
from hub.errors import NotFound, StoreUnavailable
from hub.rpc.server import HubServer
from hub.settings import Settings
from hub.store.memory import MemoryStore
from hub.store.redis import RedisStore
from tests.conftest import wait_for_redis

pytestmark = pytest.mark.anyio

MISSING_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, and their PEM files."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()


def make_pki(directory: Path, name: str = "server") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    pki = Pki(ca, directory / f"{name}-ca.pem", directory / f"{name}-cert.pem",
              directory / f"{name}-key.pem")
    ca.cert_pem.write_to_path(str(pki.ca_file))
    leaf.private_key_pem.write_to_path(str(pki.key_file))
    # The full chain, leaf first.
    pki.cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def tls_hub(pki: Pki) -> AsyncIterator[HubServer]:
    settings = Settings(port=0, tls_cert=str(pki.cert_file), tls_key=str(pki.key_file))
    async with HubServer(settings, store=MemoryStore(partitions=4)) as hub:
        yield hub


def tls_channel(port: int, ca: bytes | None, key: bytes | None = None,
                chain: bytes | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=chain)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


async def create_and_get(channel: grpc.aio.Channel, email: str) -> None:
    stub = UserServiceStub(channel)
    user = await stub.CreateUser(pb.CreateUserRequest(email=email), timeout=5)
    got = await stub.GetUser(pb.GetUserRequest(user_id=user.id), timeout=5)
    assert got.email == email


async def assert_unavailable(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await UserServiceStub(channel).GetUser(pb.GetUserRequest(user_id=MISSING_ID), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value


# -- TLS ------------------------------------------------------------------------------------


async def test_tls_client_with_the_right_ca_completes_a_call(
    tls_hub: HubServer, pki: Pki
) -> None:
    async with tls_channel(tls_hub.port, pki.ca_pem) as channel:
        await create_and_get(channel, "tls@example.com")


async def test_tls_client_trusting_another_ca_is_unavailable(
    tls_hub: HubServer, tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other", "other")
    async with tls_channel(tls_hub.port, other.ca_pem) as channel:
        await assert_unavailable(channel)


async def test_plaintext_client_against_tls_server_is_unavailable(tls_hub: HubServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_hub.port}") as channel:
        await assert_unavailable(channel)


async def test_async_user_client_over_tls(tls_hub: HubServer, pki: Pki, tmp_path: Path) -> None:
    target = f"127.0.0.1:{tls_hub.port}"
    async with AsyncUserClient(target, credentials=Credentials(tls_ca=pki.ca_pem)) as client:
        user = await client.create_user("client-tls@example.com", name="C")
        assert (await client.get_user(user.id)).email == "client-tls@example.com"
        with pytest.raises(UserNotFoundError):
            await client.get_user(MISSING_ID)

    other = make_pki(tmp_path / "other", "other")
    async with AsyncUserClient(target, credentials=Credentials(tls_ca=other.ca_pem),
                               timeout=3) as client:
        with pytest.raises(UnavailableError):
            await client.get_user(MISSING_ID)
        with pytest.raises(UnavailableError):
            await client.create_user("never@example.com")
    async with AsyncUserClient(target, timeout=3) as plaintext:  # no credentials: plaintext
        with pytest.raises(UnavailableError):
            await plaintext.get_user(MISSING_ID)
    assert [u.email async for u in _list(tls_hub, pki)] == ["client-tls@example.com"]


async def _list(hub: HubServer, pki: Pki) -> AsyncIterator[common_pb2.User]:
    async with AsyncUserClient(f"127.0.0.1:{hub.port}",
                               credentials=Credentials(tls_ca=pki.ca_pem)) as client:
        async for user in client.list_users():
            yield user


# -- mTLS -----------------------------------------------------------------------------------


@pytest.fixture
async def mtls_hub(pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[HubServer, trustme.CA]]:
    clients = trustme.CA()  # client certificates come from their own CA
    client_ca = tmp_path / "client-ca.pem"
    clients.cert_pem.write_to_path(str(client_ca))
    settings = Settings(port=0, tls_cert=str(pki.cert_file), tls_key=str(pki.key_file),
                        tls_client_ca=str(client_ca))
    async with HubServer(settings, store=MemoryStore(partitions=4)) as hub:
        yield hub, clients


async def test_mtls_refuses_a_client_without_a_certificate(
    mtls_hub: tuple[HubServer, trustme.CA], pki: Pki
) -> None:
    hub, _ = mtls_hub
    async with tls_channel(hub.port, pki.ca_pem) as channel:
        await assert_unavailable(channel)
    async with AsyncUserClient(f"127.0.0.1:{hub.port}", timeout=3,
                               credentials=Credentials(tls_ca=pki.ca_pem)) as client:
        with pytest.raises(UnavailableError):
            await client.get_user(MISSING_ID)


async def test_mtls_refuses_a_certificate_from_another_ca(
    mtls_hub: tuple[HubServer, trustme.CA], pki: Pki
) -> None:
    hub, _ = mtls_hub
    stranger = trustme.CA().issue_cert("mallory@example.com")
    async with tls_channel(hub.port, pki.ca_pem, stranger.private_key_pem.bytes(),
                           b"".join(b.bytes() for b in stranger.cert_chain_pems)) as channel:
        await assert_unavailable(channel)


async def test_mtls_accepts_a_client_certificate_signed_by_the_client_ca(
    mtls_hub: tuple[HubServer, trustme.CA], pki: Pki
) -> None:
    hub, clients = mtls_hub
    leaf = clients.issue_cert("alice@example.com")
    key = leaf.private_key_pem.bytes()
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
    async with tls_channel(hub.port, pki.ca_pem, key, chain) as channel:
        await create_and_get(channel, "mtls@example.com")
    creds = Credentials(tls_ca=pki.ca_pem, tls_cert=chain, tls_key=key)
    async with AsyncUserClient(f"127.0.0.1:{hub.port}", credentials=creds) as client:
        user = await client.create_user("mtls-client@example.com")
        assert (await client.get_user(user.id)).id == user.id


# -- settings -------------------------------------------------------------------------------


def test_settings_refuse_half_a_tls_configuration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        Settings(tls_cert=str(tmp_path / "cert.pem"))
    with pytest.raises(ValueError, match="go together"):
        Settings(tls_key=str(tmp_path / "key.pem"))
    with pytest.raises(ValueError, match="tls-client-ca"):
        Settings(tls_client_ca=str(tmp_path / "ca.pem"))
    with pytest.raises(ValueError, match="go together"):
        Settings.load(environ={"HUB_TLS_CERT": "cert.pem"})


# -- Redis over TLS -------------------------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Pki]]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server not on PATH")
    pki = make_pki(tmp_path / "redis-pki", "redis")
    port = free_port()
    log = tmp_path / "redis-tls.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(pki.cert_file), "--tls-key-file", str(pki.key_file),
             "--tls-ca-cert-file", str(pki.ca_file), "--tls-auth-clients", "no",
             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    def exited() -> None:
        output = log.read_text()
        if "tls" in output.lower():
            pytest.skip(f"redis-server was built without TLS support: {output[-300:]}")
        pytest.fail(f"redis-server (TLS) exited:\n{output}")

    try:
        with redis.Redis(port=port, ssl=True, ssl_ca_certs=str(pki.ca_file)) as client:
            wait_for_redis(client, proc, exited)
        yield port, pki
    finally:
        proc.kill()
        proc.wait()


async def test_redis_store_over_tls(tls_redis: tuple[int, Pki]) -> None:
    port, pki = tls_redis
    store = RedisStore.from_url(
        f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki.ca_file}", partitions=4)
    try:
        event = await store.create(NewUser.build("tls-redis@example.com", "R",
                                                 UserStatus.ACTIVE, None))
        assert (await store.get(event.user.id)).email == "tls-redis@example.com"
        # And through a hub on it, from its settings.
        settings = Settings(port=0, partitions=4,
                            redis_url=f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki.ca_file}")
        async with HubServer(settings) as hub, \
                grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
            got = await UserServiceStub(channel).GetUser(
                pb.GetUserRequest(user_id=event.user.id), timeout=5)
            assert got.email == "tls-redis@example.com"
    finally:
        await store.aclose()


async def test_redis_tls_with_an_untrusted_server_certificate_is_store_unavailable(
    tls_redis: tuple[int, Pki], tmp_path: Path
) -> None:
    port, _ = tls_redis
    other = make_pki(tmp_path / "other", "other")
    store = RedisStore.from_url(
        f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other.ca_file}", partitions=4)
    try:
        with pytest.raises(StoreUnavailable):
            await store.get(MISSING_ID)
    finally:
        await store.aclose()


# -- Redis ACL user -------------------------------------------------------------------------


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server not on PATH")
    proc = RedisProcess(tmp_path)
    proc.start()
    with proc.client() as admin:
        admin.execute_command("ACL", "SETUSER", "hubuser", "on", ">s3cret", "~*", "&*", "+@all")
    yield proc
    proc.stop()


async def test_redis_acl_user_with_the_right_password_works(acl_redis: RedisProcess) -> None:
    store = RedisStore.from_url(f"redis://hubuser:s3cret@127.0.0.1:{acl_redis.port}/0",
                                partitions=4)
    try:
        event = await store.create(NewUser.build("acl@example.com", "", UserStatus.ACTIVE, None))
        assert (await store.get(event.user.id)).email == "acl@example.com"
        with pytest.raises(NotFound):
            await store.get(MISSING_ID)
        async with store.listen():  # pub/sub works for the user too (&* grants channels)
            pass
    finally:
        await store.aclose()
    with acl_redis.client() as admin:
        assert admin.execute_command("ACL", "WHOAMI") == b"default"
        assert admin.hlen("hub:emails") == 1


async def test_redis_acl_wrong_password_is_store_unavailable(acl_redis: RedisProcess) -> None:
    """redis-py raises AuthenticationError (a ConnectionError) on connect; the store turns it
    into StoreUnavailable on the first call, like any unreachable store, with the cause
    chained."""
    store = RedisStore.from_url(f"redis://hubuser:wrong@127.0.0.1:{acl_redis.port}/0",
                                partitions=4)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.get(MISSING_ID)
        assert isinstance(info.value.__cause__, redis.AuthenticationError)
        with pytest.raises(StoreUnavailable):
            await store.create(NewUser.build("nope@example.com", "", UserStatus.ACTIVE, None))
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.aclose()
    with acl_redis.client() as admin:
        assert admin.hlen("hub:emails") == 0


async def test_hub_on_redis_with_a_wrong_password_is_not_serving_and_unavailable(
    acl_redis: RedisProcess,
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = Settings(port=0, partitions=4,
                        redis_url=f"redis://hubuser:wrong@127.0.0.1:{acl_redis.port}/0")
    async with HubServer(settings) as hub, \
            grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="user.v1.UserService"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await UserServiceStub(channel).CreateUser(
                pb.CreateUserRequest(email="x@example.com"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_redis_wrong_password_error_says_authentication_failed(
    acl_redis: RedisProcess,
) -> None:
    store = RedisStore.from_url(f"redis://hubuser:wrong@127.0.0.1:{acl_redis.port}/0",
                                partitions=4)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.get(MISSING_ID)
        message = str(info.value).lower()
        assert "auth" in message or "password" in message, message
    finally:
        await store.aclose()
