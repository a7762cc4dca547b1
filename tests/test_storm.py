"""Resume storms: the shared history reader (hub.replay) on its own, and a bounded storm on
real processes (`python -m loadtest.storm`: its own Redis, one hub, client processes).

The storm tests measure the hub as it is wired: while Fanout.replay reads the store itself,
every subscriber's replay makes its own reads, decoding and encoding, and the first responses
(9.5 s for 300 subscribers 1,000 events back) and GetUser (timeouts) show it.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from hub.domain import Event, EventType, NewUser, User, UserStatus, new_user_id, now_us
from hub.errors import StoreUnavailable
from hub.replay import SharedHistory
from hub.rpc.wire import encode_event
from hub.store.memory import MemoryStore
from tests.conftest import REDIS_SERVER

ROOT = Path(__file__).resolve().parent.parent


class FakeHistory:
    """A store's history and nothing else: one partition's events in a bounded deque (the
    oldest are trimmed, as Redis's MAXLEN does), reads counted, and optionally held until
    `release()` so that concurrent readers pile up on one read. A read sees the history as it
    was when it was made, like a Redis command that ran before later writes."""

    def __init__(self, keep: int = 100_000, epoch: str = "e1") -> None:
        self.partitions = 1
        self.epoch = epoch
        self.log: deque[Event] = deque(maxlen=keep)
        self.last = 0
        self.reads: list[tuple[int, int, int]] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    def append(self, count: int) -> None:
        for _ in range(count):
            self.last += 1
            user = User(new_user_id(), f"u{self.last}@example.com", f"User {self.last}",
                        UserStatus.ACTIVE, now_us(), now_us(), 1)
            self.log.append(Event(EventType.CREATED, user, 0, self.last, self.epoch, now_us()))

    def hold(self) -> None:
        self.gate = asyncio.Event()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()

    def expected(self, after: int, limit: int) -> list[Event]:
        """What a store answers: up to `limit` events after `after`, from the oldest kept."""
        return [e for e in self.log if e.offset > after][:limit]

    async def history(self, partition: int, after_offset: int, limit: int) -> list[Event]:
        self.reads.append((partition, after_offset, limit))
        answer = self.expected(after_offset, limit)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return answer


def offsets(events: list[Event]) -> list[int]:
    return [e.offset for e in events]


# -- single flight and sharing -----------------------------------------------------------------


@pytest.mark.anyio
async def test_fifty_concurrent_readers_of_one_chunk_cause_one_store_read() -> None:
    store = FakeHistory()
    store.append(300)
    shared = SharedHistory(store, encode_event, chunk_size=500)  # type: ignore[arg-type]
    store.hold()
    readers = [asyncio.create_task(shared.encoded(0, 0, 300, epoch="e1")) for _ in range(50)]
    await asyncio.sleep(0.01)
    store.release()
    answers = await asyncio.gather(*readers)
    assert len(store.reads) == 1
    assert shared.joins == 49
    first_events, first_encoded = answers[0]
    assert offsets(first_events) == list(range(1, 301))
    for events, encoded in answers:
        assert offsets(events) == offsets(first_events)
        # Encoded once: every reader holds the very same objects.
        assert all(a is b for a, b in zip(encoded, first_encoded, strict=True))


@pytest.mark.anyio
async def test_nearby_positions_share_the_aligned_chunk_and_late_joiners_hit_the_cache() -> None:
    store = FakeHistory()
    store.append(1200)
    shared = SharedHistory(store, chunk_size=500)  # type: ignore[arg-type]
    assert offsets(await shared.history(0, 0, 500, epoch="e1")) == list(range(1, 501))
    assert len(store.reads) == 1
    # Tokens a little apart fall in the same chunk: no new read.
    assert offsets(await shared.history(0, 37, 50, epoch="e1")) == list(range(38, 88))
    assert offsets(await shared.history(0, 120, 380, epoch="e1")) == list(range(121, 501))
    assert len(store.reads) == 1
    assert shared.hits == 2
    # An unaligned request spans two chunks: one more read (the second chunk), no more.
    assert offsets(await shared.history(0, 450, 100, epoch="e1")) == list(range(451, 551))
    assert len(store.reads) == 2
    assert store.reads[-1] == (0, 500, 500)  # chunks are read from their aligned start


@pytest.mark.anyio
async def test_answers_are_the_stores_answers() -> None:
    store = MemoryStore(partitions=2, history_size=300)  # ~500 written each: trimmed
    for n in range(1000):
        await store.create(NewUser.build(f"c{n}@example.com", f"C {n}", UserStatus.ACTIVE))
    position = await store.position()
    shared = SharedHistory(store, encode_event, chunk_size=64)
    for partition in range(2):
        last = position.offsets[partition]
        for after in [0, 1, last - 300, last - 299, last - 250, last - 64, last - 1, last,
                      last + 5]:
            for limit in (1, 7, 64, 65, 500, 2000):
                after = max(0, after)
                want = await store.history(partition, after, limit)
                got, encoded = await shared.encoded(partition, after, limit, position.epoch)
                assert offsets(got) == offsets(want), (partition, after, limit)
                assert [e.user for e in got] == [e.user for e in want]
                assert [i.event for i in encoded] == [encode_event(e).event for e in want]
                # Without an epoch: the same answer (fresh from the store).
                assert offsets(await shared.history(partition, after, limit)) == offsets(want)


@pytest.mark.anyio
async def test_random_reads_between_writes_match_the_store_and_never_invent_a_gap() -> None:
    rng = random.Random(9)
    for keep in (100_000, 120):  # untrimmed: exactly the store's answers; trimmed: see below
        store = FakeHistory(keep=keep)
        written: dict[int, Event] = {}
        shared = SharedHistory(store, chunk_size=rng.choice((7, 16, 50)),  # type: ignore[arg-type]
                               max_bytes=rng.choice((20_000, 4_000_000)))
        for _ in range(400):
            store.append(rng.choice((0, 0, 1, 3, 20)))
            written.update({e.offset: e for e in store.log})
            after = max(0, store.last - rng.randint(-3, 200))
            limit = rng.randint(1, 80)
            got = await shared.history(0, after, limit, epoch="e1")
            want = store.expected(after, limit)
            if keep > store.last:
                assert offsets(got) == offsets(want), (after, limit)
            # Always: real events, consecutive, after `after`, at most `limit` of them, and
            # up to the store's end at least when the answer starts where the store's does.
            assert all(written[e.offset] is e for e in got)
            assert offsets(got) == list(range(got[0].offset, got[0].offset + len(got))) \
                if got else True
            assert len(got) <= limit and all(e.offset > after for e in got)
            if got and want and got[0].offset == want[0].offset:
                assert offsets(got) == offsets(want)


@pytest.mark.anyio
async def test_without_an_epoch_nothing_is_served_from_the_cache() -> None:
    store = FakeHistory()
    store.append(10)
    shared = SharedHistory(store, chunk_size=500)  # type: ignore[arg-type]
    await shared.history(0, 0, 10)
    await shared.history(0, 0, 10)
    assert len(store.reads) == 2 and shared.hits == 0
    # ... though what it read is kept for readers that name the epoch.
    await shared.history(0, 0, 10, epoch="e1")
    assert len(store.reads) == 2 and shared.hits == 1


@pytest.mark.anyio
async def test_chunks_of_another_epoch_are_never_served() -> None:
    store = FakeHistory(epoch="old")
    store.append(50)
    shared = SharedHistory(store, chunk_size=500)  # type: ignore[arg-type]
    assert len(await shared.history(0, 0, 50, epoch="old")) == 50
    # The history is reset (Redis came back empty): offsets start again at 1.
    store.log.clear()
    store.last, store.epoch = 0, "new"
    store.append(20)
    fresh = await shared.history(0, 0, 50, epoch="new")
    assert offsets(fresh) == list(range(1, 21)) and {e.epoch for e in fresh} == {"new"}
    assert len(store.reads) == 2


# -- the head of the history, trimming, failures ----------------------------------------------


@pytest.mark.anyio
async def test_the_growing_head_chunk_is_extended_by_reading_only_its_missing_tail() -> None:
    store = FakeHistory()
    store.append(5)
    shared = SharedHistory(store, encode_event, chunk_size=500)  # type: ignore[arg-type]
    assert offsets(await shared.history(0, 0, 5, epoch="e1")) == [1, 2, 3, 4, 5]
    assert offsets(await shared.history(0, 2, 2, epoch="e1")) == [3, 4]  # covered: a hit
    assert len(store.reads) == 1
    store.append(5)
    events, encoded = await shared.encoded(0, 5, 5, epoch="e1")
    assert offsets(events) == [6, 7, 8, 9, 10] and len(encoded) == 5
    assert store.reads[-1] == (0, 5, 495)  # from the last event held, not the chunk start
    assert offsets(await shared.history(0, 0, 10, epoch="e1")) == list(range(1, 11))
    assert len(store.reads) == 2
    # Past the head: nothing (and the caller's replay stops there).
    assert await shared.history(0, 10, 10, epoch="e1") == []


@pytest.mark.anyio
async def test_a_reader_that_joined_a_read_begun_before_its_events_existed_reads_again() -> None:
    store = FakeHistory()
    store.append(5)
    shared = SharedHistory(store, chunk_size=500)  # type: ignore[arg-type]
    store.hold()
    early = asyncio.create_task(shared.history(0, 0, 5, epoch="e1"))
    await asyncio.sleep(0.01)  # its read has seen offsets 1..5
    store.append(3)  # written while that read is on its way
    late = asyncio.create_task(shared.history(0, 0, 8, epoch="e1"))
    await asyncio.sleep(0.01)
    store.release()
    assert offsets(await early) == [1, 2, 3, 4, 5]
    assert offsets(await late) == list(range(1, 9))  # never less than was written before it


@pytest.mark.anyio
async def test_trimmed_history_still_answers_short_so_history_expired_is_detected() -> None:
    store = FakeHistory(keep=100)
    store.append(300)  # offsets 201..300 are left
    shared = SharedHistory(store, chunk_size=64)  # type: ignore[arg-type]
    # A token from before the trim: the answer starts past after + 1 (HISTORY_EXPIRED).
    answer = await shared.history(0, 10, 50, epoch="e1")
    assert offsets(answer) == offsets(store.expected(10, 50)) == list(range(201, 251))
    # Trimmed well past whole chunks: found in a few reads, not one per missing chunk.
    assert len(store.reads) <= 3
    # Entirely past the history's end: nothing.
    assert await shared.history(0, 300, 50, epoch="e1") == []


@pytest.mark.anyio
async def test_an_answer_never_has_a_gap_where_the_store_trimmed_past_the_cache() -> None:
    store = FakeHistory(keep=30)
    store.append(30)
    shared = SharedHistory(store, chunk_size=10)  # type: ignore[arg-type]
    assert offsets(await shared.history(0, 0, 10, epoch="e1")) == list(range(1, 11))  # cached
    store.append(25)  # the store now keeps 26..55 only
    answer = await shared.history(0, 0, 30, epoch="e1")
    assert offsets(answer) == list(range(1, 11))  # stops short, no jump from 10 to 26
    # Resuming after it shows the gap at the start, as the store would.
    assert offsets(await shared.history(0, 10, 5, epoch="e1"))[0] == 26


@pytest.mark.anyio
async def test_a_failed_read_reaches_every_waiter_and_is_not_cached() -> None:
    store = FakeHistory()
    store.append(10)
    shared = SharedHistory(store, chunk_size=500)  # type: ignore[arg-type]
    store.hold()
    store.fail = StoreUnavailable("down")
    readers = [asyncio.create_task(shared.history(0, 0, 10, epoch="e1")) for _ in range(5)]
    await asyncio.sleep(0.01)
    store.release()
    results = await asyncio.gather(*readers, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert len(store.reads) == 1
    store.fail = None
    assert len(await shared.history(0, 0, 10, epoch="e1")) == 10
    assert len(store.reads) == 2


@pytest.mark.anyio
async def test_a_reader_that_goes_away_does_not_cancel_the_read_others_wait_on() -> None:
    store = FakeHistory()
    store.append(10)
    shared = SharedHistory(store, chunk_size=500)  # type: ignore[arg-type]
    store.hold()
    leaver = asyncio.create_task(shared.history(0, 0, 10, epoch="e1"))
    stayer = asyncio.create_task(shared.history(0, 0, 10, epoch="e1"))
    await asyncio.sleep(0.01)
    leaver.cancel()
    store.release()
    assert len(await stayer) == 10
    with pytest.raises(asyncio.CancelledError):
        await leaver
    assert len(store.reads) == 1


@pytest.mark.anyio
async def test_the_cache_stays_within_its_memory_bound() -> None:
    store = FakeHistory()
    store.append(5000)
    bound = 200_000
    shared = SharedHistory(store, encode_event, chunk_size=100,  # type: ignore[arg-type]
                           max_bytes=bound)
    for after in range(0, 5000, 100):
        events, encoded = await shared.encoded(0, after, 100, epoch="e1")
        assert len(events) == len(encoded) == 100
        assert shared.cached_bytes <= bound
    assert 0 < shared.cached_chunks < 50  # the oldest were evicted
    # The newest stay: reading them again is a hit.
    reads = len(store.reads)
    await shared.encoded(0, 4900, 100, epoch="e1")
    assert len(store.reads) == reads
    # A chunk bigger than the whole bound is answered, never kept.
    tiny = SharedHistory(store, chunk_size=100, max_bytes=1_000)  # type: ignore[arg-type]
    assert len(await tiny.history(0, 0, 100, epoch="e1")) == 100
    assert tiny.cached_chunks == 0 and tiny.cached_bytes == 0


@pytest.mark.anyio
async def test_encoded_needs_an_encoder() -> None:
    shared = SharedHistory(FakeHistory())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await shared.encoded(0, 0, 1)


# -- a storm on real processes ------------------------------------------------------------------

STORM_SUBSCRIBERS = 300
STORM_BACK = 1000


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One bounded storm (300 subscribers resuming 1,000 events back, about half a minute on
    a busy 2-core machine) shared by the tests below; each asserts one target."""
    if REDIS_SERVER is None:
        pytest.skip("needs redis-server on PATH")
    out = tmp_path_factory.mktemp("storm") / "storm.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.storm", "--subscribers", str(STORM_SUBSCRIBERS),
         "--back", str(STORM_BACK), "--workers", "2", "--timeout", "60", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )
    if done.returncode not in (0, 1) or not out.exists():
        pytest.fail(f"the storm could not run (exit {done.returncode}):\n{done.stdout}\n"
                    f"{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    report["printed"] = done.stdout
    return report


@pytest.mark.redis
def test_storm_every_subscriber_completes_without_loss(storm: dict[str, Any]) -> None:
    assert storm["subscribers"] == STORM_SUBSCRIBERS
    assert storm["codes"] == {"OK": STORM_SUBSCRIBERS}, storm["printed"]
    assert storm["missing"] == storm["duplicates"] == storm["unexpected"] == 0, storm["printed"]


@pytest.mark.redis
def test_storm_no_stream_is_cancelled_or_refused(storm: dict[str, Any]) -> None:
    for code in ("CANCELLED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"):
        assert code not in storm["codes"], storm["printed"]


@pytest.mark.redis
def test_storm_every_first_response_within_5_s(storm: dict[str, Any]) -> None:
    assert storm["first"]["n"] == STORM_SUBSCRIBERS, storm["printed"]
    assert storm["first"]["max"] <= 5.0, storm["printed"]


@pytest.mark.redis
def test_storm_getuser_keeps_answering(storm: dict[str, Any]) -> None:
    """No GetUser during the storm fails or runs into the probe's 5 s deadline (before the
    replays shared their reads, hundreds did while health said SERVING)."""
    assert storm["getuser"]["n"] > 0, storm["printed"]
    assert storm["getuser_failed"] == 0, storm["printed"]
