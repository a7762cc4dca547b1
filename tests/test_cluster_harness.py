"""harness.redis.ClusterProcess: a real Redis Cluster (3 masters, a replica each) that forms
in seconds, puts a key on the master that owns its slot, moves a slot live while a client
keeps using its keys, and promotes a replica when its master is killed -9. The client here
is redis-py's sync RedisCluster, which follows MOVED and ASK itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode as Seed
from redis.cluster import RedisCluster
from redis.exceptions import MovedError

from harness.redis import CLUSTER_SLOTS, REDIS_SERVER, ClusterProcess, key_slot

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcess]:
    with ClusterProcess(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def client_of(cluster: ClusterProcess) -> RedisCluster:
    return RedisCluster(startup_nodes=[Seed(h, p) for h, p in cluster.startup_nodes],
                        decode_responses=True, socket_timeout=5)


def test_cluster_forms_with_every_slot_covered(cluster: ClusterProcess) -> None:
    masters, replicas = cluster.masters(), cluster.replicas()
    assert len(masters) == 3
    assert len(replicas) == 3
    # Each master has its own replica, and the three split the slots between them.
    assert all(len(cluster.replicas_of(m)) == 1 for m in masters)
    owners = cluster.slot_owners()
    assert len(owners) == CLUSTER_SLOTS
    assert set(owners.values()) == {m.port for m in masters}
    hosts = cluster.url.removeprefix("redis+cluster://").split(",")
    assert hosts[:3] == [m.addr for m in masters]
    assert sorted(hosts) == sorted(n.addr for n in cluster.nodes)
    for node in cluster.nodes:
        assert node.cluster_info()["cluster_state"] == "ok"


def test_key_slot_is_redis_own() -> None:
    # CLUSTER KEYSLOT's answers, hash tags included.
    assert key_slot("123456789") == 12739
    assert key_slot("hub:{p7}:log") == key_slot("p7") == key_slot("{p7}x")
    assert key_slot("a{}b") != key_slot("")  # an empty tag hashes the whole key


def test_a_key_lands_on_the_master_that_owns_its_slot(cluster: ClusterProcess) -> None:
    with client_of(cluster) as client:
        for tag in ("p0", "p1", "p2", "p3"):
            key = f"hub:{{{tag}}}:probe"
            client.set(key, tag)
            owner = cluster.master_of_key(key)
            with owner.client(decode_responses=True) as direct:
                assert direct.get(key) == tag
                assert direct.execute_command("CLUSTER", "KEYSLOT", key) == key_slot(key)
            for other in cluster.masters():
                if other.port != owner.port:
                    with other.client() as direct, pytest.raises(MovedError) as moved:
                        direct.get(key)
                    assert moved.value.node_addr == ("127.0.0.1", owner.port)


def test_a_slot_moves_live_while_a_client_reads_and_writes_it(cluster: ClusterProcess) -> None:
    tag = "{p7}"
    slot = key_slot(tag)
    source = cluster.master_of_slot(slot)
    target = next(m for m in cluster.masters() if m.port != source.port)
    with client_of(cluster) as client:
        # Enough keys for several MIGRATE batches, so the slot is half-moved for a while.
        for i in range(400):
            client.set(f"hub:{tag}:k{i}", i)
        client.hset(f"hub:{tag}:user", mapping={"name": "ada", "version": 1})

        stop = threading.Event()
        reads: list[int] = []
        incrs: list[int] = []
        errors: list[BaseException] = []

        def use_the_slot() -> None:
            with client_of(cluster) as mine:
                try:
                    while not stop.is_set():
                        assert mine.hgetall(f"hub:{tag}:user") == {"name": "ada",
                                                                   "version": "1"}
                        reads.append(1)
                        incrs.append(int(mine.incr(f"hub:{tag}:counter")))
                except BaseException as e:
                    errors.append(e)

        reader = threading.Thread(target=use_the_slot)
        reader.start()
        try:
            time.sleep(0.2)
            before = len(reads)
            cluster.migrate_slot(slot, target, batch=50, pause=0.02)
            during = len(reads) - before
            time.sleep(0.2)
        finally:
            stop.set()
            reader.join(10)
        assert not errors, errors
        assert during > 0, "the client made no progress while the slot moved"

        assert cluster.master_of_slot(slot).port == target.port
        with source.client() as old, target.client() as new:
            assert old.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
            # 400 keys, the hash and the counter.
            assert new.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 402
        # Every increment acknowledged is there, once: none lost, none applied twice.
        assert incrs == list(range(1, len(incrs) + 1))
        assert int(client.get(f"hub:{tag}:counter")) == len(incrs)
        assert client.get(f"hub:{tag}:k399") == "399"


def test_killing_a_master_promotes_its_replica(tmp_path: Path) -> None:
    with ClusterProcess(tmp_path / "cluster") as cluster, client_of(cluster) as client:
        key = "hub:{p3}:user"
        client.hset(key, mapping={"name": "grace"})
        old = cluster.master_of_key(key)
        (replica,) = cluster.replicas_of(old)
        with old.client() as direct:
            assert direct.wait(1, 5000) == 1  # the replica has the write

        started = time.monotonic()
        assert cluster.kill_master(old) is old
        assert not old.running
        new = cluster.wait_failover()
        took = time.monotonic() - started

        assert new.port == replica.port
        assert new.role() == "master"
        assert cluster.master_of_key(key).port == new.port
        assert took < 15, f"failover took {took:.1f}s"
        with client_of(cluster) as fresh:
            assert fresh.hgetall(key) == {"name": "grace"}
        # The old client finds the new master by itself after its connection breaks.
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.hgetall(key) == {"name": "grace"}
                break
            except (redis.ConnectionError, redis.ClusterDownError, redis.TimeoutError):
                assert time.monotonic() < deadline
                time.sleep(0.1)

        # Back from the dead, the old master rejoins as the new one's replica.
        old.restart()
        cluster.wait_ready()
        assert old.role() == "slave"
        assert [r.port for r in cluster.replicas_of(new)] == [old.port]
