"""Authentication and per-method authorization at the gRPC edge, deny by default.

    verifier = TokenVerifier.from_settings(settings)      # hub.bearer; None: auth is off
    server = grpc.aio.server(interceptors=[AuthInterceptor(verifier, settings), ...])

Tokens come as `authorization: Bearer <jwt>` metadata; hub.bearer verifies them.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from hub.bearer import TokenVerifier
from hub.errors import PermissionDenied, Unauthenticated
from hub.principal import READ, SUBSCRIBE, WRITE, Principal, current_principal
from hub.rpc.errors import to_status
from hub.settings import Settings

# Every method hub serves and the scope it needs; a method missing here is denied.
METHOD_SCOPES: dict[str, str] = {
    "/user.v1.UserService/GetUser": READ,
    "/user.v1.UserService/ListUsers": READ,
    "/user.v1.UserService/CreateUser": WRITE,
    "/user.v1.UserService/UpdateUser": WRITE,
    "/user.v1.UserService/DeleteUser": WRITE,
    "/user.v1.UserService/BulkCreateUsers": WRITE,
    "/user.v1.UserService/ImportUsers": WRITE,
    "/user.v1.UserService/UserUpdates": SUBSCRIBE,
    "/user.v1.UserSyncService/Sync": SUBSCRIBE,
}
_ALWAYS_PUBLIC = ("/grpc.health.v1.Health/",)
_REFLECTION = (
    "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/"
)

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# The NumericDate claims (RFC 7519 section 4.1): seconds since the epoch, as JSON numbers.
class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call before its handler runs. UNAUTHENTICATED: no, malformed, expired or
    forged token. PERMISSION_DENIED: a valid token without the method's scope."""

    def __init__(self, verifier: TokenVerifier, settings: Settings) -> None:
        self._verifier = verifier
        self._public = {m.strip() for m in settings.public_methods.split(",") if m.strip()}
        self._reflection = settings.reflection

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = details.method
        found = await continuation(details)
        handler: Any = found
        if found is None or method.startswith(_ALWAYS_PUBLIC):
            return found  # unknown methods stay UNIMPLEMENTED
        if self._reflection and method.startswith(_REFLECTION):
            return found
        try:
            principal = self._authorize(method, details)
        except (Unauthenticated, PermissionDenied) as exc:
            return _refusal(handler, exc)
        return _with_principal(handler, principal)

    def _authorize(self, method: str, details: grpc.HandlerCallDetails) -> Principal:
        token = _bearer(details)
        if method in self._public and not token:
            return Principal("anonymous", frozenset(), float("inf"))
        scope = METHOD_SCOPES.get(method)
        if not token:
            raise Unauthenticated("missing bearer token (authorization: Bearer <jwt>)")
        principal = self._verifier.verify(token)
        if method in self._public:
            return principal
        if scope is None:
            raise PermissionDenied(f"{method} is not open to any scope")
        principal.require(scope)
        return principal


def _bearer(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def _kind(handler: Any) -> Callable[..., Any]:
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler
    return grpc.unary_unary_rpc_method_handler


def _behaviour(handler: Any) -> Any:
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)


def _refusal(handler: Any, exc: Exception) -> Handler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort_with_status(to_status(exc))

    return _kind(handler)(refuse, handler.request_deserializer, handler.response_serializer)  # type: ignore[no-any-return]


def _with_principal(handler: Any, principal: Principal) -> Handler:
    behaviour = _behaviour(handler)
    # The principal is set inside the handler's own task, where the service and the stream
    # code read it; a streamed response also checks the token has not expired meanwhile.
    if inspect.isasyncgenfunction(behaviour):
        async def generate(request: Any, context: Any) -> Any:
            current_principal.set(principal)
            async for item in behaviour(request, context):
                if time.time() >= principal.expires_at:
                    await context.abort_with_status(to_status(Unauthenticated("token expired")))
                yield item

        wrapped: Any = generate
    else:
        async def call(request: Any, context: Any) -> Any:
            current_principal.set(principal)
            return await behaviour(request, context)

        wrapped = call
    return _kind(handler)(wrapped, handler.request_deserializer, handler.response_serializer)  # type: ignore[no-any-return]
