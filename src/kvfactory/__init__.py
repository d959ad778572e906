"""kvfactory: stateful LLM inference with the KV cache as managed, persistent context memory.

The package is layered (see DESIGN.md): ``_types``, ``errors`` and ``config`` are the base;
``telemetry`` and ``store`` sit on them; ``engines`` produce KV; ``gateway`` serves HTTP.
"""

from kvfactory.errors import KVFactoryError

__all__ = ["KVFactoryError", "__version__"]

__version__ = "0.1.0"
