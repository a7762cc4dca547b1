"""Authentication and per-method authorization at the gRPC edge, deny by default.

    verifier = TokenVerifier.from_settings(settings)      # hub.bearer; None: auth is off
    server = grpc.aio.server(interceptors=[AuthInterceptor(verifier, settings), ...])

Tokens come as `authorization: Bearer <jwt>` metadata; hub.bearer verifies them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from hub.bearer import TokenVerifier
from hub.errors import PermissionDenied, Unauthenticated
from hub.principal import READ, SUBSCRIBE, WRITE, Principal, current_principal
from hub.rpc.errors import Aborting
from hub.rpc.handlers import rewrap
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


def _refusal(handler: Any, exc: Exception) -> Handler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        raise exc

    return rewrap(handler, Aborting, behaviour=refuse)


class _AsPrincipal(Aborting):
    """Sets the principal inside the handler's own task, where the service and the stream
    code read it; errors (an expiry found mid-stream) end the call as Aborting does."""

    __slots__ = ("_principal",)

    def __init__(self, principal: Principal, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        super().__init__(None, context)
        self._principal = principal

    async def __aenter__(self) -> None:
        current_principal.set(self._principal)


def _with_principal(handler: Any, principal: Principal) -> Handler:
    # A streamed response also checks, before each item, that the token has not expired.
    return rewrap(handler, lambda _, context: _AsPrincipal(principal, context),
                  each=principal.require_fresh)
