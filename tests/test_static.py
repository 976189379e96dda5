"""Static checks as tests: ruff (lint) and mypy (types) must be clean, with the settings in pyproject.toml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_tool(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed in this environment (pip install {module})")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_ruff_clean() -> None:
    proc = _run_tool("ruff", "check", "live", "plugin", "simulators", "tests", "benchmarks", "scripts", timeout=120)
    assert proc.returncode == 0, f"ruff found problems:\n{proc.stdout}\n{proc.stderr}"


def test_mypy_clean() -> None:
    # incremental: .mypy_cache in the repository root keeps repeated runs to a few seconds
    proc = _run_tool("mypy", "live", "simulators", "plugin", timeout=300)
    assert proc.returncode == 0, f"mypy found problems:\n{proc.stdout}\n{proc.stderr}"
