"""Pre-faulted host memory: KV-sized tensors allocated after the reserve do not fault.

Each case runs in a fresh interpreter (the reserve changes process-wide allocator settings)
and counts minor page faults (``ru_minflt``) while filling 180 MB of layer-shaped tensors.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvfactory.engines.host_memory import reserve_host_memory

PROBE = """
import json, logging, resource, sys
from kvfactory.engines.host_memory import reserve_and_report
logging.basicConfig(level=logging.INFO, format="%(message)s")
reserve = reserve_and_report(int(sys.argv[1]), "the probe")
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
layers = [torch.empty(1, 3, 4096, 64) for _ in range(60)]  # a 4k-token fp32 context
for layer in layers:
    layer.fill_(1.0)
print(json.dumps({"reserved": reserve.reserved_bytes, "reason": reserve.reason,
                  "faults": faults() - before}))
"""

PAGES_TOUCHED = 60 * 3 * 4096 * 64 * 4 // 4096


def _probe(reserve_bytes: int) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(reserve_bytes)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    result["log"] = out.stderr
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator knobs")
def test_tensors_after_the_reserve_reuse_mapped_pages() -> None:
    without = _probe(0)
    reserved = _probe(512 << 20)
    assert without["reserved"] == 0 and without["reason"] == "disabled"
    assert reserved["reserved"] == 512 << 20, reserved["reason"]
    assert isinstance(without["faults"], int) and isinstance(reserved["faults"], int)
    assert without["faults"] > PAGES_TOUCHED // 2  # fresh memory faults page by page
    assert reserved["faults"] < PAGES_TOUCHED // 20
    assert "pre-faulted 512 MiB of host memory for the probe" in str(reserved["log"])
    assert "host memory" not in str(without["log"])  # a reserve turned off says nothing


def test_a_zero_reserve_changes_nothing() -> None:
    reserve = reserve_host_memory(0)
    assert reserve.reserved_bytes == 0 and reserve.reason == "disabled"
