"""The store contract for idempotent writes and resync by state, on every store: embedded, one
Redis, Redis Cluster (real processes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from hub.domain import (
    Event,
    EventType,
    Idempotency,
    NewUser,
    User,
    UserPatch,
    UserStatus,
    partition_of,
)
from hub.errors import AlreadyExists, InvalidArgument, NotFound
from hub.store.base import Store
from hub.store.cluster import ClusterStore
from hub.store.memory import MemoryStore
from hub.store.redis import RedisStore

PARTITIONS = 8

Make = Callable[..., Store]


@pytest.fixture(params=["memory", "redis", "cluster"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Makes stores of one kind with the windows a test asks for."""
    made: list[Store] = []

    def build(**windows: Any) -> Store:
        s: Store
        if request.param == "memory":
            s = MemoryStore(PARTITIONS, 1000, **windows)
        elif request.param == "redis":
            s = RedisStore.from_url(request.getfixturevalue("redis_url"),
                                    partitions=PARTITIONS, history_size=1000, **windows)
        else:
            s = ClusterStore.from_url(request.getfixturevalue("cluster_url"),
                                      partitions=PARTITIONS, history_size=1000, **windows)
        made.append(s)
        return s

    yield build
    for s in made:
        await s.aclose()


def _new(email: str, key: str | None = None, fingerprint: str = "f1") -> NewUser:
    idem = Idempotency(key, fingerprint) if key else None
    return NewUser.build(email, "Ada", UserStatus.ACTIVE, None, idem, PARTITIONS)


async def _all_users(store: Store) -> list[User]:
    return await store.list_after("", 10_000)


async def _events(store: Store) -> list[Event]:
    out: list[Event] = []
    for p in range(PARTITIONS):
        out += await store.history(p, 0, 10_000)
    return out


async def test_a_create_retried_with_its_key_returns_the_first_outcome(make: Make) -> None:
    store = make()
    await store.ensure_epoch()
    first = await store.create(_new("ada@example.com", "k1"))
    # The retry builds a new id (as a new request would); the key's outcome wins.
    again = await store.create(_new("ada@example.com", "k1"))
    assert (again.user, again.offset, again.partition, again.epoch) == (
        first.user, first.offset, first.partition, first.epoch)
    assert [u.id for u in await _all_users(store)] == [first.user.id]
    assert len(await _events(store)) == 1


async def test_a_key_reused_for_another_request_is_refused(make: Make) -> None:
    store = make()
    await store.ensure_epoch()
    await store.create(_new("ada@example.com", "k1", "f1"))
    with pytest.raises(InvalidArgument) as refused:
        await store.create(_new("bob@example.com", "k1", "f2"))
    assert refused.value.violations[0].field == "idempotency-key"
    assert len(await _all_users(store)) == 1


async def test_bulk_rows_with_one_key_are_one_create(make: Make) -> None:
    store = make()
    await store.ensure_epoch()
    rows = [_new("a@example.com", "same"), _new("a@example.com", "same"),
            _new("b@example.com", "same", "other"), _new("c@example.com", "k3")]
    results = await store.create_many(rows)
    assert isinstance(results[0], Event) and isinstance(results[1], Event)
    assert results[1].user.id == results[0].user.id
    assert isinstance(results[2], InvalidArgument)
    assert isinstance(results[3], Event)
    # The whole batch again: nothing new, every applied row's first outcome.
    again = await store.create_many(rows)
    assert [r.user.id for r in again if isinstance(r, Event)] == [
        results[0].user.id, results[0].user.id, results[3].user.id]
    assert len(await _all_users(store)) == 2
    assert len(await _events(store)) == 2


async def test_an_update_and_a_delete_retried_apply_once(make: Make) -> None:
    store = make()
    await store.ensure_epoch()
    user = (await store.create(_new("ada@example.com"))).user
    key = Idempotency("u1", "f")
    first = await store.update(user.id, UserPatch(name="Ada L."), 1, key)
    again = await store.update(user.id, UserPatch(name="Ada L."), 1, key)
    assert again.user.version == first.user.version == 2
    assert (await store.get(user.id)).version == 2
    gone = await store.delete(user.id, 2, Idempotency("d1", "f"))
    # Retried after the user is gone: the delete's outcome, not NotFound.
    assert (await store.delete(user.id, 2, Idempotency("d1", "f"))).offset == gone.offset
    with pytest.raises(NotFound):
        await store.delete(user.id, 2)
    assert len(await _events(store)) == 3


async def test_keys_are_forgotten_after_the_window(make: Make) -> None:
    store = make(idempotency_window=0.3)
    await store.ensure_epoch()
    await store.create(_new("ada@example.com", "k1"))
    await asyncio.sleep(0.6)
    # The same request once the key is forgotten is a new create: its email is taken now.
    with pytest.raises(AlreadyExists):
        await store.create(_new("ada@example.com", "k1"))


async def _state(store: Store, offsets: tuple[int, ...], limit: int = 2
                 ) -> tuple[dict[str, User], dict[str, User]] | None:
    """Every partition's state since `offsets`, read in pages of `limit`."""
    changed: dict[str, User] = {}
    deleted: dict[str, User] = {}
    for p in range(PARTITIONS):
        cursor = None
        while True:
            page = await store.state_since(p, offsets[p], cursor, limit)
            if page is None:
                return None
            for u in page.users:
                assert partition_of(u.id, PARTITIONS) == p
                changed[u.id] = u
            for u in page.deleted:
                deleted[u.id] = u
            if page.cursor is None:
                break
            cursor = page.cursor
    return changed, deleted


async def test_state_since_gives_the_changed_and_the_deleted(make: Make) -> None:
    store = make()
    await store.ensure_epoch()
    users = [(await store.create(_new(f"u{i}@example.com"))).user for i in range(12)]
    since = (await store.position()).offsets
    updated = [(await store.update(u.id, UserPatch(name="new"))).user for u in users[:4]]
    gone = [(await store.delete(u.id)).user for u in users[4:7]]
    fresh = [(await store.create(_new(f"n{i}@example.com"))).user for i in range(3)]
    # Deleted after a change since the position: a tombstone, not a state.
    await store.update(fresh[2].id, UserPatch(name="x"))
    gone.append((await store.delete(fresh[2].id)).user)
    state = await _state(store, since)
    assert state is not None
    changed, deleted = state
    assert changed == {u.id: u for u in updated + fresh[:2]}
    assert set(deleted) == {u.id for u in gone}
    for u in gone:
        assert deleted[u.id].version == u.version  # the tombstone as its delete carried it
    # Nothing since now.
    assert await _state(store, (await store.position()).offsets) == ({}, {})


async def test_state_since_refuses_past_the_tombstone_retention(make: Make) -> None:
    store = make(tombstone_retention=0.2)
    await store.ensure_epoch()
    users = [(await store.create(_new(f"u{i}@example.com"))).user for i in range(40)]
    since = (await store.position()).offsets
    for u in users:
        await store.delete(u.id)
    await asyncio.sleep(0.4)
    for i in range(40):  # later writes drop the old tombstones, partition by partition
        await store.create(_new(f"later{i}@example.com"))
    assert await _state(store, since) is None
    # From the current position a resync is possible again.
    assert await _state(store, (await store.position()).offsets) == ({}, {})


async def test_deleted_tombstone_carries_the_deleted_type(make: Make) -> None:
    store = make()
    await store.ensure_epoch()
    user = (await store.create(_new("ada@example.com"))).user
    since = (await store.position()).offsets
    event = await store.delete(user.id)
    assert event.type is EventType.DELETED
    state = await _state(store, since)
    assert state is not None and state[1][user.id] == event.user
