"""A process appending turns is SIGKILLed at random moments, 20 times (each trial starts
a session in the same database): after each kill every acknowledged turn is present, no
partial turn exists, and the audit chains verify."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvfactory.sessions.model import Message
from kvfactory.sessions.store import SessionStore

WORKER = Path(__file__).with_name("crash_worker.py")
TRIALS = 20


def _run_and_kill(url: str, session_id: str, trial: int, delay_s: float) -> list[str]:
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), url, session_id, str(trial)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay_s)
    worker.send_signal(signal.SIGKILL)
    out, err = worker.communicate(timeout=30)
    assert worker.returncode == -signal.SIGKILL, err[-2000:]
    # A line cut by the kill was never acknowledged: keep complete lines only.
    return [line for line in out.splitlines(keepends=True) if line.endswith("\n")]


def test_sigkilled_writer_loses_no_acknowledged_turn(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    rng = random.Random(5)
    total = 0
    for trial in range(TRIALS):
        with SessionStore(url) as store:
            session_id = store.create("acme", "smol", [Message("system", "s", pinned=True)]).id
        acknowledged: dict[int, str] = {}
        for line in _run_and_kill(url, session_id, trial, rng.uniform(0.3, 1.2)):
            _, acked_number, text = line.rstrip("\n").split(" ", 2)
            acknowledged[int(acked_number)] = text
        with SessionStore(url) as store:
            versions = {v.number: v for v in store.versions(session_id, "acme")}
            for number, text in acknowledged.items():
                turn = versions[number].messages[-2:]
                assert turn == (
                    Message("user", text),
                    Message("assistant", f"reply to {text}"),
                )
            for version in versions.values():
                if version.parent is not None:
                    parent = versions[version.parent].messages
                    assert len(version.messages) == len(parent) + 2  # whole turns only
                    assert version.messages[: len(parent)] == parent
            assert store.verify(session_id).ok
        total += len(acknowledged)
    with SessionStore(url) as store:
        report = store.verify()
        assert report.ok and report.sessions == TRIALS
    assert total > TRIALS  # the kills landed while turns were being written
