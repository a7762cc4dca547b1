"""The domain's exceptions. They know nothing of gRPC; `hub.rpc.errors` maps them to status codes.

    HubError
     ├── InvalidArgument      a request field is malformed (carries one violation per field)
     ├── NotFound             the user does not exist
     ├── AlreadyExists        a unique field (email) is taken
     ├── VersionConflict      expected_version did not match the stored version
     ├── Contention           too many concurrent writers on one user; retry the call
     ├── TooManyRows          a bulk stream's response would exceed the message size limit
     ├── StoreUnavailable     the store (Redis) cannot serve now (unreachable, a replica, busy)
     │    ├── ShuttingDown        this instance is stopping (UNAVAILABLE too: resume elsewhere)
     │    └── PositionNotReached  Subscribe.min_position not routed here in time
     ├── StoreFull            the store (Redis) is out of memory; nothing was written
     ├── SlowConsumer         a subscriber fell further behind than its buffer allows
     ├── RateLimited          a principal writes faster than its rate limit
     ├── LimitExceeded        a request is over a configured limit (ids per Subscribe, rows, ...)
     ├── Unauthenticated      no, malformed, expired or forged bearer token
     ├── PermissionDenied     a valid token without the scope the method needs
     └── HistoryLost          a subscriber cannot be given every event since its token
                              (its reason, the action it can take, the earliest position
                              left; the client's hub.client.ContinuityLost is what it is told)
"""

from __future__ import annotations

from dataclasses import dataclass

from hub.domain import Position


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class HubError(Exception):
    """Base of every error hub raises on purpose; its message is safe to show to callers."""


class InvalidArgument(HubError):
    def __init__(self, *violations: FieldViolation) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))

    @classmethod
    def of(cls, field: str, description: str) -> InvalidArgument:
        return cls(FieldViolation(field, description))


class NotFound(HubError):
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        super().__init__(f"user {user_id} not found")


class AlreadyExists(HubError):
    def __init__(self, field: str, description: str) -> None:
        self.field = field
        super().__init__(description)


class VersionConflict(HubError):
    def __init__(self, user_id: str, expected: int, actual: int) -> None:
        self.user_id, self.expected, self.actual = user_id, expected, actual
        super().__init__(f"user {user_id} is at version {actual}, not the expected {expected}")


class Contention(HubError):
    def __init__(self, user_id: str) -> None:
        super().__init__(f"user {user_id} is changing too fast to update; retry")


class TooManyRows(HubError):
    def __init__(self, index: int, limit: int | None = None) -> None:
        self.index = index
        why = f"over {limit} rows" if limit else "its response would exceed the message limit"
        super().__init__(
            f"the stream is full at row {index} ({why}): this row and the rest were not"
            " read; send them in another stream"
        )


class StoreUnavailable(HubError):
    def __init__(self, detail: str = "the user store is unreachable") -> None:
        super().__init__(detail)


class ShuttingDown(StoreUnavailable):
    """This instance is stopping: a stream it ends this way resumes on another one."""

    def __init__(self) -> None:
        super().__init__("this hub instance is shutting down: resume on another instance"
                         " with the resume token (trailing hub-resume-token)")


class PositionNotReached(StoreUnavailable):
    """A stream's Subscribe.min_position was not reached by this instance in time: it has not
    yet routed the events up to it (UNAVAILABLE: try again, here or on another instance)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(
            f"this hub instance has not routed up to subscribe.min_position within {timeout:g}s"
            " (its event bus is behind, or the position is from another deployment); retry")


class KeyspaceMismatch(HubError):
    """The Redis keyspace was made by a hub configured otherwise (its partition count): a
    start-up refusal, never a call's."""


class StoreFull(HubError):
    """Redis refused a write for want of memory (maxmemory with noeviction)."""


class SlowConsumer(HubError):
    """Carries the resume token of the last response sent, so the subscriber resumes there."""

    def __init__(self, limit: str, resume_token: str = "") -> None:
        self.limit, self.resume_token = limit, resume_token
        super().__init__(
            f"subscriber fell behind by more than {limit}; resume with the token in the"
            " trailing metadata (hub-resume-token)"
        )


# HistoryLost reasons, and what a subscriber can do about them (its `action`).
EPOCH_CHANGED = "EPOCH_CHANGED"
HISTORY_EXPIRED = "HISTORY_EXPIRED"
RESYNC_BY_STATE = "RESYNC_BY_STATE"
SNAPSHOT = "SNAPSHOT"


class HistoryLost(HubError):
    """The events since a subscriber's position are gone.

    reason: EPOCH_CHANGED (the history was reset, e.g. Redis restarted empty) or
    HISTORY_EXPIRED (the events were trimmed from the bounded history).
    action: RESYNC_BY_STATE (the position's epoch is current: the store can send what changed
    since it, Subscribe.catch_up = CATCH_UP_STATE) or SNAPSHOT (start again from a snapshot:
    an epoch change, or a position beyond the tombstone retention). By default
    RESYNC_BY_STATE for HISTORY_EXPIRED, SNAPSHOT for EPOCH_CHANGED.
    epoch, earliest: the current epoch and the earliest position the history still reaches
    back to, filled in (`described`) just before the error reaches a client; "" and None
    until then. One error may end many subscriptions, so it is copied, never changed.
    """

    def __init__(self, reason: str, detail: str, action: str = "", epoch: str = "",
                 earliest: Position | None = None) -> None:
        self.reason = reason
        self.action = action or (RESYNC_BY_STATE if reason == HISTORY_EXPIRED else SNAPSHOT)
        self.epoch, self.earliest = epoch, earliest
        super().__init__(detail)

    def described(self, epoch: str, earliest: Position | None) -> HistoryLost:
        """This error, with the current epoch and earliest position."""
        return HistoryLost(self.reason, str(self), self.action, epoch, earliest)


class RateLimited(HubError):
    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"write rate limit reached; retry in {retry_after:.2f}s")


class LimitExceeded(HubError):
    def __init__(self, field: str, description: str) -> None:
        self.field = field
        super().__init__(f"{field}: {description}")


class Unauthenticated(HubError):
    pass


class PermissionDenied(HubError):
    pass
