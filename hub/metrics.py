"""Prometheus metrics (prometheus-client), served on --metrics-port when it is set.

One registry per process, created here; the code that knows when something happens updates
these objects directly.
"""

from __future__ import annotations

import importlib.metadata

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)

# `_created` series double every counter's series for a timestamp nobody graphs.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
# What a dashboard needs beside hub's own: CPU, memory and fds of the process, the Python
# version, and the garbage collector's passes.
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

try:
    _VERSION = importlib.metadata.version("hub-userfeed")
except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
    _VERSION = "unknown"
BUILD = Info("hub_build", "hub's version", registry=REGISTRY)
BUILD.info({"version": _VERSION})

RPCS = Counter("hub_rpcs", "RPCs finished, by method and status code", ["method", "code"],
               registry=REGISTRY)
RPC_SECONDS = Histogram(
    "hub_rpc_seconds", "RPC duration (streams: their whole life)", ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60,
             600),
    registry=REGISTRY,
)
ACTIVE_STREAMS = Gauge("hub_active_streams", "Open streaming RPCs", ["method"],
                       registry=REGISTRY)
EVENTS_ROUTED = Counter("hub_events_routed", "Events the fan-out took from the bus",
                           registry=REGISTRY)
EVENTS_DELIVERED = Counter("hub_events_delivered", "Events handed to subscriber streams",
                           registry=REGISTRY)
QUEUED_EVENTS = Gauge("hub_subscriber_queued_events",
                      "Events waiting in subscriber buffers (all subscriptions)",
                      registry=REGISTRY)
SLOW_CONSUMERS = Counter(
    "hub_slow_consumer_disconnects",
    "Subscribers cut for falling behind: past their buffer bound, they read the history at"
    " their own pace, and are cut only when their position leaves it", registry=REGISTRY)
# In-server catch-up (hub.fanout): a subscriber past its buffer bound reads the history from
# its position instead of being cut, then rejoins the live feed.
CATCHUP_SUBSCRIBERS = Gauge(
    "hub_catchup_subscribers",
    "Subscribers past their buffer bound, reading the history at their own pace (not yet"
    " back on the live feed)", registry=REGISTRY)
CATCHUP_LAG = Histogram(
    "hub_catchup_lag_events",
    "How far a catching-up subscriber is behind the live feed (events of the partitions it"
    " follows), at each step of its catch-up",
    buckets=(10, 100, 1_000, 10_000, 100_000, 1_000_000), registry=REGISTRY)
CATCHUPS = Counter("hub_catchups_completed",
                   "Catch-ups that rejoined the live feed with no gap", registry=REGISTRY)
RESUMES = Counter("hub_resumes", "Subscriptions resumed from a token, by outcome",
                  ["outcome"], registry=REGISTRY)
GAP_REPAIRS = Counter("hub_gap_repairs", "Gaps in the live feed repaired from history",
                      registry=REGISTRY)
STORE_ERRORS = Counter("hub_store_errors", "Store (Redis) calls that failed to reach it",
                       registry=REGISTRY)
RATE_LIMITED = Counter("hub_rate_limited", "Writes refused by the per-principal rate limit",
                       registry=REGISTRY)
BUS_CONNECTED = Gauge("hub_event_bus_connected",
                      "1 while the fan-out's event-bus (Redis pub/sub) subscription is up",
                      registry=REGISTRY)


class MetricsServer:
    """The /metrics HTTP endpoint, served from a daemon thread until `close()`."""

    def __init__(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=REGISTRY)
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
