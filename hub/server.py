"""Server assembly: store, services, health, reflection, interceptors, graceful shutdown, and
`hub serve --workers N` (N processes on one port).

    settings = Settings.load()
    async with HubServer(settings) as hub:   # binds settings.address (port 0: any free port)
        print(hub.port)
        await hub.wait_for_termination()

    raise SystemExit(run(Settings.load()))   # what `hub serve` does; --workers N supervises N

With `--workers N` this process is a supervisor: it holds the port, spawns N worker processes
that each run `serve()` with their own store and Redis subscription and bind the same port
with SO_REUSEPORT (the kernel spreads new connections over them), forwards SIGTERM/SIGINT to
them, and exits when they have all exited: 0 after a requested stop, 1 if a worker died on
its own (it then stops the others rather than restart it: a crash loop should be seen by the
process manager, not hidden). Workers get SIGKILL if the supervisor dies, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from multiprocessing.process import BaseProcess
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
from hub.logs import configure as configure_logging
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
# What the supervisor asks of its workers. Not SIGTERM: that can also reach a worker straight
# from outside (a process-group or cgroup kill: timeout(1), systemd), and the two together
# would count as "a second signal: stop now". A drain request is idempotent.
_DRAIN = signal.SIGUSR1
_STOP_NOW = signal.SIGUSR2


# maxmemory-policy values under which Redis never drops a key to make room.
_NO_EVICTION = ("noeviction", "")


class StartupError(Exception):
    """hub cannot start as configured; the message says why and what to change."""


def make_store(settings: Settings) -> Store:
    if settings.redis_url:
        return RedisStore.from_url(
            settings.redis_url, partitions=settings.partitions,
            history_size=settings.history_size, history_max_age=settings.history_max_age,
            pool_size=settings.redis_pool_size, replicas_ack=settings.redis_replicas_ack,
            replicas_ack_timeout=settings.redis_replicas_ack_timeout,
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

    async def _check_store(self) -> None:
        """What can be checked of Redis before serving: an evicting maxmemory-policy (which
        would drop users and history silently) is refused; a new Redis gets its epoch. A
        Redis that is down now is not fatal: readiness says so until it answers."""
        if not isinstance(self.store, RedisStore):
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
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            async with asyncio.timeout(3):
                await self.store.ensure_epoch()

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


def run(settings: Settings) -> int:
    """`hub serve`: one server in this process, or a supervisor of `settings.worker_count`
    worker processes. Returns the exit code."""
    settings = replace(settings, workers=settings.worker_count)
    if settings.redis_url:
        log.info("hub starting on Redis store %s%s", _redact(settings.redis_url),
                 f" with {settings.workers} workers" if settings.workers > 1 else "")
    else:
        log.info("hub starting on the embedded in-memory store (no --redis-url / HUB_REDIS_URL):"
                 " one instance, data is lost on exit")
    if settings.workers > 1:
        return _Supervisor(settings).run()
    try:
        _run_loop(serve(settings))
    except StartupError as exc:
        log.error("hub cannot start: %s", exc)
        return 2
    return 0


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Runs `main` on uvloop when it is installed (faster sockets and callbacks, which the
    fan-out and Redis client live on), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        log.info("event loop: asyncio")
        asyncio.run(main)
        return
    log.info("event loop: uvloop %s", importlib.metadata.version("uvloop"))
    uvloop.run(main)


async def serve(settings: Settings, worker_ready: Callable[[int], None] | None = None) -> None:
    """Runs until SIGTERM/SIGINT: the first signal drains gracefully, a second one stops now.

    With `worker_ready`, this is a supervised worker: it calls `worker_ready(port)` instead of
    logging the address (the supervisor logs it once for all), ignores SIGINT (a terminal
    sends it to the supervisor too, which passes it on), and obeys the supervisor's _DRAIN
    and _STOP_NOW signals.
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
        loop.add_signal_handler(_DRAIN, on_drain)
        loop.add_signal_handler(_STOP_NOW, on_stop_now)
    hub = HubServer(settings)
    await hub.start()
    if worker_ready is None:
        log.info("hub listening on %s", _describe(settings, hub.port))
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


def _describe(settings: Settings, port: int, extra: str = "") -> str:
    s = settings
    security = "mTLS" if s.tls_client_ca else "TLS" if s.tls_cert else "plaintext"
    auth = "JWT auth" if s.auth_enabled else "no auth"
    return f"{s.host}:{port} ({security}, {auth}{extra})"


# -- hub serve --workers N ----------------------------------------------------------------

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _Supervisor:
    """Runs `settings.workers` worker processes on one port until a signal or a worker's death.

    Signals are read from a wakeup socket in the main loop (no work in a signal handler). As
    for one process, the first SIGTERM/SIGINT drains (each worker gets _DRAIN) and a second
    one stops at once (_STOP_NOW).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._workers: dict[int, BaseProcess] = {}  # index -> not yet reaped
        self._signals = 0
        self._failed = False

    def run(self) -> int:
        wakeup, wakeup_writer = socket.socketpair()
        wakeup.setblocking(False)
        wakeup_writer.setblocking(False)
        previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous_fd = signal.set_wakeup_fd(wakeup_writer.fileno(), warn_on_full_buffer=False)
        try:
            with contextlib.ExitStack() as stack:
                try:
                    port = stack.enter_context(
                        _reserve_port(self.settings.host, self.settings.port))
                except OSError as exc:
                    log.error("cannot bind %s: %s", self.settings.address, exc)
                    return 1
                self._supervise(replace(self.settings, port=port), wakeup)
        finally:
            self._kill_all()
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wakeup.close()
            wakeup_writer.close()
        log.info("hub stopped%s", " after a worker failed" if self._failed else "")
        return 1 if self._failed else 0

    def _supervise(self, settings: Settings, wakeup: socket.socket) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: grpc can't fork
        starting: dict[Connection, int] = {}
        for index in range(settings.workers):
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker, args=(settings, index, writer, os.getpid()),
                name=f"hub-worker-{index}", daemon=True)
            process.start()
            writer.close()  # the worker's end: EOF here if it dies before it is ready
            self._workers[index] = process
            starting[reader] = index
            log.info("worker %d started (pid %s)", index, process.pid)
        while self._workers:
            sentinels = {p.sentinel: index for index, p in self._workers.items()}
            ready_objects = wait_any([wakeup, *starting, *sentinels])
            if wakeup in ready_objects:  # first: a worker that exits on the same SIGTERM
                self._on_signals(wakeup.recv(64))  # (a process-group kill) was asked to
            for ready in ready_objects:
                if isinstance(ready, Connection):
                    with contextlib.suppress(EOFError):  # died first: its sentinel says so
                        ready.recv()
                    ready.close()
                    del starting[ready]
                    if not starting and not self._signals and not self._failed:
                        log.info("hub listening on %s", _describe(
                            settings, settings.port, f", {settings.workers} workers"))
                elif isinstance(ready, int):
                    self._reap(sentinels[ready])
        for reader in starting:
            reader.close()

    def _on_signals(self, signums: bytes) -> None:
        for signum in signums:
            self._signals += 1
            if self._signals == 1:
                log.info("signal %s: stopping %d workers", signal.Signals(signum).name,
                         len(self._workers))
            else:
                log.warning("second signal: workers stop now")
            self._signal_all(_DRAIN if self._signals == 1 else _STOP_NOW)

    def _reap(self, index: int) -> None:
        process = self._workers.pop(index)
        process.join()
        code = process.exitcode
        asked = self._signals > 0 or self._failed
        # A worker still starting has no handlers yet: the signal itself ends it.
        if asked and code in (0, -signal.SIGTERM, -_DRAIN, -_STOP_NOW):
            log.info("worker %d (pid %s) exited with %s", index, process.pid, _exit_text(code))
            return
        if asked:
            log.error("worker %d (pid %s) exited with %s while stopping", index, process.pid,
                      _exit_text(code))
            self._failed = True
            return
        log.error("worker %d (pid %s) exited with %s unasked: stopping the other workers",
                  index, process.pid, _exit_text(code))
        self._failed = True
        self._signal_all(_DRAIN)

    def _signal_all(self, signum: int) -> None:
        # Only processes not yet reaped: a pid cannot be reused until it is.
        for process in self._workers.values():
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    def _kill_all(self) -> None:
        """Workers still running when the supervisor ends (only after an error in the
        supervisor itself): none may outlive it."""
        self._signal_all(signal.SIGKILL)
        for process in self._workers.values():
            process.join()
        self._workers.clear()


def _ignore(signum: int, frame: object) -> None:
    """A Python-level handler so the signal reaches the wakeup fd (the main loop acts on it)."""


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


@contextlib.contextmanager
def _reserve_port(host: str, port: int) -> Iterator[int]:
    """Holds `host:port` (port 0: a free one) while the workers bind it, so nothing else can
    take it in between.

    The bind is exclusive (no SO_REUSEPORT yet), so a port another server holds fails here as
    it would for one process instead of being shared; SO_REUSEPORT is set after it so the
    workers may join. The socket never listens, so no connection is queued on it.
    """
    with contextlib.ExitStack() as stack:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos:
            sock = stack.enter_context(socket.socket(family, kind, proto))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
            sock.bind((address[0], port, *address[2:]))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            port = sock.getsockname()[1]  # for port 0, every address gets the first's port
        yield port


def _worker(settings: Settings, index: int, ready: Connection, supervisor: int) -> None:
    """A worker process: `serve()` on the supervisor's port until the supervisor stops it."""
    _die_with(supervisor)
    # A terminal's Ctrl-C reaches the whole process group; the supervisor passes it on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(settings.log_level, settings.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Label(f"worker {index}"))
    if settings.metrics_port:
        settings = replace(settings, metrics_port=settings.metrics_port + index)

    def on_ready(port: int) -> None:
        ready.send(port)
        ready.close()

    try:
        _run_loop(serve(settings, on_ready))
    except StartupError as exc:
        log.error("hub cannot start: %s", exc)
        raise SystemExit(2) from None


def _die_with(supervisor: int) -> None:
    """SIGKILL this process when the supervisor dies (even by SIGKILL), so no worker outlives
    it holding the port. Linux only (prctl); elsewhere workers outlive a killed supervisor."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != supervisor:  # it died before prctl took effect
        os._exit(1)


class _Label(logging.Filter):
    """Prefixes a worker's log lines with its name: N workers share one stderr."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"{self.label}: {record.msg}"
        return True


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
