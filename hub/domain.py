"""Users, changes and events: plain values shared by the stores, the service and the fan-out."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, replace
from enum import IntEnum

from ulid import ULID


class UserStatus(IntEnum):
    # Values mirror user.v1.UserStatus so the service can convert by number.
    UNSPECIFIED = 0
    ACTIVE = 1
    INACTIVE = 2


class EventType(IntEnum):
    CREATED = 1
    UPDATED = 2
    DELETED = 3


def now_us() -> int:
    """Wall-clock microseconds: timestamps are stored as integers so msgpack and Lua keep them."""
    return time.time_ns() // 1000


def new_user_id() -> str:
    """A ULID: unique across instances and lexicographically ordered by creation time."""
    return str(ULID())


def partition_of(user_id: str, partitions: int) -> int:
    """The event partition of a user: all of one user's events share one ordered partition."""
    return zlib.crc32(user_id.encode()) % partitions


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    name: str
    status: UserStatus
    created_at: int  # microseconds since the epoch
    updated_at: int
    version: int


@dataclass(frozen=True, slots=True)
class NewUser:
    """A user to create, with the password already hashed (never the password itself)."""

    user: User
    password_hash: str | None = None

    @classmethod
    def build(
        cls, email: str, name: str, status: UserStatus, password_hash: str | None = None
    ) -> NewUser:
        ts = now_us()
        status = status or UserStatus.ACTIVE
        return cls(User(new_user_id(), email, name, status, ts, ts, 1), password_hash)


@dataclass(frozen=True, slots=True)
class UserPatch:
    """The fields an update sets; None leaves a field as it is."""

    email: str | None = None
    name: str | None = None
    status: UserStatus | None = None

    def apply(self, user: User) -> User:
        return replace(
            user,
            email=user.email if self.email is None else self.email,
            name=user.name if self.name is None else self.name,
            status=user.status if self.status is None else self.status,
            updated_at=max(now_us(), user.updated_at),
            version=user.version + 1,
        )


def tombstone(user: User) -> User:
    """The user as its deletion event carries it: one version past the last."""
    return replace(user, updated_at=max(now_us(), user.updated_at), version=user.version + 1)


def email_key(email: str) -> str:
    """Emails are unique case-insensitively; the index is keyed by this form."""
    return email.casefold()


@dataclass(frozen=True, slots=True)
class Event:
    """One change, at its position: `offset` in `partition` of history `epoch`."""

    type: EventType
    user: User
    partition: int
    offset: int
    epoch: str
    ts: int  # when the write was made (microseconds), for delivery-latency measurements


@dataclass(frozen=True, slots=True)
class Position:
    """Where the history stands: the epoch and the last offset of every partition."""

    epoch: str
    offsets: tuple[int, ...]
