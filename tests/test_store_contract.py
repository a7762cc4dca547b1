"""The Store contract, run unchanged on the memory and the Redis store (see the `store` fixture).

Each test asserts what a caller of the store would see: the records, the events in history, the
position, and the live events a listener receives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

from hub.domain import (
    Event,
    EventBatch,
    EventType,
    NewUser,
    Position,
    User,
    UserPatch,
    UserStatus,
    partition_of,
)
from hub.errors import AlreadyExists, NotFound, VersionConflict
from hub.store.base import Store
from hub.store.memory import MemoryStore
from hub.store.redis import RedisStore

pytestmark = pytest.mark.anyio

UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
EVERYTHING = 100_000


def row(email: str, name: str = "Ada", password_hash: str | None = None) -> NewUser:
    return NewUser.build(email, name, UserStatus.ACTIVE, password_hash=password_hash)


async def all_users(store: Store) -> list[User]:
    return await store.list_after("", EVERYTHING)


async def all_events(store: Store) -> list[Event]:
    out: list[Event] = []
    for p in range(store.partitions):
        out += await store.history(p, 0, EVERYTHING)
    return out


async def events_of(store: Store, user_id: str) -> list[Event]:
    p = partition_of(user_id, store.partitions)
    return [e for e in await store.history(p, 0, EVERYTHING) if e.user.id == user_id]


async def state(store: Store) -> tuple[Position, list[User], list[Event]]:
    """Everything a caller can observe, to check that a refused write changed nothing."""
    return await store.position(), await all_users(store), await all_events(store)


def by_position(events: list[Event]) -> list[Event]:
    return sorted(events, key=lambda e: (e.partition, e.offset))


async def next_batch(batches: AsyncIterator[EventBatch]) -> list[Event]:
    with anyio.fail_after(5):
        batch = await anext(batches)
    events = batch.events()
    # The batch's header (known before decoding) matches what it holds.
    assert (batch.epoch, batch.partition, batch.first_offset, batch.count) == (
        events[0].epoch, events[0].partition, events[0].offset, len(events))
    return events


# -- create ---------------------------------------------------------------------------------


async def test_create_returns_created_event_at_next_offset(store: Store) -> None:
    await store.create(row("first@x.io"))
    new = row("ada@x.io")
    p = partition_of(new.user.id, store.partitions)
    before = await store.position()

    event = await store.create(new)

    assert event.type is EventType.CREATED
    assert event.user == new.user
    assert event.user.version == 1
    assert event.partition == p
    assert event.offset == before.offsets[p] + 1
    assert event.epoch == (await store.position()).epoch
    assert await store.get(new.user.id) == new.user


async def test_get_unknown_user_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.get(UNKNOWN_ID)


async def test_email_is_unique_case_insensitively_and_refusal_writes_nothing(
    store: Store,
) -> None:
    await store.create(row("Ada@X.io"))
    before = await state(store)
    duplicate = row("ada@x.IO", name="Other")

    with pytest.raises(AlreadyExists) as info:
        await store.create(duplicate)

    assert info.value.field == "email"
    assert await state(store) == before  # same position, listing and history
    with pytest.raises(NotFound):
        await store.get(duplicate.user.id)
    # No live event either: see test_listen_sends_nothing_for_refused_writes.


# -- create_many ----------------------------------------------------------------------------


async def test_create_many_refuses_duplicate_rows_only_in_row_order(store: Store) -> None:
    await store.create(row("taken@x.io"))
    before = await all_events(store)
    rows = [
        row("a@x.io"),
        row("TAKEN@x.io"),  # taken by an existing user
        row("b@x.io"),
        row("A@X.IO"),  # taken by an earlier row of this batch
        row("c@x.io"),
    ]

    results = await store.create_many(rows)

    assert [type(r) for r in results] == [Event, AlreadyExists, Event, AlreadyExists, Event]
    created = [r for r in results if isinstance(r, Event)]
    assert [e.user for e in created] == [rows[0].user, rows[2].user, rows[4].user]
    assert all(e.type is EventType.CREATED and e.user.version == 1 for e in created)
    for refused in (rows[1], rows[3]):
        with pytest.raises(NotFound):
            await store.get(refused.user.id)
    assert by_position(await all_events(store)) == by_position([*before, *created])


async def test_create_many_takes_consecutive_offsets_per_partition(store: Store) -> None:
    rows = [row(f"u{i}@x.io") for i in range(30)]

    results = await store.create_many(rows)

    events = [r for r in results if isinstance(r, Event)]
    assert len(events) == 30
    for p in range(store.partitions):
        mine = [e for e in events if e.partition == p]
        assert [e.offset for e in mine] == list(range(1, len(mine) + 1))
        assert all(e.partition == partition_of(e.user.id, store.partitions) for e in mine)
    assert (await store.position()).offsets == tuple(
        sum(e.partition == p for e in events) for p in range(store.partitions)
    )


async def test_create_many_of_nothing_writes_nothing(store: Store) -> None:
    before = await state(store)
    assert await store.create_many([]) == []
    assert await state(store) == before


# -- update ---------------------------------------------------------------------------------


async def test_update_bumps_version_and_emits_updated_event(store: Store) -> None:
    created = await store.create(row("ada@x.io"))
    uid = created.user.id

    event = await store.update(uid, UserPatch(name="Ada L.", status=UserStatus.INACTIVE))

    assert event.type is EventType.UPDATED
    assert event.user.version == 2
    assert event.user.name == "Ada L."
    assert event.user.status is UserStatus.INACTIVE
    assert event.user.email == "ada@x.io"
    assert event.user.created_at == created.user.created_at
    assert event.partition == created.partition
    assert event.offset == created.offset + 1
    assert await store.get(uid) == event.user


async def test_update_with_matching_expected_version_succeeds(store: Store) -> None:
    uid = (await store.create(row("ada@x.io"))).user.id
    await store.update(uid, UserPatch(name="B"))

    event = await store.update(uid, UserPatch(name="C"), expected_version=2)

    assert event.user.version == 3
    assert (await store.get(uid)).name == "C"


async def test_update_email_frees_the_old_and_takes_the_new(store: Store) -> None:
    uid = (await store.create(row("old@x.io"))).user.id

    event = await store.update(uid, UserPatch(email="New@X.io"))

    assert event.user.email == "New@X.io"
    other = await store.create(row("OLD@x.io", name="Other"))  # the old email is free again
    assert await store.get(other.user.id) == other.user
    with pytest.raises(AlreadyExists):
        await store.create(row("new@x.io"))  # the new one is taken


async def test_update_may_change_the_case_of_ones_own_email(store: Store) -> None:
    uid = (await store.create(row("ada@x.io"))).user.id

    event = await store.update(uid, UserPatch(email="Ada@X.io"))

    assert (await store.get(uid)).email == "Ada@X.io"
    assert event.user.version == 2
    with pytest.raises(AlreadyExists):
        await store.create(row("ADA@x.io"))


async def test_update_to_an_email_taken_by_another_user_changes_nothing(store: Store) -> None:
    await store.create(row("taken@x.io"))
    uid = (await store.create(row("ada@x.io"))).user.id
    before = await state(store)

    with pytest.raises(AlreadyExists) as info:
        await store.update(uid, UserPatch(email="Taken@x.io", name="Changed"))

    assert info.value.field == "email"
    assert await state(store) == before
    assert (await store.get(uid)).email == "ada@x.io"


async def test_update_with_stale_expected_version_conflicts_and_changes_nothing(
    store: Store,
) -> None:
    uid = (await store.create(row("ada@x.io"))).user.id
    await store.update(uid, UserPatch(name="B"))
    before = await state(store)

    with pytest.raises(VersionConflict) as info:
        await store.update(uid, UserPatch(name="C"), expected_version=1)

    assert (info.value.expected, info.value.actual) == (1, 2)
    assert await state(store) == before


async def test_update_unknown_user_is_not_found(store: Store) -> None:
    before = await state(store)
    with pytest.raises(NotFound):
        await store.update(UNKNOWN_ID, UserPatch(name="X"))
    assert await state(store) == before


# -- delete ---------------------------------------------------------------------------------


async def test_delete_emits_deleted_event_and_forgets_the_user(store: Store) -> None:
    keep = (await store.create(row("keep@x.io"))).user
    uid = (await store.create(row("ada@x.io"))).user.id
    updated = await store.update(uid, UserPatch(name="B"))

    event = await store.delete(uid)

    assert event.type is EventType.DELETED
    assert event.user.id == uid
    assert event.user.version == 3
    assert event.offset == updated.offset + 1
    with pytest.raises(NotFound):
        await store.get(uid)
    assert await all_users(store) == [keep]
    again = await store.create(row("ADA@x.io"))  # the email can be reused
    assert await store.get(again.user.id) == again.user


async def test_delete_with_stale_expected_version_conflicts_and_changes_nothing(
    store: Store,
) -> None:
    uid = (await store.create(row("ada@x.io"))).user.id
    await store.update(uid, UserPatch(name="B"))
    before = await state(store)

    with pytest.raises(VersionConflict):
        await store.delete(uid, expected_version=1)

    assert await state(store) == before
    assert (await store.delete(uid, expected_version=2)).user.version == 3


async def test_delete_unknown_or_deleted_user_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.delete(UNKNOWN_ID)
    uid = (await store.create(row("ada@x.io"))).user.id
    await store.delete(uid)
    before = await state(store)

    with pytest.raises(NotFound):
        await store.delete(uid)
    with pytest.raises(NotFound):
        await store.update(uid, UserPatch(name="Zombie"))

    assert await state(store) == before


# -- list_after -----------------------------------------------------------------------------


async def test_list_after_pages_through_every_user_once_in_id_order(store: Store) -> None:
    ids = [(await store.create(row(f"u{i}@x.io"))).user.id for i in range(25)]

    pages: list[list[User]] = []
    after = ""
    while page := await store.list_after(after, 7):
        pages.append(page)
        after = page[-1].id

    assert [len(p) for p in pages] == [7, 7, 7, 4]
    listed = [u.id for p in pages for u in p]
    assert listed == sorted(ids)
    assert await store.list_after(listed[-1], 7) == []


async def test_list_after_shows_current_records(store: Store) -> None:
    uid = (await store.create(row("ada@x.io"))).user.id
    updated = await store.update(uid, UserPatch(name="B"))

    assert await store.list_after("", 10) == [updated.user]
    assert await store.list_after(uid, 10) == []


# -- history and position -------------------------------------------------------------------


async def test_every_write_appears_once_in_history(store: Store) -> None:
    a = await store.create(row("a@x.io"))
    b, c = await store.create_many([row("b@x.io"), row("c@x.io")])
    assert isinstance(b, Event) and isinstance(c, Event)
    written = [
        a,
        b,
        c,
        await store.update(a.user.id, UserPatch(name="A2")),
        await store.update(b.user.id, UserPatch(email="b2@x.io")),
        await store.delete(c.user.id),
    ]

    assert by_position(await all_events(store)) == by_position(written)
    assert [(e.type, e.user.version) for e in written] == [
        (EventType.CREATED, 1),
        (EventType.CREATED, 1),
        (EventType.CREATED, 1),
        (EventType.UPDATED, 2),
        (EventType.UPDATED, 2),
        (EventType.DELETED, 2),
    ]
    assert all(e.partition == partition_of(e.user.id, store.partitions) for e in written)


async def test_history_after_an_offset_returns_later_events_up_to_the_limit(
    store: Store,
) -> None:
    created = await store.create(row("ada@x.io"))
    uid, p = created.user.id, created.partition
    for i in range(9):
        await store.update(uid, UserPatch(name=f"v{i + 2}"))
    last = (await store.position()).offsets[p]
    first = created.offset

    later = await store.history(p, first + 3, EVERYTHING)
    limited = await store.history(p, first + 1, 3)

    assert [e.offset for e in later] == list(range(first + 4, last + 1))
    assert [e.user.version for e in later] == list(range(5, 11))
    assert [e.offset for e in limited] == [first + 2, first + 3, first + 4]
    assert await store.history(p, last, 10) == []
    assert all(e.partition == p for e in later + limited)


async def test_one_users_events_are_in_version_order(store: Store) -> None:
    uid = (await store.create(row("ada@x.io"))).user.id
    others = [(await store.create(row(f"o{i}@x.io"))).user.id for i in range(10)]
    for i in range(3):  # interleave this user's writes with other users' in every partition
        await store.update(uid, UserPatch(name=f"n{i}"))
        for other in others:
            await store.update(other, UserPatch(name=f"n{i}"))
    await store.delete(uid)

    mine = await events_of(store, uid)

    assert [e.user.version for e in mine] == [1, 2, 3, 4, 5]
    assert [e.type for e in mine] == [EventType.CREATED] + [EventType.UPDATED] * 3 + [
        EventType.DELETED
    ]
    assert [e.offset for e in mine] == sorted(e.offset for e in mine)


async def test_position_is_the_last_offset_of_each_partition(store: Store) -> None:
    results = await store.create_many([row(f"u{i}@x.io") for i in range(12)])
    users = [r.user for r in results if isinstance(r, Event)]
    for u in users[:5]:
        await store.update(u.id, UserPatch(name="x"))
    for u in users[5:8]:
        await store.delete(u.id)
    with pytest.raises(AlreadyExists):
        await store.create(row("U0@x.io"))

    position = await store.position()

    for p in range(store.partitions):
        history = await store.history(p, 0, EVERYTHING)
        assert position.offsets[p] == (history[-1].offset if history else 0)
    assert sum(position.offsets) == 12 + 5 + 3
    assert {e.epoch for e in await all_events(store)} == {position.epoch}


async def test_empty_store_has_zero_offsets_and_no_history(store: Store) -> None:
    await store.ensure_epoch()  # what a hub does at start-up
    position = await store.position()

    assert position.offsets == (0,) * store.partitions
    assert position.epoch
    assert await store.history(0, 0, 10) == []


async def test_reading_the_position_writes_nothing(store: Store) -> None:
    """A read must work where writes cannot (a replica, OOM, CLIENT PAUSE WRITE): reading the
    position of a Redis with no epoch yet does not create one; the first write does."""
    first = await store.position()
    again = await store.position()
    assert first.epoch == again.epoch  # no epoch appeared by reading (memory has one always)
    created = await store.create(row("ada@x.io"))
    assert created.epoch and (await store.position()).epoch == created.epoch


async def test_rotating_the_epoch_is_one_compare_and_set(store: Store) -> None:
    """Every instance that finds the history replaced asks for a new epoch at once: they all
    end on the same one, and the offsets go on (old tokens are refused by their epoch)."""
    await store.create(row("ada@x.io"))
    before = await store.position()
    first = await store.rotate_epoch(before.epoch)
    second = await store.rotate_epoch(before.epoch)  # a second instance, same finding
    after = await store.position()
    assert first != before.epoch and second == first == after.epoch
    assert after.offsets == before.offsets


# -- listen ---------------------------------------------------------------------------------


async def test_listen_delivers_every_write_made_after_entering(store: Store) -> None:
    before = await store.create(row("before@x.io"))
    async with store.listen() as events:
        created = await store.create(row("ada@x.io"))
        updated = await store.update(created.user.id, UserPatch(name="B"))
        deleted = await store.delete(before.user.id)

        delivered = [await next_batch(events) for _ in range(3)]

    assert delivered == [[created], [updated], [deleted]]


async def test_listen_groups_a_bulk_write_per_partition(store: Store) -> None:
    rows = [row(f"u{i}@x.io") for i in range(20)]
    async with store.listen() as events:
        results = await store.create_many(rows)
        batches: list[list[Event]] = []
        while sum(len(b) for b in batches) < len(rows):
            batches.append(await next_batch(events))

    assert [len({e.partition for e in b}) for b in batches] == [1] * len(batches)
    assert len({b[0].partition for b in batches}) == len(batches)  # one batch per partition
    for b in batches:
        assert [e.offset for e in b] == list(range(b[0].offset, b[0].offset + len(b)))
    assert by_position([e for b in batches for e in b]) == by_position(
        [r for r in results if isinstance(r, Event)]
    )


async def test_listen_sends_nothing_for_refused_writes(store: Store) -> None:
    created = await store.create(row("ada@x.io"))
    uid = created.user.id
    await store.create(row("bob@x.io"))
    async with store.listen() as events:
        with pytest.raises(AlreadyExists):
            await store.create(row("ADA@x.io"))
        with pytest.raises(AlreadyExists):
            await store.update(uid, UserPatch(email="Bob@x.io"))
        with pytest.raises(VersionConflict):
            await store.update(uid, UserPatch(name="B"), expected_version=7)
        with pytest.raises(VersionConflict):
            await store.delete(uid, expected_version=7)
        with pytest.raises(NotFound):
            await store.delete(UNKNOWN_ID)
        refused = await store.create_many([row("bob@X.io")])
        assert isinstance(refused[0], AlreadyExists)
        good = await store.update(uid, UserPatch(name="Good"))

        assert await next_batch(events) == [good]


# -- password hashes ------------------------------------------------------------------------

SECRET = "$argon2id$v=19$secret-hash-sentinel"


async def test_password_hash_never_appears_in_events(store: Store) -> None:
    async with store.listen() as events:
        created = await store.create(row("ada@x.io", password_hash=SECRET))
        updated = await store.update(created.user.id, UserPatch(email="ada2@x.io"))
        deleted = await store.delete(created.user.id)
        delivered = [e for _ in range(3) for e in await next_batch(events)]

    for event in [created, updated, deleted, *delivered, *await all_events(store)]:
        assert not hasattr(event.user, "password_hash")
        assert SECRET not in repr(event)


@pytest.mark.redis
async def test_redis_history_and_messages_never_carry_the_password_hash(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, partitions=8, history_size=1000)
    raw = aioredis.Redis.from_url(redis_url)
    pubsub = raw.pubsub()
    try:
        await pubsub.psubscribe("hub:ev:*")
        created = await store.create(row("ada@x.io", password_hash=SECRET))
        uid = created.user.id
        # The hash is stored with the record: proof that searching the raw bytes would find it.
        assert SECRET.encode() in await raw.hget(f"hub:user:{uid}", "d")
        await store.update(uid, UserPatch(name="B"))
        await store.create_many([row("bob@x.io", password_hash=SECRET)])
        await store.delete(uid)

        messages: list[bytes] = []
        with anyio.fail_after(5):
            while len(messages) < 4:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    messages.append(message["data"])
        entries = [
            fields[b"e"]
            for p in range(store.partitions)
            for _, fields in await raw.xrange(f"hub:log:{p}")
        ]

        assert len(entries) == 4
        for blob in messages + entries:
            assert SECRET.encode() not in blob
    finally:
        await pubsub.aclose()
        await raw.aclose()
        await store.aclose()


# -- concurrency ----------------------------------------------------------------------------


@pytest.mark.parametrize("writers", [20, 40])
async def test_concurrent_updates_without_expected_version_all_succeed(
    store: Store, writers: int
) -> None:
    uid = (await store.create(row("ada@x.io"))).user.id

    results = await asyncio.gather(
        *(store.update(uid, UserPatch(name=f"n{i}")) for i in range(writers))
    )

    assert sorted(e.user.version for e in results) == list(range(2, writers + 2))
    assert (await store.get(uid)).version == writers + 1
    updates = [e for e in await events_of(store, uid) if e.type is EventType.UPDATED]
    assert [e.user.version for e in updates] == list(range(2, writers + 2))


@pytest.mark.redis
async def test_concurrent_updates_from_two_instances_all_succeed(redis_url: str) -> None:
    """Writers in two processes race on the version; every update still lands exactly once."""
    a, b = RedisStore.from_url(redis_url), RedisStore.from_url(redis_url)
    try:
        uid = (await a.create(row("race@x.io"))).user.id
        results = await asyncio.gather(
            *(s.update(uid, UserPatch(name=f"n{i}")) for i in range(20) for s in (a, b))
        )
        assert sorted(e.user.version for e in results) == list(range(2, 42))
        assert (await b.get(uid)).version == 41
    finally:
        await a.aclose()
        await b.aclose()


async def test_history_forgets_events_older_than_its_age_limit(redis_url: str) -> None:
    """Both stores drop history by age; a subscriber from before it must be told (fan-out)."""
    stores: list[Store] = [
        MemoryStore(partitions=1, history_max_age=0.2),
        RedisStore.from_url(redis_url, partitions=1, history_max_age=0.2),
    ]
    for store in stores:
        try:
            await store.create(row("old@x.io"))
            await anyio.sleep(0.4)
            fresh = await store.create(row("new@x.io"))
            history = await store.history(0, 0, 10)
            assert [e.offset for e in history] == [fresh.offset] == [2], type(store).__name__
        finally:
            await store.aclose()


@pytest.mark.redis
async def test_redis_calls_beyond_the_pool_wait_for_a_connection(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, pool_size=4, partitions=8)
    try:
        created = await store.create(row("ada@x.io"))
        # 50 times the pool: every call waits its turn rather than failing as unavailable.
        users = await asyncio.gather(*(store.get(created.user.id) for _ in range(200)))
        assert {u.id for u in users} == {created.user.id}
    finally:
        await store.aclose()


async def test_a_store_error_names_the_redis_and_the_cause() -> None:
    """An SRE reading "store unreachable" must know which Redis and why; a read is not told
    that "nothing was written", a write whose reply is lost is told its outcome is unknown."""
    from harness.redis import free_port
    from hub.errors import StoreUnavailable

    port = free_port()  # nothing listens there
    store = RedisStore.from_url(f"redis://:secret@127.0.0.1:{port}/0", partitions=2)
    try:
        with pytest.raises(StoreUnavailable) as read:
            await store.get(UNKNOWN_ID)
        assert f"Redis at 127.0.0.1:{port}" in str(read.value)
        assert "connect call failed" in str(read.value).lower()  # the cause
        assert "secret" not in str(read.value)
        assert "written" not in str(read.value)
        with pytest.raises(StoreUnavailable) as write:
            await store.create(row("ada@x.io"))
        assert f"127.0.0.1:{port}" in str(write.value) and "unknown" in str(write.value)
    finally:
        await store.aclose()
