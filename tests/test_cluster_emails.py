"""Email uniqueness on Redis Cluster: the reservation protocol of hub.store.cluster, on a real
cluster. Two store objects stand for two hub instances; a "crash" between the protocol's steps
is a writer that runs the first steps itself and never the rest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from hub.domain import Event, NewUser, UserPatch, UserStatus, email_key
from hub.errors import AlreadyExists, HubError, NotFound
from hub.store import cluster
from hub.store.cluster import ClusterStore
from hub.store.redis import _Op

pytestmark = pytest.mark.anyio


def row(email: str) -> NewUser:
    return NewUser.build(email, "Ada", UserStatus.ACTIVE)


@pytest.fixture
async def two(cluster_url: str) -> AsyncIterator[tuple[ClusterStore, ClusterStore]]:
    a = ClusterStore.from_url(cluster_url, partitions=16)
    b = ClusterStore.from_url(cluster_url, partitions=16)
    await a.ensure_epoch()
    yield a, b
    await a.aclose()
    await b.aclose()


async def every_user(store: ClusterStore) -> list[str]:
    users, after = [], ""
    while page := await store.list_after(after, 100):
        users += [u.email for u in page]
        after = page[-1].id
    return users


async def test_concurrent_creates_of_one_email_on_two_instances_never_both_succeed(
    two: tuple[ClusterStore, ClusterStore],
) -> None:
    a, b = two
    outcomes = []
    for i in range(40):
        email = f"race{i}@x.io"
        results = await asyncio.gather(a.create(row(email)), b.create(row(email.upper())),
                                       return_exceptions=True)
        won = [r for r in results if isinstance(r, Event)]
        assert len(won) <= 1, results
        assert all(isinstance(r, Event | AlreadyExists) for r in results), results
        outcomes.append(len(won))
    assert sum(outcomes) >= 30  # mostly one winner: a refusal of both is the rare tie
    emails = [e.casefold() for e in await every_user(a)]
    assert len(emails) == len(set(emails)) == sum(outcomes)


async def test_a_crash_after_reserving_locks_the_email_only_for_the_grace(
    two: tuple[ClusterStore, ClusterStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = two
    crashed = row("held@x.io")
    token, since = await a._take_email(email_key(crashed.user.email), crashed.user.id)

    with pytest.raises(AlreadyExists):  # a write may be on its way: respected
        await b.create(row("held@x.io"))

    monkeypatch.setattr(cluster, "_PENDING_GRACE_MS", 0)
    taker = await b.create(row("HELD@x.io"))  # stale: checked, fenced, taken over
    assert taker.user.email == "HELD@x.io"

    # The crashed writer was only slow: its write arrives now, and is refused whole.
    op = _Op(crashed_type(), crashed.user, 0, "", email_key(crashed.user.email), None)
    (result,) = await a._apply([op], [(token, since)])
    assert result is cluster._RESERVATION_LOST
    with pytest.raises(NotFound):
        await a.get(crashed.user.id)
    assert await every_user(a) == ["HELD@x.io"]
    history = [e for p in range(a.partitions) for e in await a.history(p, 0, 100)]
    assert [e.user.id for e in history] == [taker.user.id]  # no event without its user


async def test_a_crash_after_the_write_leaves_the_email_taken_and_confirms_it(
    two: tuple[ClusterStore, ClusterStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = two
    new = row("landed@x.io")
    key = email_key(new.user.email)
    token, since = await a._take_email(key, new.user.id)
    op = _Op(crashed_type(), new.user, 0, "", key, None)
    (landed,) = await a._apply([op], [(token, since)])  # ...and then the crash: no confirm
    assert isinstance(landed, Event)

    monkeypatch.setattr(cluster, "_PENDING_GRACE_MS", 0)
    with pytest.raises(AlreadyExists, match="already registered"):
        await b.create(row("landed@x.io"))
    entry = await b._r.hget(b._emails(key), key)
    assert entry.startswith(b"c|") and entry.endswith(new.user.id.encode())  # confirmed now
    assert await every_user(b) == ["landed@x.io"]


async def test_an_email_change_moves_the_reservation(
    two: tuple[ClusterStore, ClusterStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = two
    user = (await a.create(row("old@x.io"))).user
    moved = await a.update(user.id, UserPatch(email="new@x.io"))
    assert moved.user.email == "new@x.io"
    with pytest.raises(AlreadyExists):
        await b.create(row("NEW@x.io"))
    freed = await b.create(row("old@x.io"))  # released by the update
    assert freed.user.email == "old@x.io"

    # An update whose release of the old email never ran (crash): the entry still names
    # the user, who no longer has that email; the next writer finds it stale.
    other = (await a.create(row("first@x.io"))).user
    changed = _Op(update_type(), UserPatch(email="second@x.io").apply(other), other.version,
                  email_key("first@x.io"), email_key("second@x.io"), None)
    reservation = await a._take_email(email_key("second@x.io"), other.id)
    (result,) = await a._apply([changed], [reservation])
    assert isinstance(result, Event)
    monkeypatch.setattr(cluster, "_PENDING_GRACE_MS", 0)
    with pytest.raises(AlreadyExists):
        await b.create(row("second@x.io"))  # the user has it: taken
    reclaimed = await b.create(row("first@x.io"))
    assert reclaimed.user.email == "first@x.io"
    emails = sorted(e.casefold() for e in await every_user(a))
    assert emails == ["first@x.io", "new@x.io", "old@x.io", "second@x.io"]


async def test_a_delete_frees_the_email_and_a_bulk_keeps_row_order(
    two: tuple[ClusterStore, ClusterStore],
) -> None:
    a, b = two
    gone = (await a.create(row("gone@x.io"))).user
    await a.delete(gone.id)
    results = await b.create_many([row("gone@x.io"), row("x@x.io"), row("GONE@x.io"),
                                   row("y@x.io")])
    kinds: list[type[Event | HubError]] = [type(r) for r in results]
    assert kinds == [Event, Event, AlreadyExists, Event]


def crashed_type() -> cluster.EventType:
    return cluster.EventType.CREATED


def update_type() -> cluster.EventType:
    return cluster.EventType.UPDATED
