"""The repository passes its own ruff configuration (pyproject.toml), as CI requires."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from gren.core.paths import REPO_ROOT


def test_ruff_passes():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(sys.prefix) + "/bin")
    if ruff is None:
        pytest.skip("ruff not installed (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "src", "tests", "benchmarks"], cwd=REPO_ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
