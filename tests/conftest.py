"""Shared fixtures: the real-data folder and small generated datasets."""

from __future__ import annotations

import pytest

from gren.core.paths import shared_data_dir


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` (or ``$GREN_SHARED_DATA``); tests that need it skip when it is absent."""
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set GREN_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def nih_dir(shared_data):
    path = shared_data / "nih"
    if not path.is_dir():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="session")
def lungs_dir(shared_data):
    path = shared_data / "lungs"
    if not path.is_dir():
        pytest.skip(f"{path} missing")
    return path
