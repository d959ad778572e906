"""Mooncake-format request traces, and the block-key chains the simulator replays.

A trace is JSON Lines, one request a line: ``timestamp`` (ms), ``input_length`` and
``output_length`` (tokens) and ``hash_ids``: one id per ``block_tokens``-token block of the
input (512 in the Mooncake release), equal ids meaning identical blocks.

Keys: the store names a chunk by its whole prefix, so block *i* of a request gets the key
``blake2b(key[i-1] + id[i])`` (``key[-1]`` is a fixed root). A shared id then only matches
under the same prefix, whatever the trace's id scheme. The Mooncake synthetic trace is
already prefix-chained (every id occurs at one position under one parent; see
``check_prefix_chains``), so chaining changes nothing there, but it keeps other traces honest.

Only full blocks are cacheable by default, as in the store (``kvfactory.store.keys``: only
full chunks get keys); ``cache_partial_blocks=True`` also caches a request's trailing
partial block, which is how the trace's README counts its 65.1% unbounded ceiling.
This module knows nothing about tiers, policies or costs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvfactory._types import BlockKey
from kvfactory.errors import ConfigError

MOONCAKE_BLOCK_TOKENS = 512
ROOT_KEY = bytes(32)
"""Parent of every chain's first block (one namespace: the trace has one model, one tenant)."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One line of a Mooncake trace."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ChainedRequest:
    """A request as the store sees it: its cacheable blocks' keys, parents and token counts.

    ``input_tokens`` may exceed ``sum(block_tokens)``: tokens outside cacheable blocks are
    always recomputed.
    """

    index: int
    timestamp_ms: float
    input_tokens: int
    keys: tuple[BlockKey, ...]
    parents: tuple[bytes, ...]
    block_tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """Whether a trace's ids already encode their prefix (each id: one position, one parent)."""

    unique_ids: int
    ids_at_several_positions: int
    ids_with_several_parents: int

    @property
    def prefix_chained(self) -> bool:
        return self.ids_at_several_positions == 0 and self.ids_with_several_parents == 0


@dataclass(frozen=True, slots=True)
class Trace:
    """A loaded trace; ``source`` names where it came from, for reports."""

    requests: tuple[TraceRequest, ...]
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    source: str = "<memory>"

    @property
    def input_tokens(self) -> int:
        return sum(r.input_length for r in self.requests)

    @property
    def unique_blocks(self) -> int:
        """Distinct block ids in the trace (its working set at block granularity)."""
        return len({block for r in self.requests for block in r.hash_ids})

    def head(self, count: int) -> Trace:
        return Trace(self.requests[:count], self.block_tokens, f"{self.source}[:{count}]")


def _block_key(parent: bytes, block_id: int) -> BlockKey:
    digest = hashlib.blake2b(parent, digest_size=32)
    digest.update(block_id.to_bytes(8, "little"))
    return BlockKey(digest.digest())


def chain_requests(trace: Trace, *, cache_partial_blocks: bool = False) -> list[ChainedRequest]:
    """Per-request key chains; see the module docstring for the key and partial-block rules."""
    size = trace.block_tokens
    chained: list[ChainedRequest] = []
    for index, request in enumerate(trace.requests):
        length = request.input_length
        cacheable = -(-length // size) if cache_partial_blocks else length // size
        ids = request.hash_ids[: min(cacheable, len(request.hash_ids))]
        keys: list[BlockKey] = []
        parents: list[bytes] = []
        tokens: list[int] = []
        parent = ROOT_KEY
        for position, block_id in enumerate(ids):
            key = _block_key(parent, block_id)
            keys.append(key)
            parents.append(parent)
            tokens.append(min(size, length - position * size))
            parent = key
        chained.append(
            ChainedRequest(
                index, request.timestamp_ms, length, tuple(keys), tuple(parents), tuple(tokens)
            )
        )
    return chained


def unique_keys(requests: Iterable[ChainedRequest]) -> int:
    """Distinct cacheable blocks (chained keys) over ``requests``."""
    return len({key for r in requests for key in r.keys})


def check_prefix_chains(trace: Trace) -> ChainCheck:
    """Count ids that occur at more than one position or under more than one parent."""
    positions: dict[int, int] = {}
    parents: dict[int, int] = {}
    several_positions: set[int] = set()
    several_parents: set[int] = set()
    for request in trace.requests:
        previous = -1
        for position, block_id in enumerate(request.hash_ids):
            if positions.setdefault(block_id, position) != position:
                several_positions.add(block_id)
            if parents.setdefault(block_id, previous) != previous:
                several_parents.add(block_id)
            previous = block_id
    return ChainCheck(len(positions), len(several_positions), len(several_parents))


def _int_field(record: dict[str, Any], name: str, where: str) -> int:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {name!r} must be a non-negative integer, got {value!r}")
    return value


def parse_request(record: object, where: str) -> TraceRequest:
    """Validate one decoded JSON line; ``where`` prefixes error messages."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    timestamp = record.get("timestamp", 0)
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise ConfigError(f"{where}: 'timestamp' must be a number, got {timestamp!r}")
    hash_ids = record.get("hash_ids")
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hash_ids
    ):
        raise ConfigError(f"{where}: 'hash_ids' must be a list of non-negative integers")
    return TraceRequest(
        timestamp_ms=float(timestamp),
        input_length=_int_field(record, "input_length", where),
        output_length=_int_field(record, "output_length", where),
        hash_ids=tuple(hash_ids),
    )


def parse_lines(
    lines: Sequence[str], *, block_tokens: int = MOONCAKE_BLOCK_TOKENS, source: str = "<memory>"
) -> Trace:
    """A trace from JSONL text lines; blank lines are skipped, bad ones name their number."""
    if block_tokens <= 0:
        raise ConfigError(f"block_tokens must be positive, got {block_tokens}")
    requests: list[TraceRequest] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from exc
        requests.append(parse_request(record, where))
    if not requests:
        raise ConfigError(f"{source}: the trace holds no requests")
    return Trace(tuple(requests), block_tokens, source)


def load_trace(
    path: Path | str, *, limit: int | None = None, block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> Trace:
    """Read a Mooncake JSONL trace, optionally only its first ``limit`` requests."""
    path = Path(path)
    if limit is not None and limit <= 0:
        raise ConfigError(f"limit must be positive, got {limit}")
    try:
        with path.open(encoding="utf-8") as handle:
            lines: list[str] = []
            requests = 0
            for line in handle:
                lines.append(line)  # blank ones too, so error messages keep line numbers
                requests += bool(line.strip())
                if limit is not None and requests >= limit:
                    break
    except FileNotFoundError as exc:
        raise ConfigError(f"trace file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read trace {path}: {exc}") from exc
    return parse_lines(lines, block_tokens=block_tokens, source=str(path))


__all__ = [
    "MOONCAKE_BLOCK_TOKENS",
    "ROOT_KEY",
    "ChainCheck",
    "ChainedRequest",
    "Trace",
    "TraceRequest",
    "chain_requests",
    "check_prefix_chains",
    "load_trace",
    "parse_lines",
    "parse_request",
    "unique_keys",
]
