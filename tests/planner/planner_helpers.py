"""Planner test helpers: tiny hand-written traces and the shared Mooncake trace's path."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kvfactory.planner.trace import Trace, TraceRequest

BLOCK = 512
SHARED_TRACE = Path(__file__).resolve().parents[2] / "data/traces/mooncake_synthetic_trace.jsonl"


def make_trace(chains: Sequence[Sequence[int]], extra_tokens: Sequence[int] | None = None) -> Trace:
    """One request per chain of ids; every block full, plus optional uncached tail tokens."""
    extra = extra_tokens or [0] * len(chains)
    requests = tuple(
        TraceRequest(
            timestamp_ms=float(i),
            input_length=BLOCK * len(ids) + tail,
            output_length=1,
            hash_ids=tuple(ids) + ((10_000 + i,) if tail else ()),
        )
        for i, (ids, tail) in enumerate(zip(chains, extra, strict=True))
    )
    return Trace(requests, BLOCK, "test")


def write_jsonl(path: Path, trace: Trace) -> Path:
    lines = [
        json.dumps(
            {
                "timestamp": r.timestamp_ms,
                "input_length": r.input_length,
                "output_length": r.output_length,
                "hash_ids": list(r.hash_ids),
            }
        )
        for r in trace.requests
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
