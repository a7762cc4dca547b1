"""The store contract. Every write changes the record(s) and appends its event(s) atomically:
a change never exists without its event, nor an event without its change."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from hub.domain import (
    Event,
    EventBatch,
    Idempotency,
    NewUser,
    Position,
    StatePage,
    User,
    UserPatch,
)
from hub.errors import HubError, InvalidArgument

# A bulk row's outcome: its event on success, the refusal otherwise.
BulkResult = Event | HubError


def idempotency_reused() -> InvalidArgument:
    """A key already used, by the same principal within the window, for another request."""
    return InvalidArgument.of(
        "idempotency-key", "already used for a different request (within the idempotency"
        " window): a retry must repeat the request exactly; use a new key for a new write")


class Store(Protocol):
    """Raises hub.errors.* (NotFound, AlreadyExists, VersionConflict, StoreUnavailable).

    Idempotency: a write given an Idempotency whose key an earlier write already used returns
    that write's event (its user, version, offset and epoch) and writes nothing; with another
    fingerprint it raises InvalidArgument (field idempotency-key). The key is kept with the
    write, in the same atomic step, for the store's idempotency window. A create's user must
    live in its key's partition (domain.new_user_id_in).
    """

    partitions: int
    # How many times the store has seen its primary replaced (Sentinel): the history the
    # fan-out followed may not be the one there now.
    switchovers: int

    async def get(self, user_id: str) -> User: ...

    async def create(self, new: NewUser) -> Event: ...

    async def create_many(self, rows: Sequence[NewUser]) -> list[BulkResult]:
        """Creates rows in one atomic step; a refused row does not stop the others."""
        ...

    async def update(
        self, user_id: str, patch: UserPatch, expected_version: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Event: ...

    async def delete(
        self, user_id: str, expected_version: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Event: ...

    async def list_after(self, after_id: str, limit: int) -> list[User]:
        """Up to `limit` users with id > after_id, in id order."""
        ...

    async def history(self, partition: int, after_offset: int, limit: int) -> list[Event]:
        """Events of one partition with offset > after_offset, oldest first."""
        ...

    async def history_tagged(
        self, partition: int, after_offset: int, limit: int
    ) -> list[tuple[Event, str, str]]:
        """history(), each event with the tag of the write that made it and the tag of the
        write before that in its partition ("" where the store keeps none)."""
        ...

    async def state_since(
        self, partition: int, after_offset: int, cursor: int | None, limit: int
    ) -> StatePage | None:
        """Resync by state: the users of `partition` changed after `after_offset` (current
        state) and those deleted after it (tombstones), about `limit` per page, from `cursor`
        (None: the first page; then the page's cursor). None when the store cannot tell: a
        tombstone after `after_offset` was already dropped (--tombstone-retention), or change
        tracking began after it. A user changed while pages are read may appear twice (its
        versions tell), never not at all."""
        ...

    async def position(self) -> Position:
        """The epoch ("" before the first) and each partition's last offset (and, where the
        store keeps them, the tag of its last write). Never writes."""
        ...

    async def ensure_epoch(self) -> None:
        """Creates the epoch if there is none (at start-up)."""
        ...

    async def rotate_epoch(self, seen: str) -> str:
        """A new epoch if the current one is still `seen`; returns the current epoch."""
        ...

    def listen(self) -> AbstractAsyncContextManager[AsyncIterator[EventBatch]]:
        """Live events, in batches (one per write call and partition), from the moment the
        context is entered: nothing written after `__aenter__` returns is missed."""
        ...

    async def ping(self) -> None:
        """Returns when the store answers; raises StoreUnavailable otherwise."""
        ...

    async def aclose(self) -> None: ...
