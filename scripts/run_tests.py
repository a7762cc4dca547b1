"""Runs each test module in its own pytest process, two at a time, then prints one summary line.

    python scripts/run_tests.py [pytest args...]

Why one process per module: the suite shares one asyncio loop per process (grpc.aio binds to
the loop it first ran on), and modules that start, kill and fault real servers must not leave
gRPC or Redis state behind for the next module's loop. Two at a time because the machine has
two cores and most modules wait on real servers; the slowest modules start first. Each
module's output is printed whole when it ends, so failures read in one piece. Coverage is
kept per module and combined at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = int(os.environ.get("HUB_TEST_JOBS", "2"))
# Modules that take longest (real Redis faults, bounded chaos and storm runs): started first,
# so the two lanes finish together.
SLOW_FIRST = ("test_chaos", "test_storm", "test_redis_faults", "test_sentinel", "test_live",
              "test_fuzz", "test_workers", "test_locust", "test_bench")


def _order(module: Path) -> tuple[int, str]:
    name = module.stem
    return (SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST), name)


def main() -> int:
    extra = sys.argv[1:]
    modules = sorted((ROOT / "tests").glob("test_*.py"), key=_order)
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    for stale in ROOT.glob(".coverage*"):
        stale.unlink()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:

        def run(module: Path) -> tuple[Path, int, str, float]:
            report = Path(tmp) / f"{module.stem}.xml"
            cmd = [sys.executable, "-m", "pytest", "--cov", "--cov-report=",
                   f"--junitxml={report}", str(module.relative_to(ROOT)), *extra]
            env = {**os.environ, "COVERAGE_FILE": str(ROOT / f".coverage.{module.stem}")}
            t0 = time.monotonic()
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, check=False)
            return report, done.returncode, done.stdout, time.monotonic() - t0

        with ThreadPoolExecutor(JOBS) as pool:
            for future in as_completed([pool.submit(run, m) for m in modules]):
                report, code, output, seconds = future.result()
                print(output, end="", flush=True)
                print(f"-- {report.stem}: exit {code} in {seconds:.0f} s", flush=True)
                if report.exists():
                    suite = ET.parse(report).getroot().find("testsuite")
                    for key in totals:
                        totals[key] += int(suite.get(key, 0)) if suite is not None else 0
                if code not in (0, 5):  # 5: the module selected no test (e.g. a -k filter)
                    failed.append(report.stem)
    subprocess.run([sys.executable, "-m", "coverage", "combine", "--quiet"], cwd=ROOT,
                   check=False)
    subprocess.run([sys.executable, "-m", "coverage", "report"], cwd=ROOT, check=False)
    bad = totals["failures"] + totals["errors"]
    passed = totals["tests"] - bad - totals["skipped"]
    print(f"wall time {time.monotonic() - started:.0f} s")
    if failed:
        print("failed modules:", ", ".join(failed))
    if totals["tests"] == 0:
        print("no test ran")
        return 1
    print(f"{passed} passed, {bad} failed, {totals['skipped']} skipped")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
