"""Server interceptors: one log line per call with method, status code and duration."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from random import random
from types import TracebackType
from typing import Any, TypeAlias

import grpc

from hub import metrics
from hub.principal import caller
from hub.rpc.handlers import rewrap

log = logging.getLogger("hub.access")

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _outcome(context: Context, exc: BaseException | None) -> grpc.StatusCode:
    if exc is None or isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        # grpc.aio leaves code() None after a normal return; abort sets it.
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class LoggingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler; logs at INFO (WARNING for server-side failures)."""

    def __init__(self, sample: float = 1.0, enabled: bool = True) -> None:
        """`sample`: the fraction of successful calls logged (failures always are);
        `enabled` False: no lines at all, the RPC metrics only."""
        self._sample, self._enabled = sample, enabled
        # method -> (the handler, its wrapper): the registered handler of a method does not
        # change, so its wrapper is built once rather than on every call.
        self._wrapped: dict[str, tuple[Any, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        # The grpc stubs type handler behaviours as sync callables; under grpc.aio they are
        # coroutine functions and async generators, so the handler is treated as untyped.
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(method, handler, self._sample, self._enabled)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap(method: str, handler: Any, sample: float, enabled: bool) -> Handler:
    requests = metrics.RPCS
    seconds_metric = metrics.RPC_SECONDS.labels(method)

    def done(context: Context, started: float, peer: str, exc: BaseException | None) -> None:
        code = _outcome(context, exc)
        seconds = time.perf_counter() - started
        requests.labels(method, code.name).inc()
        seconds_metric.observe(seconds)
        level = logging.WARNING if code in _SERVER_FAULTS else logging.INFO
        # Failures are always logged; successes as sampled (a line costs about 15 us of CPU
        # in text and 25 us in JSON, some 3-5% of a GetUser: `bench --only access-log`).
        if not enabled or not log.isEnabledFor(level):
            return
        if code is not grpc.StatusCode.OK or sample >= 1 or (sample and random() < sample):
            ms = round(seconds * 1000, 3)
            principal = caller().subject
            log.log(level, "%s %s %.1fms %s %s", method, code.name, ms, principal, peer,
                    extra={"method": method, "code": code.name, "duration_ms": ms,
                           "principal": principal, "peer": peer})

    return rewrap(handler, lambda _, context: _Timed(context, done, enabled))


class _Timed:
    """Times one call, however it ends, and reports it to `done`. The peer is read as the
    call starts: grpc's context.peer() after a cancelled call has ended crashed the process
    (a segfault in tests/test_service.py's client-goes-away test)."""

    __slots__ = ("_context", "_done", "_logged", "_peer", "_started")

    def __init__(self, context: Context,
                 done: Callable[[Context, float, str, BaseException | None], None],
                 logged: bool) -> None:
        self._context, self._done, self._logged = context, done, logged
        self._peer = ""
        self._started = time.perf_counter()

    async def __aenter__(self) -> None:
        if self._logged:
            self._peer = self._context.peer()

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._done(self._context, self._started, self._peer, exc)


_SERVER_FAULTS = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}
