"""Typed clients for user.v1.UserService: `UserClient` (blocking) and `AsyncUserClient` (asyncio).

    from hub.client import UserClient, UserNotFoundError

    with UserClient("localhost:50051", timeout=5.0) as users:
        alice = users.create_user("alice@example.com", name="Alice")
        users.update_user(alice.id, name="Alice B.", expected_version=alice.version)
        try:
            users.get_user("01HZZZZZZZZZZZZZZZZZZZZZZZ")
        except UserNotFoundError as err:
            print(err.code, err.details)
        for user in users.list_users():
            print(user.id, user.email)

    async with AsyncUserClient() as users:
        user = await users.get_user(alice.id)
        async for user in users.list_users(page_size=500):
            ...

Errors. Every failed call raises a `ClientError` subclass chained (`from`) to the grpc error:

    ClientError                  .code (grpc.StatusCode), .details, .violations [(field, why)]
     ├── InvalidArgumentError    INVALID_ARGUMENT; .violations lists the offending fields
     ├── UserNotFoundError       NOT_FOUND
     ├── AlreadyExistsError      ALREADY_EXISTS (the email is taken)
     ├── VersionConflictError    ABORTED: expected_version did not match, or the user was
     │                           changing too fast; nothing was written, re-read and retry
     └── UnavailableError        UNAVAILABLE: the server or its store cannot be reached

Other codes (DEADLINE_EXCEEDED, INTERNAL, ...) raise a plain `ClientError`.

Deadlines. Every call carries one: `timeout` (default 5 s) for unary calls and `stream_timeout`
(default 300 s, the whole stream) for ListUsers and BulkCreateUsers; both can be overridden
per call. A deadline covers all retry attempts of the call, not each one.

Concurrency. One client is one channel, one HTTP/2 connection, and the hub serves at most 100
calls at once on a connection (`--max-concurrent-streams`). A client runs at most
`max_in_flight` (default 64) unary calls at once; more wait their turn in the client, the
wait counted in their deadline. (gRPC's own queue is not enough: the hub's transport counts a
finished call against the limit until the server has released it, and refuses calls beyond it
with REFUSED_STREAM, which gRPC reports as UNAVAILABLE.) A call refused that way was never
seen by the hub, so the client sends it again, writes included, within its deadline.

Retries. gRPC's own retry machinery does them, configured by a service config on the channel
(`RETRY_SERVICE_CONFIG`), which brings exponential backoff with jitter and honours the deadline:

* GetUser and ListUsers are retried on UNAVAILABLE, up to 5 attempts in all, backoff starting
  at 0.1 s, doubling, capped at 2 s. ListUsers is retried only until its first user arrives
  (gRPC then commits to the attempt); after that, resume with `page_token=<last id seen>`.
* CreateUser, BulkCreateUsers, UpdateUser and DeleteUser are never retried by the client. When
  a write fails with UNAVAILABLE the server may have applied it anyway, and a blind retry could
  create a second user or apply an update twice. Deciding is left to the caller, who knows
  whether the write is safe to repeat (e.g. an update guarded by `expected_version`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_service_pb2_grpc as pb_grpc

__all__ = [
    "CHANNEL_OPTIONS",
    "RETRY_SERVICE_CONFIG",
    "AlreadyExistsError",
    "AsyncUserClient",
    "ClientError",
    "ContinuityLost",
    "Credentials",
    "InvalidArgumentError",
    "SyncBatch",
    "SyncFeed",
    "UnavailableError",
    "UserClient",
    "UserNotFoundError",
    "VersionConflictError",
    "from_rpc_error",
]

DEFAULT_TARGET: Final = "localhost:50051"
DEFAULT_TIMEOUT: Final = 5.0
# A ListUsers of a large store, or a big bulk load, legitimately runs for minutes.
DEFAULT_STREAM_TIMEOUT: Final = 300.0
_SERVICE: Final = "user.v1.UserService"
_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
# Unary calls a client runs at once (see "Concurrency" above). Well under the hub's 100
# streams per connection: the hub counts a call until it has released it, a little after
# the client has its answer, and 1,000 calls at once through a cap of 100 (or even 64) still
# met refusals. 64 calls in flight keep one hub process busy.
DEFAULT_MAX_IN_FLIGHT: Final = 64
# A call refused before the hub saw it (HTTP/2 REFUSED_STREAM) is sent again this many times
# at most, after 10 ms, 20 ms, 40 ms, ... (with jitter), and never past its deadline.
_REFUSED_RETRIES: Final = 6
_REFUSED_BACKOFF: Final = 0.01

Resp = TypeVar("Resp")

_RETRY_POLICY: Final[dict[str, Any]] = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    # UNAVAILABLE is gRPC's code for "transient, try again" (no connection, server draining,
    # store unreachable). DEADLINE_EXCEEDED is not retried: the deadline covers every attempt,
    # so once it has passed there is no time left for another.
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# Writes are deliberately absent: see "Retries" in the module docstring.
RETRY_SERVICE_CONFIG: Final = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": _SERVICE, "method": "GetUser"},
                    {"service": _SERVICE, "method": "ListUsers"},
                ],
                "retryPolicy": _RETRY_POLICY,
            }
        ]
    }
)

CHANNEL_OPTIONS: Final[tuple[tuple[str, str | int], ...]] = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", RETRY_SERVICE_CONFIG),
    # Ours is the policy that applies, whatever a DNS TXT record might say.
    ("grpc.service_config_disable_resolution", 1),
    # The server refuses pings more often than every 10 s (and answers abuse with GOAWAY), so
    # 30 s stays well clear of it while still finding a dead peer behind a NAT or proxy that
    # dropped the connection silently, which would otherwise stall a long ListUsers.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Ping only while calls are in flight: an idle channel reconnects on its next call anyway,
    # and idle pings are what servers count as abuse.
    ("grpc.keepalive_permit_without_calls", 0),
    # A stream may be legitimately quiet for long; keep pinging it instead of stopping after
    # the default two pings without data.
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    # Redial a refused address after 0.1 s (doubling to 2 s) instead of gRPC's default 1 s:
    # otherwise every retry attempt inside that first second fails at once on the dead
    # connection, and a read gives up on a hub that was down for a moment.
    # (Not grpc.min_reconnect_backoff_ms: gRPC also uses it as the connect timeout.)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


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


@dataclass(frozen=True, slots=True)
class Credentials:
    """How a client proves itself: a bearer token (sent as gRPC call credentials) and TLS.

        Credentials(token=jwt)                                   # loopback, no TLS
        Credentials(token=jwt, tls_ca=Path("ca.pem").read_bytes())
        Credentials(tls_ca=ca, tls_cert=cert, tls_key=key)      # mTLS
    """

    token: str = ""
    tls: bool = False  # TLS with the system's root certificates
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls or self.tls_ca or self.tls_cert:
            creds = grpc.ssl_channel_credentials(self.tls_ca, self.tls_key, self.tls_cert)
        elif self.token:
            # gRPC sends call credentials only over a secure channel; local credentials count
            # as one for loopback connections, and are refused for anything else.
            creds = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        else:
            return None
        if self.token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(self.token)
            )
        return creds


def _sync_channel(target: str, options: Sequence[tuple[str, Any]],
                  credentials: Credentials | None) -> grpc.Channel:
    creds = credentials.channel_credentials() if credentials else None
    opts = _channel_options(options)
    return (grpc.secure_channel(target, creds, options=opts) if creds
            else grpc.insecure_channel(target, options=opts))


def _aio_channel(target: str, options: Sequence[tuple[str, Any]],
                 credentials: Credentials | None) -> grpc.aio.Channel:
    creds = credentials.channel_credentials() if credentials else None
    opts = _channel_options(options)
    return (grpc.aio.secure_channel(target, creds, options=opts) if creds
            else grpc.aio.insecure_channel(target, options=opts))


def _channel_options(extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    # Merged by key so a caller's value replaces ours instead of depending on which duplicate
    # the C core happens to honour.
    return list({**dict(CHANNEL_OPTIONS), **dict(extra)}.items())


def _or_default(timeout: float | None, default: float) -> float:
    # `is None`, not `or`: an explicit 0 must stay 0 (fail at once), not become the default.
    return default if timeout is None else timeout


def _refused(err: grpc.RpcError) -> bool:
    """Whether the call was refused by the server's HTTP/2 layer before any of the server's
    code saw it (RST_STREAM with REFUSED_STREAM, code 7): always safe to send again. gRPC
    reports it as UNAVAILABLE and says so only in the details."""
    call = cast("grpc.Call", err)
    return (call.code() is grpc.StatusCode.UNAVAILABLE
            and "RST_STREAM with error code 7" in (call.details() or ""))


def _refused_backoff(attempt: int) -> float:
    return random.uniform(0.5, 1.0) * _REFUSED_BACKOFF * (1 << attempt)


def _no_slot(timeout: float, slots: int) -> ClientError:
    return ClientError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"deadline of {timeout}s passed waiting for one of this client's {slots} call slots")


def _update_request(
    user_id: str,
    email: str | None,
    name: str | None,
    status: common_pb2.UserStatus.ValueType | None,
    expected_version: int | None,
) -> pb.UpdateUserRequest:
    user = common_pb2.User(id=user_id)
    paths: list[str] = []
    # The mask names exactly the arguments given, so an empty string or UNSPECIFIED status
    # is a deliberate value rather than "leave unchanged".
    if email is not None:
        user.email = email
        paths.append("email")
    if name is not None:
        user.name = name
        paths.append("name")
    if status is not None:
        user.status = status
        paths.append("status")
    if not paths:
        # An empty mask means "every field set in user" to the server, which here is none of
        # them: almost certainly a caller's mistake, so refuse it before a round trip.
        raise ValueError("update_user needs at least one of email, name or status")
    request = pb.UpdateUserRequest(user=user, update_mask=field_mask_pb2.FieldMask(paths=paths))
    if expected_version is not None:
        request.expected_version = expected_version
    return request


def _delete_request(user_id: str, expected_version: int | None) -> pb.DeleteUserRequest:
    request = pb.DeleteUserRequest(user_id=user_id)
    if expected_version is not None:
        request.expected_version = expected_version
    return request


class _RequestTap:
    """Passes the caller's bulk rows on to gRPC, keeping any exception their source raises.

    gRPC only logs such an exception and cancels the call, which then fails as UNKNOWN (sync)
    or, worse, as a CancelledError (aio) that a task group would take for a cancellation of
    its own. Keeping it lets bulk_create re-raise the caller's own error instead.
    """

    def __init__(self) -> None:
        self.error: Exception | None = None

    def rows(self, requests: Iterable[pb.CreateUserRequest]) -> Iterator[pb.CreateUserRequest]:
        try:
            yield from requests
        except Exception as exc:
            self.error = exc
            raise

    async def async_rows(
        self, requests: Iterable[pb.CreateUserRequest] | AsyncIterable[pb.CreateUserRequest]
    ) -> AsyncIterator[pb.CreateUserRequest]:
        try:
            if isinstance(requests, AsyncIterable):
                async for request in requests:
                    yield request
            else:
                for request in requests:
                    yield request
        except Exception as exc:
            self.error = exc
            raise


# Rows per ImportUsersRequest: large enough that gRPC's per-message cost vanishes, small
# enough that a message stays far below the 4 MiB limit even with long fields.
IMPORT_BATCH = 500


def _messages(rows: Iterator[pb.CreateUserRequest], size: int) -> Iterator[pb.ImportUsersRequest]:
    batch: list[pb.CreateUserRequest] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield pb.ImportUsersRequest(users=batch)
            batch = []
    if batch:
        yield pb.ImportUsersRequest(users=batch)


async def _async_messages(
    rows: AsyncIterator[pb.CreateUserRequest], size: int
) -> AsyncIterator[pb.ImportUsersRequest]:
    batch: list[pb.CreateUserRequest] = []
    async for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield pb.ImportUsersRequest(users=batch)
            batch = []
    if batch:
        yield pb.ImportUsersRequest(users=batch)


class UserClient:
    """Blocking client; one channel, shared by every call, closed by `close()` or `with`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT,
        options: Sequence[tuple[str, Any]] = (),
        credentials: Credentials | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        """`max_in_flight`: unary calls run at once (0: no cap; see "Concurrency")."""
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._channel = _sync_channel(target, options, credentials)
        self.stub: pb_grpc.UserServiceStub = pb_grpc.UserServiceStub(self._channel)
        self._max_in_flight = max_in_flight
        self._slots = threading.BoundedSemaphore(max_in_flight) if max_in_flight else None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel, cancelling calls still in flight."""
        self._channel.close()

    def _unary(self, method: Callable[..., Resp], request: Any, timeout: float | None) -> Resp:
        """One unary call: in one of the client's slots, sent again if the hub's transport
        refused it unseen, all within its deadline."""
        budget = _or_default(timeout, self.timeout)
        deadline = time.monotonic() + budget
        if self._slots is not None and not self._slots.acquire(timeout=budget):
            raise _no_slot(budget, self._max_in_flight)
        try:
            attempt = 0
            while True:
                try:
                    return method(request, timeout=max(0.0, deadline - time.monotonic()))
                except grpc.RpcError as err:
                    pause = _refused_backoff(attempt)
                    if (not _refused(err) or attempt == _REFUSED_RETRIES
                            or time.monotonic() + pause >= deadline):
                        raise from_rpc_error(err) from err
                attempt += 1
                time.sleep(pause)
        finally:
            if self._slots is not None:
                self._slots.release()

    def get_user(self, user_id: str, *, timeout: float | None = None) -> common_pb2.User:
        return self._unary(self.stub.GetUser, pb.GetUserRequest(user_id=user_id), timeout)

    def create_user(
        self,
        email: str,
        name: str = "",
        password: str = "",
        status: common_pb2.UserStatus.ValueType = common_pb2.USER_STATUS_UNSPECIFIED,
        *,
        timeout: float | None = None,
    ) -> common_pb2.User:
        request = pb.CreateUserRequest(email=email, name=name, password=password, status=status)
        return self._unary(self.stub.CreateUser, request, timeout)

    def update_user(
        self,
        user_id: str,
        *,
        email: str | None = None,
        name: str | None = None,
        status: common_pb2.UserStatus.ValueType | None = None,
        expected_version: int | None = None,
        timeout: float | None = None,
    ) -> common_pb2.User:
        """Change the given fields only; with `expected_version`, only if the user is at it."""
        request = _update_request(user_id, email, name, status, expected_version)
        return self._unary(self.stub.UpdateUser, request, timeout)

    def delete_user(
        self,
        user_id: str,
        *,
        expected_version: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self._unary(self.stub.DeleteUser, _delete_request(user_id, expected_version), timeout)

    def list_users(
        self,
        page_size: int = 100,
        page_token: str = "",
        *,
        timeout: float | None = None,
    ) -> Iterator[common_pb2.User]:
        """Every user after `page_token`, in id order; `timeout` bounds the whole stream.

        The call starts at the first `next()`. Stopping early (break, or closing the iterator)
        cancels the stream so the server stops reading and sending.
        """
        call = self.stub.ListUsers(
            pb.ListUsersRequest(page_size=page_size, page_token=page_token),
            timeout=_or_default(timeout, self.stream_timeout),
        )
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            # A no-op once the stream has ended; otherwise the consumer gave up early.
            call.cancel()

    def bulk_create(
        self,
        requests: Iterable[pb.CreateUserRequest],
        *,
        timeout: float | None = None,
    ) -> pb.BulkCreateResponse:
        """Create one user per request; refused rows come back in `errors`, not as exceptions.

        If iterating `requests` raises, the call is cancelled and that exception propagates;
        rows the server had already committed stay created.
        """
        tap = _RequestTap()
        try:
            return self.stub.BulkCreateUsers(
                tap.rows(requests), timeout=_or_default(timeout, self.stream_timeout)
            )
        except grpc.RpcError as err:
            if tap.error is not None:
                raise tap.error from None
            raise from_rpc_error(err) from err

    def import_users(
        self,
        requests: Iterable[pb.CreateUserRequest],
        *,
        batch_size: int = IMPORT_BATCH,
        timeout: float | None = None,
    ) -> pb.BulkCreateResponse:
        """bulk_create's rows and outcomes, sent `batch_size` rows per ImportUsers message:
        several times faster, as gRPC pays per message, not per row."""
        tap = _RequestTap()
        try:
            return self.stub.ImportUsers(
                _messages(tap.rows(requests), batch_size),
                timeout=_or_default(timeout, self.stream_timeout),
            )
        except grpc.RpcError as err:
            if tap.error is not None:
                raise tap.error from None
            raise from_rpc_error(err) from err


class AsyncUserClient:
    """asyncio client; create it inside the running event loop that will use it."""

    # The per-call `timeout` parameters below (ruff ASYNC109) are gRPC deadlines, not local
    # waits: they travel to the server, which stops working on the call when they pass, and
    # they bound every retry attempt. `asyncio.timeout` would only cancel the local side.

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT,
        options: Sequence[tuple[str, Any]] = (),
        credentials: Credentials | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        """`max_in_flight`: unary calls run at once (0: no cap; see "Concurrency")."""
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._channel = _aio_channel(target, options, credentials)
        self.stub: pb_grpc.UserServiceAsyncStub = pb_grpc.UserServiceStub(self._channel)
        self._max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel, cancelling calls still in flight."""
        await self._channel.close()

    async def _unary(
        self, method: Callable[..., Awaitable[Resp]], request: Any,
        timeout: float | None,  # noqa: ASYNC109
    ) -> Resp:
        """One unary call: in one of the client's slots, sent again if the hub's transport
        refused it unseen, all within its deadline."""
        budget = _or_default(timeout, self.timeout)
        deadline = time.monotonic() + budget
        async with self._slot(budget):
            attempt = 0
            while True:
                try:
                    return await method(request, timeout=max(0.0, deadline - time.monotonic()))
                except grpc.aio.AioRpcError as err:
                    pause = _refused_backoff(attempt)
                    if (not _refused(err) or attempt == _REFUSED_RETRIES
                            or time.monotonic() + pause >= deadline):
                        raise from_rpc_error(err) from err
                attempt += 1
                await asyncio.sleep(pause)

    @contextlib.asynccontextmanager
    async def _slot(self, budget: float) -> AsyncIterator[None]:
        if self._slots is None:
            yield
            return
        try:
            # A free slot is taken without suspending, so even a 0 s budget gets one.
            async with asyncio.timeout(budget):
                await self._slots.acquire()
        except TimeoutError:
            raise _no_slot(budget, self._max_in_flight) from None
        try:
            yield
        finally:
            self._slots.release()

    async def get_user(
        self,
        user_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> common_pb2.User:
        return await self._unary(self.stub.GetUser, pb.GetUserRequest(user_id=user_id), timeout)

    async def create_user(
        self,
        email: str,
        name: str = "",
        password: str = "",
        status: common_pb2.UserStatus.ValueType = common_pb2.USER_STATUS_UNSPECIFIED,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> common_pb2.User:
        request = pb.CreateUserRequest(email=email, name=name, password=password, status=status)
        return await self._unary(self.stub.CreateUser, request, timeout)

    async def update_user(
        self,
        user_id: str,
        *,
        email: str | None = None,
        name: str | None = None,
        status: common_pb2.UserStatus.ValueType | None = None,
        expected_version: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> common_pb2.User:
        """Change the given fields only; with `expected_version`, only if the user is at it."""
        request = _update_request(user_id, email, name, status, expected_version)
        return await self._unary(self.stub.UpdateUser, request, timeout)

    async def delete_user(
        self,
        user_id: str,
        *,
        expected_version: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        await self._unary(self.stub.DeleteUser, _delete_request(user_id, expected_version),
                          timeout)

    async def list_users(
        self,
        page_size: int = 100,
        page_token: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[common_pb2.User]:
        """Every user after `page_token`, in id order; `timeout` bounds the whole stream.

        To stop early, iterate inside `contextlib.aclosing(...)`: that cancels the stream at
        once instead of whenever the abandoned generator is collected.
        """
        call = self.stub.ListUsers(
            pb.ListUsersRequest(page_size=page_size, page_token=page_token),
            timeout=_or_default(timeout, self.stream_timeout),
        )
        try:
            async for user in call:
                yield user
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err
        finally:
            # A no-op once the stream has ended; otherwise the consumer gave up early (or was
            # cancelled, which must still propagate: nothing here catches CancelledError).
            call.cancel()

    async def bulk_create(
        self,
        requests: Iterable[pb.CreateUserRequest] | AsyncIterable[pb.CreateUserRequest],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.BulkCreateResponse:
        """Create one user per request; refused rows come back in `errors`, not as exceptions.

        `requests` may be a plain or an async iterable. If iterating it raises, the call is
        cancelled and that exception propagates; rows the server had already committed stay.
        """
        tap = _RequestTap()
        return await self._client_stream(
            tap, self.stub.BulkCreateUsers(
                tap.async_rows(requests), timeout=_or_default(timeout, self.stream_timeout)))

    async def import_users(
        self,
        requests: Iterable[pb.CreateUserRequest] | AsyncIterable[pb.CreateUserRequest],
        *,
        batch_size: int = IMPORT_BATCH,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.BulkCreateResponse:
        """bulk_create's rows and outcomes, sent `batch_size` rows per ImportUsers message:
        several times faster, as gRPC pays per message, not per row."""
        tap = _RequestTap()
        return await self._client_stream(
            tap, self.stub.ImportUsers(
                _async_messages(tap.async_rows(requests), batch_size),
                timeout=_or_default(timeout, self.stream_timeout)))

    @staticmethod
    async def _client_stream(
        tap: _RequestTap, call: Awaitable[pb.BulkCreateResponse]
    ) -> pb.BulkCreateResponse:
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err
        except asyncio.CancelledError:
            task = asyncio.current_task()
            # Only a cancellation gRPC made because the source failed is replaced; one aimed
            # at this task (cancelling() > 0) must propagate untouched.
            if tap.error is not None and task is not None and task.cancelling() == 0:
                raise tap.error from None
            raise


# -- the resumable Sync feed ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncBatch:
    """One SyncResponse: its events (in order per user) and the token positioned after them."""

    events: Sequence[common_pb2.UserEvent]
    resume_token: str
    snapshot_complete: bool = False


@dataclass(frozen=True, slots=True)
class ContinuityLost:
    """The feed could not be continued without a gap: the events since the last token are
    gone (`reason` EPOCH_CHANGED: the history was reset; HISTORY_EXPIRED: trimmed). The feed
    goes on with a fresh snapshot (EVENT_TYPE_SNAPSHOT events); a live view should rebuild
    its state from it."""

    reason: str
    message: str


class SyncFeed:
    """An async iterator over UserSyncService.Sync that resumes by itself.

        async with SyncFeed(["hub-a:50051", "hub-b:50051"], snapshot=True) as feed:
            async for item in feed:
                if isinstance(item, ContinuityLost):
                    view.clear()                 # a snapshot follows
                    continue
                for event in item.events:
                    view.apply(event)            # keep a user if event.user.version is newer
                checkpoint(item.resume_token)    # feed.resume_token is the same

    On a lost connection, an instance going away, RESOURCE_EXHAUSTED (too slow) or the stream's
    deadline, it reconnects (with capped exponential backoff and jitter, moving on to the next
    address after a failure) and resumes from its last token: no event is lost or repeated.
    A snapshot cut off before it completed is started again instead. Other errors (e.g.
    INVALID_ARGUMENT) are raised as ClientError.
    """

    def __init__(
        self,
        targets: str | Sequence[str] = DEFAULT_TARGET,
        user_ids: Iterable[str] = (),
        *,
        resume_token: str = "",
        snapshot: bool = False,
        conflate: bool = False,
        stream_timeout: float = 3600.0,
        backoff: tuple[float, float] = (0.05, 5.0),
        options: Sequence[tuple[str, Any]] = (),
        credentials: Credentials | None = None,
    ) -> None:
        self._targets = [targets] if isinstance(targets, str) else list(targets)
        if not self._targets:
            raise ValueError("SyncFeed needs at least one target")
        self._users = list(user_ids)
        self.resume_token = resume_token
        self._snapshot = snapshot and not resume_token
        self._conflate = conflate
        # Long-lived, yet never without a deadline: when it passes, the feed simply resumes.
        self._stream_timeout = stream_timeout
        self._backoff = backoff
        self._options = options
        self._credentials = credentials
        self._iterator: AsyncGenerator[SyncBatch | ContinuityLost, None] | None = None
        self.reconnects = 0

    def __aiter__(self) -> AsyncIterator[SyncBatch | ContinuityLost]:
        self._iterator = self._run()
        return self._iterator

    async def aclose(self) -> None:
        """Ends the stream and closes its channel (also done by `async with`)."""
        if self._iterator is not None:
            await self._iterator.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[SyncBatch | ContinuityLost, None]:
        from hub.api.user.v1 import user_sync_service_pb2 as spb
        from hub.api.user.v1 import user_sync_service_pb2_grpc as spb_grpc

        failures, index = 0, 0
        while True:
            target = self._targets[index % len(self._targets)]
            async with _aio_channel(target, self._options, self._credentials) as channel:
                call = spb_grpc.UserSyncServiceStub(channel).Sync(timeout=self._stream_timeout)
                subscribe = common_pb2.Subscribe(
                    user_ids=self._users, resume_token=self.resume_token,
                    snapshot=self._snapshot, conflate=self._conflate,
                )
                try:
                    await call.write(spb.SyncRequest(subscribe=subscribe))
                    async for response in call:
                        failures = 0
                        if self._snapshot and response.snapshot_complete:
                            self._snapshot = False
                        if not self._snapshot:
                            # Mid-snapshot tokens are not adopted: a cut snapshot restarts.
                            self.resume_token = response.resume_token
                        yield SyncBatch(response.events, response.resume_token,
                                        response.snapshot_complete)
                    code = grpc.StatusCode.OK  # the server ended the stream: resume
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                    lost = self._on_error(err)
                    if lost is not None:
                        yield lost
                        continue
            self.reconnects += 1
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                continue  # too slow: resume at once from history, same instance
            failures += 1
            index += 1
            low, high = self._backoff
            await asyncio.sleep(random.uniform(0, min(high, low * 2 ** min(failures, 16))))

    def _on_error(self, err: grpc.aio.AioRpcError) -> ContinuityLost | None:
        """Decides what an ended stream means; returns the signal to give the caller, if any."""
        code = err.code()
        if code is grpc.StatusCode.OUT_OF_RANGE:
            self.resume_token, self._snapshot = "", True
            return ContinuityLost(_error_reason(err), err.details() or "")
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            for key, value in err.trailing_metadata() or ():
                if key == _RESUME_TOKEN_KEY and not self._snapshot:
                    self.resume_token = str(value)
            return None
        if code in _RESUMABLE:
            return None
        raise from_rpc_error(err) from err


_RESUME_TOKEN_KEY: Final = "hub-resume-token"
_RESUMABLE: Final = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
})


def _error_reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(cast(grpc.Call, err))
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return "UNKNOWN"
