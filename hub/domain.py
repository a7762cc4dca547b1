"""Users, changes and events: plain values shared by the stores, the service and the fan-out."""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import IntEnum

# ULID text: 48 bits of milliseconds then 80 random bits, in Crockford's base32.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # every 10-bit value, as 2 characters
_last_ms, _last_random, _prefix = -1, 0, ""


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
    """A ULID: unique across instances and lexicographically ordered by creation time.

    Monotonic within a process, as the ULID spec describes: in the same millisecond the random
    part counts up from the previous one, so ids made one after another sort in that order.
    Made here rather than by python-ulid, which takes three times as long: bulk imports make
    tens of thousands a second, and the time prefix only changes once a millisecond.
    """
    global _last_ms, _last_random, _prefix
    ms = time.time_ns() // 1_000_000
    if ms > _last_ms:
        _last_ms, _last_random = ms, int.from_bytes(os.urandom(10), "big")
        _prefix = _time_prefix(ms)
    else:
        # Same millisecond, or the clock stepped back: count on from the last id.
        _last_random += 1
        if _last_random >> 80:  # 2^80 ids in one millisecond: move to the next one
            _last_ms, _last_random = _last_ms + 1, 0
            _prefix = _time_prefix(_last_ms)
    r, p = _last_random, _PAIRS
    return (_prefix + p[r >> 70] + p[(r >> 60) & 1023] + p[(r >> 50) & 1023]
            + p[(r >> 40) & 1023] + p[(r >> 30) & 1023] + p[(r >> 20) & 1023]
            + p[(r >> 10) & 1023] + p[r & 1023])


def new_user_id_in(partition: int, partitions: int) -> str:
    """A new ULID whose partition is `partition`: a create with an idempotency key is written
    with its key in one atomic call, so on Redis Cluster both must live on one partition.
    About `partitions` tries (each a counter step and a crc32)."""
    while True:
        candidate = new_user_id()
        if partition_of(candidate, partitions) == partition:
            return candidate


def _time_prefix(ms: int) -> str:
    """A ULID's first 10 characters: the 48-bit millisecond time."""
    return "".join([_CROCKFORD[(ms >> s) & 31] for s in range(45, -1, -5)])


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
class Idempotency:
    """A write's idempotency key as the store keeps it. `key` names it: a digest of the
    principal, the write's target (creates: none; updates and deletes: the user id) and the
    client's key, so principals never share keys. `fingerprint` is a digest of the request it
    was first used with: a retry must carry the same one."""

    key: str
    fingerprint: str

    def partition(self, partitions: int) -> int:
        """Where a create's key is kept (and so where its user must live: one atomic write)."""
        return zlib.crc32(self.key.encode()) % partitions


@dataclass(frozen=True, slots=True)
class NewUser:
    """A user to create, with the password already hashed (never the password itself)."""

    user: User
    password_hash: str | None = None
    idempotency: Idempotency | None = None

    @classmethod
    def build(
        cls, email: str, name: str, status: UserStatus, password_hash: str | None = None,
        idempotency: Idempotency | None = None, partitions: int = 0,
    ) -> NewUser:
        """With `idempotency`, the id is made in the key's partition (of `partitions`)."""
        ts = now_us()
        status = status or UserStatus.ACTIVE
        user_id = (new_user_id() if idempotency is None
                   else new_user_id_in(idempotency.partition(partitions), partitions))
        return cls(User(user_id, email, name, status, ts, ts, 1), password_hash, idempotency)


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
class StatePage:
    """A page of one partition's state changes since an offset (a resync by state): the users
    changed since, at their current state, and tombstones (the user as its deletion event
    carried it) of the users deleted since, both in the order of their last change. `cursor`
    continues the read (None: done)."""

    epoch: str
    users: list[User]
    deleted: list[User]
    cursor: int | None


@dataclass(frozen=True, slots=True)
class Position:
    """Where the history stands: the epoch and the last offset of every partition.

    `tags`, when the store knows them, name the write that made each partition's last offset
    (see hub.store.redis): the same offsets with other tags are another history."""

    epoch: str
    offsets: tuple[int, ...]
    tags: tuple[str, ...] = field(default=(), compare=False)


class EventBatch:
    """One write's events in one partition, as the bus delivers them. Where they sit is known
    at once; the events are decoded only when asked for, so a process whose subscribers want
    none of them pays nothing for them."""

    __slots__ = ("_decode", "_events", "count", "epoch", "first_offset", "partition",
                 "prev_tag", "tag")

    def __init__(
        self, epoch: str, partition: int, first_offset: int, count: int,
        decode: Callable[[], list[Event]], prev_tag: str = "", tag: str = "",
    ) -> None:
        self.epoch, self.partition = epoch, partition
        self.first_offset, self.count = first_offset, count
        # The write's tag, and the tag of the write before it in this partition ("" where the
        # store has none): a listener checks the batch continues what it has.
        self.prev_tag, self.tag = prev_tag, tag
        self._decode = decode
        self._events: list[Event] | None = None

    @classmethod
    def of(cls, events: list[Event]) -> EventBatch:
        first = events[0]
        return cls(first.epoch, first.partition, first.offset, len(events), lambda: events)

    @property
    def last_offset(self) -> int:
        return self.first_offset + self.count - 1

    def events(self) -> list[Event]:
        if self._events is None:
            self._events = self._decode()
        return self._events
