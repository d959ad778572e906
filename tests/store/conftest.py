"""Fixtures for store tests that need real Redis: a fresh server per test, a shared cluster.

``redis_fixtures`` (and so redis-py) is imported only when a fixture is used, so the rest of
``tests/store`` collects without the ``redis`` extra.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from redis_fixtures import RedisClusterProcs, RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    from redis_fixtures import RedisServer, require_redis_server

    require_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcs]:
    from redis_fixtures import RedisClusterProcs, require_redis_server

    require_redis_server()
    cluster = RedisClusterProcs(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
