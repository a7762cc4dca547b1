"""user.v1.UserService over grpc.aio: proto <-> domain at the edge, errors mapped in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, TypeAlias

import grpc
from google.protobuf import empty_pb2

from hub import errors, resume
from hub.api.user.v1 import common_pb2, user_service_pb2, user_service_pb2_grpc
from hub.commands import Commands
from hub.domain import Event
from hub.resume import IDEMPOTENCY_KEY, POSITION_KEY, RESUME_TOKEN_KEY
from hub.rpc.bulk import Bulk
from hub.rpc.streams import LiveStreams
from hub.rpc.wire import (
    ImportMessage,
    RowsOverLimit,
    Undecodable,
    Unparsed,
    create_of,
    delete_of,
    parse_rows,
    update_of,
    user_to_pb,
)
from hub.settings import Settings
from hub.validation import (
    check,
    page_size_violation,
    user_id_violation,
)

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

DEFAULT_PAGE_SIZE = 100


class UserService(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self, ops: Commands, live: LiveStreams, settings: Settings) -> None:
        self._ops = ops
        self._store = ops.store
        self._live = live
        self._settings = settings

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: Context
    ) -> common_pb2.User:
        check(user_id_violation(request.user_id))
        return user_to_pb(await self._store.get(request.user_id))

    async def CreateUser(
        self, request: user_service_pb2.CreateUserRequest, context: Context
    ) -> common_pb2.User:
        event = await self._ops.create(create_of(request, _idempotency_key(context)))
        return user_to_pb(self._written(context, event).user)

    async def UpdateUser(
        self, request: user_service_pb2.UpdateUserRequest, context: Context
    ) -> common_pb2.User:
        event = await self._ops.update(update_of(request, _idempotency_key(context)))
        return user_to_pb(self._written(context, event).user)

    async def DeleteUser(
        self, request: user_service_pb2.DeleteUserRequest, context: Context
    ) -> empty_pb2.Empty:
        self._written(context, await self._ops.delete(
            delete_of(request, _idempotency_key(context))))
        return empty_pb2.Empty()

    def _written(self, context: Context, event: Event) -> Event:
        """Tells the caller where its write is (trailing hub-position, for min_position)."""
        context.set_trailing_metadata(
            ((POSITION_KEY, resume.covering((event,), self._store.partitions)),))
        return event

    async def ListUsers(
        self, request: user_service_pb2.ListUsersRequest, context: Context
    ) -> AsyncIterator[common_pb2.User]:
        size = request.page_size or DEFAULT_PAGE_SIZE
        most = self._settings.max_page_size
        check(
            page_size_violation(request.page_size, most),
            user_id_violation(request.page_token, "page_token") if request.page_token else None,
        )
        # Positioned just before the listing: subscribing with it delivers every change made
        # after the snapshot began (some may already show in it; versions tell which).
        position = await self._store.position()
        context.set_trailing_metadata(((RESUME_TOKEN_KEY, resume.encode(position)),))
        after = request.page_token
        while True:
            # One page at a time: memory stays bounded by page_size whatever the user count.
            page = await self._store.list_after(after, size)
            for user in page:
                yield user_to_pb(user)
            if len(page) < size or context.done():
                return
            after = page[-1].id

    async def BulkCreateUsers(
        self,
        request_iterator: AsyncIterable[user_service_pb2.CreateUserRequest],
        context: Context,
    ) -> user_service_pb2.BulkCreateResponse:
        bulk = Bulk(self._ops, self._settings, _idempotency_key(context))
        try:
            async for request in request_iterator:
                if not await bulk.add(request):
                    break
            return await bulk.finish(context)
        finally:
            bulk.abandon()

    async def ImportUsers(
        self,
        request_iterator: AsyncIterable[Unparsed | ImportMessage],
        context: Context,
    ) -> user_service_pb2.BulkCreateResponse:
        # BulkCreateUsers' rows, many per message: gRPC's per-message cost is paid per batch.
        bulk = Bulk(self._ops, self._settings, _idempotency_key(context))
        most = self._settings.import_max_rows
        try:
            # The messages come unparsed (hub.rpc.wire.Unparsed): an oversized one is refused on
            # its row count, before parsing it costs anything.
            async for message in request_iterator:
                request = parse_rows(message, most)
                if isinstance(request, Undecodable):
                    # Its row count is unknown, so later rows' indexes would be too: stop.
                    bulk.refuse(bulk.index + 1, errors.InvalidArgument.of(
                        "users", "not a valid ImportUsersRequest message: its rows and the"
                        " rest were not read"))
                    break
                if isinstance(request, RowsOverLimit):
                    bulk.refuse(bulk.index + 1, errors.LimitExceeded(
                        "users", f"more than {most} rows in one ImportUsersRequest"
                        " (--import-max-rows): this message's rows and the rest were not read;"
                        f" send at most {most} per message"))
                    break
                if not await bulk.add_many(request.users, request.idempotency_keys):
                    break
            return await bulk.finish(context)
        finally:
            bulk.abandon()

    async def UserUpdates(  # type: ignore[override]
        self,
        request_iterator: AsyncIterable[user_service_pb2.UserUpdateRequest],
        context: Context,
    ) -> None:
        await self._live.serve(request_iterator, context, batched=False)


def _idempotency_key(context: Context) -> str:
    """The request's idempotency-key metadata ("" without one)."""
    for key, value in context.invocation_metadata() or ():
        if key == IDEMPOTENCY_KEY:
            return value if isinstance(value, str) else value.decode("latin-1")
    return ""
