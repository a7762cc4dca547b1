"""The fan-out engine on its own: a batch of a partition no local subscription wants is not
decoded, and positions still move past it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from hub.domain import Event, EventBatch, NewUser, UserStatus, partition_of
from hub.fanout import Fanout
from hub.rpc.wire import encode_event
from hub.store.memory import MemoryStore

pytestmark = pytest.mark.anyio


class CountingStore(MemoryStore):
    """A memory store whose live batches count how often their events are decoded."""

    def __init__(self) -> None:
        super().__init__(partitions=4)
        self.decoded: list[int] = []  # partitions of the batches decoded

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[AsyncIterator[EventBatch]]:
        async with super().listen() as batches:

            async def counted() -> AsyncIterator[EventBatch]:
                async for batch in batches:
                    events = batch.events()

                    def decode(p: int = batch.partition, e: list[Event] = events) -> list[Event]:
                        self.decoded.append(p)
                        return e

                    yield EventBatch(batch.epoch, batch.partition, batch.first_offset,
                                     batch.count, decode)

            yield counted()


_serial = iter(range(1_000_000))


def user_in(partition: int, store: MemoryStore) -> NewUser:
    email = f"u{next(_serial)}@example.com"
    while True:
        new = NewUser.build(email, "", UserStatus.ACTIVE)
        if partition_of(new.user.id, store.partitions) == partition:
            return new


async def test_only_wanted_partitions_are_decoded_and_positions_move_past_the_rest() -> None:
    store = CountingStore()
    fanout = Fanout(store, encode_event)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(fanout.run())
        await fanout.ready.wait()
        followed = await store.create(user_in(0, store))
        with anyio.fail_after(5):
            while fanout.position().offsets[0] < followed.offset:
                await asyncio.sleep(0.01)
        assert store.decoded == []  # nobody subscribed yet

        async with fanout.subscribe({followed.user.id}) as sub:
            other = await store.create(user_in(1, store))
            wanted = await store.create(user_in(0, store))  # same partition, another user
            again = await store.create_many([user_in(0, store)])
            with anyio.fail_after(5):
                while fanout.position().offsets[0] < again[0].offset:  # type: ignore[union-attr]
                    await asyncio.sleep(0.01)
            # Partition 1 was skipped undecoded; partition 0 is followed, so decoded.
            assert 1 not in store.decoded and store.decoded.count(0) == 2
            assert fanout.position().offsets[1] == other.offset
            items, _ = sub.drain()
            assert items == []  # the followed user did not change
            assert wanted.partition == 0
        # With the subscription gone, partition 0 is skipped too.
        before = len(store.decoded)
        last = await store.create(user_in(0, store))
        with anyio.fail_after(5):
            while fanout.position().offsets[0] < last.offset:
                await asyncio.sleep(0.01)
        assert len(store.decoded) == before
        runner.cancel()
