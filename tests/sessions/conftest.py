"""Session-store fixtures: one store per test on SQLite and, when present, PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pg_fixtures import PostgresCluster, require_postgres

from kvfactory.sessions.store import SessionStore


@pytest.fixture(scope="session")
def postgres_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    require_postgres()
    cluster = PostgresCluster(tmp_path_factory.mktemp("postgres"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sessions.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.fresh_database()


@pytest.fixture
def store(db_url: str) -> Iterator[SessionStore]:
    with SessionStore(db_url) as opened:
        yield opened


@pytest.fixture
def open_store(db_url: str) -> Iterator[Callable[[], SessionStore]]:
    opened: list[SessionStore] = []

    def factory() -> SessionStore:
        opened.append(SessionStore(db_url))
        return opened[-1]

    yield factory
    for each in opened:
        each.close()
