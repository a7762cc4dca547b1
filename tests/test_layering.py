"""The layering is a contract a tool checks (import-linter), not a sentence in a guide: the
core may not import grpc, the generated code or the edge. The check itself must fail when the
core does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={"PYTHONPATH": str(tree), "PATH": str(LINT_IMPORTS.parent)})


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "hub", tree / "hub", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_contracts_hold_today(tmp_path: Path) -> None:
    done = _lint(_copy(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_a_core_module_importing_grpc_or_generated_code_breaks_the_build(
    tmp_path: Path,
) -> None:
    tree = _copy(tmp_path)
    domain = tree / "hub" / "domain.py"
    domain.write_text(domain.read_text() + "\nimport grpc  # noqa\n")
    done = _lint(tree)
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout
    assert "hub.domain -> grpc" in done.stdout

    tree = _copy(tmp_path / "again")
    fanout = tree / "hub" / "fanout.py"
    fanout.write_text(fanout.read_text() + "\nfrom hub.api.user.v1 import common_pb2  # noqa\n")
    done = _lint(tree)
    assert done.returncode != 0 and "hub.fanout -> hub.api" in done.stdout, done.stdout
