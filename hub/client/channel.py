"""The channel under both clients and the Sync feed: its options, credentials and call cap.

`CHANNEL_OPTIONS` carries the retry policy (`RETRY_SERVICE_CONFIG`), keepalive, message
limits and reconnect backoff; `Credentials` says how a channel proves itself. One client is
one channel, one HTTP/2 connection, so the cap on calls in flight (`DEFAULT_MAX_IN_FLIGHT`)
and the resending of calls the hub's transport refused unseen live here too: both exist
because of how the hub's HTTP/2 layer counts a connection's streams. `_Attempts` plans the
attempts of one call: those resends, and the retries of writes that carry an idempotency key.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import grpc
import grpc.aio

from hub.client.errors import ClientError

DEFAULT_TARGET: Final = "localhost:50051"
_SERVICE: Final = "user.v1.UserService"
_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
# Unary calls a client runs at once (see "Concurrency" in hub.client). Well under the hub's 100
# streams per connection: the hub counts a call until it has released it, a little after
# the client has its answer, and 1,000 calls at once through a cap of 100 (or even 64) still
# met refusals. 64 calls in flight keep one hub process busy.
DEFAULT_MAX_IN_FLIGHT: Final = 64
# A call refused before the hub saw it (HTTP/2 REFUSED_STREAM) is sent again this many times
# at most, after 10 ms, 20 ms, 40 ms, ... (with jitter), and never past its deadline.
_REFUSED_RETRIES: Final = 6
_REFUSED_BACKOFF: Final = 0.01
# A write that carries an idempotency key (hub.resume.IDEMPOTENCY_KEY metadata) is safe to send
# again: the hub answers a repeat with the first outcome, unapplied again. Such a write is
# sent at most this many times in all (reads' schedule: 0.1 s doubling to 2 s, jittered) on
# the codes that leave its outcome unknown. Writes without a key are never sent again (except
# when refused unseen, above).
DEFAULT_WRITE_ATTEMPTS: Final = 5
_WRITE_BACKOFF: Final = 0.1
_WRITE_BACKOFF_CAP: Final = 2.0
_RETRIED_WRITE_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

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
# Writes are deliberately absent: see "Retries" in the hub.client docstring.
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


class _Attempts:
    """The attempts of one call, all within its deadline, which starts counting before the
    call waits for a slot. Each attempt is given its share of what is left; a failed one may
    be sent again after a backoff that must fit too:

    * one the hub's transport refused unseen (REFUSED_STREAM), any call: up to
      `_REFUSED_RETRIES` more times, after 10 ms doubling (jittered);
    * a write that carries an idempotency key (`write_attempts` > 1), on UNAVAILABLE or
      DEADLINE_EXCEEDED: up to `write_attempts` attempts in all, after 0.1 s doubling to 2 s
      (jittered: each pause 50-100% of its step). While another attempt is allowed, one gets at
      most `share` of the call's deadline, so an attempt lost to a hung hub or store leaves
      time for the next; the last gets all that is left.

        attempts = _Attempts(budget)
        while True:
            try:
                return method(request, timeout=attempts.timeout())
            except grpc.RpcError as err:
                pause = attempts.pause(err)
                if pause is None:
                    raise
            time.sleep(pause)
    """

    def __init__(self, budget: float, write_attempts: int = 1, share: float = 0.5) -> None:
        self._budget = budget
        self._deadline = time.monotonic() + budget
        self._share = share
        self._refused = 0
        self._writes = 1  # attempts of a keyed write made so far (the first is being made)
        self._write_attempts = write_attempts

    def remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def timeout(self) -> float:
        """The deadline of the next attempt, in seconds from now."""
        if self._writes < self._write_attempts:
            return min(self.remaining(), self._budget * self._share)
        return self.remaining()

    def pause(self, err: grpc.RpcError) -> float | None:
        """Seconds to wait before sending the failed call again; None: give up, raise `err`."""
        if _refused(err):
            if self._refused == _REFUSED_RETRIES:
                return None
            pause = _refused_backoff(self._refused)
            if time.monotonic() + pause >= self._deadline:
                return None
            self._refused += 1
            return pause
        if (self._writes >= self._write_attempts
                or cast("grpc.Call", err).code() not in _RETRIED_WRITE_CODES):
            return None
        pause = _write_backoff(self._writes - 1)
        if time.monotonic() + pause >= self._deadline:
            return None
        self._writes += 1
        return pause


def _refused(err: grpc.RpcError) -> bool:
    """Whether the call was refused by the server's HTTP/2 layer before any of the server's
    code saw it (RST_STREAM with REFUSED_STREAM, code 7): always safe to send again. gRPC
    reports it as UNAVAILABLE and says so only in the details."""
    call = cast("grpc.Call", err)
    return (call.code() is grpc.StatusCode.UNAVAILABLE
            and "RST_STREAM with error code 7" in (call.details() or ""))


def _refused_backoff(attempt: int) -> float:
    return random.uniform(0.5, 1.0) * _REFUSED_BACKOFF * (1 << attempt)


def _write_backoff(retry: int) -> float:
    return random.uniform(0.5, 1.0) * min(_WRITE_BACKOFF_CAP, _WRITE_BACKOFF * (1 << retry))


def _no_slot(timeout: float, slots: int) -> ClientError:
    return ClientError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"deadline of {timeout}s passed waiting for one of this client's {slots} call slots")
