"""redis-server processes of our own: primaries, replicas and Sentinels that a test can kill,
pause, restart, fill and roll back to an older snapshot.

    primary = RedisProcess(tmp / "a")
    primary.start()
    replica = RedisProcess(tmp / "b", replicaof=primary)
    replica.start()
    replica.wait_synced()
    sentinels = [SentinelProcess(tmp / f"s{i}", primary) for i in range(3)]
    for s in sentinels:
        s.start()
    url = sentinel_url(sentinels)          # redis+sentinel://127.0.0.1:P1,.../hub
    ...
    primary.kill()                         # kill -9; the Sentinels promote the replica
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT = 10.0
_SETPRIV = shutil.which("setpriv") if sys.platform == "linux" else None


class HarnessError(Exception):
    """A process of the harness did not start or behave as asked."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv`, made to die with the process that starts it (Linux, PR_SET_PDEATHSIG): if the
    harness or the test run dies, even by SIGKILL, its Redis and hubs die too instead of
    lingering on their ports. setpriv (util-linux) sets it and execs the command, keeping its
    pid. Not Popen's preexec_fn: that runs Python in the forked child of a process with gRPC
    threads, where a lock one of them held at fork time (malloc's) made the child abort or
    hang."""
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv] if _SETPRIV else list(argv)


def _binary() -> str:
    if REDIS_SERVER is None:
        raise HarnessError(
            "redis-server not on PATH: install Redis 7 (apt-get install redis-server)")
    return REDIS_SERVER


@dataclass
class RedisProcess:
    """One redis-server on 127.0.0.1:`port`, its files (log, RDB, AOF) in `dir`.

    `persistent`: every write is fsynced to an append-only file before Redis answers it.
    `snapshots`: RDB saving on (SAVE/BGSAVE write `dump.rdb`); off otherwise (`--save ""`).
    `args`: more redis-server arguments (e.g. ["--maxmemory", "2mb"]).
    """

    dir: Path
    port: int = field(default_factory=free_port)
    persistent: bool = False
    snapshots: bool = False
    args: Sequence[str] = ()
    replicaof: RedisProcess | None = None
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / f"redis-{self.port}.log"

    @property
    def rdb(self) -> Path:
        return self.dir / "dump.rdb"

    def argv(self) -> list[str]:
        argv = [_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--logfile", str(self.log),
                "--dbfilename", "dump.rdb"]
        argv += ["--save", "3600 1"] if self.snapshots else ["--save", ""]
        argv += (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                 else ["--appendonly", "no"])
        if self.replicaof is not None:
            argv += ["--replicaof", "127.0.0.1", str(self.replicaof.port)]
        return [*argv, *self.args]

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(dying_with_parent(self.argv()),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_answering()

    def wait_answering(self, timeout: float = START_TIMEOUT) -> None:
        """Until the server answers PING (LOADING counts as not yet)."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise HarnessError(
                        f"redis-server on {self.port} exited with {self.proc.returncode}:\n"
                        f"{self.log_tail()}")
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.ResponseError):
                    if time.monotonic() > deadline:
                        raise HarnessError(
                            f"redis-server on {self.port} not answering:\n{self.log_tail()}"
                        ) from None
                    time.sleep(0.02)

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: nothing is saved on the way out."""
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        self.paused = False

    stop = kill

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets but answers nothing (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    # -- snapshots: Redis coming back with older data ------------------------------------

    def snapshot(self, name: str) -> Path:
        """SAVE now and keep a copy of the RDB as `name`: what an older backup holds."""
        with self.client() as client:
            client.save()
        copy = self.dir / f"{name}.rdb"
        shutil.copyfile(self.rdb, copy)
        return copy

    def restart_from(self, snapshot: Path) -> None:
        """kill -9, then start again from `snapshot` (an older RDB), as a Redis restored from
        a backup, or restarted after its last save, would. Replication, if any, is kept."""
        self.kill()
        shutil.copyfile(snapshot, self.rdb)
        aof_dir = self.dir / "appendonlydir"
        if aof_dir.exists():
            shutil.rmtree(aof_dir)
        self.start()

    # -- replication ---------------------------------------------------------------------

    def wait_synced(self, timeout: float = START_TIMEOUT) -> None:
        """For a replica: until its link to the primary is up and it has all of it."""
        assert self.replicaof is not None, "not a replica"
        deadline = time.monotonic() + timeout
        with self.client() as mine, self.replicaof.client() as theirs:
            while True:
                info = mine.info("replication")
                if info.get("master_link_status") == "up":
                    primary = theirs.info("replication")["master_repl_offset"]
                    if info.get("slave_repl_offset", -1) >= primary:
                        return
                if time.monotonic() > deadline:
                    raise HarnessError(f"replica {self.port} not in sync: {info}")
                time.sleep(0.02)

    def promote(self) -> None:
        """REPLICAOF NO ONE: this replica becomes a primary with whatever it has."""
        with self.client() as client:
            client.replicaof("NO", "ONE")
        self.replicaof = None

    def follow(self, primary: RedisProcess) -> None:
        with self.client() as client:
            client.replicaof("127.0.0.1", primary.port)
        self.replicaof = primary


@dataclass
class SentinelProcess:
    """`redis-server sentinel.conf --sentinel` monitoring `primary` as `master_name`.

    Failover is fast (the primary is down after `down_after_ms`), so a test's kill -9 of the
    primary promotes a replica within a few seconds."""

    dir: Path
    primary: RedisProcess
    master_name: str = "hub"
    quorum: int = 1
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.dir / f"sentinel-{self.port}.log"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / f"sentinel-{self.port}.conf"
        if not conf.exists():  # Sentinel rewrites its own file: keep what it learnt
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile {self.log}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.primary.port}"
                f" {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.master_name} 1\n")
        self.proc = subprocess.Popen(dying_with_parent([_binary(), str(conf), "--sentinel"]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        with redis.Redis(port=self.port, socket_timeout=2) as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise HarnessError(f"sentinel on {self.port} did not start") from None
                    time.sleep(0.02)

    def master_port(self) -> int:
        with redis.Redis(port=self.port, socket_timeout=2, decode_responses=True) as client:
            _host, port = client.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            return int(port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    stop = kill


def sentinel_url(sentinels: Sequence[SentinelProcess], password: str = "") -> str:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
    auth = f":{password}@" if password else ""
    return f"redis+sentinel://{auth}{hosts}/{sentinels[0].master_name}"


def wait_for_master(sentinels: Sequence[SentinelProcess], not_port: int,
                    timeout: float = 30.0) -> int:
    """Until the Sentinels name a master other than `not_port` (a failover happened)."""
    deadline = time.monotonic() + timeout
    while True:
        for s in sentinels:
            try:
                port = s.master_port()
            except (redis.ConnectionError, redis.ResponseError, TypeError):
                continue
            if port != not_port:
                return port
        if time.monotonic() > deadline:
            raise HarnessError(f"no failover away from {not_port} within {timeout:.0f}s")
        time.sleep(0.1)
