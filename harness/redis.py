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

And a Redis Cluster (ClusterProcess, below): 3 masters with a replica each, ready in seconds,
with live slot migration and master kill -9 / failover.
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


# -- Redis Cluster ---------------------------------------------------------------------------

CLUSTER_SLOTS = 16384
# redis-cli --cluster create sleeps a second before its first check and between checks; the
# replicas' first full sync and the gossip that spreads the topology add their share. A cold
# 6-node cluster is ready in about 3 s here; a loaded 2-core machine needs more.
CLUSTER_READY_TIMEOUT = 30.0
FAILOVER_TIMEOUT = 30.0


@dataclass
class ClusterNode(RedisProcess):
    """One redis-server in cluster mode: a RedisProcess (kill -9, restart, pause, client...)
    whose `nodes-PORT.conf` in `dir` keeps its node id across restarts, so a restarted node
    rejoins as itself (a master whose replica took over comes back as that one's replica).
    """

    node_timeout_ms: int = 2000
    # The cluster bus, on a free port of its own: the default (port + 10000) may be taken,
    # or past 65535 for a free port above 55535.
    bus_port: int = field(default_factory=free_port)
    _node_id: str = field(default="", init=False, repr=False)

    def argv(self) -> list[str]:
        return [*super().argv(),
                "--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
                "--cluster-config-file", str(self.dir / f"nodes-{self.port}.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # A replica's first sync starts at once, not after the 5 s default wait for
                # more replicas to share one diskless transfer.
                "--repl-diskless-sync-delay", "0"]

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def node_id(self) -> str:
        """The cluster node id (CLUSTER MYID): fixed once the node first started."""
        if not self._node_id:
            with self.client(decode_responses=True) as client:
                self._node_id = str(client.execute_command("CLUSTER", "MYID"))
        return self._node_id

    def cluster_info(self) -> dict[str, str]:
        with self.client(decode_responses=True) as client:
            text = client.execute_command("CLUSTER", "INFO")
        if isinstance(text, dict):  # redis-py may parse it already
            return {str(k): str(v) for k, v in text.items()}
        return dict(line.split(":", 1) for line in str(text).split() if ":" in line)

    def role(self) -> str:
        """"master" or "slave", as this node itself says (ROLE)."""
        with self.client(decode_responses=True) as client:
            return str(client.execute_command("ROLE")[0])

    def slot_owners(self) -> dict[int, int]:
        """This node's view of the slot map: slot -> port of its master (CLUSTER SLOTS)."""
        with self.client(decode_responses=True) as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        owners: dict[int, int] = {}
        for row in _slot_rows(ranges):
            start, end, port = row
            for slot in range(start, end + 1):
                owners[slot] = port
        return owners


def _slot_rows(reply: object) -> list[tuple[int, int, int]]:
    """(start, end, master port) rows from a CLUSTER SLOTS reply, raw or parsed by redis-py
    (which gives {(start, end): {"primary": (host, port), ...}})."""
    rows: list[tuple[int, int, int]] = []
    if isinstance(reply, dict):
        for (start, end), nodes in reply.items():
            rows.append((int(start), int(end), int(nodes["primary"][1])))
    else:
        for entry in reply:  # type: ignore[attr-defined]
            rows.append((int(entry[0]), int(entry[1]), int(entry[2][1])))
    return rows


class ClusterProcess:
    """A Redis Cluster of our own: `masters` masters with `replicas_per_master` replicas each,
    every node a ClusterNode on a free port under `dir`, formed by `redis-cli --cluster
    create` and ready (every slot covered, cluster_state:ok on every node, every node
    agreeing on the slot map, every replica in sync) when `start` returns.

        cluster = ClusterProcess(tmp / "cluster")        # 3 masters, 1 replica each
        cluster.start()
        cluster.url                                      # redis+cluster://127.0.0.1:P1,...
        node = cluster.master_of_slot(key_slot(b"hub:{p7}:log"))
        cluster.migrate_slot(key_slot(b"hub:{p7}:log"), other_master)   # live, keys and all
        old = cluster.kill_master(node)                  # kill -9
        new = cluster.wait_failover()                    # its replica promoted, state ok
        old.restart(); cluster.wait_ready()              # back, as the new master's replica
        cluster.stop()

    Every process dies with the one that started it. `node_timeout_ms` is the cluster's
    failure-detection time: a killed master's replica takes over about 1-2 of these later.
    """

    def __init__(self, dir: Path, masters: int = 3, replicas_per_master: int = 1,
                 node_timeout_ms: int = 2000, args: Sequence[str] = ()) -> None:
        if masters < 3:
            raise HarnessError("redis-cli --cluster create needs at least 3 masters")
        self.dir = dir
        self.replicas_per_master = replicas_per_master
        total = masters * (1 + replicas_per_master)
        self.nodes: list[ClusterNode] = []
        for i in range(total):
            port = free_port()
            self.nodes.append(ClusterNode(dir / f"node-{i}-{port}", port=port, args=args,
                                          node_timeout_ms=node_timeout_ms))
        self._masters = masters
        self._killed: tuple[ClusterNode, list[str]] | None = None

    # -- life ----------------------------------------------------------------------------

    def __enter__(self) -> ClusterProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = CLUSTER_READY_TIMEOUT) -> None:
        try:
            for node in self.nodes:
                node.start()
            argv = [_redis_cli(), "--cluster", "create",
                    *(n.addr for n in self.nodes),
                    "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
            done = subprocess.run(dying_with_parent(argv), capture_output=True, text=True,
                                  timeout=timeout, check=False)
            if done.returncode != 0:
                raise HarnessError(f"redis-cli --cluster create failed ({done.returncode}):\n"
                                   f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    kill = stop

    # -- topology ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """`redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...`: every node, masters first."""
        nodes = sorted(self.nodes, key=lambda n: n not in self._masters_at_start)
        return "redis+cluster://" + ",".join(n.addr for n in nodes)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    @property
    def _masters_at_start(self) -> list[ClusterNode]:
        return self.nodes[:self._masters]  # redis-cli makes the first N given the masters

    def node(self, port: int) -> ClusterNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise HarnessError(f"no node of this cluster on port {port}")

    def masters(self) -> list[ClusterNode]:
        """The running nodes that are masters now (ROLE), in start order."""
        return [n for n in self.nodes if n.running and n.role() == "master"]

    def replicas(self) -> list[ClusterNode]:
        """The running nodes that are replicas now (ROLE), in start order."""
        return [n for n in self.nodes if n.running and n.role() == "slave"]

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        mid = master.node_id
        return [n for n in self.replicas() if self._master_id_of(n) == mid]

    def slot_owners(self) -> dict[int, int]:
        """slot -> master port, as the first running node sees it."""
        return self._live()[0].slot_owners()

    def master_of_slot(self, slot: int) -> ClusterNode:
        owner = self.slot_owners().get(slot)
        if owner is None:
            raise HarnessError(f"slot {slot} is not covered")
        return self.node(owner)

    def master_of_key(self, key: str | bytes) -> ClusterNode:
        return self.master_of_slot(key_slot(key))

    def _live(self) -> list[ClusterNode]:
        live = [n for n in self.nodes if n.running]
        if not live:
            raise HarnessError("no node of the cluster is running")
        return live

    def _master_id_of(self, replica: ClusterNode) -> str:
        with replica.client(decode_responses=True) as client:
            nodes = client.execute_command("CLUSTER", "NODES")
        for line in _nodes_lines(nodes):
            fields = line.split()
            if "myself" in fields[2]:
                return fields[3]
        raise HarnessError(f"node {replica.port} does not list itself")

    # -- waiting -------------------------------------------------------------------------

    def wait_ready(self, timeout: float = CLUSTER_READY_TIMEOUT) -> None:
        """Until every running node says cluster_state:ok with all 16384 slots ok, they all
        agree on the slot map and on the node count, and every replica's link is up and in
        sync with its master."""
        deadline = time.monotonic() + timeout
        why = "not checked"
        while True:
            try:
                why = self._not_ready()
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
                why = f"{type(e).__name__}: {e}"
            if not why:
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"cluster not ready within {timeout:.0f}s: {why}")
            time.sleep(0.05)

    def _not_ready(self) -> str:
        live = self._live()
        views: dict[int, dict[int, int]] = {}
        for node in live:
            info = node.cluster_info()
            if info.get("cluster_state") != "ok":
                return f"{node.port}: cluster_state {info.get('cluster_state')}"
            if info.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                return f"{node.port}: cluster_slots_ok {info.get('cluster_slots_ok')}"
            if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                return f"{node.port}: knows {info.get('cluster_known_nodes')} nodes"
            views[node.port] = node.slot_owners()
        first = views[live[0].port]
        for port, view in views.items():
            if view != first:
                return f"{port} and {live[0].port} disagree on the slot map"
        owners = set(first.values())
        for node in live:
            if node.port in owners:
                continue
            with node.client(decode_responses=True) as client:
                info = client.info("replication")
            if info.get("role") != "slave" or info.get("master_link_status") != "up":
                return f"{node.port}: replica link {info.get('master_link_status')}"
            if int(info.get("master_port", 0)) not in owners:
                return f"{node.port}: replica of {info.get('master_port')}, not a master"
            if info.get("master_sync_in_progress") not in (0, "0"):
                return f"{node.port}: replica sync in progress"
        return ""

    # -- faults --------------------------------------------------------------------------

    def kill_master(self, node: ClusterNode | None = None, lag: float = 0.0) -> ClusterNode:
        """kill -9 of `node` (a master; the first master by default). `wait_failover` then
        waits for one of its replicas to take over. With `lag`, its replicas are stopped
        (SIGSTOP) and their links cut that many seconds before the kill, and go on right
        after it: they are behind, and the one promoted lacks what the master took
        meanwhile."""
        node = node or self.masters()[0]
        if node.role() != "master":
            raise HarnessError(f"node {node.port} is not a master")
        replicas = self.replicas_of(node)
        if not replicas:
            raise HarnessError(f"master {node.port} has no replica to take over")
        self._killed = (node, [r.node_id for r in replicas])
        if lag:
            for replica in replicas:
                replica.pause()
            # Cut the replication links too: what the master sent before sits in the stopped
            # replicas' socket buffers and would arrive after all.
            with node.client() as client:
                client.execute_command("CLIENT", "KILL", "TYPE", "replica")
            time.sleep(lag)
        node.kill()
        for replica in replicas if lag else ():
            replica.resume()
        return node

    def wait_failover(self, timeout: float = FAILOVER_TIMEOUT) -> ClusterNode:
        """Until a replica of the master `kill_master` killed is a master, every live node
        names it the owner of the dead one's slots and says cluster_state:ok. Returns it."""
        if self._killed is None:
            raise HarnessError("wait_failover without kill_master")
        dead, replica_ids = self._killed
        deadline = time.monotonic() + timeout
        while True:
            promoted = [n for n in self.nodes if n.running and n.node_id in replica_ids
                        and _role_or_none(n) == "master"]
            if promoted:
                break
            if time.monotonic() > deadline:
                raise HarnessError(f"no replica of {dead.port} promoted within {timeout:.0f}s")
            time.sleep(0.05)
        # The dead node stays in everyone's node table (as failed): it is not "ready", so
        # wait for state and agreement only, not for known-node counts or replicas.
        new = promoted[0]
        while True:
            why = self._not_serving(new, dead.port)
            if not why:
                self._killed = None
                return new
            if time.monotonic() > deadline:
                raise HarnessError(f"cluster not ok after failover to {new.port}: {why}")
            time.sleep(0.05)

    def _not_serving(self, new: ClusterNode, dead_port: int) -> str:
        try:
            for node in self._live():
                info = node.cluster_info()
                if info.get("cluster_state") != "ok":
                    return f"{node.port}: cluster_state {info.get('cluster_state')}"
                owners = set(node.slot_owners().values())
                if dead_port in owners:
                    return f"{node.port} still names {dead_port} a slot owner"
                if new.port not in owners:
                    return f"{node.port} does not name {new.port} a slot owner yet"
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
            return f"{type(e).__name__}: {e}"
        return ""

    # -- resharding ----------------------------------------------------------------------

    def migrate_slot(self, slot: int, to: ClusterNode, batch: int = 100,
                     pause: float = 0.0, timeout_ms: int = 5000,
                     wait: float = 10.0) -> None:
        """Move `slot` to master `to` live, as `redis-cli --cluster reshard` does: the target
        IMPORTING and the source MIGRATING (in that order, so the target takes the ASK
        redirects the source starts giving), then the keys by `MIGRATE ... REPLACE KEYS` in
        batches of `batch` (sleeping `pause` s between them, to hold the slot in its
        half-moved state longer), then `CLUSTER SETSLOT slot NODE` on the target, the
        source and every other master. Returns once every running node names `to` the
        owner (`wait` s at most; 0: at once)."""
        source = self.master_of_slot(slot)
        if source.port == to.port:
            return
        with to.client() as target_client, source.client() as source_client:
            target_client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING",
                                          source.node_id)
            source_client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", to.node_id)
            while True:
                keys = source_client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                source_client.execute_command("MIGRATE", "127.0.0.1", to.port, "", 0,
                                              timeout_ms, "REPLACE", "KEYS", *keys)
                if pause:
                    time.sleep(pause)
            # The target first: once it owns the slot it bumps its config epoch, and the
            # source's MOVED then points at a node that already answers for the slot.
            others = [m for m in self.masters() if m.port not in (source.port, to.port)]
            for node in [to, source, *others]:
                with node.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", to.node_id)
        if wait:
            self.wait_slot_owner(slot, to, wait)

    def wait_slot_owner(self, slot: int, owner: ClusterNode, timeout: float = 10.0) -> None:
        """Until every running node (replicas too) names `owner` the master of `slot`."""
        deadline = time.monotonic() + timeout
        while True:
            lagging = [n.port for n in self._live()
                       if n.slot_owners().get(slot) != owner.port]
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"nodes {lagging} do not name {owner.port} the owner of "
                                   f"slot {slot} within {timeout:.0f}s")
            time.sleep(0.02)


def _role_or_none(node: ClusterNode) -> str | None:
    try:
        return node.role()
    except (redis.ConnectionError, redis.TimeoutError):
        return None


def _nodes_lines(reply: object) -> list[str]:
    if isinstance(reply, bytes):
        reply = reply.decode()
    if isinstance(reply, str):
        return [line for line in reply.splitlines() if line.strip()]
    raise HarnessError(f"unexpected CLUSTER NODES reply: {type(reply).__name__}")


def _redis_cli() -> str:
    cli = shutil.which("redis-cli")
    if cli is None:
        raise HarnessError("redis-cli not on PATH: install Redis 7 (apt-get install redis-tools)")
    return cli


def key_slot(key: str | bytes) -> int:
    """The hash slot of `key` (CRC16/XMODEM of its hash tag, mod 16384), as Redis computes it."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % CLUSTER_SLOTS
