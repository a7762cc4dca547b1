"""Shared history reads: replays resuming from the same or nearby positions read each piece of
history from the store once, decode it once and encode it once, whatever their number.

    history = SharedHistory(store, encode)           # one per process, beside the fan-out
    events = await history.history(p, after, limit, epoch=start.epoch)   # store.history's contract
    events, encoded = await history.encoded(p, after, limit, epoch=start.epoch)

When an instance dies, its subscribers all resume on the survivors at once, from tokens a few
thousand events back and nearly equal. Read one by one, each replay costs a store read, the
decoding of every event and its protobuf encoding, per subscriber: 900 subscribers made the
same reads 900 times, the event loop stalled for seconds and new calls waited in gRPC's queue
until it cancelled them.

Here history is read in **chunks** of `chunk_size` offsets aligned on multiples of it (chunk k
holds offsets k*size+1 .. (k+1)*size of one partition), so positions near each other fall in
the same chunks:

- **Single flight.** Concurrent requests for one chunk await one store read.
- **A small cache.** Recent chunks stay, keyed by (epoch, partition, first offset), so replays
  that start a little later (or run a little behind) reuse them. It is an LRU bounded by an
  estimate of the memory its events (and their encodings) hold, `max_bytes`.
- **Encoded once.** `encoded()` also returns each event's `Encoded` form, made once per chunk.

What an answer means is the store's contract, unchanged: up to `limit` events with offset >
`after_offset`, consecutive, oldest first; fewer or none where the history was trimmed (the
first event is then not `after_offset + 1`, which is how a caller tells HISTORY_EXPIRED). An
answer never has a gap in its middle: if cached events end where the store's history has since
been trimmed, the answer stops short, and the next request shows the gap at its start.

Chunks are of one epoch. A request naming its `epoch` (a resume token's, the fan-out's) is
served from cached chunks of that epoch only. Without one the reader cannot tell a cached
chunk from one of a newer history (a Redis that restarted empty starts its offsets at 1
again), so it only shares reads in flight, always fresh from the store.

The chunk at the head of a partition is still growing: it is kept with what it had when read,
and a request for offsets past that reads only the missing tail of the chunk (once, for every
request waiting on it). A request that joined a read begun before its own offsets existed
reads again, so a subscriber never gets less than what was written before it asked.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import OrderedDict
from typing import TYPE_CHECKING

from hub.domain import Event
from hub.store.base import Store

if TYPE_CHECKING:
    from hub.fanout import Encoded, Encoder

# Rough memory of one cached event beyond its strings (Event, User, their fields, the list
# slot: about 400 bytes measured with tracemalloc), and of one Encoded beyond its bytes.
_EVENT_OVERHEAD = 400
_ENCODED_OVERHEAD = 140

_Key = tuple[str | None, int, int]  # (epoch, partition, first offset of the chunk)


def _event_cost(event: Event) -> int:
    user = event.user
    return _EVENT_OVERHEAD + len(user.id) + len(user.email) + len(user.name)


def _encoded_cost(item: Encoded) -> int:
    return _ENCODED_OVERHEAD + len(item.event) + len(item.user)


class _Chunk:
    """The events of one chunk (a trimmed history may have lost its first ones)."""

    __slots__ = ("beyond", "cost", "encoded", "end", "epoch", "events", "final", "key")

    def __init__(self, key: _Key, end: int, events: list[Event], beyond: int,
                 epoch: str | None) -> None:
        self.key = key
        self.end = end
        self.events = events  # consecutive offsets, all <= end
        # The first offset past the chunk the store had (0: none seen), which tells a chunk
        # whose first events were trimmed from the head of the history.
        self.beyond = beyond
        # Nothing will be added to it: it is full, or the history goes on past it.
        self.final = beyond > 0 or (bool(events) and events[-1].offset == end)
        self.epoch = epoch  # of the events read (None: nothing was read to tell)
        self.encoded: list[Encoded] | None = None
        self.cost = sum(_event_cost(e) for e in events)

    def covers(self, offset: int) -> bool:
        """Whether it holds everything of the chunk up to `offset` that the store may have."""
        return self.final or (bool(self.events) and self.events[-1].offset >= offset)


class SharedHistory:
    """Reads a store's history in aligned chunks, shared by every concurrent and nearby reader.

    `encode` is needed only for `encoded()`. `max_bytes` bounds the cache (an estimate of the
    memory its events and encodings hold, about 800 bytes an event with its encoding): the
    default keeps some 5,000 events, a storm of resumes a few thousand events back (a few
    hundred per partition) whole, and a deeper one as a window moving with its replays.
    """

    def __init__(self, store: Store, encode: Encoder | None = None, chunk_size: int = 500,
                 max_bytes: int = 4 * 1024 * 1024) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self._store = store
        self._encode = encode
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        self._cache: OrderedDict[_Key, _Chunk] = OrderedDict()
        self._bytes = 0
        # Reads in flight, each with its sequence number: a request that joins one begun
        # before it was made may need to read again.
        self._flights: dict[_Key, tuple[int, asyncio.Task[_Chunk]]] = {}
        self._serial = itertools.count(1)
        self._last_serial = 0
        # For tests and metrics.
        self.reads = 0  # store calls
        self.hits = 0  # chunks served from the cache
        self.joins = 0  # requests that awaited another request's read

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    @property
    def cached_chunks(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()
        self._bytes = 0

    async def history(self, partition: int, after_offset: int, limit: int,
                      epoch: str | None = None) -> list[Event]:
        """Store.history's contract: up to `limit` events after `after_offset`, oldest first,
        consecutive; fewer or none where the history was trimmed."""
        events, _ = await self._collect(partition, after_offset, limit, epoch, False)
        return events

    async def encoded(self, partition: int, after_offset: int, limit: int,
                      epoch: str | None = None) -> tuple[list[Event], list[Encoded]]:
        """`history()`'s events, and beside each its encoding (made once per cached event)."""
        if self._encode is None:
            raise TypeError("SharedHistory was made without an encoder")
        events, encoded = await self._collect(partition, after_offset, limit, epoch, True)
        return events, encoded

    # -- the answer, from chunks ------------------------------------------------------------

    async def _collect(self, partition: int, after: int, limit: int, epoch: str | None,
                       with_encoded: bool) -> tuple[list[Event], list[Encoded]]:
        events: list[Event] = []
        encoded: list[Encoded] = []
        size = self.chunk_size
        pos = after  # the answer covers the offsets up to here
        while len(events) < limit:
            start = pos // size * size + 1  # the chunk holding pos + 1
            end = start + size - 1
            # The last offset this answer can take from the chunk, were it all there.
            need = min(end, pos + limit - len(events))
            chunk = await self._chunk(epoch, partition, start, need)
            held = chunk.events
            first = max(0, pos + 1 - held[0].offset) if held else 0
            last = min(len(held), first + limit - len(events))
            if first < last:
                if events and held[first].offset != events[-1].offset + 1:
                    break  # the cache ends where the store was trimmed: stop short, no gap
                events += held[first:last]
                if with_encoded:
                    encoded += self._encodings(chunk)[first:last]
                pos = held[last - 1].offset
            if len(events) >= limit or not chunk.final:
                break  # done, or at the head of the history
            # The history goes on past this chunk: from its end, or (a trimmed stretch) from
            # the first offset the store still had.
            pos = max(pos, end, chunk.beyond - 1)
        return events, encoded

    def _encodings(self, chunk: _Chunk) -> list[Encoded]:
        if chunk.encoded is None:
            assert self._encode is not None
            chunk.encoded = [self._encode(e) for e in chunk.events]
            added = sum(_encoded_cost(item) for item in chunk.encoded)
            chunk.cost += added
            if self._cache.get(chunk.key) is chunk:
                self._bytes += added
                self._evict()
        return chunk.encoded

    # -- chunks: cache, single flight, store reads -------------------------------------------

    async def _chunk(self, epoch: str | None, partition: int, start: int, need: int) -> _Chunk:
        """The chunk at `start`, holding at least the offsets up to `need` that the store had
        when this was called."""
        key: _Key = (epoch, partition, start)
        asked = self._last_serial  # reads numbered above this began after this call
        while True:
            cached = self._cache.get(key) if epoch is not None else None
            if cached is not None and cached.covers(need):
                self._cache.move_to_end(key)
                self.hits += 1
                return cached
            flight = self._flights.get(key)
            if flight is None:
                serial = next(self._serial)
                self._last_serial = serial
                task = asyncio.get_running_loop().create_task(self._read(key, cached))
                flight = self._flights[key] = (serial, task)
                task.add_done_callback(functools.partial(self._landed, key))
            else:
                self.joins += 1
            serial, task = flight
            # Shielded: a reader that goes away (its stream closed) must not cancel the read
            # the others wait on.
            chunk = await asyncio.shield(task)
            if serial > asked or chunk.covers(need):
                return chunk
            # That read began before this request: the offsets it needs may have been written
            # since. Go round again: a read begun from now on has them.

    def _landed(self, key: _Key, task: asyncio.Task[_Chunk]) -> None:
        flight = self._flights.get(key)
        if flight is not None and flight[1] is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters (if any are left) get it raised

    async def _read(self, key: _Key, prior: _Chunk | None) -> _Chunk:
        _, partition, start = key
        end = start + self.chunk_size - 1
        chunk = None
        if prior is not None and prior.events:
            # The head chunk grew: read only what it lacks.
            last = prior.events[-1].offset
            self.reads += 1
            more = await self._store.history(partition, last, end - last)
            if not more or (more[0].offset == last + 1 and more[0].epoch == prior.epoch):
                chunk = _Chunk(key, end, prior.events + [e for e in more if e.offset <= end],
                               next((e.offset for e in more if e.offset > end), 0), prior.epoch)
                if prior.encoded is not None and self._encode is not None:
                    chunk.encoded = prior.encoded + [self._encode(e)
                                                     for e in chunk.events[len(prior.events):]]
                    chunk.cost += sum(_encoded_cost(item) for item in chunk.encoded)
        if chunk is None:
            self.reads += 1
            events = await self._store.history(partition, start - 1, self.chunk_size)
            inside = events
            for n, e in enumerate(events):
                if e.offset > end:  # past a stretch trimmed from the head of the history
                    inside = events[:n]
                    break
            # An entirely trimmed chunk still tells its epoch by the events past it.
            chunk = _Chunk(key, end, inside, events[len(inside)].offset
                           if len(inside) < len(events) else 0,
                           events[0].epoch if events else None)
        self._keep(chunk)
        return chunk

    def _keep(self, chunk: _Chunk) -> None:
        """Caches a chunk under the epoch of its events, not the one asked for: a history
        that changed epoch meanwhile must not be served as the old one."""
        if chunk.epoch is None:
            return  # nothing was read: nothing to share
        key: _Key = (chunk.epoch, chunk.key[1], chunk.key[2])
        chunk.key = key
        old = self._cache.pop(key, None)
        if old is not None:
            self._bytes -= old.cost
        if chunk.cost > self.max_bytes:
            return
        self._cache[key] = chunk
        self._bytes += chunk.cost
        self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._cache:
            _, oldest = self._cache.popitem(last=False)
            self._bytes -= oldest.cost
