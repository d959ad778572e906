"""Session storage growth: bytes and latency per append on one long session.

Appends ``--appends`` turns of ``--size`` bytes (one user message each) to one session in
a fresh SQLite file and prints: the content sent, the database growth (file + WAL after
a checkpoint), the growth per append over the first and the last tenth of the run, and
the median latency of an append and of reading the head near append 1 and near the end.
Issue 23 found the original layout (every version storing the whole message list) grew
the database 156x the content with appends slowing down 7x; with versions that store
only their new messages both should stay flat. Run
``python benchmarks/session_storage.py [--appends 300] [--size 5000]``; it prints, it
never asserts.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from kvfactory.sessions.model import Message
from kvfactory.sessions.store import SessionStore

WINDOW = 10
"""Appends timed at each end of the run (medians, so one disturbed append does not decide)."""


def _db_bytes(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def _ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=300)
    parser.add_argument("--size", type=int, default=5000, help="bytes per appended message")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sessions.db"
        store = SessionStore(f"sqlite:///{path}")
        session = store.create("bench", "model").id
        empty = _db_bytes(path)
        sizes = [empty]
        appends: list[float] = []
        reads: list[float] = []
        for n in range(args.appends):
            text = f"{n:06d} " + "x" * (args.size - 7)
            started = time.perf_counter()
            store.append(session, "bench", [Message("user", text)])
            appends.append(time.perf_counter() - started)
            started = time.perf_counter()
            store.version(session, "bench")
            reads.append(time.perf_counter() - started)
            if n < WINDOW or n >= args.appends - WINDOW - 1:
                sizes.append(_db_bytes(path))
        store.close()
        total = _db_bytes(path)
    sent = args.appends * args.size
    growth = total - empty
    first = (sizes[WINDOW] - sizes[0]) / WINDOW
    last = (sizes[-1] - sizes[-WINDOW - 1]) / WINDOW
    print(f"{args.appends} appends of {args.size} B: {sent / 1e6:.2f} MB sent")
    print(f"database growth: {growth / 1e6:.2f} MB ({growth / sent:.2f}x the content)")
    print(
        f"growth per append: first {WINDOW} {first / 1e3:.1f} kB, last {WINDOW} {last / 1e3:.1f} kB"
    )
    print(
        f"append latency: first {WINDOW} {_ms(appends[:WINDOW])}, last {WINDOW} {_ms(appends[-WINDOW:])}"
    )
    print(
        f"head read latency: first {WINDOW} {_ms(reads[:WINDOW])}, last {WINDOW} {_ms(reads[-WINDOW:])}"
    )


if __name__ == "__main__":
    main()
