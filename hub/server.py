"""Server assembly: store, services, health, reflection, interceptors, graceful shutdown.

    settings = Settings.load()
    async with HubServer(settings) as hub:   # binds settings.address (port 0: any free port)
        print(hub.port)
        await hub.wait_for_termination()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hub import metrics
from hub.api.user.v1 import user_service_pb2, user_sync_service_pb2
from hub.auth import AuthInterceptor, TokenVerifier
from hub.errors import StoreUnavailable
from hub.fanout import Fanout, Limits
from hub.interceptors import LoggingInterceptor
from hub.live import LiveStreams, UserSyncService
from hub.ops import UserOps
from hub.passwords import PasswordHashing
from hub.ratelimit import RateLimiter
from hub.service import UserService
from hub.settings import Settings
from hub.store.base import Store
from hub.store.memory import MemoryStore
from hub.store.redis import RedisStore
from hub.wire import encode_event, guard_undecodable, parser

log = logging.getLogger(__name__)

_USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]
_SYNC_SERVICE = user_sync_service_pb2.DESCRIPTOR.services_by_name["UserSyncService"]
USER_SERVICE = _USER_SERVICE.full_name
SYNC_SERVICE = _SYNC_SERVICE.full_name
_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
# How often readiness re-checks the store.
_HEALTH_INTERVAL = 1.0


def make_store(settings: Settings) -> Store:
    if settings.redis_url:
        return RedisStore.from_url(
            settings.redis_url, partitions=settings.partitions,
            history_size=settings.history_size, history_max_age=settings.history_max_age,
        )
    return MemoryStore(settings.partitions, settings.history_size, settings.history_max_age)


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
        # port; one instance per port unless asked otherwise.
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
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
        interceptors: list[grpc.aio.ServerInterceptor] = [LoggingInterceptor()]
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
        ops = UserOps(self.store, PasswordHashing(settings.password_hash_concurrency),
                      RateLimiter(settings.write_rate, settings.write_burst))
        live = LiveStreams(self.fanout, ops, settings)
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
        if credentials is None:
            self.port = self._server.add_insecure_port(self.settings.address)
        else:
            self.port = self._server.add_secure_port(self.settings.address, credentials)
        if not self.port:
            raise OSError(f"cannot bind {self.settings.address}")
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
            self._metrics = metrics.MetricsServer(self.settings.host, self.settings.metrics_port)
            self.metrics_port = self._metrics.port
            log.info("metrics on http://%s:%d/metrics", self.settings.host, self.metrics_port)
        s = self.settings
        log.info("hub listening on %s:%d (%s, %s)", s.host, self.port,
                 "mTLS" if s.tls_client_ca else "TLS" if s.tls_cert else "plaintext",
                 "JWT auth" if s.auth_enabled else "no auth")
        if not s.auth_enabled and not s.loopback:
            log.warning("--insecure: serving %s without authentication", s.host)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Readiness goes NOT_SERVING first so balancers drain us, then calls get `grace`."""
        await self.health.enter_graceful_shutdown()
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

    async def _store_ok(self) -> bool:
        return await self._store_problem() is None

    async def _store_problem(self) -> str | None:
        """Why the store cannot serve now, or None when it answers."""
        try:
            await asyncio.wait_for(self.store.ping(), timeout=2)
        except StoreUnavailable as exc:
            return str(exc)
        except TimeoutError:
            return "the user store did not answer in time"
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


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM/SIGINT: the first signal drains gracefully, a second one stops now."""
    if settings.redis_url:
        log.info("hub starting on Redis store %s", _redact(settings.redis_url))
    else:
        log.info("hub starting on the embedded in-memory store (no --redis-url / HUB_REDIS_URL):"
                 " one instance, data is lost on exit")
    hub = HubServer(settings)
    await hub.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            log.warning("second signal: stopping now")
            stop_now.set()
        else:
            log.info("signal %s: draining for up to %.0fs", signal.Signals(signum).name,
                     settings.shutdown_grace)
            stopping.set()

    stop_now = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await stopping.wait()
    graceful = asyncio.create_task(hub.stop())
    immediate = asyncio.create_task(stop_now.wait())
    await asyncio.wait({graceful, immediate}, return_when=asyncio.FIRST_COMPLETED)
    if not graceful.done():
        await hub.stop(grace=0)
        graceful.cancel()
    immediate.cancel()
    log.info("hub stopped")


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


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Registers `servicer`'s methods for `service` straight from the descriptor.

    Unlike the generated add_*_to_server, the response serializer passes `bytes` through, so a
    handler can send a message it assembled from pre-encoded parts (one encoding per event,
    not one per subscriber); and bytes that do not parse as the request message become
    INVALID_ARGUMENT rather than gRPC's UNKNOWN (see hub.wire.Undecodable).
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


def _report_exit(task: asyncio.Task[None]) -> None:
    """A background task must never die unseen."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s died", task.get_name(), exc_info=task.exception())


def _redact(url: str) -> str:
    """Never log a Redis password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
