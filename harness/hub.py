"""`python -m hub serve` as a subprocess of our own: on a fixed free port (so a restart comes
back where its clients' channels point), its output in a log file, dying with its parent.

    hub = HubProcess(tmp, redis_url, env={"HUB_HEARTBEAT_INTERVAL": "0.5"})
    hub.start()                      # returns once UserSyncService health is SERVING
    ... grpc.aio.insecure_channel(hub.target) ...
    hub.kill()                       # kill -9: no drain, in-flight calls just break
    hub.restart()                    # same port, same settings

    HubProcess(tmp, url, port=0, workers=2).start()   # a supervisor on a port it picks
    HubProcess(tmp, args=["--workers", "-1"]).run()   # a hub that must refuse: its exit status

`start` and `wait_serving` block; asyncio code (the chaos checker) awaits `astart` and
`await_serving` instead, so its event loop keeps serving its own streams meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.redis import HarnessError, dying_with_parent, free_port

ROOT = Path(__file__).resolve().parent.parent
# A cold `hub serve` imports gRPC, protobuf and redis-py: seconds on a busy 2-core machine.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# Readiness of the live feed: store reachable and event bus connected. A hub that is SERVING
# here can take writes and subscriptions (UserService readiness is a subset of it).
READY_SERVICE = "user.v1.UserSyncService"
# What `hub serve` logs once it (or, with workers, every worker) has bound its port.
LISTENING = r"hub listening on (?:\[[^\]]*\]|[^\s:]+):(\d+)"
WORKER_STARTED = r"worker \d+ started \(pid (\d+)\)"
_UNNAMED_LOGS = itertools.count(1)


@dataclass
class HubProcess:
    """One `hub serve` on 127.0.0.1:`port` over `redis_url`, its log in `dir`.

    `env`: more HUB_* variables (they win over the defaults set here); `args`: more flags.
    `port` 0: the hub picks one, known (and kept for restarts) once it logs that it listens.
    `source`: the checkout whose `hub` package runs (`python -m` puts its working directory
    first on sys.path): another commit's worktree, to compare it with this one.
    `workers` > 1: `--workers N`, a supervisor on the port and N worker processes behind it
    (their pids in `worker_pids` once it serves). `log_name`: the log's file name in `dir`.
    """

    dir: Path
    redis_url: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    source: Path = ROOT
    workers: int = 1
    log_name: str = ""
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0  # how many times it was started (restarts + 1)
    worker_pids: list[int] = field(default_factory=list, init=False)
    _run_offset: int = field(default=0, init=False, repr=False)  # this start's, in the log

    def __post_init__(self) -> None:
        # Named once (a port-0 hub's port is not known yet), and not another hub's log (one
        # tried on a port another holds).
        if not self.log_name:
            stem = f"hub-{self.port}" if self.port else f"hub-port0-{next(_UNNAMED_LOGS)}"
            self.log_name, n = f"{stem}.log", 1
            while (self.dir / self.log_name).exists():
                n += 1
                self.log_name = f"{stem}-{n}.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / self.log_name

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def run_output(self) -> str:
        """What the latest start has written (output() has every start's)."""
        if not self.log.exists():
            return ""
        with self.log.open("rb") as log:
            log.seek(self._run_offset)
            return log.read().decode(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:] or "(no log)"

    def wait_output(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Until the latest start's output matches `pattern` (re.MULTILINE), even if the
        process has exited since; HarnessError if it exits without it or the time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc is None or self.proc.poll() is not None  # before the read
            if match := re.search(pattern, self.run_output(), re.MULTILINE):
                return match
            if exited or time.monotonic() > deadline:
                state = ("exited" if self.proc is None or self.proc.poll() is not None
                         else f"still silent after {timeout:.0f}s")
                raise HarnessError(f"hub on {self.port} never logged {pattern!r} ({state}):\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    # -- starting --------------------------------------------------------------------------

    def spawn(self) -> None:
        """Starts the process without waiting for it to be ready."""
        if self.running:
            raise HarnessError(f"hub on {self.port} is already running")
        self.dir.mkdir(parents=True, exist_ok=True)
        environ = {**os.environ, "HUB_HOST": "127.0.0.1", "HUB_PORT": str(self.port),
                   "HUB_REDIS_URL": self.redis_url, **self.env}
        workers = ["--workers", str(self.workers)] if self.workers != 1 else []
        # Appended, not truncated: a restarted hub's log keeps what the killed one said, after
        # a line that says where the next start begins (none before the first: its first line
        # is the hub's own).
        with self.log.open("ab") as out:
            if self.starts:
                out.write(f"--- start {self.starts + 1} at {time.time():.3f} ---\n".encode())
                out.flush()
            self._run_offset = out.tell()
            self.proc = subprocess.Popen(
                dying_with_parent([sys.executable, "-m", "hub", "serve", *workers, *self.args]),
                env=environ, stdout=out, stderr=subprocess.STDOUT, cwd=self.source)
        self.starts += 1
        self.worker_pids = []

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.spawn()
        self.wait_serving(timeout)

    # The async variants take `within`, not `timeout`: a local wait, not a gRPC deadline.
    async def astart(self, within: float = START_TIMEOUT) -> None:
        self.spawn()
        await self.await_serving(within)

    def run(self, timeout: float = START_TIMEOUT) -> int:
        """Starts a hub that is to exit by itself (a refusal) and returns its exit status;
        HarnessError (killing it) if it still runs after `timeout`."""
        self.spawn()
        code = self.wait_exit(timeout)
        if code is None:
            self.kill()
            raise HarnessError(f"hub on {self.port} still running after {timeout:.0f}s:\n"
                               f"{self.log_tail()}")
        return code

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status once the process has ended, within `timeout`; None if it runs on."""
        if self.proc is None:
            raise HarnessError(f"hub on {self.port} was never started")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_serving(self, timeout: float = START_TIMEOUT, service: str = READY_SERVICE
                     ) -> None:
        """Until health of `service` is SERVING ("": the process is up, whatever its
        readiness); HarnessError (with the log) if the hub exits or the time runs out.

        Every check dials a connection of its own, which the kernel hands to any of the
        workers: with workers, 5 SERVING answers in a row per worker are asked for, so each
        has had its chance to say otherwise. A port-0 hub's port (and a supervisor's worker
        pids) are read from its log first."""
        deadline = time.monotonic() + timeout
        if self.port == 0 or self.workers > 1:
            self._read_listening(deadline)
        wanted = 1 if self.workers <= 1 else 5 * self.workers
        in_a_row, last = 0, "no answer"
        while in_a_row < wanted:
            self._check_alive()
            with grpc.insecure_channel(
                    self.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                health: Any = health_pb2_grpc.HealthStub(channel)  # stubs lack its methods
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=service),
                                         timeout=1)
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as err:
                    last = str(err.code())
            if last == "SERVING":
                in_a_row += 1
                continue
            in_a_row = 0
            if time.monotonic() > deadline:
                raise HarnessError(f"hub on {self.port} not SERVING after {timeout:.0f}s"
                                   f" (last health: {last}):\n{self.log_tail()}")
            time.sleep(0.05)

    def _read_listening(self, deadline: float) -> None:
        listening = self.wait_output(LISTENING, max(deadline - time.monotonic(), 0))
        if self.port == 0:
            self.port = int(listening.group(1))
        if self.workers > 1:
            self.worker_pids = [int(pid) for pid in re.findall(WORKER_STARTED,
                                                               self.run_output())]
            if len(self.worker_pids) != self.workers:
                raise HarnessError(f"hub on {self.port} logged {len(self.worker_pids)} of"
                                   f" {self.workers} workers started:\n{self.log_tail()}")

    async def await_serving(self, within: float = START_TIMEOUT) -> None:
        """wait_serving of READY_SERVICE for asyncio callers (of one process on a known port:
        port 0 and workers are wait_serving's)."""
        deadline = time.monotonic() + within
        last = "no answer"
        async with grpc.aio.insecure_channel(self.target) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive()
                try:
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(service=READY_SERVICE), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.aio.AioRpcError as err:
                    last = err.code().name
                if time.monotonic() > deadline:
                    raise HarnessError(f"hub on {self.port} not SERVING after {within:.0f}s"
                                       f" (last health: {last}):\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    def _check_alive(self) -> None:
        if self.proc is None:
            raise HarnessError(f"hub on {self.port} was never started")
        if self.proc.poll() is not None:
            raise HarnessError(f"hub on {self.port} exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")

    # -- stopping --------------------------------------------------------------------------

    def kill(self) -> None:
        """kill -9: no graceful shutdown, streams and calls in flight just break. A
        supervisor's workers first (its children while it runs; they die with it anyway)."""
        if self.running:
            assert self.proc is not None
            for pid in self.worker_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (health NOT_SERVING, then --shutdown-grace for calls in flight), SIGKILL if
        it is still there after `timeout`. Returns the exit status (None: never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    stop = kill

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """kill -9, then start again on the same port with the same settings."""
        self.kill()
        self.start(timeout)

    async def arestart(self, within: float = START_TIMEOUT) -> None:
        self.kill()
        await self.astart(within)
