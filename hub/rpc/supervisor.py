"""`hub serve [--workers N]`: one server in this process, or N processes on one port.

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
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from multiprocessing.process import BaseProcess
from typing import Any

from hub.logs import configure as configure_logging
from hub.rpc.server import DRAIN, STOP_NOW, StartupError, describe, redact, serve
from hub.settings import Settings

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    """`hub serve`: one server in this process, or a supervisor of `settings.worker_count`
    worker processes. Returns the exit code."""
    settings = replace(settings, workers=settings.worker_count)
    if settings.redis_url:
        log.info("hub starting on Redis store %s%s", redact(settings.redis_url),
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


# -- hub serve --workers N ----------------------------------------------------------------

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _Supervisor:
    """Runs `settings.workers` worker processes on one port until a signal or a worker's death.

    Signals are read from a wakeup socket in the main loop (no work in a signal handler). As
    for one process, the first SIGTERM/SIGINT drains (each worker gets DRAIN) and a second
    one stops at once (STOP_NOW).
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
                        log.info("hub listening on %s", describe(
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
            self._signal_all(DRAIN if self._signals == 1 else STOP_NOW)

    def _reap(self, index: int) -> None:
        process = self._workers.pop(index)
        process.join()
        code = process.exitcode
        asked = self._signals > 0 or self._failed
        # A worker still starting has no handlers yet: the signal itself ends it.
        if asked and code in (0, -signal.SIGTERM, -DRAIN, -STOP_NOW):
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
        self._signal_all(DRAIN)

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
