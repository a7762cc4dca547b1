"""The client's exception tree, and the one place a grpc error becomes part of it.

Both clients and the Sync feed run their calls inside `_mapped()` instead of each catching
`grpc.RpcError` itself (the shape of httpx's `map_httpcore_exceptions`):

    with _mapped():
        return self.stub.GetUser(request, timeout=timeout)

The same `with` serves the asyncio client: catching needs no `async with`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Final, cast

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class ClientError(Exception):
    """A call to the user service failed; `code` says how, `details` is the server's message."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.code = code
        self.details = details
        # (field, description) pairs from a google.rpc.BadRequest detail, when the server sent one.
        self.violations: list[tuple[str, str]] = list(violations)
        super().__init__(f"{code.name}: {details}")


class InvalidArgumentError(ClientError):
    """A request field was malformed; see `violations` for which and why."""


class UserNotFoundError(ClientError):
    """The user does not exist (or was deleted)."""


class AlreadyExistsError(ClientError):
    """A unique field, the email, is taken by another user."""


class VersionConflictError(ClientError):
    """The write was refused unapplied: expected_version was stale or the user was contended."""


class UnavailableError(ClientError):
    """The server, or its store, could not be reached."""


_ERRORS: Final[dict[grpc.StatusCode, type[ClientError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: UserNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.ABORTED: VersionConflictError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """Raises a failed call's `grpc.RpcError` (sync or aio) as its ClientError, chained to it.

    Anything else passes untouched, CancelledError included.
    """
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err


def from_rpc_error(err: grpc.RpcError) -> ClientError:
    """The typed error for a failed call, from the sync (`grpc.RpcError`) or aio API."""
    if isinstance(err, grpc.aio.AioRpcError):
        code, details = err.code(), err.details() or ""
        # from_call reads only code(), details() and trailing_metadata(), which a finished
        # AioRpcError provides just as a sync call does.
        call: grpc.Call | None = cast("grpc.Call", err)
    elif isinstance(err, grpc.Call):
        code, details, call = err.code(), err.details() or "", err
    else:
        # An RpcError that is not a call (none are raised today): nothing more to read.
        code, details, call = grpc.StatusCode.UNKNOWN, str(err), None
    kind = _ERRORS.get(code, ClientError)
    return kind(code, details, _violations(call) if call is not None else ())


def _violations(call: grpc.Call) -> list[tuple[str, str]]:
    try:
        status = rpc_status.from_call(call)
    except ValueError:
        # The rich status disagrees with the call's own code or message: trust neither detail.
        return []
    if status is None:
        return []
    found: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.extend((v.field, v.description) for v in bad_request.field_violations)
    return found
