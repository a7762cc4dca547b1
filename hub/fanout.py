"""Fan-out: one per process, from the store's event bus to every local subscription.

    fanout = Fanout(store, encode, Limits())
    async with asyncio.TaskGroup() as tg:
        tg.create_task(fanout.run())            # the one listener (and its auditor)
        async with fanout.subscribe(users=None) as sub:   # all users, live from now
            await sub.wait()                    # events arrived (or sub.wake() was called)
            items, position = sub.drain()       # raises the error that ended it, if any

One store subscription per process, never one per client. Each event is decoded once (by the
store) and encoded once (by `encode`, which the gRPC layer supplies, so this module knows no
protobuf), then pushed to the bounded buffer of every matching subscription.

Positions: the engine keeps, per partition, the offset of the last event it routed; offsets
are consecutive, so a batch whose first offset is not the next one reveals a gap (a pub/sub
message lost while the connection was down, Redis dropping a slow subscriber connection, ...),
which is repaired from the history before anything later is routed. An auditor re-reads the
store's positions every second, so a loss at the tail (with no later event to reveal it) is
repaired too. A subscriber's resume token is the engine's position at the moment its buffer
is drained: every matching event up to it has been handed over, none after it.

Slow subscribers catch up in the server instead of being cut. A subscription whose buffer
passes its bound (Limits: events or bytes) drops its buffer and is marked `lagging`: the engine
stops pushing to it, so it holds no events however far behind it falls, and nobody else waits
for it. It keeps `given`, the position its stream has been handed everything up to (its last
drain), and every event dropped is after it. The stream's writer then reads the history from
there at its client's pace (`replay`: chunks shared with every reader at nearby positions, see
hub.replay), to a target that moves with the engine, and once it is close (within half the
event bound) it rejoins: `rejoin` puts it back on the live feed at the engine's position P (its
new origin), synchronously, so every event after P is pushed to it and none before, and the
writer replays from where it stands to P, exactly as a resume does. No gap, no duplicate; if it
falls behind again meanwhile, it goes round again from P. It is cut only when its position
leaves the history (HistoryLost HISTORY_EXPIRED), or resyncs by state where its stream asked.

Conflated subscriptions keep the newest event per user, so their count is the number of users
waiting, not of events: they pass the event bound only with that many distinct users behind,
and the byte bound with that many bytes of newest events. Either way they catch up like any
other, and their catch-up responses are conflated too (each keeps the newest event per user).

Identity: offsets alone cannot tell a continuation from another history under the same
offsets (a Redis restarted from an older snapshot, a replica promoted before it had every
write, then new writes reusing the lost offsets). Every write carries a tag and the tag of the
write before it in its partition, so the engine also keeps the tag at its position and checks
each batch, each repair and each audit continues it. Where one does not, the engine starts a
new epoch (one compare-and-set in the store, the same for every instance) and ends every
subscription with EPOCH_CHANGED: a subscriber is told, never handed a reused offset as if it
followed what it had.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from hub import metrics
from hub.domain import Event, EventBatch, Position, partition_of
from hub.errors import (
    EPOCH_CHANGED,
    HISTORY_EXPIRED,
    RESYNC_BY_STATE,
    SNAPSHOT,
    HistoryLost,
    PositionNotReached,
    StoreUnavailable,
)
from hub.replay import SharedHistory
from hub.store.base import Store

log = logging.getLogger(__name__)

__all__ = ["EPOCH_CHANGED", "HISTORY_EXPIRED", "RESYNC_BY_STATE", "SNAPSHOT", "Encoded",
           "Encoder", "Fanout", "Limits", "Subscription"]
_REPLAY_CHUNK = 500
_AUDIT_INTERVAL = 1.0
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 2.0
_EARLIEST_TTL = 1.0  # seconds an earliest() answer is shared


@dataclass(frozen=True, slots=True)
class Encoded:
    """One event, encoded once for every subscriber that gets it."""

    user_id: str
    event: bytes  # what a batched feed sends (user.v1.UserEvent)
    user: bytes  # what a per-user feed sends (user.v1.User)


Encoder = Callable[[Event], Encoded]


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-subscription buffer bounds; a subscriber past either catches up from the history
    (see the module docstring)."""

    max_events: int = 10_000
    max_bytes: int = 8 * 1024 * 1024


class Subscription:
    """A bounded buffer of encoded events for one stream, filled by the engine.

    There is one per open stream and most streams are idle, so it holds as little as it can
    while idle: slots, no buffer until an event arrives, and no Event/timer to wait on, just
    a future made when its owner waits.

    `given` is the position its owner has been handed everything up to (its last drain, or
    its origin); `lagging` says the engine stopped pushing to it (its buffer overflowed) and
    its owner is to read the history from `given` (Fanout.replay, then Fanout.rejoin).
    """

    __slots__ = ("_bytes", "_engine", "_held", "_items", "_latest", "_limits", "_waiter",
                 "_woken", "behind", "conflate", "error", "given", "lagging", "origin",
                 "users")

    def __init__(
        self, engine: Fanout, users: set[str] | None, conflate: bool, limits: Limits
    ) -> None:
        self._engine = engine
        self.users = users  # None: all users
        self.conflate = conflate
        self._limits = limits
        self._items: list[Encoded] | None = None
        self._latest: dict[str, Encoded] | None = None  # conflated: the newest event per user
        self._bytes = 0
        self._woken = False  # something to drain since the last drain
        self._waiter: asyncio.Future[None] | None = None
        self._held: asyncio.Future[None] | None = None  # its owner's Fanout.wait_for
        self.error: Exception | None = None
        # The engine position when this subscription started receiving live events.
        self.origin = self.given = engine.position()
        self.lagging = False  # the engine does not push to it: its owner reads the history
        self.behind = False  # lagging, or reading the history: counted as catching up

    def push(self, item: Encoded) -> None:
        """Called by the engine, synchronously, for every matching event."""
        if self.error is not None or self.lagging:
            return
        if self.conflate:
            if self._latest is None:
                self._latest = {}
            old = self._latest.pop(item.user_id, None)
            if old is not None:
                self._bytes -= len(old.event)
            self._latest[item.user_id] = item
            count = len(self._latest)
        else:
            if self._items is None:
                self._items = []
            self._items.append(item)
            count = len(self._items)
        self._bytes += len(item.event)
        if count > self._limits.max_events or self._bytes > self._limits.max_bytes:
            self._lag()
        self.wake()

    def _lag(self) -> None:
        """Past a bound: the buffer goes and the engine stops pushing; every event dropped
        is after `given`, so the owner's read of the history from there has each of them."""
        self._items, self._latest, self._bytes = None, None, 0
        self.lagging = True
        if not self.behind:
            self.behind = True
            metrics.CATCHUP_SUBSCRIBERS.inc()

    def fall_behind(self) -> None:
        """The engine cannot give it what it missed (events lost before delivery): its owner
        reads the history from `given`, as after an overflow, and meets the gap there."""
        if self.error is None:
            self._lag()
            self.wake()

    def caught_up(self) -> None:
        """Its owner has replayed up to its origin since it rejoined: live again."""
        if self.behind and not self.lagging:
            self.behind = False
            metrics.CATCHUP_SUBSCRIBERS.dec()
            metrics.CATCHUPS.inc()

    def fail(self, error: Exception) -> None:
        """Ends the subscription: its owner sees `error` on its next drain."""
        if self.error is None:
            self.error = error
            self._items, self._latest, self._bytes = None, None, 0
            self.wake()
            held, self._held = self._held, None
            if held is not None and not held.done():
                held.set_result(None)
            # Stop routing to it now, not when its owner gets round to closing it (a stalled
            # stream's writer may be stuck for long); not during this routing pass, though.
            asyncio.get_running_loop().call_soon(self.close)

    def wake(self) -> None:
        """Lets the owner's wait return without events (e.g. change results to send)."""
        if self._woken:
            return
        self._woken = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wait(self) -> asyncio.Future[None]:
        """Done once there is something to drain, the subscription failed, or `wake` was
        called since the last drain. Only the owner waits, one wait at a time."""
        waiter = asyncio.get_running_loop().create_future()
        if self._woken:
            waiter.set_result(None)
        else:
            self._waiter = waiter
        return waiter

    def drain(self) -> tuple[list[Encoded], Position]:
        """Everything buffered, and the position that covers it (for the resume token)."""
        if self.error is not None:
            raise self.error
        self._woken = False
        if self.lagging:
            return [], self.given  # nothing buffered: the owner reads the history instead
        items: list[Encoded]
        if self._latest is not None:
            items, self._latest = list(self._latest.values()), None
        else:
            items, self._items = self._items or [], None
        self._bytes = 0
        self.given = self._engine.position()
        return items, self.given

    @property
    def pending(self) -> int:
        buffer = self._latest if self._latest is not None else self._items
        return len(buffer) if buffer is not None else 0

    def matches(self, user_id: str) -> bool:
        return self.users is None or user_id in self.users

    def partitions(self, count: int) -> set[int]:
        if self.users is None:
            return set(range(count))
        return {partition_of(u, count) for u in self.users}

    def add_users(self, users: Iterable[str] | None) -> None:
        """Follow more users, or all users (users=None); live from now. Costs the ids given,
        not the ids already followed: a stream that adds users in many Subscribes must not
        pay for its whole set each time."""
        if users is None or self.users is None:
            self._engine._reindex(self, None)
        else:
            self._engine._index_users(self, users)

    def remove_users(self, users: Iterable[str] | None) -> None:
        """Unsubscribe some users, or everything (users=None); costs the ids given."""
        if users is None:
            self._engine._reindex(self, set())
        elif self.users is not None:
            self._engine._unindex_users(self, users)

    def close(self) -> None:
        if self.behind:
            self.behind = False
            metrics.CATCHUP_SUBSCRIBERS.dec()
        self._engine._unregister(self)


class _Subscribing:
    """The context manager of Fanout.subscribe: a small slotted object rather than a
    generator-based one, since every open stream holds one for its whole life."""

    __slots__ = ("_args", "_engine", "_sub")

    def __init__(self, engine: Fanout, *args: Any) -> None:
        self._engine, self._args = engine, args
        self._sub: Subscription | None = None

    async def __aenter__(self) -> Subscription:
        self._sub = await self._engine.open(*self._args)
        self._args = ()
        return self._sub

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._sub is not None:
            self._sub.close()


class Fanout:
    def __init__(self, store: Store, encode: Encoder, limits: Limits | None = None) -> None:
        self._store = store
        self._encode = encode
        # Replays share their history reads, decoding and encoding (see hub.replay): a storm
        # of resumes from nearby tokens reads each chunk once, not once per subscriber.
        self.history = SharedHistory(store, encode, chunk_size=_REPLAY_CHUNK)
        self.limits = limits or Limits()
        self.partitions = store.partitions
        self.epoch = ""
        self._pos = [0] * store.partitions
        # The tag of the write that made each partition's position ("": not known).
        self._tags = [""] * store.partitions
        self._switchovers = store.switchovers  # the store's primary changes, as handled
        self._position = Position("", ())  # the last one handed out
        self._all: set[Subscription] = set()
        self._by_user: dict[str, set[Subscription]] = {}
        # Per partition, how many users some subscription here names: a batch of a partition
        # nobody here wants is skipped without decoding it.
        self._wanted = [0] * store.partitions
        self._lock = asyncio.Lock()  # one router at a time: listener or auditor
        self.ready = asyncio.Event()
        self.connected = False
        # Streams holding their first response until the engine has routed up to a position
        # (Subscribe.min_position): each with its future, done once reached.
        self._waiters: list[tuple[Position, asyncio.Future[None]]] = []
        # (epoch, loop time, read) of the last earliest() (see there).
        self._earliest: tuple[str, float, asyncio.Task[Position]] | None = None

    # -- positions --------------------------------------------------------------------------

    def position(self) -> Position:
        offsets = tuple(self._pos)
        last = self._position
        if last.offsets != offsets or last.epoch != self.epoch:
            last = self._position = Position(self.epoch, offsets)
        # While nothing moves, every caller shares one object: each subscription keeps its
        # origin, and 10k idle streams opened at one position need not hold 10k copies.
        return last

    async def continuity(self, error: HistoryLost) -> HistoryLost:
        """`error` with what a client needs to act on it: the current epoch and the earliest
        position the history still reaches back to (left out if the store cannot be read)."""
        if error.earliest is not None:
            return error
        try:
            earliest: Position | None = await self.earliest()
        except StoreUnavailable:
            earliest = None
        return error.described(self.epoch, earliest)

    async def earliest(self) -> Position:
        """The earliest position the history reaches back to: per partition, the offset just
        before its first event still kept (the partition's position where none is).

        One read per partition, shared by every caller for a second: an epoch change ends
        every subscription at once, and each is told this."""
        loop = asyncio.get_running_loop()
        held = self._earliest
        if held is None or held[0] != self.epoch or loop.time() - held[1] > _EARLIEST_TTL or (
                held[2].done() and (held[2].cancelled() or held[2].exception() is not None)):
            held = self._earliest = (self.epoch, loop.time(),
                                     loop.create_task(self._read_earliest()))
        return await asyncio.shield(held[2])

    async def _read_earliest(self) -> Position:
        epoch, offsets = self.epoch, list(self._pos)
        firsts = await asyncio.gather(*(self._store.history(p, 0, 1)
                                        for p in range(self.partitions)))
        for p, first in enumerate(firsts):
            if first:
                offsets[p] = first[0].offset - 1
        return Position(epoch, tuple(offsets))

    def queued(self) -> int:
        """Events waiting in every subscription's buffer (for the metrics endpoint)."""
        subs = self._all | {s for subs in self._by_user.values() for s in subs}
        return sum(s.pending for s in subs)

    @property
    def subscriber_count(self) -> int:
        return len(self._all) + len({s for subs in self._by_user.values() for s in subs})

    # -- subscriptions ----------------------------------------------------------------------

    def subscribe(
        self, users: set[str] | None, conflate: bool = False, resume: Position | None = None,
        ready_timeout: float = 5.0,
    ) -> _Subscribing:
        """`async with fanout.subscribe(users) as sub:` opens a subscription (see `open`) and
        closes it on the way out, whatever happens: no exit path leaks one (broadcaster's
        shape)."""
        return _Subscribing(self, users, conflate, resume, ready_timeout)

    async def open(
        self, users: set[str] | None, conflate: bool = False, resume: Position | None = None,
        ready_timeout: float = 5.0,
    ) -> Subscription:
        """Registers a subscription, live from the engine's current position (its origin).

        With `resume`, first checks it can be continued from (see `reach`); call `replay`
        next to get the events between `resume` and the origin.
        """
        if not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), ready_timeout)
            except TimeoutError:
                raise StoreUnavailable("the event bus is not connected") from None
        if resume is not None:
            await self.reach(resume)
        sub = Subscription(self, None, conflate, self.limits)
        self._reindex(sub, users)
        return sub

    def restart(self, sub: Subscription, users: set[str] | None) -> None:
        """Re-points a subscription to `users`, live from now: its origin moves here."""
        self.rejoin(sub)
        self._reindex(sub, users)

    def rejoin(self, sub: Subscription) -> None:
        """Live again from now: its origin (and so its `given`) moves here, and the engine
        pushes to it from the next event on. What lies between where its owner stands and the
        origin is the owner's to replay (`replay`), as after a resume."""
        sub.origin = sub.given = self.position()
        sub.lagging = False

    def lag(self, sub: Subscription, position: Position) -> int:
        """Events of the partitions `sub` follows between `position` and the engine's."""
        return sum(max(0, self._pos[p] - position.offsets[p])
                   for p in sub.partitions(self.partitions))

    async def reach(self, resume: Position) -> None:
        """Checks `resume` is from this history (same epoch). A token handed out by a faster
        instance may be a few events ahead of this one: wait for the engine to catch up."""
        if not resume.epoch and not any(resume.offsets):
            return  # taken before the first write ever: nothing seen, so nothing to lose
        if resume.epoch != self.epoch:
            raise HistoryLost(
                EPOCH_CHANGED,
                f"history epoch {resume.epoch} is gone (now {self.epoch}): the event history"
                " was reset; start again from a snapshot",
            )
        if all(r <= p for r, p in zip(resume.offsets, self._pos, strict=True)):
            return
        async with self._lock:
            await self._catch_up()
        if any(r > p for r, p in zip(resume.offsets, self._pos, strict=True)):
            # Tokens are not signed, so one ahead is not proof enough to end everyone's
            # subscription (any client could send one); the catch-up above has compared the
            # store with what this engine saw. This subscriber's history is gone, though.
            raise HistoryLost(
                EPOCH_CHANGED, "the token is ahead of this event history: the history it came"
                " from is gone (Redis came back with older data?); start again from a snapshot"
            )

    async def wait_for(self, position: Position, patience: float, sub: Subscription) -> None:
        """Returns once this engine has routed every partition up to `position` (a write's
        hub-position, a token: Subscribe.min_position), or once `sub` has failed (its owner
        raises the error next). HistoryLost EPOCH_CHANGED for a position of another epoch;
        PositionNotReached after `patience` seconds."""
        if not position.epoch and not any(position.offsets):
            return  # before the first write ever: reached by definition
        if position.epoch != self.epoch:
            # A write on another instance may have started an epoch this one has not seen
            # yet: look once (its audit would, within a second) before saying it is gone.
            async with self._lock:
                await self._catch_up()
        if self._reached(position):
            return
        future = asyncio.get_running_loop().create_future()
        entry = (position, future)
        self._waiters.append(entry)
        sub._held = future
        try:
            await asyncio.wait_for(asyncio.shield(future), patience)
        except TimeoutError:
            raise PositionNotReached(patience) from None
        finally:
            sub._held = None
            if entry in self._waiters:
                self._waiters.remove(entry)
        if sub.error is None and position.epoch != self.epoch:
            raise self._other_epoch(position)

    def _reached(self, position: Position) -> bool:
        """Routed up to `position`; HistoryLost where it is of another epoch."""
        if position.epoch != self.epoch:
            raise self._other_epoch(position)
        return all(r <= p for r, p in zip(position.offsets, self._pos, strict=True))

    def _other_epoch(self, position: Position) -> HistoryLost:
        return HistoryLost(
            EPOCH_CHANGED, f"subscribe.min_position is of history epoch {position.epoch},"
            f" not the current {self.epoch}: the history it came from was reset")

    def _release(self) -> None:
        """Wakes the streams whose min_position the engine has now routed past (or whose
        epoch is gone): called after each batch, repair and audit."""
        if not self._waiters:
            return
        waiting = []
        for position, future in self._waiters:
            if future.done():
                continue
            if position.epoch != self.epoch or all(
                    r <= p for r, p in zip(position.offsets, self._pos, strict=True)):
                future.set_result(None)
            else:
                waiting.append((position, future))
        self._waiters = waiting

    async def replay(
        self, sub: Subscription, start: Position, until: Position | None = None,
    ) -> AsyncIterator[tuple[list[Encoded], Position]]:
        """The events after `start` up to `until` (default: the subscription's origin) that
        match it, in chunks, each with the position it brings the subscriber to. Raises
        HistoryLost when the history no longer reaches back to `start`."""
        end = sub.origin if until is None else until
        progress = list(start.offsets)
        wanted = sub.partitions(self.partitions)
        for p in range(self.partitions):
            if p not in wanted:
                progress[p] = end.offsets[p]  # nothing there can match
        for p in sorted(wanted):
            target = end.offsets[p]
            while progress[p] < target:
                events, encoded = await self.history.encoded(
                    p, progress[p], min(_REPLAY_CHUNK, target - progress[p]), start.epoch
                )
                if not events or events[0].offset != progress[p] + 1:
                    raise HistoryLost(
                        HISTORY_EXPIRED,
                        f"events after offset {progress[p]} of partition {p} have left the"
                        " bounded history; resync by state (subscribe.catch_up) or start"
                        " again from a snapshot",
                    )
                if events[-1].offset > target:  # never, by the contract; but never past it
                    keep = target - progress[p]
                    events, encoded = events[:keep], encoded[:keep]
                # Encoded once for every replay that shares the chunk.
                items = encoded if sub.users is None else [
                    item for item in encoded if sub.matches(item.user_id)]
                progress[p] = events[-1].offset
                yield items, Position(start.epoch, tuple(progress))
                # Let live routing, unary calls and new calls in between chunks (a chunk
                # from the cache does not suspend at all).
                await asyncio.sleep(0)

    def _reindex(self, sub: Subscription, users: set[str] | None) -> None:
        self._unregister(sub)
        # The subscription owns its set (add_users changes it in place): never the caller's.
        sub.users = None if users is None else set()
        if users is None:
            self._all.add(sub)
        else:
            self._index_users(sub, users)

    def _index_users(self, sub: Subscription, users: Iterable[str]) -> None:
        assert sub.users is not None
        for u in users:
            if u not in sub.users:
                sub.users.add(u)
                self._follow(u, sub)

    def _unindex_users(self, sub: Subscription, users: Iterable[str]) -> None:
        assert sub.users is not None
        for u in users:
            if u in sub.users:
                sub.users.discard(u)
                self._unfollow(u, sub)

    def _unregister(self, sub: Subscription) -> None:
        self._all.discard(sub)
        for u in sub.users or ():
            self._unfollow(u, sub)

    def _follow(self, user: str, sub: Subscription) -> None:
        subs = self._by_user.get(user)
        if subs is None:
            subs = self._by_user[user] = set()
            self._wanted[partition_of(user, self.partitions)] += 1
        subs.add(sub)

    def _unfollow(self, user: str, sub: Subscription) -> None:
        subs = self._by_user.get(user)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_user[user]
                self._wanted[partition_of(user, self.partitions)] -= 1

    # -- the listener -------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs until cancelled; store failures are retried, never fatal."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._listen(), name="fanout-listen")
            tg.create_task(self._audit(), name="fanout-audit")

    async def _listen(self) -> None:
        backoff = _BACKOFF_MIN
        while True:
            try:
                async with self._store.listen() as batches:
                    async with self._lock:
                        await self._catch_up()
                    self.connected = True
                    self.ready.set()
                    backoff = _BACKOFF_MIN
                    log.info("fan-out listening at epoch %s", self.epoch)
                    async for batch in batches:
                        async with self._lock:
                            await self._on_batch(batch)
            except StoreUnavailable as exc:
                log.warning("fan-out lost the event bus (%s); reconnecting in %.2fs",
                            exc, backoff)
            except Exception:
                # A bug must not silence every subscriber: log it loudly and start over.
                log.exception("fan-out listener failed; restarting in %.2fs", backoff)
            self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _audit(self) -> None:
        while True:
            await asyncio.sleep(_AUDIT_INTERVAL)
            if not self.connected:
                continue
            try:
                async with self._lock:
                    await self._catch_up()
            except StoreUnavailable:
                pass  # the listener sees it too and reconnects
            except Exception:
                log.exception("fan-out audit failed")

    async def _catch_up(self) -> None:
        """Route whatever the store has that we have not (after a reconnect, or a lost tail),
        after checking it is still the history we follow."""
        try:
            await self._catch_up_unreleased()
        finally:
            self._release()

    async def _catch_up_unreleased(self) -> None:
        switchovers = self._store.switchovers
        current = await self._store.position()
        if current.epoch != self.epoch:
            self._new_epoch(current)
            self._switchovers = switchovers
            return
        if switchovers != self._switchovers:
            # Sentinel promoted another node. Even where its offsets and tags match ours,
            # writes, events and snapshots may have come from the old primary (it can answer
            # as one for a while after the switch) and be missing here: say so.
            self._switchovers = switchovers
            if self.epoch:
                await self._diverged(-1, "Sentinel moved the Redis primary")
                return
        for p, target in enumerate(current.offsets):
            head = current.tags[p] if current.tags else ""
            if target < self._pos[p] or (
                    target == self._pos[p] and head and self._tags[p] and head != self._tags[p]):
                await self._diverged(p, f"the store is at offset {target}, this engine routed"
                                        f" up to {self._pos[p]}")
                return
            if target > self._pos[p]:
                await self._repair(p, target)

    async def _on_batch(self, batch: EventBatch) -> None:
        try:
            await self._route_batch(batch)
        finally:
            self._release()

    async def _route_batch(self, batch: EventBatch) -> None:
        if batch.epoch != self.epoch:
            current = await self._store.position()
            if current.epoch != self.epoch:
                self._new_epoch(current)
            # Otherwise a message of an epoch already replaced, published before the change.
            return
        p = batch.partition
        if batch.first_offset > self._pos[p] + 1:
            await self._repair(p, batch.first_offset - 1)
        if not self._continues(batch):
            await self._diverged(p, f"offsets {batch.first_offset}..{batch.last_offset} were"
                                    " written by another history than the one routed here")
            return
        fresh = batch.last_offset - self._pos[p]
        if fresh <= 0:
            return  # a repair routed these already
        metrics.EVENTS_ROUTED.inc(fresh)
        self._tags[p] = batch.tag
        if not self._all and not self._wanted[p]:
            # Nobody here wants any event of this partition: take the position, skip decoding.
            self._pos[p] = batch.last_offset
            return
        for event in batch.events():
            if event.offset == self._pos[p] + 1:
                self._route(event)

    def _continues(self, batch: EventBatch) -> bool:
        """Whether `batch` belongs to the history routed so far (True where tags are not
        known: a store without them, or a position taken over from a trimmed history)."""
        pos, known = self._pos[batch.partition], self._tags[batch.partition]
        if not known:
            return True
        if pos == batch.first_offset - 1:
            return not batch.prev_tag or batch.prev_tag == known
        if batch.first_offset <= pos <= batch.last_offset:
            return not batch.tag or batch.tag == known  # a repair routed part of this write
        return True  # older than our position: nothing here to compare it with

    async def _repair(self, p: int, target: int) -> None:
        log.info("fan-out repairing partition %d from offset %d to %d", p, self._pos[p], target)
        metrics.GAP_REPAIRS.inc()
        while self._pos[p] < target:
            tagged = await self._store.history_tagged(
                p, self._pos[p], min(_REPLAY_CHUNK, target - self._pos[p]))
            if not tagged or tagged[0][0].offset != self._pos[p] + 1:
                lost_to = tagged[0][0].offset - 1 if tagged else target
                self._lose(p, lost_to)
                continue
            _, tag, prev = tagged[0]
            known = self._tags[p]
            if known and tag and known not in (tag, prev):
                await self._diverged(p, f"the history after offset {self._pos[p]} was written"
                                        " by another history than the one routed here")
                return
            routed = [(e, t) for e, t, _ in tagged if e.offset <= target]
            metrics.EVENTS_ROUTED.inc(len(routed))
            for event, tag in routed:
                self._route(event)
                self._tags[p] = tag

    async def _diverged(self, p: int, detail: str) -> None:
        """The store's history is not the one routed here: a new epoch for everyone."""
        log.error("event history of epoch %s replaced%s (%s): Redis came back with other"
                  " data (an older snapshot, or a replica promoted before it had every write);"
                  " starting a new epoch", self.epoch,
                  f" in partition {p}" if p >= 0 else "", detail)
        await self._store.rotate_epoch(self.epoch)
        self._new_epoch(await self._store.position())

    def _route(self, event: Event) -> None:
        self._pos[event.partition] = event.offset
        by_user = self._by_user.get(event.user.id)
        if not self._all and not by_user:
            return
        item = self._encode(event)
        for sub in self._all:
            sub.push(item)
        for sub in by_user or ():
            sub.push(item)

    def _lose(self, p: int, lost_to: int) -> None:
        """Events of partition p up to `lost_to` are gone: whoever could have wanted one of
        them goes to catch up from the history, which finds the gap: its stream resyncs by
        state where it asked to, and is cut with HISTORY_EXPIRED otherwise."""
        log.error("fan-out: events %d..%d of partition %d left the history before delivery",
                  self._pos[p] + 1, lost_to, p)
        for sub in [*self._all, *{s for subs in self._by_user.values() for s in subs}]:
            if p in sub.partitions(self.partitions):
                sub.fall_behind()
        self._pos[p] = lost_to
        self._tags[p] = ""

    def _new_epoch(self, current: Position) -> None:
        """The store is at another epoch than the one routed here."""
        if not self.epoch and not any(self._pos):
            # Nothing was ever routed (a new or emptied Redis had no epoch yet): the new
            # history starts where this engine stands, so nobody has missed anything.
            self._adopt(current)
            return
        self._reset(current)

    def _reset(self, current: Position) -> None:
        log.warning("event history epoch changed from %s to %s: ending every subscription",
                    self.epoch, current.epoch or "(none yet)")
        error = HistoryLost(
            EPOCH_CHANGED, "the event history was reset (epoch changed); start again from a"
            " snapshot",
        )
        for sub in [*self._all, *{s for subs in self._by_user.values() for s in subs}]:
            sub.fail(error)
        self._adopt(current)

    def _adopt(self, current: Position) -> None:
        if current.epoch != self.epoch:
            self.history.clear()  # chunks of a history nobody can resume from any more
        self.epoch, self._pos = current.epoch, list(current.offsets)
        self._tags = list(current.tags) if current.tags else [""] * self.partitions
