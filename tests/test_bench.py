"""`python -m loadtest.bench --quick` end to end: it starts Redis, hubs, ceilings and clients
itself, and must leave a table, a JSON report and a PNG chart with a figure and a ceiling for
every section. Missed targets are not failures here (the test machine is shared and small);
a measurement that could not be made, or lost events, is."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.redis import REDIS_SERVER

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("fanout", "latency", "bulk", "import", "getuser", "idle", "resync")
# Sections whose figures stand beside a ceiling measured in the same run.
WITH_CEILING = ("fanout", "bulk", "import", "getuser", "idle", "resync")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server on PATH"),
]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def test_quick_bench_reports_every_section_beside_its_ceiling(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    # About a minute on a busy 2-core machine. If the bench overruns, killing it is enough:
    # its Redis and hubs die with it (PR_SET_PDEATHSIG) and its workers on stdin EOF.
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )
    report = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() \
        else {}
    errors = {name: s["errors"] for name, s in report.get("sections", {}).items()
              if s["errors"]}
    assert done.returncode == 0, (
        f"exit {done.returncode}; failed measurements: {errors}\n"
        f"stderr tail:\n{done.stderr[-3000:]}")

    assert report["exit_code"] == 0
    assert set(SECTIONS) <= set(report["sections"])
    for name in SECTIONS:
        section = report["sections"][name]
        measured = [r for r in section["rows"] if r["status"] == "ok"]
        assert measured, f"{name}: no measured row ({section})"
        for row in measured:
            assert _number(row["hub"]), f"{name}: hub figure {row['hub']!r}"
            if name in WITH_CEILING:
                assert _number(row["ceiling"]) and row["ceiling"] > 0, \
                    f"{name}: ceiling {row['ceiling']!r}"
                assert _number(row["ratio"]), f"{name}: ratio {row['ratio']!r}"
            assert row["met"] in (True, False, None)
            # The harness reports how busy its own clients and the machine were.
            assert _number(row["clients_cpu"]) and _number(row["machine_busy"]), row

    curve = report["latency_curve"]
    assert curve and all(_number(p[k]) for p in curve for k in ("p50", "p99", "p99.9"))
    assert all(p["p50"] <= p["p99"] <= p["p99.9"] for p in curve)

    table = (out / "bench.md").read_text()
    assert "| measurement |" in table and "hub/ceiling" in table
    assert table.strip() in done.stdout  # the table is printed, too
    assert (out / "latency.png").read_bytes()[:8] == PNG_MAGIC


def test_access_log_section_measures_each_state_beside_off(tmp_path: Path) -> None:
    # `--access-log-before` pointed at this checkout: the second hub's rows go through the
    # same plumbing (another source directory) an older worktree's would.
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--quick", "--only", "access-log",
         "--access-log-before", str(ROOT), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "bench.json").read_text())["sections"]["access-log"]["rows"]
    assert [(r["details"]["tree"] == "this checkout", r["details"]["state"]) for r in rows] \
        == [(mine, s) for s in ("off", "text", "json", "sampled") for mine in (True, False)]
    for row in rows:
        assert row["status"] == "ok", row
        run = row["details"]["runs"][0]
        assert _number(row["hub"]) and row["hub"] > 0 and run["hub_us_per_call"] > 0, row
        # What each state wrote is what it promises: nothing, a line a call, or a sample.
        lines = {"off": (0, 0), "text": (0.99, 1.01), "json": (0.99, 1.01),
                 "sampled": (0, 0.1)}[row["details"]["state"]]
        assert lines[0] <= run["log_lines_per_call"] <= lines[1], row
        if row["details"]["state"] == "off":
            assert row["ceiling"] is None
        else:  # beside the same hub with the access log off
            off = next(r for r in rows if r["details"]["tree"] == row["details"]["tree"]
                       and r["details"]["state"] == "off")
            assert row["ceiling"] == off["hub"] and _number(row["ratio"]), row
    json_run, text_run = (rows[n]["details"]["runs"][0] for n in (4, 2))
    assert json_run["log_bytes_per_call"] > text_run["log_bytes_per_call"]  # the fields


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli (cluster create)")
def test_cluster_section_measures_one_node_and_a_cluster_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--quick", "--only", "cluster",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=150, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "bench.json").read_text())["sections"]["cluster"]["rows"]
    for row in rows:  # measured, every event delivered, its cost and its limit said
        assert row["status"] == "ok", row
        assert _number(row["hub"]) and row["hub"] > 0, row
        assert "at its limit: " in row["hub_text"] and row["details"]["at_limit"], row
        cost = row["details"]["cost_us"]
        assert cost["hubs (sum)"] > 0 and cost.get("redis (sum)", cost.get("redis", 0)) > 0
    fan = {r["details"]["store"]: r for r in rows if "rate" not in r["details"]}
    assert {k: r["details"]["partitions"] for k, r in fan.items()} == \
        {"node": 16, "node 128": 128, "cluster": 128}
    for key in ("node 128", "cluster"):  # beside the bench's usual single node
        assert fan[key]["ceiling"] == fan["node"]["hub"] and _number(fan[key]["ratio"])
    cost = fan["cluster"]["details"]["cost_us"]
    masters = [v for k, v in cost.items() if re.fullmatch(r"redis \d", k)]
    assert len(masters) == 3 and all(v > 0 for v in masters), cost
    assert cost["redis (sum)"] == pytest.approx(sum(masters), abs=0.05)
    latency = [r for r in rows if "rate" in r["details"]]
    assert [(r["details"]["store"], r["details"]["rate"]) for r in latency] == \
        [(s, rate) for s in ("node", "cluster") for rate in (200.0, 1000.0)]
    for row in latency:
        ms = row["details"]["percentiles_ms"]
        assert 0 < ms["p50"] <= ms["p99"] <= ms["p99.9"], row
    assert "cluster of 3 masters (128 partitions)" in (out / "bench.md").read_text()


def test_resync_section_sends_only_the_changed_users_beside_a_snapshot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--quick", "--only", "resync",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads((out / "bench.json").read_text())["sections"]["resync"]["rows"]
    assert row["status"] == "ok", row
    details = row["details"]
    changed = details["changed"]
    assert changed["updated"] == 45 and changed["deleted"] == 5  # 1% of 5,000, 10% deleted
    [resync], [snapshot] = details["resync"], details["snapshot"]
    assert (resync["updated"], resync["deleted"], resync["other"]) == (45, 5, 0), resync
    assert resync["users"] == 50 and resync["complete"] and not resync["problems"]
    assert snapshot["users"] == 4_995 and snapshot["complete"], snapshot
    assert 0 < resync["bytes"] < snapshot["bytes"] / 20
    assert row["hub"] == pytest.approx(resync["bytes"] / 1024)
    assert row["ceiling"] == pytest.approx(snapshot["bytes"] / 1024)
    assert _number(row["ratio"]) and row["met"] in (True, False)
    assert resync["cpu_ms"]["hub A"] < snapshot["cpu_ms"]["hub A"]


def test_an_older_hub_is_measured_in_the_states_it_has() -> None:
    from loadtest.bench.access_log import log_states

    old = {s.key: s for s in log_states("usage: hub serve [--log-level LOG_LEVEL]", 0.01)}
    assert old["off"].flags == ("--log-level", "WARNING") and not old["off"].missing
    assert old["sampled"].missing and not old["text"].missing
    new = {s.key: s for s in log_states("--no-access-log --access-log-sample F", 0.01)}
    assert "--no-access-log" in new["off"].flags and not new["sampled"].missing
    assert new["sampled"].flags[-2:] == ("--access-log-sample", "0.01")


def test_access_log_before_needs_the_access_log_section(
        capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--only", "getuser", "--access-log-before", str(ROOT)])
    assert exit_.value.code == 2 and "--only access-log" in capsys.readouterr().err
