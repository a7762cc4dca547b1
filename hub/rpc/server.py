"""Server assembly: store, services, health, reflection, interceptors, graceful shutdown.

    settings = Settings.load()
    async with HubServer(settings) as hub:   # binds settings.address (port 0: any free port)
        print(hub.port)
        await hub.wait_for_termination()

`serve()` is one server process until SIGTERM/SIGINT; `hub.rpc.supervisor.run` is what
`hub serve` calls (one process, or N workers under a supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hub import metrics
from hub.api.user.v1 import user_service_pb2, user_sync_service_pb2
from hub.bearer import TokenVerifier
from hub.commands import Commands
from hub.errors import KeyspaceMismatch, StoreUnavailable
from hub.fanout import Fanout, Limits
from hub.passwords import PasswordHashing
from hub.ratelimit import RateLimiter
from hub.rpc.access_log import LoggingInterceptor
from hub.rpc.auth import AuthInterceptor
from hub.rpc.handlers import add_service
from hub.rpc.streams import LiveStreams
from hub.rpc.sync import UserSyncService
from hub.rpc.users import UserService
from hub.rpc.wire import encode_event
from hub.settings import Settings
from hub.store.base import Store
from hub.store.cluster import ClusterStore
from hub.store.memory import MemoryStore
from hub.store.redis import RedisStore

log = logging.getLogger(__name__)

_USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]
_SYNC_SERVICE = user_sync_service_pb2.DESCRIPTOR.services_by_name["UserSyncService"]
USER_SERVICE = _USER_SERVICE.full_name
SYNC_SERVICE = _SYNC_SERVICE.full_name
# How often readiness re-checks the store.
_HEALTH_INTERVAL = 1.0
# What the supervisor asks of its workers. Not SIGTERM: that can also reach a worker straight
# from outside (a process-group or cgroup kill: timeout(1), systemd), and the two together
# would count as "a second signal: stop now". A drain request is idempotent.
DRAIN = signal.SIGUSR1
STOP_NOW = signal.SIGUSR2


# maxmemory-policy values under which Redis never drops a key to make room.
_NO_EVICTION = ("noeviction", "")


class StartupError(Exception):
    """hub cannot start as configured; the message says why and what to change."""


def tracing_interceptor(settings: Settings) -> grpc.aio.ServerInterceptor | None:
    """OpenTelemetry's grpc.aio server interceptor (opentelemetry-instrumentation-grpc), with
    an OTLP exporter to --otlp-endpoint, unless the process already set a tracer provider of
    its own (tests, or an application embedding hub). None when tracing is off."""
    if not settings.otlp_endpoint:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        raise StartupError("--otlp-endpoint needs the tracing extra: pip install"
                           " 'hub-userfeed[tracing]'") from None
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": "hub"}))
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
        trace.set_tracer_provider(provider)
    log.info("tracing RPCs to %s", settings.otlp_endpoint)
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor()  # type: ignore[no-untyped-call]
    return interceptor


def make_store(settings: Settings) -> Store:
    if settings.cluster:
        return ClusterStore.from_url(
            settings.redis_url, partitions=settings.partition_count,
            history_size=settings.history_size, history_max_age=settings.history_max_age,
            pool_size=settings.redis_pool_size, replicas_ack=settings.redis_replicas_ack,
            replicas_ack_timeout=settings.redis_replicas_ack_timeout,
            tombstone_retention=settings.tombstone_retention,
            idempotency_window=settings.idempotency_window,
        )
    if settings.redis_url:
        return RedisStore.from_url(
            settings.redis_url, partitions=settings.partition_count,
            history_size=settings.history_size, history_max_age=settings.history_max_age,
            pool_size=settings.redis_pool_size, replicas_ack=settings.redis_replicas_ack,
            replicas_ack_timeout=settings.redis_replicas_ack_timeout,
            tombstone_retention=settings.tombstone_retention,
            idempotency_window=settings.idempotency_window,
        )
    return MemoryStore(settings.partition_count, settings.history_size, settings.history_max_age,
                       settings.tombstone_retention, settings.idempotency_window)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Ping idle clients so dead peers (and their streams) are noticed within ~1.5 min.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Enforcement: a client pinging more often than every 10 s gets GOAWAY after 2 strikes.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # grpc enables SO_REUSEPORT by default, which lets a second server silently share a
        # port; one instance per port, except the workers of one supervisor (which made
        # sure nothing else held the port before they bound it).
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Request headers are bounded like messages: without it a client could send megabytes
        # of metadata (an `authorization` of 1 MB would reach the JWT code).
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        # ... and the hard limit with it: the soft one alone let headers up to gRPC's default
        # hard limit (16 KiB) through half the time (measured).
        ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
        # Connections are recycled so long-lived streams spread over new instances; the
        # grace lets calls finish (SyncFeed resumes from its token either way).
        ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * 1000)),
    ]


class HubServer:
    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or make_store(settings)
        self.health = health.aio.HealthServicer()
        self.port = 0
        interceptors: list[grpc.aio.ServerInterceptor] = [
            LoggingInterceptor(settings.access_log_sample, settings.access_log)]
        tracing = tracing_interceptor(settings)
        if tracing is not None:
            interceptors.insert(0, tracing)  # outermost: the span covers the whole call
        verifier = TokenVerifier.from_settings(settings)
        if verifier is not None:
            interceptors.append(AuthInterceptor(verifier, settings))
        self._server = grpc.aio.server(
            interceptors=interceptors, options=server_options(settings)
        )
        self.fanout = Fanout(
            self.store, encode_event,
            Limits(settings.subscriber_max_events, settings.subscriber_max_bytes),
        )
        ops = Commands(self.store, PasswordHashing(settings.password_hash_concurrency),
                      RateLimiter(settings.write_rate, settings.write_burst))
        live = self._live = LiveStreams(self.fanout, ops, settings)
        add_service(self._server, _USER_SERVICE, UserService(ops, live, settings))
        add_service(self._server, _SYNC_SERVICE, UserSyncService(live))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if settings.reflection:
            reflection.enable_server_reflection(
                [USER_SERVICE, SYNC_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME],
                self._server,
            )
        self.metrics_port = 0
        self._metrics: metrics.MetricsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        credentials = server_credentials(self.settings)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(self.settings.address)
            else:
                self.port = self._server.add_secure_port(self.settings.address, credentials)
        except RuntimeError:  # grpc's "Failed to bind to address ...": it says no more
            self.port = 0
        if not self.port:
            raise StartupError(f"cannot bind {self.settings.address}: in use, or not an address"
                               " of this machine")
        await self._check_store()
        await self._set_ready(await self._store_ok())
        self._tasks = [
            asyncio.create_task(self.fanout.run(), name="hub-fanout"),
            asyncio.create_task(self._watch_store(), name="hub-health"),
        ]
        for task in self._tasks:
            task.add_done_callback(_report_exit)
        await self._server.start()
        if self.settings.metrics_port:
            metrics.QUEUED_EVENTS.set_function(self.fanout.queued)
            metrics.BUS_CONNECTED.set_function(lambda: float(self.fanout.connected))
            host = self.settings.metrics_host
            self._metrics = metrics.MetricsServer(host, self.settings.metrics_port)
            self.metrics_port = self._metrics.port
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
            if not _is_loopback(host):
                log.warning("--metrics-host %s: /metrics has no authentication and is open to"
                            " that network", host)
        if not self.settings.auth_enabled and not self.settings.loopback:
            log.warning("--insecure: serving %s without authentication", self.settings.host)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Readiness goes NOT_SERVING first so balancers drain us; live streams end at once
        with UNAVAILABLE and their resume token (their clients resume on another instance
        with no loss, instead of waiting out the grace here); unary calls get `grace`."""
        await self.health.enter_graceful_shutdown()
        self._live.end_all()
        await self._server.stop(self.settings.shutdown_grace if grace is None else grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.aclose()
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.close)
            self._metrics = None

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def __aenter__(self) -> HubServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop(grace=0 if et is not None else None)

    async def _check_store(self) -> None:
        """What can be checked of Redis before serving: an evicting maxmemory-policy (which
        would drop users and history silently) is refused; a new Redis gets its epoch. A
        Redis that is down now is not fatal: readiness says so until it answers."""
        if not isinstance(self.store, RedisStore | ClusterStore):
            return
        try:
            async with asyncio.timeout(3):
                policy = await self.store.eviction_policy()
        except TimeoutError:
            policy = None
        if policy is None:
            log.warning("could not read Redis's maxmemory-policy (CONFIG GET refused or Redis"
                        " down): make sure it is noeviction")
        elif policy not in _NO_EVICTION:
            if not self.settings.allow_evicting_redis:
                raise StartupError(
                    f"Redis's maxmemory-policy is {policy}: it may evict hub's users, indexes"
                    " and history without a word; set it to noeviction (CONFIG SET"
                    " maxmemory-policy noeviction), or pass --allow-evicting-redis to run"
                    " anyway")
            log.warning("Redis's maxmemory-policy is %s (--allow-evicting-redis): users and"
                        " history may vanish silently when Redis is full", policy)
        try:
            async with asyncio.timeout(3):
                await self.store.ensure_epoch()
        except KeyspaceMismatch as exc:
            raise StartupError(str(exc)) from exc
        except (StoreUnavailable, TimeoutError):
            pass

    async def _store_ok(self) -> bool:
        return await self._store_problem() is None

    async def _store_problem(self) -> str | None:
        """Why the store cannot serve now, or None when it answers."""
        try:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for returns the result of a
            # ping that finished just as the task was cancelled and drops the cancellation,
            # which left this loop running through shutdown.
            async with asyncio.timeout(2):
                await self.store.ping()
        except StoreUnavailable as exc:
            return str(exc)
        except TimeoutError:
            return "the user store did not answer in time"
        except Exception as exc:
            # Readiness must outlive anything Redis answers: a watcher that died here would
            # leave the last status (SERVING) standing whatever happens next.
            log.exception("store health check failed")
            return f"the store health check failed: {exc!r}"
        return None

    async def _set_ready(self, ok: bool, live: bool = False) -> None:
        # "" is liveness: the process is up and answering, whatever Redis does (a liveness
        # probe must not restart hub for an outage a restart cannot fix). The services say
        # whether they can do their work: readiness.
        for name, serving in (("", True), (USER_SERVICE, ok), (SYNC_SERVICE, ok and live)):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING if serving
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _watch_store(self) -> None:
        """Readiness: the store answers (and, for the live feeds, the event bus is up)."""
        ready = True
        while True:
            problem = await self._store_problem()
            ok = problem is None
            if ok != ready:
                if ok:
                    log.warning("store reachable again: SERVING")
                else:
                    log.warning("store unreachable (%s): NOT_SERVING", problem)
                ready = ok
            await self._set_ready(ok, self.fanout.connected)
            await asyncio.sleep(_HEALTH_INTERVAL)


async def serve(settings: Settings, worker_ready: Callable[[int], None] | None = None) -> None:
    """Runs until SIGTERM/SIGINT: the first signal drains gracefully, a second one stops now.

    With `worker_ready`, this is a supervised worker: it calls `worker_ready(port)` instead of
    logging the address (the supervisor logs it once for all), ignores SIGINT (a terminal
    sends it to the supervisor too, which passes it on), and obeys the supervisor's DRAIN
    and STOP_NOW signals.
    """
    stopping = asyncio.Event()
    stop_now = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(cause: str) -> None:
        if stopping.is_set():
            log.warning("second signal: stopping now")
            stop_now.set()
        else:
            log.info("%s: draining for up to %.0fs", cause, settings.shutdown_grace)
            stopping.set()

    def on_drain() -> None:
        if not stopping.is_set():  # the same stop may have reached us as SIGTERM already
            on_signal("supervisor")

    def on_stop_now() -> None:
        log.warning("supervisor: stopping now")
        stopping.set()
        stop_now.set()

    # Before start: a signal while the server starts still means "drain and stop".
    loop.add_signal_handler(signal.SIGTERM, on_signal, "signal SIGTERM")
    if worker_ready is None:
        loop.add_signal_handler(signal.SIGINT, on_signal, "signal SIGINT")
    else:
        loop.add_signal_handler(DRAIN, on_drain)
        loop.add_signal_handler(STOP_NOW, on_stop_now)
    hub = HubServer(settings)
    await hub.start()
    if worker_ready is None:
        log.info("hub listening on %s", describe(settings, hub.port))
    else:
        worker_ready(hub.port)
    await stopping.wait()
    graceful = asyncio.create_task(hub.stop())
    immediate = asyncio.create_task(stop_now.wait())
    await asyncio.wait({graceful, immediate}, return_when=asyncio.FIRST_COMPLETED)
    if not graceful.done():
        await hub.stop(grace=0)
        graceful.cancel()
    immediate.cancel()
    log.info("hub stopped")


def _is_loopback(host: str) -> bool:
    return Settings(host=host, insecure=True).loopback


def describe(settings: Settings, port: int, extra: str = "") -> str:
    s = settings
    security = "mTLS" if s.tls_client_ca else "TLS" if s.tls_cert else "plaintext"
    auth = "JWT auth" if s.auth_enabled else "no auth"
    return f"{s.host}:{port} ({security}, {auth}{extra})"


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from PEM files; with a client CA, client certificates are required (mTLS)."""
    if not settings.tls_cert:
        return None
    key = Path(settings.tls_key).read_bytes()
    chain = Path(settings.tls_cert).read_bytes()
    ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )


def _report_exit(task: asyncio.Task[None]) -> None:
    """A background task must never die unseen."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s died", task.get_name(), exc_info=task.exception())


def redact(url: str) -> str:
    """Never log a Redis password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
