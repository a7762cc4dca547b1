"""Resume tokens: where a subscriber stands in the event history.

A token is `base64url(msgpack([1, epoch, [offset_0, ..., offset_{n-1}]]))` without padding:
the format version, the history epoch, and for every partition the offset of the last event
the subscriber has been given (or had filtered out). Offsets are small integers, so with the
default 16 partitions a token is a few dozen characters. Tokens are opaque to clients; this
docstring is the documentation of record.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

import msgpack

from hub.domain import Event, Position
from hub.errors import InvalidArgument

# The metadata key under which a resume token travels: trailing metadata of ListUsers (the
# position before its listing) and of a stream cut with RESOURCE_EXHAUSTED. Defined once here,
# for the server and the client alike.
RESUME_TOKEN_KEY = "hub-resume-token"
# Trailing metadata of every write: a position covering it (see `covering`), for
# Subscribe.min_position (read-your-writes on any instance).
POSITION_KEY = "hub-position"
# Request metadata of a write: the client's idempotency key (see hub.commands).
IDEMPOTENCY_KEY = "idempotency-key"

_VERSION = 1


def encode(position: Position) -> str:
    raw = msgpack.packb([_VERSION, position.epoch, list(position.offsets)])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode(token: str, partitions: int, field: str = "resume_token") -> Position:
    """Raises InvalidArgument for anything that is not a token of this deployment."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, epoch, offsets = msgpack.unpackb(raw)
        valid = (
            version == _VERSION
            and isinstance(epoch, str)
            and isinstance(offsets, list)
            and all(isinstance(o, int) and o >= 0 for o in offsets)
        )
    except (ValueError, TypeError, binascii.Error, msgpack.UnpackException):
        valid = False
    if not valid:
        raise InvalidArgument.of(field, "not a resume token")
    if len(offsets) != partitions:
        raise InvalidArgument.of(
            field, f"token has {len(offsets)} partitions, this deployment {partitions}"
        )
    return Position(epoch, tuple(offsets))


def covering(events: Iterable[Event], partitions: int) -> str:
    """A token covering `events` (one write's, or a bulk stream's): in each partition they
    touch, the offset of the last of them; 0 in the others. As Subscribe.min_position it is
    reached once an instance has routed them all. As a resume token it would replay the
    other partitions from the start of their history: it is for waiting, not resuming."""
    offsets = [0] * partitions
    epoch = ""
    for event in events:
        epoch = event.epoch
        if event.offset > offsets[event.partition]:
            offsets[event.partition] = event.offset
    return encode(Position(epoch, tuple(offsets)))
