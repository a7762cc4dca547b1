"""gRPC handler plumbing in one place: registering a servicer from its descriptor, and one
helper that re-wraps a handler of any kind (unary or streaming, either side)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from hub.rpc.wire import guard_undecodable, parser

_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Registers `servicer`'s methods for `service` straight from the descriptor.

    Unlike the generated add_*_to_server, the response serializer passes `bytes` through, so a
    handler can send a message it assembled from pre-encoded parts (one encoding per event,
    not one per subscriber); and bytes that do not parse as the request message become
    INVALID_ARGUMENT rather than gRPC's UNKNOWN (see hub.rpc.wire.Undecodable).
    """
    handlers = {}
    for method in service.methods:
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        request = message_factory.GetMessageClass(method.input_type)
        handlers[method.name] = kind(
            guard_undecodable(getattr(servicer, method.name), method.client_streaming,
                              method.server_streaming),
            request_deserializer=parser(request),
            response_serializer=_serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()
