"""The locust scenarios of loadtest/locustfile.py, each run headless for a few seconds against a
`hub serve` subprocess on Redis. Locust runs as a subprocess too: it monkey-patches the standard
library with gevent on import, which must never happen to the pytest process.

Each run must exit 0 (locust exits 1 on any failed request), write its CSV and HTML reports,
and show requests for every name its scenario reports."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jwt
import pytest

from harness.hub import HubProcess
from harness.redis import dying_with_parent
from hub.principal import READ, SUBSCRIBE, WRITE

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
# Long enough for a locust process started on a machine the suite keeps busy to spawn its
# users and record requests (4 s once recorded none: only the Aggregated row).
RUN_TIME_S = 6
SECRET = "locust-test-secret-0123456789abcdef-0123456789"  # >= 32 bytes, as HS256 wants
Row = dict[str, str]


class Run:
    """A finished locust run: the rows of its `_stats.csv` by name and its final JSON stats.

    The CSV is locust's last one-second snapshot; the JSON (--json-file) is written at exit, so
    exact totals such as events delivered come from it."""

    def __init__(self, prefix: Path) -> None:
        with (prefix.parent / f"{prefix.name}_stats.csv").open(newline="") as f:
            self.rows: dict[str, Row] = {row["Name"]: row for row in csv.DictReader(f)}
        entries = json.loads((prefix.parent / f"{prefix.name}.json").read_text())
        self.final: dict[str, dict[str, float]] = {e["name"]: e for e in entries}

    def row(self, name: str) -> Row:
        assert name in self.rows, f"no {name!r} row in {sorted(self.rows)}"
        row = self.rows[name]
        assert int(row["Request Count"]) > 0, row
        assert int(row["Failure Count"]) == 0, row
        return row

    def total(self, name: str, field: str = "num_requests") -> float:
        return self.final[name][field] if name in self.final else 0


def run_locust(hub: HubProcess, tmp_path: Path, classes: Sequence[str], users: int,
               *options: str, scheme: str = "") -> Run:
    host = f"{scheme}{hub.target}"
    prefix, html = tmp_path / "run", tmp_path / "report.html"
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{RUN_TIME_S}s", "--host", host,
        "--csv", str(prefix), "--html", str(html), "--json-file", str(prefix),
        "--only-summary", "--loglevel", "WARNING", *options, *classes,
    ]
    # Locust reads LOCUST_* variables as options; the run takes only what the test passes.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LOCUST_") and k != "HUB_LOADTEST_TOKEN"}
    started = time.monotonic()
    done = subprocess.run(dying_with_parent(command), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    failures = tmp_path / "run_failures.csv"
    assert done.returncode == 0, (
        f"locust exited {done.returncode}\n{done.stderr[-4000:]}\n"
        f"{failures.read_text() if failures.exists() else ''}\nhub log:\n{hub.output()[-4000:]}")
    # -t bounds the run: a scenario that ignored the stop would show here.
    assert time.monotonic() - started < RUN_TIME_S + 20
    assert html.stat().st_size > 0
    for name in classes:  # the report names the classes that ran
        assert name in html.read_text()
    return Run(prefix)


@pytest.fixture
def redis_hub(redis_url: str, hub_process: Callable[..., HubProcess]) -> HubProcess:
    return hub_process(redis_url, HUB_LOG_LEVEL="WARNING")


def test_crud_mix(redis_hub: HubProcess, tmp_path: Path) -> None:
    run = run_locust(redis_hub, tmp_path, ["CrudUser"], 4)
    for name in ("CreateUser", "GetUser", "UpdateUser"):
        run.row(name)
    # Weighted 6 : 3 : 1, plus 3 seed creates per user: reads dominate.
    assert run.total("GetUser") > run.total("CreateUser")


def test_bulk_producer(redis_hub: HubProcess, tmp_path: Path) -> None:
    run = run_locust(redis_hub, tmp_path, ["BulkProducer"], 2, "--bulk-rows", "200",
                     scheme="grpc://")
    row = run.row("BulkCreateUsers")
    assert float(row["Average Content Size"]) == 200  # rows per call


def test_sync_subscribers_with_writers(
    redis_url: str, hub_process: Callable[..., HubProcess], tmp_path: Path
) -> None:
    # With authentication on, so the token option is exercised too.
    hub = hub_process(redis_url, HUB_LOG_LEVEL="WARNING", HUB_JWT_SECRET=SECRET)
    token = jwt.encode({"sub": "locust", "scope": f"{READ} {WRITE} {SUBSCRIBE}",
                        "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    subscribers = 2
    run = run_locust(
        hub, tmp_path, ["CrudUser", "SyncSubscriber"], 5,
        "--hub-token", token, "--sync-interval", "0.5",
        # `=`: the option takes any number of values and would swallow the class names.
        f'--config-users={{"user_class_name": "SyncSubscriber", "fixed_count": {subscribers}}}',
    )
    for name in ("CreateUser", "Sync events", "Sync delivery latency",
                 "Sync delivery latency p99"):
        run.row(name)
    assert "Sync" not in run.final  # no stream was cut

    delivered = run.total("Sync events", "total_content_length")
    writes = run.total("CreateUser") + run.total("UpdateUser")
    # Every subscriber follows all users: at most one event per write each (nothing twice);
    # writes made before a stream was up are missed, so only a loose lower bound.
    assert 0.1 * subscribers * writes <= delivered <= subscribers * writes, (delivered, writes)

    median = float(run.row("Sync delivery latency")["Average Response Time"])
    p99 = float(run.row("Sync delivery latency p99")["Average Response Time"])
    # Same host, same clock: write to receive takes milliseconds; a busy CI box, maybe more.
    assert 0 < median <= p99 < 5000, (median, p99)
