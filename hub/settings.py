"""Settings: read once at the edge (flags, then HUB_* environment variables), frozen."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

_PARSERS: dict[str, Callable[[Any], Any]] = {"str": str, "int": int, "float": float}


def _setting(default: Any, help: str) -> Any:
    # The help text is what `hub serve --help` shows for the flag (hub.cli builds one flag
    # per setting), so each setting is described once, here.
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = _setting("127.0.0.1", "address to bind")
    port: int = _setting(50051, "port to bind (0: any free port)")
    redis_url: str = _setting(
        "", "redis://[user:password@]host:port/db; empty: the embedded in-memory store"
        " (one instance, nothing survives a restart)")
    partitions: int = _setting(
        16, "event partitions; a user's events share one, so each is ordered per user."
        " Every instance on one Redis must use the same count")
    history_size: int = _setting(10_000, "events kept per partition for resuming subscribers")
    history_max_age: float = _setting(86_400.0, "seconds an event stays in the history")
    shutdown_grace: float = _setting(
        10.0, "seconds in-flight calls get on SIGTERM/SIGINT before they are cancelled")
    max_message_bytes: int = _setting(4 * 1024 * 1024, "largest message sent or received")
    password_hash_concurrency: int = _setting(
        2, "concurrent argon2id hashes (each ~64 MiB and tens of ms of a core)")
    bulk_batch_size: int = _setting(
        500, "BulkCreateUsers rows written per atomic store call")
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    heartbeat_interval: float = _setting(
        15.0, "seconds between heartbeat responses on an idle Sync stream")
    subscriber_max_events: int = _setting(
        10_000, "unsent events a subscriber may fall behind by before it is cut with"
        " RESOURCE_EXHAUSTED (and its resume token); must exceed the largest write batch")
    subscriber_max_bytes: int = _setting(
        8 * 1024 * 1024, "unsent bytes a subscriber may fall behind by before it is cut")
    max_subscription_users: int = _setting(10_000, "user ids one Subscribe may name")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not 0..65535")
        positive = ("partitions", "history_size", "history_max_age", "max_message_bytes",
                    "password_hash_concurrency", "bulk_batch_size", "heartbeat_interval",
                    "subscriber_max_events", "subscriber_max_bytes", "max_subscription_users")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.shutdown_grace < 0:
            raise ValueError("shutdown_grace must not be negative")

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
