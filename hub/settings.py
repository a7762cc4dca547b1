"""Settings: read once at the edge (flags, then HUB_* environment variables), frozen."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

_PARSERS: dict[str, Callable[[Any], Any]] = {"str": str, "int": int, "float": float}


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    # Empty: the embedded in-memory store (one instance, nothing survives a restart).
    redis_url: str = ""
    # Events are ordered per partition; a user's events always share one. Every instance
    # sharing a Redis must use the same count.
    partitions: int = 16
    # Events kept per partition for resuming subscribers, and for at most this many seconds.
    history_size: int = 10_000
    history_max_age: float = 86_400.0
    # Seconds in-flight calls get to finish on SIGTERM/SIGINT before they are cancelled.
    shutdown_grace: float = 10.0
    max_message_bytes: int = 4 * 1024 * 1024
    # Concurrent argon2id hashes (each ~64 MiB and tens of ms of a core).
    password_hash_concurrency: int = 2
    # Rows BulkCreateUsers gathers into one atomic store call.
    bulk_batch_size: int = 500
    log_level: str = "INFO"
    # Seconds between heartbeat responses on an idle Sync stream (no events, a fresh token).
    heartbeat_interval: float = 15.0
    # A subscriber whose unsent events exceed either bound is cut with RESOURCE_EXHAUSTED
    # (and its resume token), so it can never slow anyone else down or exhaust memory.
    subscriber_max_events: int = 10_000
    subscriber_max_bytes: int = 8 * 1024 * 1024
    max_subscription_users: int = 10_000

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> Settings:
        """Flags (`overrides`, None meaning "not given") win over HUB_<NAME> variables."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            given = (overrides or {}).get(f.name)
            raw = given if given is not None else env.get(f"HUB_{f.name.upper()}")
            if raw is None:
                continue
            parse = _PARSERS[str(f.type)]
            try:
                values[f.name] = parse(raw)
            except ValueError:
                raise ValueError(f"HUB_{f.name.upper()}={raw!r} is not a valid {f.type}") from None
        return cls(**values)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
