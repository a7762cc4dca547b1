"""The cluster store's sharded pub/sub on a real cluster: a slot that moves ends the
subscription loudly, and a partition whose events stop arriving while its offsets advance
(a subscription that died silently) is found by the audit, so the listener subscribes again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import pytest

from harness.redis import ClusterProcess, key_slot
from hub.domain import EventBatch, NewUser, UserStatus, partition_of
from hub.errors import StoreUnavailable
from hub.store.cluster import ClusterStore, partition_tags

pytestmark = pytest.mark.anyio
PARTITIONS = 16


@pytest.fixture
async def store(cluster_url: str) -> AsyncIterator[ClusterStore]:
    s = ClusterStore.from_url(cluster_url, partitions=PARTITIONS)
    await s.ensure_epoch()
    yield s
    await s.aclose()


def rows_in(partition: int, n: int) -> list[NewUser]:
    rows: list[NewUser] = []
    while len(rows) < n:
        new = NewUser.build(f"p{partition}-{len(rows)}-{id(rows)}@x.io", "Ada", UserStatus.ACTIVE)
        if partition_of(new.user.id, PARTITIONS) == partition:
            rows.append(new)
    return rows


async def drain(batches: AsyncIterator[EventBatch], got: list[EventBatch]) -> None:
    async for batch in batches:
        got.append(batch)


async def test_a_partition_gone_silent_is_found_and_resubscribed(store: ClusterStore) -> None:
    deaf, loud = 3, 5

    async def write_and_audit() -> None:
        while True:
            for p in (deaf, loud):
                await store.create_many(rows_in(p, 2))
            await store.position()  # what the fan-out's audit does each second
            await anyio.sleep(0.3)

    got: list[EventBatch] = []
    async with store.listen() as batches, anyio.create_task_group() as tg:
        # The subscription of `deaf` dies silently: its messages no longer reach the store.
        del store._partition_of_channel[store._channels[deaf].encode()]
        tg.start_soon(write_and_audit)
        with anyio.fail_after(10), pytest.raises(
                StoreUnavailable, match=f"partition {deaf} stopped arriving"):
            async for batch in batches:
                got.append(batch)
        tg.cancel_scope.cancel()
    assert got and {b.partition for b in got} == {loud}


async def test_steady_writes_everywhere_raise_no_false_alarm(store: ClusterStore) -> None:
    got: list[EventBatch] = []
    async with store.listen() as batches, anyio.create_task_group() as tg:
        tg.start_soon(drain, batches, got)
        for _ in range(12):
            await store.create_many([r for p in range(PARTITIONS) for r in rows_in(p, 1)])
            await store.position()
            await anyio.sleep(0.25)
        # Every batch arrives (a busy machine delays them): wait for them, not a fixed time.
        with anyio.move_on_after(10):
            while sum(b.count for b in got) < 12 * PARTITIONS:
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)  # and no more than them
        tg.cancel_scope.cancel()
    assert sum(b.count for b in got) == 12 * PARTITIONS


async def test_a_slot_moving_away_ends_the_subscription(
    store: ClusterStore, redis_cluster: ClusterProcess,
) -> None:
    p = 2
    slot = key_slot(f"{{{partition_tags(PARTITIONS)[p]}}}".encode())
    source = redis_cluster.master_of_slot(slot)
    target = next(m for m in redis_cluster.masters() if m.port != source.port)
    async with store.listen() as batches:
        await store.create_many(rows_in(p, 1))
        first = await anext(batches)
        assert first.partition == p
        await asyncio.to_thread(redis_cluster.migrate_slot, slot, target)
        with anyio.fail_after(10), pytest.raises(StoreUnavailable, match="slot moved"):
            async for _ in batches:
                pass
    # Listening again follows the slot to its new master.
    async with store.listen() as batches:
        await store.create_many(rows_in(p, 1))
        with anyio.fail_after(5):
            batch = await anext(batches)
        assert (batch.partition, batch.first_offset) == (p, 2)
    assert redis_cluster.master_of_slot(slot).port == target.port


async def test_batches_carry_the_epoch_another_instance_moved_to(
    store: ClusterStore, cluster_url: str,
) -> None:
    other = ClusterStore.from_url(cluster_url, partitions=PARTITIONS)
    try:
        async with store.listen() as batches:
            before = await store.position()
            moved = await other.rotate_epoch(before.epoch)
            assert moved != before.epoch
            assert (await store.position()).epoch == moved  # what the fan-out reads
            await other.create_many(rows_in(7, 1))
            with anyio.fail_after(5):
                batch = await anext(batches)
            # Shown with the digest the fan-out now follows: routed, not taken for a message
            # of an epoch already replaced (and dropped until the audit repaired it).
            assert (batch.partition, batch.epoch) == (7, moved)
    finally:
        await other.aclose()


async def test_a_message_lost_before_listening_raises_no_alarm(store: ClusterStore) -> None:
    # A partition written while nobody listened: its offset is ahead of anything the new
    # subscription will receive, yet nothing is missing from it.
    await store.create_many(rows_in(4, 2))
    async with store.listen() as batches, anyio.create_task_group() as tg:
        got: list[EventBatch] = []
        tg.start_soon(drain, batches, got)
        for _ in range(5):
            await store.position()
            await anyio.sleep(0.3)
        assert not store._resubscribe
        tg.cancel_scope.cancel()
