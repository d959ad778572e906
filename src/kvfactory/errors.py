"""The exception hierarchy of kvfactory, in one place.

::

    KVFactoryError                      base of everything raised on purpose
    ├── ConfigError                     invalid settings (flag, env, file)
    ├── StoreError                      context-store failures
    │   ├── BlockCorruptError           checksum/header mismatch on read (a miss + incident)
    │   ├── BlockFormatError            bytes that are not a kvfactory block at all
    │   └── TierUnavailableError        a tier cannot serve right now (e.g. remote down)
    ├── EngineError                     model loading and generation failures
    │   └── ModelLoadError              model missing, unreadable or unsupported
    └── RequestError                    the client asked for something invalid (HTTP 4xx)
        ├── InvalidRequestError         wrong types/values, bad sampling parameters (400)
        ├── ContextLengthExceededError  prompt + max_tokens beyond the model context (400)
        └── ModelNotFoundError          unknown model name (404)

``RequestError`` subclasses carry ``status_code``, ``code`` and ``param`` so the gateway
can render OpenAI's error shape without knowing each subclass.
"""

from __future__ import annotations


class KVFactoryError(Exception):
    """Base class of all kvfactory errors."""


class ConfigError(KVFactoryError):
    """Settings that cannot be used."""


class StoreError(KVFactoryError):
    """A context-store operation failed."""


class BlockCorruptError(StoreError):
    """A stored block failed its checksum or header check; treat it as a miss."""


class BlockFormatError(BlockCorruptError):
    """Bytes that do not decode as a kvfactory block (bad magic, truncated, wrong version)."""


class TierUnavailableError(StoreError):
    """A tier cannot serve now; callers fall back to other tiers or recompute."""


class EngineError(KVFactoryError):
    """The engine failed to load a model or to generate."""


class ModelLoadError(EngineError):
    """The model could not be found, converted or loaded."""


class RequestError(KVFactoryError):
    """A client request is invalid. Rendered as an OpenAI-shaped error by the gateway."""

    status_code: int = 400
    error_type: str = "invalid_request_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class InvalidRequestError(RequestError):
    """Wrong types or values in a request, including bad sampling parameters."""


class ContextLengthExceededError(RequestError):
    """The prompt (plus requested completion) does not fit the model's context window."""

    def __init__(self, *, prompt_tokens: int, max_tokens: int, context_window: int):
        message = (
            f"This model's maximum context length is {context_window} tokens. "
            f"However, you requested {prompt_tokens + max_tokens} tokens "
            f"({prompt_tokens} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion."
        )
        super().__init__(message, code="context_length_exceeded", param="messages")
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_window = context_window


class ModelNotFoundError(RequestError):
    """The requested model is not served here."""

    status_code = 404

    def __init__(self, model: str, available: list[str]):
        super().__init__(
            f"The model '{model}' does not exist. Available models: {', '.join(available)}",
            code="model_not_found",
            param="model",
        )
        self.model = model


__all__ = [
    "BlockCorruptError",
    "BlockFormatError",
    "ConfigError",
    "ContextLengthExceededError",
    "EngineError",
    "InvalidRequestError",
    "KVFactoryError",
    "ModelLoadError",
    "ModelNotFoundError",
    "RequestError",
    "StoreError",
    "TierUnavailableError",
]
