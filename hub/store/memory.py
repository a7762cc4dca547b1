"""The embedded store: one process, no Redis, the same semantics as the Redis store."""

from __future__ import annotations

import asyncio
import bisect
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from hub.domain import (
    Event,
    EventBatch,
    EventType,
    Idempotency,
    NewUser,
    Position,
    StatePage,
    User,
    UserPatch,
    email_key,
    now_us,
    partition_of,
    tombstone,
)
from hub.errors import AlreadyExists, InvalidArgument, NotFound, VersionConflict
from hub.store.base import BulkResult, idempotency_reused


class MemoryStore:
    """Keeps users, their email index and a bounded event history per partition in memory.

    Every method runs without awaiting between its reads and writes, so each write is atomic
    with respect to every other coroutine, as a Lua script is in Redis.
    """

    def __init__(
        self, partitions: int = 16, history_size: int = 10_000, history_max_age: float = 86_400.0,
        tombstone_retention: float = 7 * 86_400.0, idempotency_window: float = 86_400.0,
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
        # Resync by state: per partition, each live user's last-change offset and each
        # deleted user's tombstone (offset, the user as deleted), and the offset up to which
        # tombstones may have been dropped (a resync from before it is refused).
        self._changed: list[dict[str, int]] = [{} for _ in range(partitions)]
        self._dead: list[dict[str, tuple[int, User]]] = [{} for _ in range(partitions)]
        self._floor = [0] * partitions
        self._retention_us = int(tombstone_retention * 1_000_000)
        # Idempotency keys: key -> (fingerprint, the write's event, expiry in monotonic s).
        self._idem: dict[str, tuple[str, Event, float]] = {}
        self._idem_window = idempotency_window

    def _replayed(self, idem: Idempotency | None) -> Event | None:
        """The event of the write that already used `idem`'s key, if one did (in the window)."""
        if idem is None:
            return None
        found = self._idem.get(idem.key)
        if found is None:
            return None
        fingerprint, event, expires = found
        if expires <= time.monotonic():
            del self._idem[idem.key]
            return None
        if fingerprint != idem.fingerprint:
            raise idempotency_reused()
        return event

    def _remember(self, idem: Idempotency | None, event: Event) -> None:
        if idem is not None:
            self._idem[idem.key] = (idem.fingerprint, event, time.monotonic() + self._idem_window)

    async def get(self, user_id: str) -> User:
        try:
            return self._users[user_id]
        except KeyError:
            raise NotFound(user_id) from None

    def password_hash(self, user_id: str) -> str | None:
        return self._hashes.get(user_id)

    async def create(self, new: NewUser) -> Event:
        (result,) = await self.create_many([new])
        if isinstance(result, Exception):
            raise result
        return result

    async def create_many(self, rows: Sequence[NewUser]) -> list[BulkResult]:
        results: list[BulkResult] = []
        fresh: list[Event] = []
        for row in rows:
            try:
                replayed = self._replayed(row.idempotency)
            except InvalidArgument as exc:
                results.append(exc)
                continue
            if replayed is not None:
                results.append(replayed)
                continue
            result = self._create(row)
            if isinstance(result, Event):
                self._remember(row.idempotency, result)
                fresh.append(result)
            results.append(result)
        self._publish(fresh)
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
        self, user_id: str, patch: UserPatch, expected_version: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Event:
        replayed = self._replayed(idempotency)
        if replayed is not None:
            return replayed
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
        self._remember(idempotency, event)
        self._publish([event])
        return event

    async def delete(
        self, user_id: str, expected_version: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Event:
        replayed = self._replayed(idempotency)
        if replayed is not None:
            return replayed
        current = self._current(user_id, expected_version)
        del self._users[user_id]
        del self._emails[email_key(current.email)]
        self._hashes.pop(user_id, None)
        del self._ids[bisect.bisect_left(self._ids, user_id)]
        event = self._append(EventType.DELETED, tombstone(current))
        self._remember(idempotency, event)
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
        if type_ is EventType.DELETED:
            self._changed[p].pop(user.id, None)
            self._dead[p][user.id] = (event.offset, user)
        else:
            self._changed[p][user.id] = event.offset
        return event

    def _drop_old_tombstones(self, p: int) -> None:
        dead, cutoff = self._dead[p], now_us() - self._retention_us
        # Insertion order is offset order: the oldest come first.
        for user_id, (offset, user) in list(dead.items()):
            if user.updated_at >= cutoff:
                break
            del dead[user_id]
            self._floor[p] = max(self._floor[p], offset)

    async def state_since(
        self, partition: int, after_offset: int, cursor: int | None, limit: int
    ) -> StatePage | None:
        self._drop_old_tombstones(partition)
        if after_offset < self._floor[partition]:
            return None
        start = after_offset if cursor is None else max(cursor, after_offset)
        entries = sorted(
            [(o, u, False) for u, o in self._changed[partition].items() if o > start]
            + [(o, u, True) for u, (o, _) in self._dead[partition].items() if o > start])
        page = entries[:limit]
        users = [self._users[u] for _, u, dead in page if not dead]
        deleted = [self._dead[partition][u][1] for _, u, dead in page if dead]
        more = len(entries) > limit
        return StatePage(self._epoch, users, deleted, page[-1][0] if more else None)

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
