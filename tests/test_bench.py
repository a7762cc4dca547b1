"""`python -m loadtest.bench --quick` end to end: it starts Redis, hubs, ceilings and clients
itself, and must leave a table, a JSON report and a PNG chart with a figure and a ceiling for
every section. Missed targets are not failures here (the test machine is shared and small);
a measurement that could not be made, or lost events, is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.redis import REDIS_SERVER

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("fanout", "latency", "bulk", "import", "getuser", "idle")
# Sections whose figures stand beside a ceiling measured in the same run.
WITH_CEILING = ("fanout", "bulk", "import", "getuser", "idle")
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
