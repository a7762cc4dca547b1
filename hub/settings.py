"""Settings: read once at the edge (flags, then HUB_* environment variables), frozen."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


def parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{raw!r} is not a boolean")


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "str": str, "int": int, "float": float, "bool": parse_bool,
}


def _setting(default: Any, help: str) -> Any:
    # The help text is what `hub serve --help` shows for the flag (hub.cli builds one flag
    # per setting), so each setting is described once, here.
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = _setting("127.0.0.1", "address to bind")
    port: int = _setting(50051, "port to bind (0: any free port)")
    redis_url: str = _setting(
        "", "redis://[user:password@]host:port/db, rediss:// for TLS,"
        " redis+sentinel://[:password@]host:port[,host:port...]/MASTER_NAME (rediss+sentinel://"
        " for TLS), or redis+cluster://[user:password@]host:port[,host:port...] for Redis"
        " Cluster (rediss+cluster:// for TLS); empty: the embedded in-memory store (one"
        " instance, nothing survives a restart)")
    redis_replicas_ack: int = _setting(
        0, "acknowledge a write only after WAIT confirms this many replicas have it"
        " (0: as soon as the primary has it); unconfirmed writes fail UNAVAILABLE, outcome"
        " unknown")
    redis_replicas_ack_timeout: float = _setting(
        1.0, "seconds a write waits for --redis-replicas-ack replicas")
    allow_evicting_redis: bool = _setting(
        False, "run even if Redis's maxmemory-policy may evict keys (hub's users, indexes and"
        " history would vanish silently; use noeviction)")
    partitions: int = _setting(
        0, "event partitions; a user's events share one, so each is ordered per user."
        " Every instance on one keyspace must use the same count (hub refuses to start"
        " otherwise). 0: 16, or 128 on a redis+cluster:// URL (spread over the masters)")
    redis_pool_size: int = _setting(
        64, "Redis connections per process; store calls beyond it wait for a free one")
    history_size: int = _setting(10_000, "events kept per partition for resuming subscribers")
    history_max_age: float = _setting(86_400.0, "seconds an event stays in the history")
    tombstone_retention: float = _setting(
        7 * 86_400.0, "seconds a deleted user's tombstone is kept, so a subscriber whose token"
        " has left the history can still resync by state (Subscribe.catch_up); longer than"
        " --history-max-age")
    idempotency_window: float = _setting(
        86_400.0, "seconds a write's idempotency key (idempotency-key metadata) is remembered:"
        " a retry within it gets the first outcome, a reuse after it writes again")
    min_position_timeout: float = _setting(
        5.0, "seconds a stream with Subscribe.min_position waits for this instance to route up"
        " to it before it fails UNAVAILABLE")
    shutdown_grace: float = _setting(
        10.0, "seconds in-flight calls get on SIGTERM/SIGINT before they are cancelled")
    max_message_bytes: int = _setting(4 * 1024 * 1024, "largest message sent or received")
    password_hash_concurrency: int = _setting(
        2, "concurrent argon2id hashes (each ~64 MiB and tens of ms of a core)")
    bulk_batch_size: int = _setting(
        500, "BulkCreateUsers rows written per atomic store call")
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _setting("text", "text, or json for one JSON object per line")
    otlp_endpoint: str = _setting(
        "", "OpenTelemetry: trace every RPC and export the spans over OTLP/gRPC to this"
        " endpoint (e.g. http://collector:4317); needs the [tracing] extra. Empty: off")
    access_log: bool = _setting(True, "log one line per call (method, code, duration, principal,"
                                " peer); RPC metrics are kept either way")
    access_log_sample: float = _setting(
        1.0, "fraction of successful calls the access log writes (failures always); 0.01 keeps"
        " 1 in 100 at high rates")
    heartbeat_interval: float = _setting(
        15.0, "seconds between heartbeat responses on an idle Sync stream")
    subscriber_max_events: int = _setting(
        10_000, "unsent events a subscriber may fall behind by before the engine stops"
        " buffering for it and it catches up from the history at its own pace (cut,"
        " OUT_OF_RANGE, only once its position leaves the history); must exceed the largest"
        " write batch")
    subscriber_max_bytes: int = _setting(
        8 * 1024 * 1024, "unsent bytes a subscriber may fall behind by before it catches up"
        " from the history the same way")
    max_subscription_users: int = _setting(10_000, "user ids one Subscribe may name")
    max_stream_users: int = _setting(
        20_000, "user ids one UserUpdates/Sync stream may follow in all (its Subscribes added"
        " up)")
    import_max_rows: int = _setting(
        10_000, "rows one ImportUsers message may carry (counted before it is parsed)")
    max_metadata_bytes: int = _setting(
        16 * 1024, "largest request metadata (headers) a call may send")
    max_subscribes_per_stream: int = _setting(
        100, "Subscribe requests one UserUpdates/Sync stream may send")
    max_page_size: int = _setting(1000, "largest ListUsers page_size")
    bulk_max_rows: int = _setting(100_000, "rows one BulkCreateUsers stream may send")
    max_concurrent_streams: int = _setting(100, "concurrent RPCs on one HTTP/2 connection")
    max_connection_age: float = _setting(
        1800.0, "seconds before a connection is asked to reconnect (so long streams rebalance"
        " across instances; SyncFeed resumes seamlessly)")
    max_connection_age_grace: float = _setting(
        30.0, "seconds calls get to finish after max_connection_age")
    write_rate: float = _setting(
        20_000.0, "writes per second per principal (a bulk row counts as one; 0: unlimited)")
    write_burst: int = _setting(20_000, "writes a principal may make at once above write_rate")
    jwt_secret: str = _setting("", "HMAC secret for HS256 bearer tokens (enables auth)")
    jwt_public_key: str = _setting(
        "", "PEM public key file for RS256/ES256 bearer tokens (enables auth)")
    jwt_algorithms: str = _setting(
        "", "accepted JWT algorithms, comma-separated (default HS256 with a secret,"
        " RS256,ES256 with a public key); never taken from the token")
    jwt_audience: str = _setting("", "required aud claim (empty: not checked)")
    jwt_issuer: str = _setting("", "required iss claim (empty: not checked)")
    public_methods: str = _setting(
        "/user.v1.UserService/CreateUser", "comma-separated methods callable without a token")
    reflection: bool = _setting(True, "serve gRPC server reflection")
    insecure: bool = _setting(
        False, "allow binding a non-loopback address without authentication")
    tls_cert: str = _setting("", "PEM certificate chain file (enables TLS)")
    tls_key: str = _setting("", "PEM private key file for --tls-cert")
    tls_client_ca: str = _setting(
        "", "PEM CA file: require client certificates signed by it (mTLS)")
    metrics_host: str = _setting(
        "127.0.0.1", "address of the /metrics endpoint (it has no authentication: hub warns"
        " when it is not a loopback address)")
    metrics_port: int = _setting(
        0, "port of the Prometheus /metrics endpoint (0: off); with --workers N, worker i"
        " (0..N-1) serves it on this port + i")
    workers: int = _setting(
        1, "server processes sharing the port (SO_REUSEPORT), each with its own Redis"
        " subscription; 0: one per usable core. More than 1 needs --redis-url. The"
        " supervisor forwards SIGTERM/SIGINT to them, and if one dies it stops the others"
        " and exits 1")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not 0..65535")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (one per core) or more, not {self.workers}")
        if self.workers != 1 and not self.redis_url:
            # Each worker would hold its own embedded store: users created through one
            # connection would be missing on the next.
            raise ValueError(
                f"--workers {self.workers} needs --redis-url: the embedded in-memory store"
                " lives in one process, so workers would not share users")
        if self.metrics_port and self.metrics_port + self.worker_count - 1 > 65535:
            raise ValueError(f"metrics ports {self.metrics_port}.."
                             f"{self.metrics_port + self.worker_count - 1} exceed 65535")
        if self.partitions < 0:
            raise ValueError(f"partitions must be 0 (the default) or more, not {self.partitions}")
        positive = ("redis_pool_size", "history_size", "history_max_age",
                    "max_message_bytes",
                    "password_hash_concurrency", "bulk_batch_size", "heartbeat_interval",
                    "subscriber_max_events", "subscriber_max_bytes", "max_subscription_users",
                    "max_subscribes_per_stream", "max_page_size", "bulk_max_rows",
                    "max_concurrent_streams", "max_connection_age", "write_burst",
                    "max_stream_users", "import_max_rows", "max_metadata_bytes",
                    "tombstone_retention", "idempotency_window", "min_position_timeout")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if not 0 <= self.access_log_sample <= 1:
            raise ValueError(f"access_log_sample must be 0 to 1, not {self.access_log_sample}")
        if self.redis_replicas_ack < 0 or self.redis_replicas_ack_timeout <= 0:
            raise ValueError("redis_replicas_ack must not be negative and its timeout must be"
                             " positive")
        if self.shutdown_grace < 0 or self.write_rate < 0:
            raise ValueError("shutdown_grace and write_rate must not be negative")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if not self.auth_enabled and not self.loopback and not self.insecure:
            raise ValueError(
                f"refusing to serve {self.host} without authentication: configure"
                " --jwt-secret or --jwt-public-key, or pass --insecure")

    @property
    def cluster(self) -> bool:
        return self.redis_url.startswith(("redis+cluster://", "rediss+cluster://"))

    @property
    def partition_count(self) -> int:
        """`partitions`, or for 0 what suits the store: a cluster spreads them over its
        masters, so it wants many; one node wants few (each costs a pub/sub channel)."""
        return self.partitions or (128 if self.cluster else 16)

    @property
    def worker_count(self) -> int:
        """Server processes to run: `workers`, or for 0 the cores this process may use."""
        if self.workers:
            return self.workers
        if hasattr(os, "sched_getaffinity"):  # Linux: honours taskset and cpusets
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1

    @property
    def auth_enabled(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

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
