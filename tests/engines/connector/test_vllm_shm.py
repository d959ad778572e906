"""The shm tier under stock vLLM (CPU build, real SmolLM2 weights): a restarted engine
reads its prefix from host RAM on tmpfs, even with every disk copy gone.

Two engine processes in turn on one store whose ``shm_dir`` is a private tmpfs folder: the
first runs each prompt twice (cold, then vLLM's own prefix cache: the reference); between
the two, every disk block file is deleted, which a disk-only store could not survive.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_vllm_connector import VLLM_MARKS
from vllm_harness import VLLMDriver, synthetic_prompt

from model_dir import default_model_dir

pytestmark = [
    *VLLM_MARKS,
    pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm tmpfs here"),
]

CHUNK = 256
PROMPTS = [synthetic_prompt(700, seed=31), synthetic_prompt(1100, seed=32)]


@pytest.fixture(scope="module")
def shm_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="kvf-test-shm-", dir="/dev/shm"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def options(root: Path, shm_dir: Path) -> dict[str, Any]:
    return {
        "model": str(default_model_dir()),
        "connector": "kvfactory",
        "block_size": 128,
        "store": {
            "home": str(root / "home"),
            "store_dir": str(root / "store"),
            "chunk_tokens": CHUNK,
            "shm_bytes": 1 << 30,
            "shm_dir": str(shm_dir),
        },
    }


def test_a_restarted_engine_reads_shm_with_the_disk_copies_gone(
    tmp_path: Path, shm_dir: Path
) -> None:
    config = options(tmp_path, shm_dir)
    with VLLMDriver(config, log_path=tmp_path / "first.log") as first:
        reference = []
        for prompt in PROMPTS:
            first.generate([prompt], 8)
            reply = first.generate([prompt], 8)  # vLLM's own prefix cache
            reference.append(list(reply["outputs"][0]["token_ids"]))
    disk_files = list((tmp_path / "store").rglob("*.kvb"))
    shm_files = list(shm_dir.rglob("*.kvb"))
    assert disk_files and len(shm_files) == len(disk_files)
    for path in disk_files:
        path.unlink()

    with VLLMDriver(config, log_path=tmp_path / "second.log") as second:
        for prompt, expected in zip(PROMPTS, reference, strict=True):
            reply = second.generate([prompt], 8)
            assert reply["outputs"][0]["num_cached_tokens"] == (len(prompt) - 1) // CHUNK * CHUNK
            assert list(reply["outputs"][0]["token_ids"]) == expected
        assert second.counters()["load_errors"] == 0
