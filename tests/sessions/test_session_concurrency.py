"""Many writers racing on one session: exactly one wins per version, the rest get a
conflict that carries the current head, and no acknowledged turn is ever lost."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kvfactory.sessions.model import Message, VersionConflictError
from kvfactory.sessions.store import SessionStore

WRITERS = 12
ROUNDS = 6


def test_exactly_one_writer_wins_each_version(open_store: Callable[[], SessionStore]) -> None:
    # One store (its own connection pool) per writer, as separate gateways would have.
    stores = [open_store() for _ in range(WRITERS)]
    info = stores[0].create("acme", "smol", [Message("system", "s", pinned=True)])
    barrier = threading.Barrier(WRITERS)
    acknowledged: list[tuple[int, str]] = []
    conflicts: list[tuple[int, int]] = []
    lock = threading.Lock()

    def writer(index: int, parent: int) -> None:
        text = f"writer {index} on {parent}"
        barrier.wait()
        try:
            version = stores[index].append(info.id, "acme", [Message("user", text)], parent=parent)
        except VersionConflictError as conflict:
            with lock:
                conflicts.append((parent, conflict.head))
        else:
            with lock:
                acknowledged.append((version.number, text))

    with ThreadPoolExecutor(WRITERS) as pool:
        for round_ in range(ROUNDS):
            parent = 1 + round_
            list(pool.map(writer, range(WRITERS), [parent] * WRITERS))
            winners = [a for a in acknowledged if a[0] == parent + 1]
            assert len(winners) == 1, acknowledged
            round_conflicts = [c for c in conflicts if c[0] == parent]
            assert len(round_conflicts) == WRITERS - 1
            assert all(head == parent + 1 for _, head in round_conflicts)

    head = stores[0].version(info.id, "acme")
    assert head.number == 1 + ROUNDS
    assert [m.content for m in head.messages[1:]] == [text for _, text in sorted(acknowledged)]
    assert stores[0].verify().ok
