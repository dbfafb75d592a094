"""The code stays ruff- and mypy --strict-clean (run as part of the suite, so CI enforces it)."""

from __future__ import annotations

import subprocess
import sys

from tests.procs import ROOT


def test_ruff_is_clean() -> None:
    """ruff check finds nothing in the project's code and tests."""
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "service", "tasks", "clients", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_is_clean() -> None:
    """mypy --strict (configured in pyproject.toml) finds nothing in the code and bench."""
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
