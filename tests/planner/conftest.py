"""Planner fixtures: the Mooncake synthetic trace vendored under data/traces/."""

from __future__ import annotations

from pathlib import Path

import pytest
from planner_helpers import SHARED_TRACE


@pytest.fixture
def shared_trace() -> Path:
    assert SHARED_TRACE.exists(), f"vendored trace missing: {SHARED_TRACE}"
    return SHARED_TRACE
