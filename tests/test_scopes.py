"""Scopes beyond the method: a snapshot inside Sync/UserUpdates needs users:read (it is every
followed user's record), while live events need only users:subscribe; and a token's time
claims must be JSON numbers, not numeric strings."""

from __future__ import annotations

import time
from typing import Any

import anyio
import grpc
import jwt
import pytest

from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.principal import READ, SUBSCRIBE, WRITE
from tests.test_auth import (
    PERMISSION_DENIED,
    SECRET,
    UNAUTHENTICATED,
    Hub,
    bearer,
    claims,
    mint,
    serving,
)

pytestmark = pytest.mark.anyio


def open_stream(hub: Hub, batched: bool, token: str) -> Any:
    if batched:
        return hub.sync.Sync(metadata=bearer(token), timeout=10)
    return hub.users.UserUpdates(metadata=bearer(token), timeout=10)


def subscribe(batched: bool, **fields: Any) -> Any:
    request = common_pb2.Subscribe(**fields)
    return spb.SyncRequest(subscribe=request) if batched else pb.UserUpdateRequest(
        subscribe=request)


async def read_error(call: Any) -> grpc.aio.AioRpcError:
    """Reads the stream to its end, which must be an error status; nothing may come first."""
    with anyio.fail_after(5), pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            response = await call.read()
            assert response is not grpc.aio.EOF, "the stream ended OK"
            assert not getattr(response, "events", None), "a record was sent"
            assert not getattr(response, "id", None), "a record was sent"
    return info.value


STREAMS = pytest.mark.parametrize("batched", [True, False], ids=["Sync", "UserUpdates"])


# -- snapshots need users:read --------------------------------------------------------------


@STREAMS
@pytest.mark.parametrize("named", [False, True], ids=["everyone", "named"])
async def test_a_snapshot_without_users_read_is_permission_denied(
    batched: bool, named: bool
) -> None:
    async with serving() as hub:
        ids = [hub.seed] if named else []
        call = open_stream(hub, batched, mint(f"{SUBSCRIBE} {WRITE}"))
        await call.write(subscribe(batched, user_ids=ids, snapshot=True))
        err = await read_error(call)
        assert err.code() == PERMISSION_DENIED
        assert READ in (err.details() or "") and "snapshot" in (err.details() or "")


@STREAMS
async def test_a_later_snapshot_without_users_read_is_refused_too(batched: bool) -> None:
    async with serving() as hub:
        call = open_stream(hub, batched, mint(SUBSCRIBE))
        await call.write(subscribe(batched))
        if batched:
            with anyio.fail_after(5):
                assert (await call.read()).resume_token  # a heartbeat: subscribed
        await call.write(subscribe(batched, user_ids=[hub.seed], snapshot=True))
        err = await read_error(call)
        assert err.code() == PERMISSION_DENIED


@STREAMS
async def test_live_events_need_only_users_subscribe(batched: bool) -> None:
    async with serving() as hub:
        call = open_stream(hub, batched, mint(SUBSCRIBE))
        await call.write(subscribe(batched))
        if batched:
            with anyio.fail_after(5):
                assert (await call.read()).resume_token  # subscribed before the write below
        else:
            await anyio.sleep(0.3)
        user = await hub.users.CreateUser(pb.CreateUserRequest(email="live@example.com"),
                                          metadata=bearer(mint(WRITE)), timeout=5)
        with anyio.fail_after(5):
            while True:
                response = await call.read()
                emails = ([e.user.email for e in response.events] if batched
                          else [response.email])
                if emails:
                    break
        assert emails == ["live@example.com"]
        call.cancel()
        assert user.email == "live@example.com"


@STREAMS
async def test_a_snapshot_with_users_read_and_subscribe_is_served(batched: bool) -> None:
    async with serving() as hub:
        call = open_stream(hub, batched, mint(f"{SUBSCRIBE} {READ}"))
        await call.write(subscribe(batched, snapshot=True))
        with anyio.fail_after(5):
            response = await call.read()
        ids = [e.user.id for e in response.events] if batched else [response.id]
        assert ids == [hub.seed]
        call.cancel()


# -- time claims must be numbers ------------------------------------------------------------


def signed(**changes: Any) -> str:
    """A validly signed token whose claims carry `changes` exactly as given (types kept)."""
    return jwt.encode(claims(**changes), SECRET, algorithm="HS256")


NOW = int(time.time())


@pytest.mark.parametrize(("claim", "value"), [
    ("exp", "9999999999"),
    ("exp", str(NOW + 3600)),
    ("exp", True),
    ("iat", str(NOW)),
    ("iat", False),
    ("nbf", str(NOW - 10)),
    ("nbf", True),
], ids=["exp far string", "exp string", "exp bool", "iat string", "iat bool",
        "nbf string", "nbf bool"])
async def test_a_time_claim_that_is_not_a_number_is_unauthenticated(
    claim: str, value: Any
) -> None:
    async with serving() as hub:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await hub.users.GetUser(pb.GetUserRequest(user_id=hub.seed),
                                    metadata=bearer(signed(**{claim: value})), timeout=5)
        assert info.value.code() == UNAUTHENTICATED
        assert info.value.details() == f"invalid token: {claim} must be a number" or (
            # PyJWT's own checks come first: a boolean exp of true (1) has long expired.
            (claim, value) == ("exp", True) and info.value.details() == "token expired")


async def test_numeric_time_claims_including_fractions_are_accepted() -> None:
    async with serving() as hub:
        token = signed(exp=time.time() + 60.5, iat=time.time() - 1.25, nbf=NOW - 5)
        user = await hub.users.GetUser(pb.GetUserRequest(user_id=hub.seed),
                                       metadata=bearer(token), timeout=5)
        assert user.id == hub.seed
