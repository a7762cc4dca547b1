"""How big each measurement of the bench is (`Plan`, and `QUICK` for --quick), its sections
and the targets it checks them against."""

from __future__ import annotations

from dataclasses import dataclass

SECTIONS = ("fanout", "latency", "bulk", "import", "getuser", "idle", "resync")
# Sections only --only runs: what they measure is a choice of configuration, not a headline.
EXTRA_SECTIONS = ("access-log", "cluster", "catchup")
# Targets (2-core machine) the bench lets us check; see the docstring of __main__.py.
FANOUT_TARGET = 300_000.0
LATENCY_TARGET_RATE = 200.0
LATENCY_TARGET_P50_MS, LATENCY_TARGET_P99_MS = 2.0, 5.0
BULK_TARGET_RATIO = 0.70
IMPORT_TARGET = 50_000.0
GETUSER_TARGET_RATIO = 0.70
IDLE_TARGET_RATIO = 1.5
# A resync by state of 1% changed users: its bytes and seconds against a full snapshot's.
RESYNC_TARGET_RATIO = 0.05
# The 20 subscribers' p99 with one stalled subscriber catching up, against a run without it.
CATCHUP_TARGET_RATIO = 1.2


@dataclass(frozen=True)
class Plan:
    """How big each measurement is; `--quick` shrinks every one of them."""

    fanout_duration: float = 10.0
    fanout_ceiling_duration: float = 5.0
    subscribers: int = 100
    subscriber_processes: int = 4
    latency_rates: tuple[float, ...] = (200.0, 1000.0, 5000.0)
    latency_duration: float = 10.0
    latency_subscribers: int = 20
    bulk_users: int = 50_000
    # Client-stream runs last seconds, so one busy moment on a shared machine moves them by a
    # third: each side (hub and ceiling) is run this many times and its best run counts.
    stream_runs: int = 3
    redis_users: int = 100_000
    import_users: int = 100_000
    import_rows: int = 1000
    getuser_duration: float = 8.0
    getuser_runs: int = 2  # best of, as stream_runs
    getuser_users: int = 1000
    getuser_clients: int = 2  # processes
    getuser_concurrency: int = 32  # call loops per process
    getuser_channels: int = 8  # connections per process (spread over --workers by the kernel)
    # The access-log section: the GetUser load once per log state in each round, the states
    # alternating, so a busy moment on a shared machine falls on all of them alike.
    access_log_rounds: int = 3
    access_log_sample: float = 0.01
    # The cluster section: the fanout and latency loads on one redis-server and on a cluster.
    cluster_masters: int = 3
    cluster_replicas: int = 0  # per master; each replays its master's writes on our 2 cores
    cluster_latency_rates: tuple[float, ...] = (200.0, 1000.0)
    # The fan-out also runs on the single node with the cluster's partition count (0: not).
    cluster_node_partitions: int = 128
    cluster_idle: float = 2.0  # s: the hubs' and Redis's CPU with nothing to do, measured once
    idle_streams: int = 10_000
    idle_clients: int = 4  # processes
    idle_channels: int = 10  # connections per process
    drain_timeout: float = 30.0
    # The resync section: a token T taken after importing resync_users, resync_changed of them
    # changed (resync_deleted of those deleted), the history expired (hubs run with
    # --history-max-age resync_history_age); then a resync by state from T beside a full
    # snapshot, alternating, resync_runs of each (the best of each counts).
    resync_users: int = 100_000
    resync_changed: float = 0.01
    resync_deleted: float = 0.10
    resync_history_age: float = 3.0
    resync_runs: int = 3
    # The catchup section: the latency load at catchup_rate writes/s for catchup_duration s on
    # hubs with --subscriber-max-events catchup_max_events, without and with one subscriber
    # that stops reading until catchup_stall of the writes are made; catchup_rounds of each,
    # alternating.
    catchup_rate: float = 1000.0
    catchup_duration: float = 10.0
    catchup_stall: float = 0.6
    catchup_max_events: int = 2000
    catchup_rounds: int = 2


QUICK = Plan(
    fanout_duration=1.5, fanout_ceiling_duration=1.0, latency_rates=(200.0, 2000.0),
    latency_duration=1.5, bulk_users=3_000, redis_users=20_000, import_users=20_000,
    import_rows=500, getuser_duration=1.5, getuser_users=200, idle_streams=500,
    idle_clients=2, idle_channels=4, drain_timeout=15.0, stream_runs=1,
    getuser_runs=1, access_log_rounds=1, cluster_idle=1.0, resync_users=5_000, resync_runs=1,
    catchup_duration=3.0, catchup_max_events=500, catchup_rounds=1,
)
