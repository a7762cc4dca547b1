"""gRPC handler plumbing in one place: registering a servicer from its descriptor, and ONE
helper, `rewrap`, that wraps a handler of any kind (unary or streaming on either side) for the
layers that need to: the access log, auth, the undecodable-request guard and the mapping of
domain errors to statuses (hub.rpc.errors.Aborting).

    handler = rewrap(handler, around=lambda request, context: Timed(context))

`around(request, context)` is an async context manager entered for the whole call: around the
await of a coroutine handler (unary responses, and streams written with context.write), or
around the whole iteration of an async-generator handler (responses yielded one by one).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeAlias

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from hub.rpc.errors import Aborting
from hub.rpc.wire import guard_undecodable, parser

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Around: TypeAlias = Callable[[Any, Context], AbstractAsyncContextManager[Any]]

_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behaviour_of(handler: Any) -> Any:
    """The function a handler runs, whatever its kind. (The grpc stubs type behaviours as
    sync callables; under grpc.aio they are coroutine functions and async generators.)"""
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)


def rewrap(handler: Any, around: Around | None = None, behaviour: Any = None,
           each: Callable[[], None] | None = None) -> Handler:
    """A handler of the same kind and (de)serializers as `handler`, running `behaviour`
    (default: the handler's own) inside `around`, and calling `each` before every response an
    async-generator behaviour yields (it may raise to end the call)."""
    inner = behaviour if behaviour is not None else behaviour_of(handler)
    wrapped: Any
    if inspect.isasyncgenfunction(inner):
        async def generate(request: Any, context: Context) -> AsyncIterator[Any]:
            if around is None:
                async for item in inner(request, context):
                    if each is not None:
                        each()
                    yield item
                return
            async with around(request, context):
                async for item in inner(request, context):
                    if each is not None:
                        each()
                    yield item

        wrapped = generate
    else:
        async def call(request: Any, context: Context) -> Any:
            if around is None:
                return await inner(request, context)
            async with around(request, context):
                return await inner(request, context)

        wrapped = call
    kind = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return kind(wrapped, handler.request_deserializer, handler.response_serializer)


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Registers `servicer`'s methods for `service` straight from the descriptor.

    Unlike the generated add_*_to_server, the response serializer passes `bytes` through, so a
    handler can send a message it assembled from pre-encoded parts (one encoding per event,
    not one per subscriber); bytes that do not parse as the request message become
    INVALID_ARGUMENT rather than gRPC's UNKNOWN (see hub.rpc.wire.Undecodable); and every
    method runs inside Aborting, the one place a domain error becomes its status.
    """
    handlers = {}
    for method in service.methods:
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        request = message_factory.GetMessageClass(method.input_type)
        plain = kind(
            guard_undecodable(getattr(servicer, method.name), method.client_streaming,
                              method.server_streaming),
            request_deserializer=parser(request),
            response_serializer=_serialize,
        )
        handlers[method.name] = rewrap(plain, Aborting)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()
