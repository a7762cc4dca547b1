"""Domain values to protobuf: conversions, and events encoded once for every subscriber."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from hub.api.user.v1 import common_pb2, user_sync_service_pb2
from hub.domain import Event, EventType, User
from hub.errors import InvalidArgument
from hub.fanout import Encoded
from hub.status import to_status

# Trailing-metadata key of the resume token (ListUsers, and RESOURCE_EXHAUSTED endings).
RESUME_TOKEN_KEY = "hub-resume-token"

_EVENT_TYPES = {
    EventType.CREATED: common_pb2.EVENT_TYPE_CREATED,
    EventType.UPDATED: common_pb2.EVENT_TYPE_UPDATED,
    EventType.DELETED: common_pb2.EVENT_TYPE_DELETED,
}
# Field tags (field number << 3 | wire type 2) of the length-delimited fields built by hand.
_USER_EVENT_USER = b"\x12"
_SYNC_RESPONSE_EVENTS = b"\x0a"


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000)


def user_to_pb(user: User) -> common_pb2.User:
    return common_pb2.User(
        id=user.id,
        email=user.email,
        name=user.name,
        status=int(user.status),  # type: ignore[arg-type]
        created_at=timestamp(user.created_at),
        updated_at=timestamp(user.updated_at),
        version=user.version,
    )


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _event_bytes(type_: int, user: bytes, written_at: int | None) -> bytes:
    # A UserEvent is its scalar fields plus the user's bytes as field 2: serializing the head
    # alone and appending the user avoids encoding the user a second time.
    head = common_pb2.UserEvent(
        type=type_,  # type: ignore[arg-type]
        written_at=timestamp(written_at) if written_at is not None else None,
    ).SerializeToString()
    return head + _USER_EVENT_USER + varint(len(user)) + user


def encode_event(event: Event) -> Encoded:
    """The one protobuf encoding of a live event, shared by every subscriber."""
    pb = user_to_pb(event.user)
    if event.type is EventType.DELETED:
        pb.deleted_at.CopyFrom(timestamp(event.user.updated_at))
    user = pb.SerializeToString()
    return Encoded(event.user.id, _event_bytes(_EVENT_TYPES[event.type], user, event.ts), user)


def encode_snapshot(user: User) -> Encoded:
    data = user_to_pb(user).SerializeToString()
    return Encoded(user.id, _event_bytes(common_pb2.EVENT_TYPE_SNAPSHOT, data, None), data)


def sync_response(
    events: list[Encoded], tail: user_sync_service_pb2.SyncResponse
) -> bytes:
    """A SyncResponse from pre-encoded events plus its other fields (token, results, ...)."""
    parts: list[bytes] = []
    for item in events:
        parts += (_SYNC_RESPONSE_EVENTS, varint(len(item.event)), item.event)
    parts.append(tail.SerializeToString())
    return b"".join(parts)


class Undecodable:
    """Stands in for request bytes that are not the method's message: gRPC would turn the
    parse error into UNKNOWN, a server fault, when it is the caller's (INVALID_ARGUMENT)."""

    def __init__(self, message: str) -> None:
        self.error = InvalidArgument.of("request", f"not a valid {message} message")


def parser(cls: Any) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError:
            return Undecodable(name)

    return parse


async def _checked(requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error
        yield request


def guard_undecodable(behaviour: Any, request_streaming: bool, response_streaming: bool) -> Any:
    """Wraps a handler so an Undecodable request ends the call with INVALID_ARGUMENT.

    Client-streaming unary handlers (BulkCreateUsers) see Undecodable rows themselves and
    report them per row; bidirectional ones get them raised from their request iterator.
    """
    if request_streaming:
        if not response_streaming:
            return behaviour  # it reports Undecodable rows itself

        async def bidi(requests: AsyncIterable[Any], context: Any) -> Any:
            # hub's bidi handlers are coroutines writing with context.write
            return await behaviour(_checked(requests), context)

        return bidi

    if inspect.isasyncgenfunction(behaviour):
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await context.abort_with_status(to_status(request.error))
            async for item in behaviour(request, context):
                yield item

        return stream

    async def unary(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            await context.abort_with_status(to_status(request.error))
        return await behaviour(request, context)

    return unary
