"""The embedded store: one process, no Redis, the same semantics as the Redis store."""

from __future__ import annotations

import asyncio
import bisect
import secrets
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from hub.domain import (
    Event,
    EventBatch,
    EventType,
    NewUser,
    Position,
    User,
    UserPatch,
    email_key,
    now_us,
    partition_of,
    tombstone,
)
from hub.errors import AlreadyExists, NotFound, VersionConflict
from hub.store.base import BulkResult


class MemoryStore:
    """Keeps users, their email index and a bounded event history per partition in memory.

    Every method runs without awaiting between its reads and writes, so each write is atomic
    with respect to every other coroutine, as a Lua script is in Redis.
    """

    def __init__(
        self, partitions: int = 16, history_size: int = 10_000, history_max_age: float = 86_400.0
    ) -> None:
        self.partitions = partitions
        self.switchovers = 0  # one process's memory has no primary to lose
        self._users: dict[str, User] = {}
        self._hashes: dict[str, str] = {}
        self._emails: dict[str, str] = {}
        self._ids: list[str] = []  # sorted; ULIDs mostly arrive in order, so insort appends
        self._max_age_us = int(history_max_age * 1_000_000)
        self._epoch = secrets.token_hex(4)
        self._offsets = [0] * partitions
        self._history = [deque[Event](maxlen=history_size) for _ in range(partitions)]
        self._listeners: set[asyncio.Queue[EventBatch]] = set()

    async def get(self, user_id: str) -> User:
        try:
            return self._users[user_id]
        except KeyError:
            raise NotFound(user_id) from None

    def password_hash(self, user_id: str) -> str | None:
        return self._hashes.get(user_id)

    async def create(self, new: NewUser) -> Event:
        result = self._create(new)
        if isinstance(result, Exception):
            raise result
        self._publish([result])
        return result

    async def create_many(self, rows: Sequence[NewUser]) -> list[BulkResult]:
        results = [self._create(row) for row in rows]
        self._publish([r for r in results if isinstance(r, Event)])
        return results

    def _create(self, new: NewUser) -> BulkResult:
        user, key = new.user, email_key(new.user.email)
        if key in self._emails:
            return AlreadyExists("email", f"email {user.email} is already registered")
        self._users[user.id] = user
        self._emails[key] = user.id
        if new.password_hash:
            self._hashes[user.id] = new.password_hash
        bisect.insort(self._ids, user.id)
        return self._append(EventType.CREATED, user)

    async def update(
        self, user_id: str, patch: UserPatch, expected_version: int | None = None
    ) -> Event:
        current = self._current(user_id, expected_version)
        updated = patch.apply(current)
        old_key, new_key = email_key(current.email), email_key(updated.email)
        if new_key != old_key:
            if new_key in self._emails:
                raise AlreadyExists("email", f"email {updated.email} is already registered")
            del self._emails[old_key]
            self._emails[new_key] = user_id
        self._users[user_id] = updated
        event = self._append(EventType.UPDATED, updated)
        self._publish([event])
        return event

    async def delete(self, user_id: str, expected_version: int | None = None) -> Event:
        current = self._current(user_id, expected_version)
        del self._users[user_id]
        del self._emails[email_key(current.email)]
        self._hashes.pop(user_id, None)
        del self._ids[bisect.bisect_left(self._ids, user_id)]
        event = self._append(EventType.DELETED, tombstone(current))
        self._publish([event])
        return event

    def _current(self, user_id: str, expected_version: int | None) -> User:
        current = self._users.get(user_id)
        if current is None:
            raise NotFound(user_id)
        if expected_version is not None and current.version != expected_version:
            raise VersionConflict(user_id, expected_version, current.version)
        return current

    def _append(self, type_: EventType, user: User) -> Event:
        p = partition_of(user.id, self.partitions)
        self._offsets[p] += 1
        event = Event(type_, user, p, self._offsets[p], self._epoch, now_us())
        self._history[p].append(event)
        return event

    def _publish(self, events: list[Event]) -> None:
        if not events:
            return
        by_partition: dict[int, list[Event]] = {}
        for e in events:
            by_partition.setdefault(e.partition, []).append(e)
        for events in by_partition.values():
            batch = EventBatch.of(events)
            for queue in self._listeners:
                queue.put_nowait(batch)

    async def list_after(self, after_id: str, limit: int) -> list[User]:
        start = bisect.bisect_right(self._ids, after_id)
        return [self._users[i] for i in self._ids[start : start + limit]]

    async def history(self, partition: int, after_offset: int, limit: int) -> list[Event]:
        log = self._history[partition]
        cutoff = now_us() - self._max_age_us
        while log and log[0].ts < cutoff:
            log.popleft()
        if not log:
            return []
        # Offsets in one partition's log are consecutive, so the index is arithmetic.
        start = max(0, after_offset + 1 - log[0].offset)
        return [log[i] for i in range(start, min(len(log), start + limit))]

    async def history_tagged(
        self, partition: int, after_offset: int, limit: int
    ) -> list[tuple[Event, str, str]]:
        # One process's memory cannot come back with older data: nothing to tell apart.
        return [(e, "", "") for e in await self.history(partition, after_offset, limit)]

    async def position(self) -> Position:
        return Position(self._epoch, tuple(self._offsets))

    async def ensure_epoch(self) -> None:
        return None

    async def rotate_epoch(self, seen: str) -> str:
        if seen == self._epoch:
            self._epoch = secrets.token_hex(4)
        return self._epoch

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[AsyncIterator[EventBatch]]:
        queue: asyncio.Queue[EventBatch] = asyncio.Queue()
        self._listeners.add(queue)

        async def batches() -> AsyncIterator[EventBatch]:
            while True:
                yield await queue.get()

        try:
            yield batches()
        finally:
            self._listeners.discard(queue)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._listeners.clear()
