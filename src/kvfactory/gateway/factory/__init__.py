"""The factory gateway: one OpenAI-compatible front over many backends.

``config`` reads ``factory.toml``; ``backends`` holds one pooled client per upstream;
``routing`` orders candidates (KV affinity, load, health, cost, energy); ``health`` is the
circuit breaker; ``dispatch`` sends with fallbacks, degradation and stream relaying;
``canary`` checks answers against baselines; ``app`` is the HTTP face; ``commands`` adds
``kvfactory gateway`` and ``kvfactory incidents``. Like the rest of ``gateway`` it imports
``engines.base`` at most, never a concrete engine.
"""

from kvfactory.gateway.factory.app import create_factory_app
from kvfactory.gateway.factory.config import FactoryConfig, load_config

__all__ = ["FactoryConfig", "create_factory_app", "load_config"]
