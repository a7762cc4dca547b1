"""Domain values to protobuf: conversions, and events encoded once for every subscriber."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeAlias

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from hub.api.user.v1 import common_pb2, user_service_pb2, user_sync_service_pb2
from hub.commands import MASKABLE, Change, Create, Delete, Update
from hub.domain import Event, EventType, User
from hub.errors import InvalidArgument
from hub.fanout import Encoded

_EVENT_TYPES = {
    EventType.CREATED: common_pb2.EVENT_TYPE_CREATED,
    EventType.UPDATED: common_pb2.EVENT_TYPE_UPDATED,
    EventType.DELETED: common_pb2.EVENT_TYPE_DELETED,
}
# Field tags (field number << 3 | wire type 2) of the length-delimited fields built by hand.
_USER_EVENT_USER = b"\x12"
_SYNC_RESPONSE_EVENTS = b"\x0a"


# -- requests to commands ---------------------------------------------------------------------


def create_of(request: user_service_pb2.CreateUserRequest, idempotency_key: str = "") -> Create:
    return Create(request.email, request.name, request.password, int(request.status),
                  idempotency_key)


def update_of(request: user_service_pb2.UpdateUserRequest, idempotency_key: str = "") -> Update:
    """The FieldMask read as AIP-134 says: `["*"]` is every maskable field, an empty mask every
    field the request sets (non-default). Which paths are allowed is hub.validation's rule."""
    user = request.user
    paths = tuple(request.update_mask.paths)
    if paths == ("*",):
        paths = MASKABLE
    elif not paths:
        paths = tuple(p for p in MASKABLE if getattr(user, p))
    expected = request.expected_version if request.HasField("expected_version") else None
    return Update(user.id, paths, user.email, user.name, int(user.status), expected,
                  idempotency_key)


def delete_of(request: user_service_pb2.DeleteUserRequest, idempotency_key: str = "") -> Delete:
    expected = request.expected_version if request.HasField("expected_version") else None
    return Delete(request.user_id, expected, idempotency_key)


def change_of(change: user_service_pb2.UserChange) -> Change:
    kind = change.WhichOneof("change")
    key = change.idempotency_key
    if kind == "create":
        return create_of(change.create, key)
    if kind == "update":
        return update_of(change.update, key)
    if kind == "delete":
        return delete_of(change.delete, key)
    raise InvalidArgument.of("change", "names no create, update or delete")


# -- domain values to messages -------------------------------------------------------------


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
    prefixes = _EVENT_PREFIXES
    for item in events:
        n = len(item.event)
        parts += (prefixes[n] if n < _PREFIXED else _SYNC_RESPONSE_EVENTS + varint(n),
                  item.event)
    parts.append(tail.SerializeToString())
    return b"".join(parts)


# SyncResponse.events' tag and length prefix for every event shorter than 16 KiB (two varint
# bytes), looked up rather than computed per event and per subscriber.
_PREFIXED = 1 << 14
_EVENT_PREFIXES = [_SYNC_RESPONSE_EVENTS + varint(n) for n in range(_PREFIXED)]


class Undecodable:
    """Stands in for request bytes that are not the method's message: gRPC would turn the
    parse error into UNKNOWN, a server fault, when it is the caller's (INVALID_ARGUMENT)."""

    def __init__(self, message: str) -> None:
        self.error = InvalidArgument.of("request", f"not a valid {message} message")


class Unparsed:
    """A request handed to its handler as bytes: an ImportUsersRequest's rows are counted
    against --import-max-rows before any is parsed, and the deserializer (made once per
    method, from the descriptor) does not know the setting; the handler does (`parse_rows`)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class RowsOverLimit:
    """Stands in for a message with more rows than `limit`: it was never parsed (two million
    empty rows fit in 4 MiB, and parsing them would cost hundreds of MB and seconds)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit


# Messages whose handler parses them itself (see Unparsed).
_PARSED_BY_HANDLER = frozenset({user_service_pb2.ImportUsersRequest.DESCRIPTOR.full_name})


def parser(cls: Any) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name
    if name in _PARSED_BY_HANDLER:
        return Unparsed

    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError:
            return Undecodable(name)

    return parse


# What the ImportUsers handler makes of a message.
ImportMessage: TypeAlias = user_service_pb2.ImportUsersRequest | Undecodable | RowsOverLimit


def parse_rows(request: Unparsed | ImportMessage, most: int) -> ImportMessage:
    """An ImportUsersRequest from its bytes, unless it has more than `most` rows: then it is
    refused unparsed, after a scan of at most `most` + 1 of its fields. (What a deserializer
    already made of it passes through, checked.)"""
    if isinstance(request, Undecodable | RowsOverLimit):
        return request
    if not isinstance(request, Unparsed):
        return RowsOverLimit(most) if len(request.users) > most else request
    if more_fields_than(request.data, most):
        return RowsOverLimit(most)
    try:
        return user_service_pb2.ImportUsersRequest.FromString(request.data)
    except DecodeError:
        return Undecodable(user_service_pb2.ImportUsersRequest.DESCRIPTOR.full_name)


def more_fields_than(data: bytes, most: int) -> bool:
    """Whether the serialized message `data` has more than `most` top-level fields (for an
    ImportUsersRequest, its rows: field 1, tag 0x0a, a length, then the row). Counting stops
    at most + 1, so it costs that many steps at most, whatever the message's size. The other
    fields (a row's idempotency key) have a count of their own with the same limit (parsing
    them costs too); malformed bytes stop the count, and are left for the parser to
    refuse."""
    end = len(data)
    # Every field takes two bytes at least (a tag, then a length or a value), so a message
    # shorter than this cannot have more: the usual message costs no scan at all.
    if end < 2 * (most + 1):
        return False
    pos = count = others = 0
    while pos < end:
        if data[pos] == 0x0A:
            count += 1
            if count > most:
                return True
        else:
            others += 1
            if others > most:
                return True
        if data[pos] == 0x0A and pos + 2 < end:  # a row: inline for lengths of 1-2 bytes
            low = data[pos + 1]
            if low < 0x80:
                pos += 2 + low
                continue
            high = data[pos + 2]
            if high < 0x80:
                pos += 3 + (low & 0x7F | high << 7)
                continue
        tag, pos = _read_varint(data, pos)
        kind = tag & 7
        if tag < 0 or kind not in (0, 1, 2, 5):
            return False  # cut off, a group (no hub message has one) or garbage
        if kind == 2:  # length-delimited, as every row is
            length, pos = _read_varint(data, pos)
            if length < 0:
                return False
            pos += length
        elif kind == 0:
            _, pos = _read_varint(data, pos)
        else:
            pos += 8 if kind == 1 else 4
    return False


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; -1 (and the end) when it is cut off or
    longer than 10 bytes."""
    result = shift = 0
    end = min(len(data), pos + 10)
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    return -1, len(data)


async def _checked(requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error
        yield request


def guard_undecodable(behaviour: Any, request_streaming: bool, response_streaming: bool) -> Any:
    """Wraps a handler so an Undecodable request ends the call with INVALID_ARGUMENT (raised
    inside the handler's Aborting, which turns it into the status).

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
                raise request.error
            async for item in behaviour(request, context):
                yield item

        return stream

    async def unary(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            raise request.error
        return await behaviour(request, context)

    return unary
