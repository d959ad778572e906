"""Where a prompt's prefix probably lives: chained chunk digests -> the backend that served them.

A prompt's text is cut into fixed-size chunks; the digest of chunk *i* is
``blake3(domain + digest[i-1] + chunk_i)`` rooted at the tenant's namespace (its isolation
salt) and the public model name, the same chaining
as the context store's block keys (``store.keys``), so digest *i* names chunk *i* and its
whole prefix. Only full chunks get digests. The gateway never tokenises (it fronts remote
backends with different tokenizers), so chunks are characters, not tokens: what matters is
that equal prefixes give equal digests. ``PrefixIndex`` remembers, in a bounded LRU, which
backend last served each digest and whether that backend reported cached tokens for it
(``usage.prompt_tokens_details.cached_tokens``). Because every tenant's digests have their
own root, the table is in effect one per tenant: a tenant guessing another's prompt
matches nothing and is routed exactly like any cold prompt (the KV affinity side channel
of a shared table). It knows nothing about load or health.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

DOMAIN = b"kvfactory/gateway-affinity/v1\0"
UNCONFIRMED_WEIGHT = 0.5
"""A prefix a backend served but never reported hits for may have been evicted or never
stored there; it counts half as much as one with reported cached tokens."""


def prefix_digests(
    model: str, text: str, chunk_chars: int, *, namespace: bytes = b""
) -> tuple[bytes, ...]:
    """Chained digests of the full ``chunk_chars`` chunks of ``text`` under ``model``,
    rooted at ``namespace`` (the tenant's isolation salt: one tenant's prompts never match
    another's entries, so where a prefix lives cannot be probed across tenants)."""
    data = text.encode("utf-8", errors="surrogatepass")
    chunk_bytes = chunk_chars  # bytes, so multi-byte text cannot split differently
    root = len(namespace).to_bytes(4, "big") + namespace + model.encode()
    parent = blake3.blake3(DOMAIN + root).digest()
    digests = []
    for start in range(0, len(data) - chunk_bytes + 1, chunk_bytes):
        parent = blake3.blake3(DOMAIN + parent + data[start : start + chunk_bytes]).digest()
        digests.append(parent)
    return tuple(digests)


@dataclass(slots=True)
class _Entry:
    backend: str
    confirmed: bool


class PrefixIndex:
    """Bounded LRU of prefix digest -> backend; one event loop, no locking needed."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def affinity(self, digests: Sequence[bytes]) -> dict[str, float]:
        """Per backend, the weighted fraction of the prompt's chunks it holds as a prefix.

        Digest *i* present on a backend means chunks 0..i were served there, so the deepest
        match per backend is what counts."""
        if not digests:
            return {}
        depth: dict[str, float] = {}
        for i, digest in enumerate(digests):
            entry = self._entries.get(digest)
            if entry is None:
                continue
            self._entries.move_to_end(digest)
            weight = 1.0 if entry.confirmed else UNCONFIRMED_WEIGHT
            depth[entry.backend] = max(depth.get(entry.backend, 0.0), (i + 1) * weight)
        return {name: value / len(digests) for name, value in depth.items()}

    def remember(self, digests: Sequence[bytes], backend: str, *, cached_tokens: int) -> None:
        """``backend`` served a prompt with these digests; ``cached_tokens`` it reported."""
        confirmed = cached_tokens > 0
        for digest in digests:
            old = self._entries.get(digest)
            keep_confirmed = old is not None and old.backend == backend and old.confirmed
            self._entries[digest] = _Entry(backend, confirmed or keep_confirmed)
            self._entries.move_to_end(digest)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)


__all__ = ["UNCONFIRMED_WEIGHT", "PrefixIndex", "prefix_digests"]
