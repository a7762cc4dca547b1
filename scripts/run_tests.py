"""Runs each test module in its own pytest process, then prints one summary line.

    python scripts/run_tests.py [pytest args...]

Why one process per module: the suite shares one asyncio loop per process (grpc.aio binds to
the loop it first ran on), and modules that start, kill and fault real servers must not leave
gRPC or Redis state behind for the next module's loop. Coverage is appended across runs.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    extra = sys.argv[1:]
    modules = sorted((ROOT / "tests").glob("test_*.py"))
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    (ROOT / ".coverage").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for module in modules:
            report = Path(tmp) / f"{module.stem}.xml"
            cmd = [sys.executable, "-m", "pytest", "--cov", "--cov-append", "--cov-report=",
                   f"--junitxml={report}", str(module.relative_to(ROOT)), *extra]
            code = subprocess.run(cmd, cwd=ROOT).returncode
            if report.exists():
                suite = ET.parse(report).getroot().find("testsuite")
                for key in totals:
                    totals[key] += int(suite.get(key, 0)) if suite is not None else 0
            if code not in (0, 5):  # 5: the module selected no test (e.g. a -k filter)
                failed.append(module.name)
    subprocess.run([sys.executable, "-m", "coverage", "report"], cwd=ROOT, check=False)
    bad = totals["failures"] + totals["errors"]
    passed = totals["tests"] - bad - totals["skipped"]
    if failed:
        print("failed modules:", ", ".join(failed))
    if totals["tests"] == 0:
        print("no test ran")
        return 1
    print(f"{passed} passed, {bad} failed, {totals['skipped']} skipped")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
