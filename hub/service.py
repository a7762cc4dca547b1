"""user.v1.UserService over grpc.aio: proto <-> domain at the edge, errors mapped by hub.status."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf import empty_pb2

from hub import errors, tokens
from hub.api.user.v1 import common_pb2, user_service_pb2, user_service_pb2_grpc
from hub.domain import NewUser
from hub.live import LiveStreams
from hub.ops import UserOps
from hub.principal import caller
from hub.settings import Settings
from hub.status import code_of, to_status
from hub.validation import (
    check,
    user_id_violation,
)
from hub.wire import RESUME_TOKEN_KEY, Undecodable, user_to_pb

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

DEFAULT_PAGE_SIZE = 100
# A partial bulk batch is written once it is this old, so a slow producer's rows still show up
# to subscribers promptly instead of waiting for the batch to fill.
_BULK_FLUSH_AFTER = 0.05
# Worst-case encoded size of one row's outcome in BulkCreateResponse (an error quoting a
# 254-character email), and room kept free for the rest of the response.
_ROW_RESERVE = 400
_RESPONSE_HEADROOM = 1024


def _unary(
    fn: Callable[[Any, Req, Context], Awaitable[Resp]],
) -> Callable[[Any, Req, Context], Awaitable[Resp]]:
    """Domain errors end the call with their mapped status; anything else becomes INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            # context.abort ends the call by raising AbortError: it must pass through untouched.
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await context.abort_with_status(to_status(exc))

    return wrapper


def _server_stream(
    fn: Callable[[Any, Req, Context], AsyncIterator[Resp]],
) -> Callable[[Any, Req, Context], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Context) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await context.abort_with_status(to_status(exc))

    return wrapper


class UserService(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self, ops: UserOps, live: LiveStreams, settings: Settings) -> None:
        self._ops = ops
        self._store = ops.store
        self._live = live
        self._settings = settings

    @_unary
    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: Context
    ) -> common_pb2.User:
        check(user_id_violation(request.user_id))
        return user_to_pb(await self._store.get(request.user_id))

    @_unary
    async def CreateUser(
        self, request: user_service_pb2.CreateUserRequest, context: Context
    ) -> common_pb2.User:
        return user_to_pb((await self._ops.create(request)).user)

    @_unary
    async def UpdateUser(
        self, request: user_service_pb2.UpdateUserRequest, context: Context
    ) -> common_pb2.User:
        return user_to_pb((await self._ops.update(request)).user)

    @_unary
    async def DeleteUser(
        self, request: user_service_pb2.DeleteUserRequest, context: Context
    ) -> empty_pb2.Empty:
        await self._ops.delete(request)
        return empty_pb2.Empty()

    @_server_stream
    async def ListUsers(
        self, request: user_service_pb2.ListUsersRequest, context: Context
    ) -> AsyncIterator[common_pb2.User]:
        size = request.page_size or DEFAULT_PAGE_SIZE
        most = self._settings.max_page_size
        check(
            errors.FieldViolation("page_size", f"must be 0 (the default, 100) to {most}")
            if not 0 <= request.page_size <= most else None,
            user_id_violation(request.page_token, "page_token") if request.page_token else None,
        )
        # Positioned just before the listing: subscribing with it delivers every change made
        # after the snapshot began (some may already show in it; versions tell which).
        position = await self._store.position()
        context.set_trailing_metadata(((RESUME_TOKEN_KEY, tokens.encode(position)),))
        after = request.page_token
        while True:
            # One page at a time: memory stays bounded by page_size whatever the user count.
            page = await self._store.list_after(after, size)
            for user in page:
                yield user_to_pb(user)
            if len(page) < size or context.done():
                return
            after = page[-1].id

    @_unary
    async def BulkCreateUsers(
        self,
        request_iterator: AsyncIterable[user_service_pb2.CreateUserRequest],
        context: Context,
    ) -> user_service_pb2.BulkCreateResponse:
        response = user_service_pb2.BulkCreateResponse()
        batch: list[tuple[int, NewUser]] = []
        started = time.monotonic()
        # The response lists every row's outcome, so it must stay under the message limit:
        # `size` is its encoded size so far and every pending row reserves its worst case.
        budget = self._settings.max_message_bytes - _RESPONSE_HEADROOM
        size = 0

        def refuse(index: int, exc: errors.HubError) -> None:
            nonlocal size
            size += _row_error(response, index, exc).ByteSize() + 3

        async def flush() -> None:
            nonlocal size
            rows = [new for _, new in batch]
            await self._wait_for_tokens(len(rows))
            try:
                results = await self._store.create_many(rows)
            except errors.StoreUnavailable as exc:
                # Report every row of the failed batch: none is lost silently, and a retry of
                # a row that did land is refused by the email index, never duplicated.
                results = [exc] * len(rows)
            for (index, _), result in zip(batch, results, strict=True):
                if isinstance(result, errors.HubError):
                    refuse(index, result)
                else:
                    response.user_ids.append(result.user.id)
                    size += len(result.user.id) + 2
            batch.clear()

        principal = caller()
        index = -1
        async for request in request_iterator:
            index += 1
            if index >= self._settings.bulk_max_rows or time.time() >= principal.expires_at:
                await flush()
                refuse(index, errors.TooManyRows(index, self._settings.bulk_max_rows)
                       if index >= self._settings.bulk_max_rows
                       else errors.Unauthenticated("token expired; the rest were not read"))
                break
            if size + (len(batch) + 1) * _ROW_RESERVE > budget:
                await flush()
                if size + _ROW_RESERVE > budget:
                    # Stop reading: this row and the rest were not processed.
                    refuse(index, errors.TooManyRows(index))
                    break
            try:
                if isinstance(request, Undecodable):
                    raise request.error
                batch.append((index, await self._ops.new_user(request)))
            except errors.HubError as exc:
                refuse(index, exc)
            if len(batch) >= self._settings.bulk_batch_size or (
                batch and time.monotonic() - started > _BULK_FLUSH_AFTER
            ):
                await flush()
                started = time.monotonic()
        if batch:
            await flush()
        response.created_count = len(response.user_ids)
        return response

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

    async def UserUpdates(  # type: ignore[override]
        self,
        request_iterator: AsyncIterable[user_service_pb2.UserUpdateRequest],
        context: Context,
    ) -> None:
        await self._live.serve(request_iterator, context, batched=False)


def _row_error(
    response: user_service_pb2.BulkCreateResponse, index: int, exc: errors.HubError
) -> user_service_pb2.BulkCreateError:
    field = ""
    if isinstance(exc, errors.InvalidArgument):
        field = exc.violations[0].field
    elif isinstance(exc, errors.AlreadyExists):
        field = exc.field
    return response.errors.add(
        index=index, code=code_of(exc).value[0], message=str(exc), field=field
    )
