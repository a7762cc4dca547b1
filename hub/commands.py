"""Validated writes on domain values: what the unary RPCs, bulk streams and streamed changes
share. The gRPC edge (hub.rpc.wire) turns request messages into these commands; nothing here
knows protobuf.

    commands = Commands(store, PasswordHashing())
    event = await commands.create(Create("ada@example.com", "Ada"))
    await commands.update(Update(event.user.id, ("name",), name="Ada L."))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from hub import errors, metrics
from hub.domain import Event, Idempotency, NewUser, UserPatch, UserStatus
from hub.passwords import PasswordHashing
from hub.principal import WRITE, caller
from hub.ratelimit import RateLimiter
from hub.store.base import Store
from hub.validation import (
    MASKABLE,
    check,
    email_violation,
    mask_violations,
    name_violation,
    password_violation,
    status_violation,
    user_id_violation,
    version_violation,
)


@dataclass(frozen=True, slots=True)
class Create:
    email: str
    name: str = ""
    password: str = ""
    status: int = UserStatus.UNSPECIFIED  # UNSPECIFIED: ACTIVE
    idempotency_key: str = ""  # the client's (request metadata idempotency-key); "": none


@dataclass(frozen=True, slots=True)
class Update:
    """Sets the fields named in `paths` (a subset of MASKABLE) to the values given here."""

    user_id: str
    paths: tuple[str, ...]
    email: str = ""
    name: str = ""
    status: int = UserStatus.UNSPECIFIED
    expected_version: int | None = None
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class Delete:
    user_id: str
    expected_version: int | None = None
    idempotency_key: str = ""


Change = Create | Update | Delete


class Commands:
    """Validated writes: every field rule is checked (all violations at once) before the
    store is asked, and every write is charged to the caller's rate limit."""

    def __init__(
        self, store: Store, hashing: PasswordHashing, limiter: RateLimiter | None = None
    ) -> None:
        self.store = store
        self._hashing = hashing
        self.limiter = limiter or RateLimiter(0, 1)

    def charge(self, rows: int = 1) -> None:
        """Spends the caller's write tokens (RateLimited when the bucket is empty)."""
        try:
            self.limiter.take(caller().subject, rows)
        except errors.RateLimited:
            metrics.RATE_LIMITED.inc()
            raise

    async def new_user(self, create: Create) -> NewUser:
        _check_new(create)
        idem = self._idempotency(create.idempotency_key, "", create.email, create.name,
                                 create.password, create.status)
        pw_hash = await self._hashing.hash(create.password) if create.password else None
        return NewUser.build(create.email, create.name, UserStatus(create.status), pw_hash,
                             idem, self.store.partitions)

    def new_user_without_password(self, create: Create) -> NewUser:
        """new_user for a row that has no password to hash, without a coroutine per row:
        the bulk paths take this for most rows."""
        assert not create.password
        _check_new(create)
        idem = self._idempotency(create.idempotency_key, "", create.email, create.name, "",
                                 create.status)
        return NewUser.build(create.email, create.name, UserStatus(create.status), None,
                             idem, self.store.partitions)

    @staticmethod
    def _idempotency(key: str, target: str, *request: object) -> Idempotency | None:
        """The store's form of a client's idempotency key: named by the principal, the
        write's target and the key (principals never share keys; an update's key is the
        user's), fingerprinted by the request, so a retry is told from a reuse."""
        if not key:
            return None
        check(idempotency_key_violation(key))
        name = hashlib.sha256(
            "\0".join((caller().subject, target, key)).encode()).hexdigest()[:32]
        # Salted with the name: a fingerprint says nothing of a password outside its key.
        fingerprint = hashlib.sha256(repr((name, *request)).encode()).hexdigest()[:32]
        return Idempotency(name, fingerprint)

    async def create(self, create: Create) -> Event:
        new = await self.new_user(create)
        self.charge()
        return await self.store.create(new)

    async def update(self, update: Update) -> Event:
        paths = update.paths
        check(
            user_id_violation(update.user_id, "user.id"),
            *mask_violations(paths),
            email_violation(update.email, "user.email") if "email" in paths else None,
            name_violation(update.name, "user.name") if "name" in paths else None,
            status_violation(update.status, "user.status", allow_unspecified=False)
            if "status" in paths else None,
            version_violation(update.expected_version),
        )
        patch = UserPatch(
            email=update.email if "email" in paths else None,
            name=update.name if "name" in paths else None,
            status=UserStatus(update.status) if "status" in paths else None,
        )
        idem = self._idempotency(update.idempotency_key, update.user_id, "update", paths,
                                 patch, update.expected_version)
        self.charge()
        return await self.store.update(update.user_id, patch, update.expected_version, idem)

    async def delete(self, delete: Delete) -> Event:
        check(user_id_violation(delete.user_id), version_violation(delete.expected_version))
        idem = self._idempotency(delete.idempotency_key, delete.user_id, "delete",
                                 delete.expected_version)
        self.charge()
        return await self.store.delete(delete.user_id, delete.expected_version, idem)

    async def apply(self, change: Change) -> Event:
        """A change sent on a stream, applied exactly like the unary RPC of its kind (and
        needing the users:write scope, as those do)."""
        principal = caller()
        principal.require(WRITE)
        # A stream outlives its token's checks at the door: each change checks it again.
        principal.require_fresh()
        if isinstance(change, Create):
            return await self.create(change)
        if isinstance(change, Update):
            return await self.update(change)
        return await self.delete(change)


# Long enough for a UUID, a hash or "import-<digest>/<row>"; what a key may hold, printable
# ASCII, is what metadata carries anyway.
_MAX_IDEMPOTENCY_KEY = 255


def idempotency_key_violation(key: str) -> errors.FieldViolation | None:
    if len(key) > _MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        return errors.FieldViolation(
            "idempotency-key", f"must be 1-{_MAX_IDEMPOTENCY_KEY} printable ASCII characters")
    return None


def _check_new(create: Create) -> None:
    check(
        email_violation(create.email),
        name_violation(create.name),
        password_violation(create.password),
        status_violation(create.status),
    )


__all__ = ["MASKABLE", "Change", "Commands", "Create", "Delete", "Update"]
