"""Moved to `loadtest.bench.procs`. Kept only for `loadtest/storm.py`, which still imports it
from here: delete this file once storm imports `loadtest.bench.procs`."""

from harness.redis import free_port
from loadtest.bench.procs import (
    HUB_FLAGS,
    BenchError,
    Children,
    CpuMeter,
    Hub,
    log_summary,
    print_table,
    start_hub,
    start_redis,
    stop,
    wait_hub,
)

__all__ = ["HUB_FLAGS", "BenchError", "Children", "CpuMeter", "Hub", "free_port",
           "log_summary", "print_table", "start_hub", "start_redis", "stop", "wait_hub"]
