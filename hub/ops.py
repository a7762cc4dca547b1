"""Validated writes from request messages: shared by the unary RPCs and streamed changes."""

from __future__ import annotations

import time

from hub import errors
from hub.api.user.v1 import user_service_pb2
from hub.domain import Event, NewUser, UserPatch, UserStatus
from hub.passwords import PasswordHashing
from hub.principal import WRITE, caller
from hub.ratelimit import RateLimiter
from hub.store.base import Store
from hub.validation import (
    check,
    email_violation,
    name_violation,
    password_violation,
    status_violation,
    user_id_violation,
)

_MASKABLE = ("email", "name", "status")


class UserOps:
    """Validated writes from request messages: what the unary RPCs and streamed changes share."""

    def __init__(
        self, store: Store, hashing: PasswordHashing, limiter: RateLimiter | None = None
    ) -> None:
        self.store = store
        self._hashing = hashing
        self.limiter = limiter or RateLimiter(0, 1)

    def charge(self, rows: int = 1) -> None:
        """Spends the caller's write tokens (RateLimited when the bucket is empty)."""
        self.limiter.take(caller().subject, rows)

    async def new_user(self, request: user_service_pb2.CreateUserRequest) -> NewUser:
        _check_new(request)
        pw_hash = await self._hashing.hash(request.password) if request.password else None
        return NewUser.build(request.email, request.name, UserStatus(request.status), pw_hash)

    @staticmethod
    def new_user_without_password(request: user_service_pb2.CreateUserRequest) -> NewUser:
        """new_user for a row that has no password to hash, without a coroutine per row:
        the bulk paths take this for most rows."""
        assert not request.password
        _check_new(request)
        return NewUser.build(request.email, request.name, UserStatus(request.status))

    async def create(self, request: user_service_pb2.CreateUserRequest) -> Event:
        new = await self.new_user(request)
        self.charge()
        return await self.store.create(new)

    async def update(self, request: user_service_pb2.UpdateUserRequest) -> Event:
        user = request.user
        paths = list(request.update_mask.paths)
        if paths == ["*"]:
            paths = list(_MASKABLE)
        elif not paths:  # AIP-134: no mask means every field the request sets
            paths = [p for p in _MASKABLE if getattr(user, p)]
        unknown = [p for p in paths if p not in _MASKABLE]
        expected = request.expected_version if request.HasField("expected_version") else None
        check(
            user_id_violation(user.id, "user.id"),
            errors.FieldViolation(
                "update_mask.paths", f"unknown path(s) {unknown}; allowed: {list(_MASKABLE)}"
            ) if unknown else None,
            errors.FieldViolation("update_mask", "names no field to update")
            if not paths else None,
            email_violation(user.email, "user.email") if "email" in paths else None,
            name_violation(user.name, "user.name") if "name" in paths else None,
            status_violation(user.status, "user.status", allow_unspecified=False)
            if "status" in paths else None,
            _version_violation(expected),
        )
        patch = UserPatch(
            email=user.email if "email" in paths else None,
            name=user.name if "name" in paths else None,
            status=UserStatus(user.status) if "status" in paths else None,
        )
        self.charge()
        return await self.store.update(user.id, patch, expected)

    async def delete(self, request: user_service_pb2.DeleteUserRequest) -> Event:
        expected = request.expected_version if request.HasField("expected_version") else None
        check(user_id_violation(request.user_id), _version_violation(expected))
        self.charge()
        return await self.store.delete(request.user_id, expected)

    async def apply(self, change: user_service_pb2.UserChange) -> Event:
        """A change sent on a stream, applied exactly like the unary RPC of its kind (and
        needing the users:write scope, as those do)."""
        principal = caller()
        principal.require(WRITE)
        # A stream outlives its token's checks at the door: each change checks it again.
        if time.time() >= principal.expires_at:
            raise errors.Unauthenticated("token expired")
        kind = change.WhichOneof("change")
        if kind == "create":
            return await self.create(change.create)
        if kind == "update":
            return await self.update(change.update)
        if kind == "delete":
            return await self.delete(change.delete)
        raise errors.InvalidArgument.of("change", "names no create, update or delete")


def _check_new(request: user_service_pb2.CreateUserRequest) -> None:
    check(
        email_violation(request.email),
        name_violation(request.name),
        password_violation(request.password),
        status_violation(request.status),
    )


def _version_violation(expected: int | None) -> errors.FieldViolation | None:
    if expected is not None and expected < 1:
        return errors.FieldViolation("expected_version", "must be at least 1")
    return None
