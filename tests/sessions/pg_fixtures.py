"""A real PostgreSQL cluster on loopback for the session tests, via scripts/postgres.sh.

``require_postgres`` skips when the binaries are missing (fails under CI, where the
Makefile installs them). ``PostgresCluster`` starts one throwaway cluster and hands out
a fresh database per test, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "postgres.sh"


def _binaries_present() -> bool:
    """The same search as ``bin_dir`` in scripts/postgres.sh."""
    if shutil.which("pg_ctl") and shutil.which("initdb"):
        return True
    return any(
        (folder / "pg_ctl").exists() and (folder / "initdb").exists()
        for folder in Path("/usr/lib/postgresql").glob("*/bin")
    )


def require_postgres() -> None:
    if _binaries_present():
        return
    message = "PostgreSQL binaries not found: run `scripts/postgres.sh install`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresCluster:
    def __init__(self, directory: Path):
        self.directory = directory
        self.url = ""

    def start(self) -> None:
        done = subprocess.run(
            [str(SCRIPT), "start", str(self.directory), str(_free_port())],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"postgres.sh start failed: {done.stderr[-2000:]}")
        self.url = done.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "stop", str(self.directory)], capture_output=True, timeout=60)

    def fresh_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        admin = sa.create_engine(
            self.url.replace("postgresql://", "postgresql+psycopg://"),
            isolation_level="AUTOCOMMIT",
        )
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        admin.dispose()
        return self.url.rsplit("/", 1)[0] + "/" + name


__all__ = ["PostgresCluster", "require_postgres"]
