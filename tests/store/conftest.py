"""Fixtures for the store tests."""

from __future__ import annotations

import pytest

from featurebank.store import open_store


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "store")
    yield s
    s.close()
