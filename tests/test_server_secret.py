"""The server secret when many processes start at once on one empty home, as a vLLM
scheduler and its tensor-parallel workers do: every process gets the same 32 bytes, and
none ever reads a half-written file (a worker once failed with 'must hold 32 bytes,
found 0'). Real child processes, released together."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILDREN = 8
ROUNDS = 5
LOADER = """
import sys, time
from pathlib import Path
from kvfactory.server_secret import load_server_secret
home, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.0005)
print(load_server_secret(home, env={}).hex())
"""


def test_processes_starting_together_agree_on_one_whole_secret(tmp_path: Path) -> None:
    for round_ in range(ROUNDS):
        home, go = tmp_path / f"home{round_}", tmp_path / f"go{round_}"
        children = [
            subprocess.Popen(
                [sys.executable, "-c", LOADER, str(home), str(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(CHILDREN)
        ]
        go.touch()
        results = [child.communicate(timeout=120) for child in children]
        failed = [
            err for child, (_, err) in zip(children, results, strict=True) if child.returncode
        ]
        assert failed == []
        secrets = {out.strip() for out, _ in results}
        assert len(secrets) == 1 and len(bytes.fromhex(secrets.pop())) == 32
        assert [p.name for p in home.iterdir()] == ["server-secret"]  # no scratch left


SLOW_WRITER = """
import secrets, sys, time
from pathlib import Path
real_token_bytes = secrets.token_bytes
def slow_token_bytes(n):  # a preempted writer: a moment passes before the value is written
    time.sleep(1.0)
    return real_token_bytes(n)
secrets.token_bytes = slow_token_bytes
from kvfactory.server_secret import load_server_secret
print(load_server_secret(Path(sys.argv[1]), env={}).hex())
"""
EAGER_READER = """
import sys, time
from pathlib import Path
from kvfactory.server_secret import load_server_secret
home = Path(sys.argv[1])
while not (home / "server-secret").exists():  # starts the moment the file appears
    time.sleep(0.001)
print(load_server_secret(home, env={}).hex())
"""


def test_the_secret_file_never_appears_half_written(tmp_path: Path) -> None:
    """A process that finds the file while its creator is still writing it must read the
    whole value: the file may only appear complete."""
    home = tmp_path / "home"
    reader = subprocess.Popen(
        [sys.executable, "-c", EAGER_READER, str(home)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    writer = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(home)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    read_out, read_err = reader.communicate(timeout=120)
    written_out, written_err = writer.communicate(timeout=120)
    assert writer.returncode == 0, written_err
    assert reader.returncode == 0, read_err
    assert read_out == written_out and len(bytes.fromhex(read_out.strip())) == 32
