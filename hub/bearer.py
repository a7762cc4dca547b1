"""Bearer tokens (JWTs): verified with keys and algorithms pinned by configuration, never
taken from the token (so `alg: none` and HS/RS confusion are refused); `exp` and `sub` are
required, `aud` and `iss` checked when configured. `sub` is the principal, `scope` a
space-separated list of scopes (OAuth 2 style). No gRPC here: hub.rpc.auth reads the token
from the call's metadata and asks this module.

    verifier = TokenVerifier.from_settings(settings)      # None: auth is off
    principal = verifier.verify(token)                     # or Unauthenticated
"""

from __future__ import annotations

from pathlib import Path

import jwt

from hub.errors import Unauthenticated
from hub.principal import Principal
from hub.settings import Settings

_TIME_CLAIMS = ("exp", "iat", "nbf")


def _is_number(value: object) -> bool:
    # bool is an int in Python, not a number in JSON.
    return isinstance(value, int | float) and not isinstance(value, bool)


class TokenVerifier:
    def __init__(
        self, key: str | bytes, algorithms: list[str],
        audience: str = "", issuer: str = "", leeway: float = 0.0,
    ) -> None:
        if not algorithms or any(a.lower() == "none" for a in algorithms):
            raise ValueError("JWT algorithms must be configured and must not include 'none'")
        self._key, self._algorithms = key, algorithms
        self._audience, self._issuer, self._leeway = audience or None, issuer or None, leeway

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier | None:
        if settings.jwt_secret and settings.jwt_public_key:
            raise ValueError("set one of --jwt-secret and --jwt-public-key, not both")
        algorithms = [a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()]
        if settings.jwt_secret:
            key: str | bytes = settings.jwt_secret
            algorithms = algorithms or ["HS256"]
            if any(not a.startswith("HS") for a in algorithms):
                raise ValueError("an HMAC secret goes with HS256/HS384/HS512 only")
        elif settings.jwt_public_key:
            key = Path(settings.jwt_public_key).read_bytes()
            algorithms = algorithms or ["RS256", "ES256"]
            if any(a.startswith("HS") for a in algorithms):
                # A public key used as an HMAC secret would let anyone sign tokens.
                raise ValueError("a public key goes with RS*/ES*/PS*/EdDSA algorithms only")
        else:
            return None
        return cls(key, algorithms, settings.jwt_audience, settings.jwt_issuer)

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token, self._key, algorithms=self._algorithms, audience=self._audience,
                issuer=self._issuer, leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.PyJWTError as exc:
            # The library's message names the failed check, never the token itself.
            raise Unauthenticated(f"invalid token: {exc}") from None
        scope = claims.get("scope", "")
        if not isinstance(scope, str) or not isinstance(claims["sub"], str):
            raise Unauthenticated("invalid token: sub and scope must be strings")
        for name in _TIME_CLAIMS:
            # PyJWT checks them with int(), which also takes the string "9999999999" and
            # true. RFC 7519 makes them JSON numbers: such a token is malformed (a signer's
            # bug, or a claim set built from untyped input), and hub must not be the one
            # verifier that accepts it.
            if name in claims and not _is_number(claims[name]):
                raise Unauthenticated(f"invalid token: {name} must be a number")
        return Principal(claims["sub"], frozenset(scope.split()), float(claims["exp"]))
