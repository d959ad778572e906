"""Appends turns to one session forever, printing ``ACK <version> <text>`` after each
commit returns; the crash test SIGKILLs it at random moments. Not a test module."""

from __future__ import annotations

import sys

from kvfactory.sessions.model import Message
from kvfactory.sessions.store import SessionStore


def main(url: str, session_id: str, trial: int) -> None:
    with SessionStore(url) as store:
        n = 0
        while True:
            text = f"trial {trial} turn {n}"
            version = store.append(
                session_id,
                "acme",
                [Message("user", text), Message("assistant", f"reply to {text}")],
            )
            sys.stdout.write(f"ACK {version.number} {text}\n")
            sys.stdout.flush()
            n += 1


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
