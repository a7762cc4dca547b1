"""Authentication and authorization: JWT bearer tokens (HS256, RS256, ES256), the scope each
method needs, public methods, health and reflection, token expiry on streams, the clients'
credentials, `hub token`, and tokens never reaching the log.

Every refused call is also checked to have written nothing (the store's users and its event
position are unchanged)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness.hub import HubProcess
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.api.user.v1.user_sync_service_pb2_grpc import UserSyncServiceStub
from hub.bearer import TokenVerifier
from hub.client import AsyncUserClient, ClientError, Credentials, SyncBatch, SyncFeed
from hub.domain import NewUser, UserStatus
from hub.principal import READ, SUBSCRIBE, WRITE
from hub.rpc.server import HubServer
from hub.settings import Settings
from hub.store.base import Store
from hub.store.memory import MemoryStore

pytestmark = pytest.mark.anyio

SECRET = "hub-test-secret-0123456789abcdef-0123456789"  # >= 32 bytes, as HS256 wants
OTHER_SECRET = "not-the-hub-secret-0123456789abcdef-012345"
AUDIENCE, ISSUER = "hub", "https://issuer.example"
ALL = f"{READ} {WRITE} {SUBSCRIBE}"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
Metadata = tuple[tuple[str, str], ...]


# -- tokens ---------------------------------------------------------------------------------


def claims(scope: str = ALL, ttl: int = 60, **changes: Any) -> dict[str, Any]:
    """Claims the test hub accepts, unless `changes` say otherwise (None drops a claim)."""
    now = int(time.time())
    body = {"sub": "alice", "scope": scope, "iat": now, "exp": now + ttl,
            "aud": AUDIENCE, "iss": ISSUER, **changes}
    return {k: v for k, v in body.items() if v is not None}


def mint(scope: str = ALL, *, key: Any = SECRET, algorithm: str = "HS256", ttl: int = 60,
         **changes: Any) -> str:
    return jwt.encode(claims(scope, ttl, **changes), key, algorithm=algorithm)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def segment(obj: dict[str, Any]) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def unsigned(body: dict[str, Any]) -> str:
    """An `alg: none` token: header and payload, empty signature."""
    return f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(body)}."


def tampered(token: str, **changes: Any) -> str:
    """`token` with claims changed in its payload, keeping the original signature."""
    header, payload, signature = token.split(".")
    body = {**json.loads(unb64(payload)), **changes}
    return f"{header}.{segment(body)}.{signature}"


def hs256_signed_with(key: bytes, body: dict[str, Any]) -> str:
    """HS256 by hand (PyJWT refuses a PEM key as an HMAC secret): the alg-confusion forgery."""
    signing_input = f"{segment({'alg': 'HS256', 'typ': 'JWT'})}.{segment(body)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def new_key(algorithm: str) -> tuple[Any, bytes]:
    """A private key for `algorithm` and its public key as PEM."""
    private: Any = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
                    if algorithm == "RS256" else ec.generate_private_key(ec.SECP256R1()))
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, pem


# -- an in-process hub with auth ------------------------------------------------------------


@dataclass
class Hub:
    server: HubServer
    channel: grpc.aio.Channel
    seed: str  # a user that exists before the test's calls

    @property
    def users(self) -> UserServiceStub:
        return UserServiceStub(self.channel)

    @property
    def sync(self) -> UserSyncServiceStub:
        return UserSyncServiceStub(self.channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def state(self) -> tuple[Any, ...]:
        """Everything a write would change: the users and the event history's position."""
        store = self.server.store
        users = [(u.id, u.email, u.name, u.version) for u in await store.list_after("", 1000)]
        return (await store.position(), users)


@asynccontextmanager
async def serving(store: Store | None = None, **overrides: Any) -> AsyncIterator[Hub]:
    settings = {"port": 0, "jwt_secret": SECRET, "jwt_audience": AUDIENCE, "jwt_issuer": ISSUER,
                "heartbeat_interval": 0.2, "shutdown_grace": 1.0, **overrides}
    async with HubServer(Settings(**settings), store=store or MemoryStore()) as server:
        seed = await server.store.create(
            NewUser.build("seed@example.com", "Seed", UserStatus.ACTIVE))
        # A channel of its own connections: a port reused from an earlier test's server
        # (still in its grace period) must never be reached through a shared subchannel.
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            yield Hub(server, channel, seed.user.id)


def _list(hub: Hub, md: Metadata) -> Awaitable[Any]:
    async def run() -> list[common_pb2.User]:
        return [u async for u in hub.users.ListUsers(pb.ListUsersRequest(), metadata=md,
                                                     timeout=5)]
    return run()


# One call of each unary-response method of UserService, on the hub's seed user.
CALLS: dict[str, Callable[[Hub, Metadata], Awaitable[Any]]] = {
    "GetUser": lambda hub, md: hub.users.GetUser(
        pb.GetUserRequest(user_id=hub.seed), metadata=md, timeout=5),
    "ListUsers": _list,
    "CreateUser": lambda hub, md: hub.users.CreateUser(
        pb.CreateUserRequest(email="new@example.com"), metadata=md, timeout=5),
    "UpdateUser": lambda hub, md: hub.users.UpdateUser(
        pb.UpdateUserRequest(user=common_pb2.User(id=hub.seed, name="Mallory"),
                             update_mask=field_mask_pb2.FieldMask(paths=["name"])),
        metadata=md, timeout=5),
    "DeleteUser": lambda hub, md: hub.users.DeleteUser(
        pb.DeleteUserRequest(user_id=hub.seed), metadata=md, timeout=5),
    "BulkCreateUsers": lambda hub, md: hub.users.BulkCreateUsers(
        iter([pb.CreateUserRequest(email="bulk@example.com")]), metadata=md, timeout=5),
    "ImportUsers": lambda hub, md: hub.users.ImportUsers(
        iter([pb.ImportUsersRequest(users=[pb.CreateUserRequest(email="imp@example.com")])]),
        metadata=md, timeout=5),
}


async def refused(hub: Hub, method: str, md: Metadata) -> grpc.aio.AioRpcError:
    """Calls `method`, which must fail and leave the store as it was."""
    before = await hub.state()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await CALLS[method](hub, md)
    assert await hub.state() == before
    return info.value


# -- bad credentials: UNAUTHENTICATED, nothing written ------------------------------------

BAD_CREDENTIALS: dict[str, Callable[[], Metadata]] = {
    "missing": lambda: (),
    "empty bearer": lambda: (("authorization", "Bearer "),),
    "malformed": lambda: (("authorization", "Bearer abc"),),
    "basic scheme": lambda: (("authorization", "Basic x"),),
    "valid token, basic scheme": lambda: (("authorization", f"Basic {mint()}"),),
    "expired": lambda: bearer(mint(ttl=-30)),
    "not yet valid": lambda: bearer(mint(nbf=int(time.time()) + 3600)),
    "other secret": lambda: bearer(mint(key=OTHER_SECRET)),
    "alg none": lambda: bearer(unsigned(claims())),
    "wrong audience": lambda: bearer(mint(aud="someone-else")),
    "no audience": lambda: bearer(mint(aud=None)),
    "wrong issuer": lambda: bearer(mint(iss="https://evil.example")),
    "no issuer": lambda: bearer(mint(iss=None)),
    "no exp": lambda: bearer(mint(exp=None)),
    "no sub": lambda: bearer(mint(sub=None)),
    "tampered scope": lambda: bearer(tampered(mint(READ), scope=ALL)),
    "tampered sub": lambda: bearer(tampered(mint(), sub="root")),
}


@pytest.mark.parametrize(
    "method", ["GetUser", "UpdateUser", "DeleteUser", "BulkCreateUsers", "ImportUsers"])
@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
async def test_bad_credentials_are_unauthenticated(case: str, method: str) -> None:
    async with serving() as hub:
        md = BAD_CREDENTIALS[case]()
        err = await refused(hub, method, md)
        assert err.code() == UNAUTHENTICATED, err.details()
        token = md[0][1].partition(" ")[2] if md else ""
        assert len(token) < 10 or token not in (err.details() or "")


async def test_alg_none_is_refused_even_with_every_scope_claimed() -> None:
    async with serving(public_methods="") as hub:
        for method in CALLS:
            err = await refused(hub, method, bearer(unsigned(claims(ALL))))
            assert err.code() == UNAUTHENTICATED, method


# -- scopes: PERMISSION_DENIED, distinct from UNAUTHENTICATED ------------------------------

METHOD_SCOPE = [("GetUser", READ), ("ListUsers", READ), ("CreateUser", WRITE),
                ("UpdateUser", WRITE), ("DeleteUser", WRITE), ("BulkCreateUsers", WRITE),
                ("ImportUsers", WRITE)]


@pytest.mark.parametrize(("method", "scope"), METHOD_SCOPE)
async def test_each_method_needs_its_scope(method: str, scope: str) -> None:
    async with serving(public_methods="") as hub:
        every_other = " ".join(s for s in ALL.split() if s != scope)
        err = await refused(hub, method, bearer(mint(every_other)))
        assert err.code() == PERMISSION_DENIED, err.details()
        assert scope in (err.details() or "")
        await CALLS[method](hub, bearer(mint(scope)))  # exactly that scope is enough


async def test_read_only_token_cannot_write(store: Store) -> None:
    async with serving(store) as hub:
        for method in ("UpdateUser", "DeleteUser", "BulkCreateUsers", "ImportUsers"):
            err = await refused(hub, method, bearer(mint(READ)))
            assert err.code() == PERMISSION_DENIED, method
        user = await CALLS["GetUser"](hub, bearer(mint(READ)))
        assert user.name == "Seed"


async def test_empty_scope_is_denied_not_unauthenticated() -> None:
    async with serving() as hub:
        err = await refused(hub, "GetUser", bearer(mint(scope=None)))
        assert err.code() == PERMISSION_DENIED


async def test_user_updates_needs_the_subscribe_scope() -> None:
    async with serving() as hub:
        denied = hub.users.UserUpdates(metadata=bearer(mint(f"{READ} {WRITE}")), timeout=10)
        assert await denied.code() == PERMISSION_DENIED
        # users:read as well: the snapshot shows records (tests/test_scopes.py).
        call = hub.users.UserUpdates(metadata=bearer(mint(f"{SUBSCRIBE} {READ}")), timeout=10)
        await call.write(pb.UserUpdateRequest(subscribe=common_pb2.Subscribe(snapshot=True)))
        with anyio.fail_after(5):
            assert (await call.read()).id == hub.seed
        call.cancel()


async def test_sync_needs_the_subscribe_scope() -> None:
    async with serving() as hub:
        denied = hub.sync.Sync(metadata=bearer(mint(f"{READ} {WRITE}")), timeout=10)
        assert await denied.code() == PERMISSION_DENIED
        # users:read as well: the snapshot shows records (tests/test_scopes.py).
        call = hub.sync.Sync(metadata=bearer(mint(f"{SUBSCRIBE} {READ}")), timeout=10)
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(snapshot=True)))
        with anyio.fail_after(5):
            assert [e.user.id for e in (await call.read()).events] == [hub.seed]
        call.cancel()


async def test_change_on_sync_without_write_scope_gets_permission_denied_result() -> None:
    async with serving() as hub:
        before = await hub.state()
        change = pb.UserChange(request_id="r1", delete=pb.DeleteUserRequest(user_id=hub.seed))
        call = hub.sync.Sync(metadata=bearer(mint(SUBSCRIBE)), timeout=10)
        await call.write(spb.SyncRequest(change=change))
        with anyio.fail_after(5):
            response = await call.read()
        assert [(r.request_id, r.code) for r in response.results] == [("r1", 7)]
        assert await hub.state() == before
        # The stream goes on; the same change with users:write on another stream is applied.
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe()))
        with anyio.fail_after(5):
            assert (await call.read()).resume_token  # a heartbeat: still open
        call.cancel()
        writer = hub.sync.Sync(metadata=bearer(mint(f"{SUBSCRIBE} {WRITE}")), timeout=10)
        await writer.write(spb.SyncRequest(change=change))
        with anyio.fail_after(5):
            response = await writer.read()
        assert [(r.request_id, r.code) for r in response.results] == [("r1", 0)]
        writer.cancel()


async def test_change_on_user_updates_without_write_scope_ends_the_stream() -> None:
    async with serving() as hub:
        before = await hub.state()
        call = hub.users.UserUpdates(metadata=bearer(mint(SUBSCRIBE)), timeout=10)
        await call.write(pb.UserUpdateRequest(change=pb.UserChange(
            update=pb.UpdateUserRequest(user=common_pb2.User(id=hub.seed, name="Mallory"),
                                        update_mask=field_mask_pb2.FieldMask(paths=["name"])))))
        with anyio.fail_after(5):
            assert await call.code() == PERMISSION_DENIED
        assert await hub.state() == before


# -- public methods, health, reflection ---------------------------------------------------


async def test_create_user_is_public_by_default() -> None:
    async with serving() as hub:
        user = await CALLS["CreateUser"](hub, ())
        assert (await hub.server.store.get(user.id)).email == "new@example.com"


async def test_a_forged_token_on_a_public_method_is_still_refused() -> None:
    async with serving() as hub:
        err = await refused(hub, "CreateUser", bearer(mint(key=OTHER_SECRET)))
        assert err.code() == UNAUTHENTICATED


async def test_no_public_methods_means_create_needs_a_token() -> None:
    async with serving(public_methods="") as hub:
        assert (await refused(hub, "CreateUser", ())).code() == UNAUTHENTICATED
        assert (await refused(hub, "CreateUser", bearer(mint(READ)))).code() == PERMISSION_DENIED
        await CALLS["CreateUser"](hub, bearer(mint(WRITE)))


@pytest.mark.parametrize("md", [(), (("authorization", "Bearer garbage"),)])
async def test_health_needs_no_token(md: Metadata) -> None:
    async with serving(public_methods="") as hub:
        health = health_pb2_grpc.HealthStub(hub.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), metadata=md, timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    reply = await call.read()
    call.cancel()
    return [s.name for s in reply.list_services_response.service]


async def test_reflection_needs_no_token() -> None:
    async with serving(public_methods="") as hub:
        assert "user.v1.UserService" in await list_services(hub.channel)


async def test_reflection_off_is_unimplemented() -> None:
    async with serving(reflection=False) as hub:
        # Nothing is written first: a request the client is still sending when the server
        # refuses the call can surface as the client's own INTERNAL ("execute_batch").
        call = reflection_pb2_grpc.ServerReflectionStub(hub.channel).ServerReflectionInfo(
            timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_unknown_method_stays_unimplemented() -> None:
    async with serving() as hub:
        nope = hub.channel.unary_unary("/user.v1.UserService/Nope")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await nope(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- token expiry on a stream ---------------------------------------------------------------


async def test_sync_stream_ends_unauthenticated_when_its_token_expires() -> None:
    async with serving() as hub:
        expires = int(time.time()) + 2
        call = hub.sync.Sync(metadata=bearer(mint(SUBSCRIBE, exp=expires)), timeout=15)
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe()))
        heartbeats = 0
        with anyio.fail_after(10), pytest.raises(grpc.aio.AioRpcError) as info:
            while True:
                response = await call.read()
                assert response.resume_token and not response.events
                heartbeats += 1
        assert info.value.code() == UNAUTHENTICATED
        assert time.time() >= expires - 0.05  # not before the token ran out
        assert heartbeats >= 2


async def test_user_updates_stream_ends_unauthenticated_when_its_token_expires() -> None:
    async with serving() as hub:
        expires = int(time.time()) + 2
        call = hub.users.UserUpdates(metadata=bearer(mint(SUBSCRIBE, exp=expires)), timeout=15)
        await call.write(pb.UserUpdateRequest(subscribe=common_pb2.Subscribe()))
        with anyio.fail_after(10):
            assert await call.code() == UNAUTHENTICATED
        assert time.time() >= expires - 0.05


async def test_change_after_token_expiry_is_refused_while_the_writer_is_stalled() -> None:
    async with serving() as hub:
        for i in range(2000):
            await hub.server.store.create(
                NewUser.build(f"u{i}@example.com", "x" * 200, UserStatus.ACTIVE))
        expires = int(time.time()) + 2
        token = mint(f"{SUBSCRIBE} {WRITE} {READ}", exp=expires)  # READ: for the snapshot
        # Without BDP probing the window stays at 64 KiB: a ~0.5 MB snapshot this client
        # never reads keeps the server's writer waiting in context.write.
        async with grpc.aio.insecure_channel(hub.target,
                                             options=[("grpc.http2.bdp_probe", 0)]) as channel:
            call = UserSyncServiceStub(channel).Sync(metadata=bearer(token), timeout=15)
            await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe(snapshot=True)))
            await anyio.sleep(expires - time.time() + 0.3)
            late = pb.UserChange(request_id="late",
                                 create=pb.CreateUserRequest(email="late@example.com"))
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.write(spb.SyncRequest(change=late))
            await anyio.sleep(0.5)
            emails = {u.email for u in await hub.server.store.list_after("", 10_000)}
            call.cancel()
        assert "late@example.com" not in emails, "a change was applied after its token expired"


# -- public keys: RS256 and ES256 -----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_public_key_tokens(tmp_path: Path, algorithm: str) -> None:
    key, pem = new_key(algorithm)
    other, _ = new_key(algorithm)
    (tmp_path / "jwt.pem").write_bytes(pem)
    async with serving(jwt_secret="", jwt_public_key=str(tmp_path / "jwt.pem")) as hub:
        user = await CALLS["GetUser"](hub, bearer(mint(key=key, algorithm=algorithm)))
        assert user.id == hub.seed
        for method in ("GetUser", "UpdateUser"):
            err = await refused(hub, method, bearer(mint(key=other, algorithm=algorithm)))
            assert err.code() == UNAUTHENTICATED, method
            err = await refused(hub, method, bearer(mint(key=SECRET)))  # HS256
            assert err.code() == UNAUTHENTICATED, method
            family = "ES256" if algorithm == "RS256" else "RS256"
            err = await refused(hub, method, bearer(mint(key=new_key(family)[0],
                                                         algorithm=family)))
            assert err.code() == UNAUTHENTICATED, method


@pytest.mark.parametrize("algorithms", ["", "RS256"])
async def test_hs256_signed_with_the_public_key_is_refused(tmp_path: Path, algorithms: str
                                                           ) -> None:
    _, pem = new_key("RS256")
    (tmp_path / "jwt.pem").write_bytes(pem)
    forged = hs256_signed_with(pem, claims(ALL))
    async with serving(jwt_secret="", jwt_public_key=str(tmp_path / "jwt.pem"),
                       jwt_algorithms=algorithms) as hub:
        for method in ("GetUser", "UpdateUser", "DeleteUser"):
            err = await refused(hub, method, bearer(forged))
            assert err.code() == UNAUTHENTICATED, method


def test_unsafe_verifier_configurations_are_refused(tmp_path: Path) -> None:
    _, pem = new_key("RS256")
    (tmp_path / "jwt.pem").write_bytes(pem)
    path = str(tmp_path / "jwt.pem")
    for unsafe in (
        {"jwt_public_key": path, "jwt_algorithms": "HS256"},  # the public key as HMAC secret
        {"jwt_public_key": path, "jwt_algorithms": "RS256,none"},
        {"jwt_secret": SECRET, "jwt_algorithms": "none"},
        {"jwt_secret": SECRET, "jwt_algorithms": "RS256"},
        {"jwt_secret": SECRET, "jwt_public_key": path},
    ):
        with pytest.raises(ValueError):
            TokenVerifier.from_settings(Settings(port=0, **unsafe))
    with pytest.raises(ValueError):
        TokenVerifier(SECRET, [])
    assert TokenVerifier.from_settings(Settings(port=0)) is None  # no key: auth off


# -- clients ----------------------------------------------------------------------------------


async def test_async_client_sends_its_token() -> None:
    async with serving() as hub:
        async with AsyncUserClient(hub.target, credentials=Credentials(token=mint())) as client:
            assert (await client.get_user(hub.seed)).email == "seed@example.com"
            assert (await client.update_user(hub.seed, name="Renamed")).name == "Renamed"
        before = await hub.state()
        async with AsyncUserClient(hub.target) as anonymous:
            with pytest.raises(ClientError) as info:
                await anonymous.get_user(hub.seed)
            assert info.value.code == UNAUTHENTICATED
            with pytest.raises(ClientError) as info:
                await anonymous.delete_user(hub.seed)
            assert info.value.code == UNAUTHENTICATED
        async with AsyncUserClient(hub.target,
                                   credentials=Credentials(token=mint(READ))) as reader:
            with pytest.raises(ClientError) as info:
                await reader.delete_user(hub.seed)
            assert info.value.code == PERMISSION_DENIED
        assert await hub.state() == before


async def test_sync_feed_sends_its_token() -> None:
    async with serving() as hub:
        feed = SyncFeed(hub.target, snapshot=True,  # a snapshot needs users:read too
                        credentials=Credentials(token=mint(f"{SUBSCRIBE} {READ}")))
        async with feed:
            with anyio.fail_after(10):
                async for item in feed:
                    assert isinstance(item, SyncBatch)
                    assert [e.user.id for e in item.events] == [hub.seed]
                    break
        with anyio.fail_after(10), pytest.raises(ClientError) as info:
            async with SyncFeed(hub.target) as anonymous:
                async for _ in anonymous:
                    pass
        assert info.value.code == UNAUTHENTICATED


def non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))  # no packet is sent: this only picks a route
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


async def test_token_is_not_sent_without_tls_to_a_non_loopback_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    caplog.set_level(logging.INFO, logger="hub.access")
    async with serving(host="0.0.0.0") as hub:
        before = await hub.state()
        target = f"{address}:{hub.server.port}"
        async with AsyncUserClient(target, credentials=Credentials(token=mint())) as client:
            with pytest.raises(ClientError) as info:
                await client.delete_user(hub.seed, timeout=3)
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED)
        assert await hub.state() == before
        assert "DeleteUser" not in caplog.text  # the call never reached the server
        async with AsyncUserClient(hub.target, credentials=Credentials(token=mint())) as client:
            await client.get_user(hub.seed)  # while loopback works
        assert "GetUser OK" in caplog.text


# -- the command line and the server process ------------------------------------------------


def hub_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    return subprocess.run([sys.executable, "-m", "hub", *args], env={**environ, **env},
                          capture_output=True, text=True, timeout=60, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"
    return result.stdout


def test_hub_token_mints_a_jwt_that_verifies() -> None:
    token = ok(hub_cli("token", "--secret", SECRET, "--sub", "alice", "--scope", READ,
                       "--ttl", "120")).strip()
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    body = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert (body["sub"], body["scope"]) == ("alice", READ)
    assert time.time() < body["exp"] <= time.time() + 121
    assert body["exp"] - body["iat"] == 120
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, OTHER_SECRET, algorithms=["HS256"])


def test_hub_token_needs_a_secret() -> None:
    result = hub_cli("token", "--sub", "alice")
    assert result.returncode == 2 and "secret" in result.stderr and not result.stdout


def test_cli_user_get_with_and_without_token(hub_process: Callable[..., HubProcess]) -> None:
    server = hub_process(HUB_JWT_SECRET=SECRET)
    target = ("user", "--target", server.target)
    created = json.loads(ok(hub_cli(*target, "create", "--email", "cli@example.com")))
    token = ok(hub_cli("token", "--secret", SECRET, "--sub", "alice", "--scope", READ)).strip()

    got = json.loads(ok(hub_cli(*target, "--token", token, "get", created["id"])))
    assert got["email"] == "cli@example.com"
    assert json.loads(ok(hub_cli(*target, "get", created["id"], HUB_TOKEN=token))) == got

    refused = hub_cli(*target, "get", created["id"])
    assert refused.returncode == 1 and not refused.stdout
    assert "UNAUTHENTICATED" in refused.stderr

    denied = hub_cli(*target, "--token", token, "delete", created["id"])
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    assert json.loads(ok(hub_cli(*target, "--token", token, "get", created["id"]))) == got


def test_server_log_never_contains_tokens(hub_process: Callable[..., HubProcess]) -> None:
    server = hub_process(HUB_JWT_SECRET=SECRET, HUB_LOG_LEVEL="DEBUG")
    good, reader = mint(), mint(READ)
    expired, forged = mint(ttl=-30), mint(key=OTHER_SECRET)
    with grpc.insecure_channel(server.target) as channel:
        users = UserServiceStub(channel)
        seed = users.CreateUser(pb.CreateUserRequest(email="log@example.com"), timeout=5)
        assert users.GetUser(pb.GetUserRequest(user_id=seed.id), metadata=bearer(good),
                             timeout=5).id == seed.id
        for token, want in ((reader, PERMISSION_DENIED), (expired, UNAUTHENTICATED),
                            (forged, UNAUTHENTICATED), ("not.a.jwt", UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as info:
                users.DeleteUser(pb.DeleteUserRequest(user_id=seed.id), metadata=bearer(token),
                                 timeout=5)
            assert info.value.code() == want
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=30)
    log = server.output()
    assert "GetUser OK" in log and "PERMISSION_DENIED" in log and "UNAUTHENTICATED" in log
    for token in (good, reader, expired, forged):
        signature = token.rsplit(".", 1)[1]
        assert token not in log and signature not in log
