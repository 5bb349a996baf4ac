"""Shared fixtures: the real-data folder and small generated datasets."""

from __future__ import annotations

import os

import pytest

from gren.core.paths import shared_data_dir


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` (or ``$GREN_SHARED_DATA``); tests that need it skip when it is absent (and fail
    when ``$CI`` is set: CI always has it)."""
    root = shared_data_dir()
    if not root.is_dir():
        _missing(f"real data not found at {root} (set GREN_SHARED_DATA)")
    return root


def _missing(message: str) -> None:
    """Skip a real-data test, except under CI (``$CI`` set), where the data must be there: fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI runs with ../shared beside the clone, so this is an error there", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def nih_dir(shared_data):
    path = shared_data / "nih"
    if not path.is_dir():
        _missing(f"{path} missing")
    return path


@pytest.fixture(scope="session")
def lungs_dir(shared_data):
    path = shared_data / "lungs"
    if not path.is_dir():
        _missing(f"{path} missing")
    return path
