"""`UserClient` (blocking) and `AsyncUserClient` (asyncio): the same methods, side by side.

Both run each call inside `_mapped()` (hub.client.errors), the one place a grpc error becomes
a ClientError, and each unary call in one of the client's slots, its attempts planned by
`_Attempts` (hub.client.channel). What differs is only how they wait: threads or the event loop.

Every write takes an optional `idempotency_key` and has a `*_with_position` twin returning a
`Written` (the result and the write's position); see "Idempotency keys" in hub.client.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeAlias, TypeVar

import grpc
import grpc.aio
from google.protobuf import field_mask_pb2

from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_service_pb2_grpc as pb_grpc
from hub.client.channel import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_TARGET,
    DEFAULT_WRITE_ATTEMPTS,
    Credentials,
    _aio_channel,
    _Attempts,
    _no_slot,
    _sync_channel,
)
from hub.client.errors import _mapped
from hub.resume import IDEMPOTENCY_KEY, POSITION_KEY

DEFAULT_TIMEOUT: Final = 5.0
# A ListUsers of a large store, or a big bulk load, legitimately runs for minutes.
DEFAULT_STREAM_TIMEOUT: Final = 300.0
# Rows per ImportUsersRequest: large enough that gRPC's per-message cost vanishes, small
# enough that a message stays far below the 4 MiB limit even with long fields.
IMPORT_BATCH = 500

Resp = TypeVar("Resp")
Row = TypeVar("Row")
T = TypeVar("T")
# An ImportUsers row: a create, or a create and its own idempotency key.
ImportRow: TypeAlias = pb.CreateUserRequest | tuple[pb.CreateUserRequest, str]


@dataclass(frozen=True, slots=True)
class Written(Generic[T]):
    """A write's outcome and its position, as the `*_with_position` methods return them.

        written = users.create_user_with_position("ada@example.com", idempotency_key=key)
        ada = written.result
        feed = SyncFeed("hub-b:50051", min_position=written.position)  # shows the create

    `position` is the write's trailing `hub-position` (hub.resume.POSITION_KEY): a token
    covering the write (a bulk stream's: all its rows), for `Subscribe.min_position` on any
    instance (`SyncFeed(min_position=...)`, `hub watch --min-position`). It is for waiting, not
    resuming: as a resume token it would replay most of the history. "" from a hub that sends
    none. A retried keyed write's position is its first outcome's.
    """

    result: T
    position: str


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
        write_attempts: int = DEFAULT_WRITE_ATTEMPTS,
    ) -> None:
        """`max_in_flight`: unary calls run at once (0: no cap; see "Concurrency").
        `write_attempts`: attempts in all of a write that carries an idempotency key (1: never
        retried; see "Idempotency keys")."""
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._channel = _sync_channel(target, options, credentials)
        self.stub: pb_grpc.UserServiceStub = pb_grpc.UserServiceStub(self._channel)
        self._max_in_flight = max_in_flight
        self._slots = threading.BoundedSemaphore(max_in_flight) if max_in_flight else None
        self._write_attempts = _check_attempts(write_attempts)

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

    def _unary(
        self, method: grpc.UnaryUnaryMultiCallable[Any, Resp], request: Any,
        timeout: float | None, key: str | None = None,
    ) -> Written[Resp]:
        """One unary call: in one of the client's slots, sent again if the hub's transport
        refused it unseen or (with an idempotency `key`) its outcome is unknown, all within
        its deadline."""
        budget = _or_default(timeout, self.timeout)
        attempts = _Attempts(budget, self._write_attempts if key else 1)
        metadata = _key_metadata(key)
        with self._slot(budget), _mapped():
            while True:
                try:
                    response, call = method.with_call(
                        request, timeout=attempts.timeout(), metadata=metadata)
                    return Written(response, _position(call.trailing_metadata()))
                except grpc.RpcError as err:
                    pause = attempts.pause(err)
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
        return self._unary(self.stub.GetUser, pb.GetUserRequest(user_id=user_id),
                           timeout).result

    def create_user(
        self,
        email: str,
        name: str = "",
        password: str = "",
        status: common_pb2.UserStatus.ValueType = common_pb2.USER_STATUS_UNSPECIFIED,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> common_pb2.User:
        """The created user. With `idempotency_key`, safe to retry, and retried by itself on
        UNAVAILABLE and DEADLINE_EXCEEDED: a repeat returns the user the key first created."""
        return self.create_user_with_position(
            email, name, password, status, idempotency_key=idempotency_key,
            timeout=timeout).result

    def create_user_with_position(
        self,
        email: str,
        name: str = "",
        password: str = "",
        status: common_pb2.UserStatus.ValueType = common_pb2.USER_STATUS_UNSPECIFIED,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Written[common_pb2.User]:
        """create_user, with the write's position (`Written.position`) beside the user."""
        request = pb.CreateUserRequest(email=email, name=name, password=password, status=status)
        return self._unary(self.stub.CreateUser, request, timeout, idempotency_key)

    def update_user(
        self,
        user_id: str,
        *,
        email: str | None = None,
        name: str | None = None,
        status: common_pb2.UserStatus.ValueType | None = None,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> common_pb2.User:
        """Change the given fields only; with `expected_version`, only if the user is at it.
        With `idempotency_key`, retried by itself like create_user (a repeat is not applied
        again: it returns the user as the key's first update left it)."""
        return self.update_user_with_position(
            user_id, email=email, name=name, status=status, expected_version=expected_version,
            idempotency_key=idempotency_key, timeout=timeout).result

    def update_user_with_position(
        self,
        user_id: str,
        *,
        email: str | None = None,
        name: str | None = None,
        status: common_pb2.UserStatus.ValueType | None = None,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Written[common_pb2.User]:
        """update_user, with the write's position beside the user."""
        request = _update_request(user_id, email, name, status, expected_version)
        return self._unary(self.stub.UpdateUser, request, timeout, idempotency_key)

    def delete_user(
        self,
        user_id: str,
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Delete the user; with `idempotency_key`, retried by itself like create_user (a
        repeat of a delete that landed succeeds again instead of NOT_FOUND)."""
        self.delete_user_with_position(user_id, expected_version=expected_version,
                                       idempotency_key=idempotency_key, timeout=timeout)

    def delete_user_with_position(
        self,
        user_id: str,
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Written[None]:
        """delete_user, with the write's position (`result` is None)."""
        written = self._unary(self.stub.DeleteUser, _delete_request(user_id, expected_version),
                              timeout, idempotency_key)
        return Written(None, written.position)

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
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.BulkCreateResponse:
        """Create one user per request; refused rows come back in `errors`, not as exceptions.

        If iterating `requests` raises, the call is cancelled and that exception propagates;
        rows the server had already committed stay created.

        `idempotency_key` K is the stream's: row N gets the key "K/N", so the same rows sent
        again with K are each created once, and rows created the first time are reported
        created again (their ids in `user_ids`). With K and rows that can be iterated again (a
        list, a tuple: any iterable that is not an iterator), the stream is sent again by
        itself on UNAVAILABLE; an iterator's rows cannot be, so that is left to the caller.
        """
        return self.bulk_create_with_position(
            requests, idempotency_key=idempotency_key, timeout=timeout).result

    def bulk_create_with_position(
        self,
        requests: Iterable[pb.CreateUserRequest],
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Written[pb.BulkCreateResponse]:
        """bulk_create, with a position covering every row it created."""
        return self._stream(self.stub.BulkCreateUsers, requests, lambda rows: rows,
                            idempotency_key, timeout)

    def import_users(
        self,
        requests: Iterable[ImportRow],
        *,
        batch_size: int = IMPORT_BATCH,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> pb.BulkCreateResponse:
        """bulk_create's rows and outcomes, sent `batch_size` rows per ImportUsers message:
        several times faster, as gRPC pays per message, not per row.

        A row is a CreateUserRequest, or a `(request, key)` pair giving that row its own
        idempotency key (ImportUsersRequest.idempotency_keys; it wins over the stream's
        "K/N"): the row is created once however often it is sent within the hub's window,
        and reported created each time. `idempotency_key` and resending are as bulk_create's.
        """
        return self.import_users_with_position(
            requests, batch_size=batch_size, idempotency_key=idempotency_key,
            timeout=timeout).result

    def import_users_with_position(
        self,
        requests: Iterable[ImportRow],
        *,
        batch_size: int = IMPORT_BATCH,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Written[pb.BulkCreateResponse]:
        """import_users, with a position covering every row it created."""
        return self._stream(self.stub.ImportUsers, requests,
                            lambda rows: _messages(rows, batch_size), idempotency_key, timeout)

    def _stream(
        self,
        method: grpc.StreamUnaryMultiCallable[Any, pb.BulkCreateResponse],
        requests: Iterable[Row],
        messages: Callable[[Iterator[Row]], Iterator[Any]],
        key: str | None,
        timeout: float | None,
    ) -> Written[pb.BulkCreateResponse]:
        """A bulk stream of `messages(rows)`; sent again (see bulk_create) only with a `key`
        and rows that can be iterated again."""
        resendable = _resendable(requests)
        attempts = _Attempts(_or_default(timeout, self.stream_timeout),
                             self._write_attempts if key and resendable else 1, share=1.0)
        metadata = _key_metadata(key)
        with _mapped():
            while True:
                tap = _RequestTap()
                try:
                    with tap.instead_of(grpc.RpcError):
                        response, call = method.with_call(
                            messages(tap.rows(requests)), timeout=attempts.timeout(),
                            metadata=metadata)
                    return Written(response, _position(call.trailing_metadata()))
                except grpc.RpcError as err:
                    pause = attempts.pause(err) if resendable else None
                    if pause is None:
                        raise
                time.sleep(pause)


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
        write_attempts: int = DEFAULT_WRITE_ATTEMPTS,
    ) -> None:
        """`max_in_flight`: unary calls run at once (0: no cap; see "Concurrency").
        `write_attempts`: attempts in all of a write that carries an idempotency key (1: never
        retried; see "Idempotency keys")."""
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._channel = _aio_channel(target, options, credentials)
        self.stub: pb_grpc.UserServiceAsyncStub = pb_grpc.UserServiceStub(self._channel)
        self._max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._write_attempts = _check_attempts(write_attempts)

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
        self, method: grpc.aio.UnaryUnaryMultiCallable[Any, Resp], request: Any,
        timeout: float | None, key: str | None = None,  # noqa: ASYNC109
    ) -> Written[Resp]:
        """One unary call: in one of the client's slots, sent again if the hub's transport
        refused it unseen or (with an idempotency `key`) its outcome is unknown, all within
        its deadline."""
        budget = _or_default(timeout, self.timeout)
        attempts = _Attempts(budget, self._write_attempts if key else 1)
        metadata = _key_metadata(key)
        async with self._slot(budget):
            with _mapped():
                while True:
                    try:
                        call = method(request, timeout=attempts.timeout(), metadata=metadata)
                        response = await call
                        return Written(response, _position(await call.trailing_metadata()))
                    except grpc.aio.AioRpcError as err:
                        pause = attempts.pause(err)
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
        written = await self._unary(self.stub.GetUser, pb.GetUserRequest(user_id=user_id),
                                    timeout)
        return written.result

    async def create_user(
        self,
        email: str,
        name: str = "",
        password: str = "",
        status: common_pb2.UserStatus.ValueType = common_pb2.USER_STATUS_UNSPECIFIED,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> common_pb2.User:
        """The created user. With `idempotency_key`, safe to retry, and retried by itself on
        UNAVAILABLE and DEADLINE_EXCEEDED: a repeat returns the user the key first created."""
        written = await self.create_user_with_position(
            email, name, password, status, idempotency_key=idempotency_key, timeout=timeout)
        return written.result

    async def create_user_with_position(
        self,
        email: str,
        name: str = "",
        password: str = "",
        status: common_pb2.UserStatus.ValueType = common_pb2.USER_STATUS_UNSPECIFIED,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Written[common_pb2.User]:
        """create_user, with the write's position (`Written.position`) beside the user."""
        request = pb.CreateUserRequest(email=email, name=name, password=password, status=status)
        return await self._unary(self.stub.CreateUser, request, timeout, idempotency_key)

    async def update_user(
        self,
        user_id: str,
        *,
        email: str | None = None,
        name: str | None = None,
        status: common_pb2.UserStatus.ValueType | None = None,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> common_pb2.User:
        """Change the given fields only; with `expected_version`, only if the user is at it.
        With `idempotency_key`, retried by itself like create_user (a repeat is not applied
        again: it returns the user as the key's first update left it)."""
        written = await self.update_user_with_position(
            user_id, email=email, name=name, status=status, expected_version=expected_version,
            idempotency_key=idempotency_key, timeout=timeout)
        return written.result

    async def update_user_with_position(
        self,
        user_id: str,
        *,
        email: str | None = None,
        name: str | None = None,
        status: common_pb2.UserStatus.ValueType | None = None,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Written[common_pb2.User]:
        """update_user, with the write's position beside the user."""
        request = _update_request(user_id, email, name, status, expected_version)
        return await self._unary(self.stub.UpdateUser, request, timeout, idempotency_key)

    async def delete_user(
        self,
        user_id: str,
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        """Delete the user; with `idempotency_key`, retried by itself like create_user (a
        repeat of a delete that landed succeeds again instead of NOT_FOUND)."""
        await self.delete_user_with_position(user_id, expected_version=expected_version,
                                             idempotency_key=idempotency_key, timeout=timeout)

    async def delete_user_with_position(
        self,
        user_id: str,
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Written[None]:
        """delete_user, with the write's position (`result` is None)."""
        written = await self._unary(
            self.stub.DeleteUser, _delete_request(user_id, expected_version), timeout,
            idempotency_key)
        return Written(None, written.position)

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
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.BulkCreateResponse:
        """Create one user per request; refused rows come back in `errors`, not as exceptions.

        `requests` may be a plain or an async iterable. If iterating it raises, the call is
        cancelled and that exception propagates; rows the server had already committed stay.
        `idempotency_key` and resending are as UserClient.bulk_create's (async iterables are
        never sent again).
        """
        written = await self.bulk_create_with_position(
            requests, idempotency_key=idempotency_key, timeout=timeout)
        return written.result

    async def bulk_create_with_position(
        self,
        requests: Iterable[pb.CreateUserRequest] | AsyncIterable[pb.CreateUserRequest],
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Written[pb.BulkCreateResponse]:
        """bulk_create, with a position covering every row it created."""
        return await self._stream(self.stub.BulkCreateUsers, requests, lambda rows: rows,
                                  idempotency_key, timeout)

    async def import_users(
        self,
        requests: Iterable[ImportRow] | AsyncIterable[ImportRow],
        *,
        batch_size: int = IMPORT_BATCH,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.BulkCreateResponse:
        """bulk_create's rows and outcomes, sent `batch_size` rows per ImportUsers message:
        several times faster, as gRPC pays per message, not per row. Rows and keys are as
        UserClient.import_users takes them."""
        written = await self.import_users_with_position(
            requests, batch_size=batch_size, idempotency_key=idempotency_key, timeout=timeout)
        return written.result

    async def import_users_with_position(
        self,
        requests: Iterable[ImportRow] | AsyncIterable[ImportRow],
        *,
        batch_size: int = IMPORT_BATCH,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Written[pb.BulkCreateResponse]:
        """import_users, with a position covering every row it created."""
        return await self._stream(self.stub.ImportUsers, requests,
                                  lambda rows: _async_messages(rows, batch_size),
                                  idempotency_key, timeout)

    async def _stream(
        self,
        method: grpc.aio.StreamUnaryMultiCallable[Any, pb.BulkCreateResponse],
        requests: Iterable[Row] | AsyncIterable[Row],
        messages: Callable[[AsyncIterator[Row]], AsyncIterator[Any]],
        key: str | None,
        timeout: float | None,  # noqa: ASYNC109
    ) -> Written[pb.BulkCreateResponse]:
        """A bulk stream of `messages(rows)`; sent again (see UserClient.bulk_create) only
        with a `key` and rows that can be iterated again."""
        resendable = _resendable(requests)
        attempts = _Attempts(_or_default(timeout, self.stream_timeout),
                             self._write_attempts if key and resendable else 1, share=1.0)
        metadata = _key_metadata(key)
        with _mapped():
            while True:
                tap = _RequestTap()
                try:
                    with tap.instead_of(asyncio.CancelledError):
                        call = method(messages(tap.async_rows(requests)),
                                      timeout=attempts.timeout(), metadata=metadata)
                        response = await call
                        return Written(response, _position(await call.trailing_metadata()))
                except grpc.aio.AioRpcError as err:
                    pause = attempts.pause(err) if resendable else None
                    if pause is None:
                        raise
                await asyncio.sleep(pause)


# -- what both clients send -----------------------------------------------------------------


def _or_default(timeout: float | None, default: float) -> float:
    # `is None`, not `or`: an explicit 0 must stay 0 (fail at once), not become the default.
    return default if timeout is None else timeout


def _check_attempts(attempts: int) -> int:
    if attempts < 1:
        raise ValueError(f"write_attempts must be at least 1, not {attempts}")
    return attempts


def _key_metadata(key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The request metadata naming an idempotency key (None or "": no key)."""
    return ((IDEMPOTENCY_KEY, key),) if key else None


def _position(trailing: Any) -> str:
    """The write's position from its trailing metadata; "" from a hub that sends none."""
    for key, value in trailing or ():
        if key == POSITION_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def _resendable(rows: object) -> bool:
    """Whether bulk rows can be sent again: an iterable that is not an iterator (a list, a
    tuple, or any object whose `__iter__` starts over). Generators, files and async iterables
    are consumed as they are sent."""
    return (isinstance(rows, Iterable) and not isinstance(rows, Iterator)
            and not isinstance(rows, AsyncIterable))


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

    def rows(self, requests: Iterable[Row]) -> Iterator[Row]:
        try:
            yield from requests
        except Exception as exc:
            self.error = exc
            raise

    async def async_rows(
        self, requests: Iterable[Row] | AsyncIterable[Row]
    ) -> AsyncIterator[Row]:
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


def _row(row: ImportRow) -> tuple[pb.CreateUserRequest, str]:
    return row if isinstance(row, tuple) else (row, "")


def _message(batch: list[tuple[pb.CreateUserRequest, str]]) -> pb.ImportUsersRequest:
    # Keys go along only when a row of the message has one (then one per row, "" for none).
    keys = [key for _, key in batch]
    return pb.ImportUsersRequest(users=[request for request, _ in batch],
                                 idempotency_keys=keys if any(keys) else [])


def _messages(rows: Iterator[ImportRow], size: int) -> Iterator[pb.ImportUsersRequest]:
    batch: list[tuple[pb.CreateUserRequest, str]] = []
    for row in rows:
        batch.append(_row(row))
        if len(batch) >= size:
            yield _message(batch)
            batch = []
    if batch:
        yield _message(batch)


async def _async_messages(
    rows: AsyncIterator[ImportRow], size: int
) -> AsyncIterator[pb.ImportUsersRequest]:
    batch: list[tuple[pb.CreateUserRequest, str]] = []
    async for row in rows:
        batch.append(_row(row))
        if len(batch) >= size:
            yield _message(batch)
            batch = []
    if batch:
        yield _message(batch)
