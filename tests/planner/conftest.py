"""Planner fixtures: the shared Mooncake trace (skipped when the shared folder is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from planner_helpers import SHARED_TRACE


@pytest.fixture
def shared_trace() -> Path:
    if not SHARED_TRACE.exists():
        pytest.skip(f"shared trace missing: {SHARED_TRACE}")
    return SHARED_TRACE
