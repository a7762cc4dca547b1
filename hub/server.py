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
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hub.api.user.v1 import user_service_pb2, user_service_pb2_grpc
from hub.errors import StoreUnavailable
from hub.interceptors import LoggingInterceptor
from hub.passwords import PasswordHashing
from hub.service import UserService
from hub.settings import Settings
from hub.store.base import Store
from hub.store.memory import MemoryStore
from hub.store.redis import RedisStore

log = logging.getLogger(__name__)

USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
# How often readiness re-checks the store.
_HEALTH_INTERVAL = 1.0


def make_store(settings: Settings) -> Store:
    if settings.redis_url:
        return RedisStore.from_url(
            settings.redis_url, partitions=settings.partitions,
            history_size=settings.history_size,
        )
    return MemoryStore(partitions=settings.partitions, history_size=settings.history_size)


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
    ]


class HubServer:
    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or make_store(settings)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server = grpc.aio.server(
            interceptors=[LoggingInterceptor()], options=server_options(settings)
        )
        user_service_pb2_grpc.add_UserServiceServicer_to_server(
            UserService(self.store, PasswordHashing(settings.password_hash_concurrency), settings),
            self._server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [USER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self._monitor: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self.port = self._server.add_insecure_port(self.settings.address)
        if not self.port:
            raise OSError(f"cannot bind {self.settings.address}")
        await self._set_ready(await self._store_ok())
        await self._server.start()
        self._monitor = asyncio.create_task(self._watch_store(), name="hub-health")
        log.info("hub listening on %s:%d", self.settings.host, self.port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Readiness goes NOT_SERVING first so balancers drain us, then calls get `grace`."""
        await self.health.enter_graceful_shutdown()
        if self._monitor:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self._server.stop(self.settings.shutdown_grace if grace is None else grace)
        await self.store.aclose()

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
        try:
            await asyncio.wait_for(self.store.ping(), timeout=2)
        except (StoreUnavailable, TimeoutError):
            return False
        return True

    async def _set_ready(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", USER_SERVICE):
            await self.health.set(name, status)

    async def _watch_store(self) -> None:
        ready = True
        while True:
            ok = await self._store_ok()
            if ok != ready:
                log.warning("store %s", "reachable again" if ok else "unreachable: NOT_SERVING")
                ready = ok
            await self._set_ready(ok)
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


def _redact(url: str) -> str:
    """Never log a Redis password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
