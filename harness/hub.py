"""`python -m hub serve` as a subprocess of our own: on a fixed free port (so a restart comes
back where its clients' channels point), its output in a log file, dying with its parent.

    hub = HubProcess(tmp, redis_url, env={"HUB_HEARTBEAT_INTERVAL": "0.5"})
    hub.start()                      # returns once UserSyncService health is SERVING
    ... grpc.aio.insecure_channel(hub.target) ...
    hub.kill()                       # kill -9: no drain, in-flight calls just break
    hub.restart()                    # same port, same settings

`start` and `wait_serving` block; asyncio code (the chaos checker) awaits `astart` and
`await_serving` instead, so its event loop keeps serving its own streams meanwhile.
"""

from __future__ import annotations

import asyncio
import os
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


@dataclass
class HubProcess:
    """One `hub serve` on 127.0.0.1:`port` over `redis_url`, its log in `dir`.

    `env`: more HUB_* variables (they win over the defaults set here); `args`: more flags.
    `source`: the checkout whose `hub` package runs (`python -m` puts its working directory
    first on sys.path): another commit's worktree, to compare it with this one.
    """

    dir: Path
    redis_url: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    source: Path = ROOT
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0  # how many times it was started (restarts + 1)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.dir / f"hub-{self.port}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:] or "(no log)"

    # -- starting --------------------------------------------------------------------------

    def spawn(self) -> None:
        """Starts the process without waiting for it to be ready."""
        if self.running:
            raise HarnessError(f"hub on {self.port} is already running")
        self.dir.mkdir(parents=True, exist_ok=True)
        environ = {**os.environ, "HUB_HOST": "127.0.0.1", "HUB_PORT": str(self.port),
                   "HUB_REDIS_URL": self.redis_url, **self.env}
        # Appended, not truncated: a restarted hub's log keeps what the killed one said.
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts + 1} at {time.time():.3f} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                dying_with_parent([sys.executable, "-m", "hub", "serve", *self.args]),
                env=environ, stdout=out, stderr=subprocess.STDOUT, cwd=self.source)
        self.starts += 1

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.spawn()
        self.wait_serving(timeout)

    # The async variants take `within`, not `timeout`: a local wait, not a gRPC deadline.
    async def astart(self, within: float = START_TIMEOUT) -> None:
        self.spawn()
        await self.await_serving(within)

    def wait_serving(self, timeout: float = START_TIMEOUT) -> None:
        """Until READY_SERVICE is SERVING; HarnessError (with the log) if the hub exits or
        the time runs out."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        with grpc.insecure_channel(self.target) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)  # stubs lack its methods
            while True:
                self._check_alive()
                try:
                    reply = health.Check(
                        health_pb2.HealthCheckRequest(service=READY_SERVICE), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as err:
                    last = str(err.code())
                if time.monotonic() > deadline:
                    raise HarnessError(f"hub on {self.port} not SERVING after {timeout:.0f}s"
                                       f" (last health: {last}):\n{self.log_tail()}")
                time.sleep(0.05)

    async def await_serving(self, within: float = START_TIMEOUT) -> None:
        """wait_serving for asyncio callers."""
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
        """kill -9: no graceful shutdown, streams and calls in flight just break."""
        if self.running:
            assert self.proc is not None
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
