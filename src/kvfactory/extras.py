"""Optional parts of kvfactory, imported only where they are used.

``make serve`` installs the core and the ``engines`` and ``server`` extras; everything else
(Redis/Valkey, PostgreSQL, the benchmark client and charts, NVML, encryption at rest) is
an extra of its own; vLLM runs from its own environment (``make vllm``), never imported by
this process.
No module that the CLI imports at start-up may import one of them at module level: a
command that needs one calls ``require`` when it runs, so ``kvfactory --help`` and
``kvfactory serve`` work with only what ``make serve`` installed, and a missing extra is one
line naming what to install (``ConfigError``: exit code 2 on the CLI) instead of a
traceback half-way through start-up. ``tests/test_extras.py`` runs every command with each
of these packages made unimportable, so a new top-level import of one fails a test.

``EXTRAS`` maps each optional top-level module to its extra; pyproject.toml is the source
of truth for what each extra installs.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from kvfactory.errors import ConfigError

EXTRAS: dict[str, str] = {
    "redis": "redis",
    "psycopg": "postgres",
    "openai": "bench",
    "matplotlib": "bench",
    "pynvml": "nvml",
    "cryptography": "encryption",
}
"""Optional top-level module -> the extra that installs it."""


class MissingExtraError(ConfigError):
    """A feature was used whose optional package is not installed."""

    def __init__(self, feature: str, module: str) -> None:
        self.feature = feature
        self.module = module
        self.extra = EXTRAS[module]
        super().__init__(f"{feature} needs: pip install 'kvfactory[{self.extra}]'")


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (a dotted name under one of ``EXTRAS``) for ``feature``.

    NOTE: only a missing *optional* package becomes ``MissingExtraError``; an import error
    inside an installed package (a broken install, a missing transitive dependency) is
    raised as it is, because "pip install the extra" would not fix it.
    """
    top = module.split(".", 1)[0]
    if top not in EXTRAS:
        raise ValueError(f"{top!r} is not an optional package of kvfactory")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".", 1)[0] == top:
            raise MissingExtraError(feature, top) from exc
        raise


def pyplot(feature: str = "PNG charts") -> Any:
    """matplotlib's ``pyplot`` on the non-interactive Agg backend."""
    matplotlib = require("matplotlib", feature)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", feature)


__all__ = ["EXTRAS", "MissingExtraError", "pyplot", "require"]
