"""`UserClient` (blocking) and `AsyncUserClient` (asyncio): the same methods, side by side.

Both run each call inside `_mapped()` (hub.client.errors), the one place a grpc error becomes
a ClientError, and each unary call in one of the client's slots under `_Resend`
(hub.client.channel). What differs is only how they wait: threads or the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import grpc
import grpc.aio
from google.protobuf import field_mask_pb2

from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_service_pb2_grpc as pb_grpc
from hub.client.channel import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_TARGET,
    Credentials,
    _aio_channel,
    _no_slot,
    _Resend,
    _sync_channel,
)
from hub.client.errors import _mapped

DEFAULT_TIMEOUT: Final = 5.0
# A ListUsers of a large store, or a big bulk load, legitimately runs for minutes.
DEFAULT_STREAM_TIMEOUT: Final = 300.0
# Rows per ImportUsersRequest: large enough that gRPC's per-message cost vanishes, small
# enough that a message stays far below the 4 MiB limit even with long fields.
IMPORT_BATCH = 500

Resp = TypeVar("Resp")


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
        resend = _Resend(budget)
        with self._slot(budget), _mapped():
            while True:
                try:
                    return method(request, timeout=resend.remaining())
                except grpc.RpcError as err:
                    pause = resend.pause(err)
                    if pause is None:
                        raise
                time.sleep(pause)

    @contextlib.contextmanager
    def _slot(self, budget: float) -> Iterator[None]:
        if self._slots is None:
            yield
            return
        if not self._slots.acquire(timeout=budget):
            raise _no_slot(budget, self._max_in_flight)
        try:
            yield
        finally:
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
            with _mapped():
                yield from call
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
        with _mapped(), tap.instead_of(grpc.RpcError):
            return self.stub.BulkCreateUsers(
                tap.rows(requests), timeout=_or_default(timeout, self.stream_timeout)
            )

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
        with _mapped(), tap.instead_of(grpc.RpcError):
            return self.stub.ImportUsers(
                _messages(tap.rows(requests), batch_size),
                timeout=_or_default(timeout, self.stream_timeout),
            )


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
        resend = _Resend(budget)
        async with self._slot(budget):
            with _mapped():
                while True:
                    try:
                        return await method(request, timeout=resend.remaining())
                    except grpc.aio.AioRpcError as err:
                        pause = resend.pause(err)
                        if pause is None:
                            raise
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
            with _mapped():
                async for user in call:
                    yield user
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
        with _mapped(), tap.instead_of(asyncio.CancelledError):
            return await self.stub.BulkCreateUsers(
                tap.async_rows(requests), timeout=_or_default(timeout, self.stream_timeout))

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
        with _mapped(), tap.instead_of(asyncio.CancelledError):
            return await self.stub.ImportUsers(
                _async_messages(tap.async_rows(requests), batch_size),
                timeout=_or_default(timeout, self.stream_timeout))


# -- what both clients send -----------------------------------------------------------------


def _or_default(timeout: float | None, default: float) -> float:
    # `is None`, not `or`: an explicit 0 must stay 0 (fail at once), not become the default.
    return default if timeout is None else timeout


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

    @contextlib.contextmanager
    def instead_of(self, failure: type[BaseException]) -> Iterator[None]:
        """Raises the source's own exception in place of `failure`, the way gRPC reports it:
        `grpc.RpcError` (sync) or `asyncio.CancelledError` (aio)."""
        try:
            yield
        except failure as exc:
            if self.error is not None and not _aimed_at_task(exc):
                raise self.error from None
            raise

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


def _aimed_at_task(exc: BaseException) -> bool:
    # Only a cancellation gRPC made because the source failed is replaced; one aimed at the
    # running task (cancelling() > 0) must propagate untouched.
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


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
