"""Requests the gateway can tell are built to break a backend, before any backend sees them.

``suspicion(body)`` names the first value in a generation request that no sane client
sends and that is known to crash backends instead of being refused by them: an integer
outside the signed 64-bit range (``"seed": 2**64`` overflowed a sampler and came back as
an HTTP 500), or a non-finite number (Python's JSON reader accepts ``NaN`` and
``Infinity``). Such a request is still forwarded (a backend may accept it), but whatever
failure it meets is the request's fault: the dispatcher never counts it against a backend,
never records an incident for it and never tries it on another backend (``failures``).
This module only inspects values; it does not know backends or HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_NODES = 100_000
"""Walking stops here (a body this large is not refused, only not inspected further)."""


def suspicion(body: Mapping[str, Any]) -> str | None:
    """Why ``body`` looks hostile (``"seed is outside the 64-bit integer range"``), or
    ``None``. Strings are not inspected (prompts may say anything)."""
    stack: list[tuple[str, Any]] = [(str(k), v) for k, v in body.items()]
    seen = 0
    while stack and seen < MAX_NODES:
        where, value = stack.pop()
        seen += 1
        if isinstance(value, bool | str) or value is None:
            continue
        if isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                return f"{where} is outside the 64-bit integer range"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return f"{where} is not a finite number"
        elif isinstance(value, Mapping):
            stack.extend((f"{where}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
    return None


__all__ = ["INT64_MAX", "INT64_MIN", "suspicion"]
