"""``kvfactory.store`` imports and works with torch, transformers, FastAPI and vLLM absent."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys
    from pathlib import Path

    BLOCKED = {"torch", "transformers", "fastapi", "vllm"}

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Absent())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker does not work")

    from kvfactory._types import ModelFingerprint
    from kvfactory.store import (
        BlockHeader, BlockMac, ContextStore, DiskTier, KVBlock, MemoryTier, Namespace, chunk_keys,
    )

    fingerprint = ModelFingerprint("w", "t", "layout", "float32", 16)
    namespace = Namespace.create(fingerprint, b"salt")
    tokens = list(range(40))
    keys = chunk_keys(tokens, namespace)
    blocks = [
        KVBlock(
            BlockHeader("float32", (8,), namespace.id, key, namespace.id if i == 0 else keys[i - 1], i, 16),
            key,
        )
        for i, key in enumerate(keys)
    ]
    directory = Path(sys.argv[1])
    mac = BlockMac.from_secret(b"test")
    with ContextStore([MemoryTier(1 << 20), DiskTier(directory, 1 << 20)], mac=mac, chunk_tokens=16) as store:
        store.put_many(blocks)
    with ContextStore([MemoryTier(1 << 20), DiskTier(directory, 1 << 20)], mac=mac, chunk_tokens=16) as store:
        result = store.lookup(tokens, namespace)
        loaded = store.load(result)
    assert [h.tier for h in result.hits] == ["disk", "disk"], result
    assert [bytes(b.payload) for b in loaded] == keys
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("round trip ok")
    """
)


def test_store_round_trip_without_heavy_dependencies(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "disk")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round trip ok" in done.stdout
