"""The one place domain errors become gRPC statuses (with google.rpc details): the table
(`to_status`, most specific class along the MRO) and `Aborting`, which every handler runs
inside (grpclib's `Stream.__aexit__` shape).

OUT_OF_RANGE (HistoryLost) carries a google.rpc.ErrorInfo whose `reason` is EPOCH_CHANGED or
HISTORY_EXPIRED and whose `metadata` has `action` (RESYNC_BY_STATE: subscribe again with the
token and catch_up = CATCH_UP_STATE; SNAPSHOT: start again from a snapshot), `epoch` (the
history's current epoch) and `earliest_position` (a resume token at the earliest position the
history still reaches back to; absent when the store could not be read).

Unknown exceptions become INTERNAL with a generic message: their text may hold internals.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from hub import errors, resume

log = logging.getLogger(__name__)

ERROR_DOMAIN = "hub.user.v1"

_CODES: dict[type[errors.HubError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.VersionConflict: grpc.StatusCode.ABORTED,
    errors.Contention: grpc.StatusCode.ABORTED,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    # Not UNAVAILABLE: retrying at once cannot help until memory is freed or raised.
    errors.StoreFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooManyRows: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.SlowConsumer: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.HistoryLost: grpc.StatusCode.OUT_OF_RANGE,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def code_of(exc: errors.HubError) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        if issubclass(kind, errors.HubError) and kind in _CODES:
            return _CODES[kind]
    return grpc.StatusCode.INTERNAL


def to_status(
    exc: BaseException, trailing_metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.Status:
    """A rich status for `context.abort_with_status` (plus any extra trailing metadata)."""
    if not isinstance(exc, errors.HubError):
        log.error("unexpected error", exc_info=exc)
        return rpc_status.to_status(
            status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
        )
    code = code_of(exc)
    status = status_pb2.Status(code=code.value[0], message=str(exc))
    detail = _detail(exc)
    if detail is not None:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    rich = rpc_status.to_status(status)
    if not trailing_metadata:
        return rich
    return _Status(rich.code, rich.details, (*rich.trailing_metadata, *trailing_metadata))


class WithTrailing(Exception):
    """`error`, to end this one call with these trailing metadata as well (a stream's resume
    token): the error itself may be shared by many calls."""

    def __init__(self, error: Exception, trailing: tuple[tuple[str, str], ...]) -> None:
        super().__init__(error)
        self.error, self.trailing = error, trailing


class Aborting:
    """`async with Aborting(request, context):` around a handler's work: a domain error (or
    anything else) raised inside ends the call with its status. AbortError (the call is
    already ending with a status) and CancelledError pass untouched; so does an error once
    the call is done (the client left: nobody to tell). WithTrailing adds trailing metadata."""

    __slots__ = ("_context",)

    def __init__(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None or not isinstance(exc, Exception) or isinstance(
                exc, grpc.aio.AbortError | asyncio.CancelledError):
            return False
        trailing: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, WithTrailing):
            trailing, exc = exc.trailing, exc.error
        if self._context.done():
            log.debug("call ended by its client: %r", exc)
            return True
        await self._context.abort_with_status(to_status(exc, trailing))
        return False  # abort_with_status raised; never reached


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def _detail(exc: errors.HubError) -> Any:
    if isinstance(exc, errors.InvalidArgument):
        return error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in exc.violations
            ]
        )
    if isinstance(exc, errors.HistoryLost):
        # What a client in any language acts on without parsing the message: `action` says
        # whether a resync by state can continue it, `earliest_position` is a token the
        # history still reaches back to, `epoch` the history's current one.
        metadata = {"action": exc.action, "epoch": exc.epoch}
        if exc.earliest is not None:
            metadata["earliest_position"] = resume.encode(exc.earliest)
        return error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN,
                                           metadata=metadata)
    if isinstance(exc, errors.SlowConsumer):
        return error_details_pb2.ErrorInfo(
            reason="SLOW_CONSUMER", domain=ERROR_DOMAIN,
            metadata={"resume_token": exc.resume_token, "limit": exc.limit},
        )
    if isinstance(exc, errors.RateLimited):
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=exc.retry_after))
        return error_details_pb2.RetryInfo(retry_delay=delay)
    if isinstance(exc, errors.LimitExceeded):
        return error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=exc.field, description=str(exc))
        ])
    if isinstance(exc, errors.NotFound):
        return error_details_pb2.ResourceInfo(
            resource_type="user.v1.User", resource_name=exc.user_id, description=str(exc)
        )
    return None
