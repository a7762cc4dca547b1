"""Who is calling: set per RPC by the auth interceptor, read by the code that enforces scopes,
rate limits and token expiry. Plain values: no gRPC here."""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass

from hub.errors import PermissionDenied, Unauthenticated

READ, WRITE, SUBSCRIBE = "users:read", "users:write", "users:subscribe"


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    scopes: frozenset[str]
    expires_at: float  # epoch seconds; inf for a call on a public method without a token

    def require(self, scope: str, what: str = "") -> None:
        """PermissionDenied unless the principal has `scope`; `what` names what needs it,
        when that is not the whole method."""
        if scope not in self.scopes:
            raise PermissionDenied(
                f"{self.subject} lacks scope {scope}" + (f" (needed for {what})" if what else ""))

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at

    def require_fresh(self, detail: str = "") -> None:
        """Unauthenticated once the token has expired: the one expiry rule, for every place
        a call outlives the check at its start (streamed changes, bulk rows, stream items)."""
        if self.expired:
            raise Unauthenticated("token expired" + (f"; {detail}" if detail else ""))


ANONYMOUS = Principal("anonymous", frozenset({READ, WRITE, SUBSCRIBE}), float("inf"))

# None outside an RPC; ANONYMOUS-like principals when auth is off (every scope).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None
)


def caller() -> Principal:
    return current_principal.get() or ANONYMOUS
