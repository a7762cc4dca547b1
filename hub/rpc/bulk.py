"""One bulk stream (BulkCreateUsers, ImportUsers): rows validated, written in batches of
--bulk-batch-size with two store writes in flight, and every row's outcome collected into one
BulkCreateResponse that stays under the message limit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc

from hub import errors
from hub.api.user.v1 import user_service_pb2
from hub.commands import Commands
from hub.domain import Event, NewUser
from hub.principal import caller
from hub.resume import POSITION_KEY, covering
from hub.rpc.errors import code_of
from hub.rpc.wire import Undecodable, create_of
from hub.settings import Settings
from hub.store.base import BulkResult

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

# A partial bulk batch is written once it is this old, so a slow producer's rows still show up
# to subscribers promptly instead of waiting for the batch to fill.
_BULK_FLUSH_AFTER = 0.05
# Worst-case encoded size of one row's outcome in BulkCreateResponse (an error quoting a
# 254-character email), and room kept free for the rest of the response.
_ROW_RESERVE = 400
_RESPONSE_HEADROOM = 1024
# Store writes of one bulk stream in flight at once: with two, Redis runs one script while the
# next is already queued behind it, and hub validates the rows after them meanwhile.
_WRITES_IN_FLIGHT = 2

class Bulk:
    """One bulk stream's rows: validated, written in batches of bulk_batch_size, and their
    outcomes collected into one BulkCreateResponse that stays under the message limit."""

    def __init__(self, ops: Commands, settings: Settings, idempotency_key: str = "") -> None:
        self._ops, self._store = ops, ops.store
        # The stream's key K gives row N the key "K/N" (a row's own key wins: ImportUsers).
        self._stream_key = idempotency_key
        # Where the rows written are: per partition the last offset, for hub-position.
        self._covered: list[Event] = []
        self._max_rows, self._batch_size = settings.bulk_max_rows, settings.bulk_batch_size
        self.response = user_service_pb2.BulkCreateResponse()
        self.index = -1  # the last row read
        self._batch: list[tuple[int, NewUser]] = []
        self._writing: deque[tuple[list[tuple[int, NewUser]],
                                   asyncio.Task[list[BulkResult]]]] = deque()
        self._started = time.monotonic()
        self._expires_at = caller().expires_at
        # The response lists every row's outcome, so it must stay under the message limit:
        # `_size` is its encoded size so far and every pending row reserves its worst case.
        self._budget = settings.max_message_bytes - _RESPONSE_HEADROOM
        self._size = 0

    def refuse(self, index: int, exc: errors.HubError) -> None:
        self._size += _row_error(self.response, index, exc).ByteSize() + 3

    async def add(self, request: user_service_pb2.CreateUserRequest | Undecodable) -> bool:
        """Takes the next row; False when the stream must stop (the rest were not read)."""
        if not self._fits() and not await self._admit():
            return False
        await self._take(request)
        if len(self._batch) >= self._batch_size or (
            self._batch and time.monotonic() - self._started > _BULK_FLUSH_AFTER
        ):
            await self.flush()
        return True

    async def add_many(
        self, requests: Sequence[user_service_pb2.CreateUserRequest],
        keys: Sequence[str] = (),
    ) -> bool:
        if len(keys) > len(requests):
            self.refuse(self.index + 1, errors.InvalidArgument.of(
                "idempotency_keys", f"{len(keys)} keys for {len(requests)} rows: this"
                " message's rows and the rest were not read"))
            return False
        for n, request in enumerate(requests):
            if not self._fits() and not await self._admit():
                return False
            await self._take(request, keys[n] if n < len(keys) else "")
            if len(self._batch) >= self._batch_size:
                await self.flush()
        # A message is the producer's own batch: write it now rather than wait for the next.
        if self._batch:
            await self.flush()
        return True

    async def _take(self, request: user_service_pb2.CreateUserRequest | Undecodable,
                    key: str = "") -> None:
        try:
            if isinstance(request, Undecodable):
                raise request.error
            if not key and self._stream_key:
                key = f"{self._stream_key}/{self.index}"
            create = create_of(request, key)
            # Most bulk rows have no password: they skip the coroutine that hashing needs.
            self._batch.append((self.index, self._ops.new_user_without_password(create)
                                if not request.password
                                else await self._ops.new_user(create)))
        except errors.HubError as exc:
            self.refuse(self.index, exc)

    def _fits(self) -> bool:
        """Moves to the next row; True when it fits every limit (the common case, checked
        without a coroutine), else _admit decides."""
        self.index += 1
        # Rows read but not yet counted in the response: the batch and the writes in flight.
        pending = len(self._batch) + sum(len(batch) for batch, _ in self._writing)
        return (self.index < self._max_rows and time.time() < self._expires_at
                and self._size + (pending + 1) * _ROW_RESERVE <= self._budget)

    async def _admit(self) -> bool:
        index = self.index
        if index >= self._max_rows or time.time() >= self._expires_at:
            await self.flush()
            self.refuse(index, errors.TooManyRows(index, self._max_rows)
                        if index >= self._max_rows
                        else errors.Unauthenticated("token expired; the rest were not read"))
            return False
        # The response might outgrow the message limit: count the rows in flight, then look.
        await self.flush()
        await self.settle()
        if self._size + _ROW_RESERVE > self._budget:
            self.refuse(index, errors.TooManyRows(index))
            return False
        return True

    async def flush(self) -> None:
        """Starts writing the rows read so far. Writes run while the next rows are read and
        validated (up to _WRITES_IN_FLIGHT at once, so Redis always has the next script
        queued); outcomes are still recorded in row order."""
        self._started = time.monotonic()
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        while len(self._writing) >= _WRITES_IN_FLIGHT:
            await self._settle_oldest()
        await self._wait_for_tokens(len(batch))
        self._writing.append((batch, asyncio.create_task(self._write(batch))))

    async def settle(self) -> None:
        """Waits for every write in flight and records its rows' outcomes."""
        while self._writing:
            await self._settle_oldest()

    async def _settle_oldest(self) -> None:
        batch, writing = self._writing[0]
        results = await writing
        self._writing.popleft()
        ids = self.response.user_ids
        for (index, _), result in zip(batch, results, strict=True):
            if isinstance(result, errors.HubError):
                self.refuse(index, result)
            else:
                ids.append(result.user.id)
                self._size += len(result.user.id) + 2
                self._cover(result)

    async def _wait_for_tokens(self, rows: int) -> None:
        """A bulk stream is slowed to the caller's write rate rather than refused: the
        client-stream's flow control pushes back on the producer. Charged per batch."""
        rows = min(rows, self._ops.limiter.burst)
        while True:
            try:
                self._ops.charge(rows)
                return
            except errors.RateLimited as exc:
                await asyncio.sleep(exc.retry_after)

    async def _write(self, batch: list[tuple[int, NewUser]]) -> list[BulkResult]:
        try:
            return await self._store.create_many([new for _, new in batch])
        except (errors.StoreUnavailable, errors.StoreFull) as exc:
            # Report every row of the failed batch: none is lost silently, and a retry of
            # a row that did land is refused by the email index, never duplicated. (A write
            # is one script that Redis refuses whole, so none of these rows landed unless
            # the outcome is unknown, which the message then says.)
            return [exc] * len(batch)

    def _cover(self, event: Event) -> None:
        """Keeps, per partition, the row written last (bounded by the partition count)."""
        covered = self._covered
        if not covered:
            covered.extend([event] * self._store.partitions)
        last = covered[event.partition]
        if event.offset > last.offset or last.partition != event.partition:
            covered[event.partition] = event

    async def finish(self, context: Context | None = None) -> user_service_pb2.BulkCreateResponse:
        await self.flush()
        await self.settle()
        self.response.created_count = len(self.response.user_ids)
        if context is not None and self._covered:
            context.set_trailing_metadata(((POSITION_KEY, covering(
                [e for p, e in enumerate(self._covered) if e.partition == p],
                self._store.partitions)),))
        return self.response

    def abandon(self) -> None:
        """The call ended early (cancelled, or an error): writes already sent to the store
        still complete there, and their outcomes are dropped with the call."""
        for _, writing in self._writing:
            if not writing.done():
                writing.add_done_callback(_retrieve)
        self._writing.clear()


def _retrieve(task: asyncio.Task[list[BulkResult]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("bulk write of an abandoned call failed", exc_info=task.exception())


def _row_error(
    response: user_service_pb2.BulkCreateResponse, index: int, exc: errors.HubError
) -> user_service_pb2.BulkCreateError:
    field = ""
    if isinstance(exc, errors.InvalidArgument):
        field = exc.violations[0].field
    elif isinstance(exc, errors.AlreadyExists | errors.LimitExceeded):
        field = exc.field
    return response.errors.add(
        index=index, code=code_of(exc).value[0], message=str(exc), field=field
    )
