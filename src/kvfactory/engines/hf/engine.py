"""``HFEngine``: the embedded transformers engine with KV reuse through the context store.

It wires the pieces together: resolves and loads the model (``model_source``, ``runner``),
computes the fingerprint that roots every store key (``fingerprint``), builds the scheduler
(``scheduler``) and the store-facing reuse (``reuse``), and implements the gateway's
``kvfactory.engines.base.Engine`` protocol. Validation happens before a request is queued,
so a bad or over-long prompt or a full queue is an immediate error, never a broken stream.
It knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.metrics_core import Metric
from rich.console import Console

from kvfactory._types import ModelFingerprint
from kvfactory.config import Settings
from kvfactory.engines.base import ChatMessage, GenerationRequest, check_context
from kvfactory.engines.hf.chat_tokenizer import ChatTokenizer
from kvfactory.engines.hf.detokenize import TextStream
from kvfactory.engines.hf.fingerprint import (
    KVGeometry,
    build_fingerprint,
    fingerprint_cache_file,
)
from kvfactory.engines.hf.kv_blocks import BlockCodec, supports_block_reuse
from kvfactory.engines.hf.model_source import resolve_model_dir, validate_model_dir
from kvfactory.engines.hf.reuse import ContextStoreLike, PrefixReuse
from kvfactory.engines.hf.runner import ModelRunner, eos_token_ids, load_tokenizer_from
from kvfactory.engines.hf.runtime import (
    configure_threads,
    dtype_name,
    resolve_device,
    resolve_dtype,
)
from kvfactory.engines.hf.sampling import TokenSampler
from kvfactory.engines.hf.scheduler import Scheduler
from kvfactory.engines.hf.sequence import Sequence as EngineSequence
from kvfactory.engines.hf.stream import EventChannel, EventStream
from kvfactory.engines.host_memory import reserve_and_report
from kvfactory.engines.tenant_budgets import TenantStoreBudgets
from kvfactory.errors import ConfigError, InvalidRequestError
from kvfactory.store.keys import Namespace
from kvfactory.telemetry.incidents import IncidentLog
from kvfactory.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_TIMEOUT_S = 30.0


class HFEngine:
    """Transformers on CPU or CUDA, one scheduler thread, prefix reuse via the store."""

    def __init__(
        self,
        model_dir: Path,
        *,
        settings: Settings | None = None,
        store: ContextStoreLike | None = None,
        metrics: Metrics | None = None,
        incidents: IncidentLog | None = None,
        console: Console | None = None,
    ):
        settings = settings if settings is not None else Settings()
        model_dir = validate_model_dir(Path(model_dir).expanduser().resolve())
        if store is not None and store.chunk_tokens != settings.chunk_tokens:
            raise ConfigError(
                f"the store uses chunk_tokens={store.chunk_tokens} but settings say "
                f"{settings.chunk_tokens}"
            )
        self.settings = settings
        self.model_dir = model_dir
        self.metrics = metrics if metrics is not None else Metrics()
        self.incidents = incidents if incidents is not None else IncidentLog()
        self._model_name = settings.served_model_name or model_dir.name
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        configure_threads()
        self.tokenizer = load_tokenizer_from(model_dir)
        # Rust tokenizers are not safe to share between threads ("Already borrowed"): the
        # scheduler thread detokenizes with its own copy, callers share one behind a lock
        self._text = ChatTokenizer(self.tokenizer)
        self._stream_tokenizer = load_tokenizer_from(model_dir)
        self.runner = ModelRunner.load(model_dir, device=device, dtype=dtype, console=console)
        self._text.max_prompt_tokens = self.runner.context_window  # refuse huge text untokenized
        if device.type == "cpu":
            reserve_and_report(settings.host_reserve_bytes, "KV buffers")
        # NOTE: the fingerprint names the attention implementation the loaded model runs,
        # not the one asked for, so KV is never shared across a silent fallback.
        self.fingerprint: ModelFingerprint = build_fingerprint(
            model_dir,
            dtype=dtype_name(dtype),
            chunk_tokens=settings.chunk_tokens,
            attn_implementation=self.runner.attn_implementation,
            device_type=device.type,
            cache_file=fingerprint_cache_file(settings.models_dir, model_dir),
        )
        self.eos_ids = eos_token_ids(self.runner.model, self.tokenizer)
        self.reuse = self._make_reuse(store)
        self._store_budgets = (
            TenantStoreBudgets(store, settings.tenant_store_bytes)
            if self.reuse is not None and store is not None and settings.tenant_store_bytes
            else None
        )
        self.scheduler = Scheduler(
            self.runner,
            eos_ids=self.eos_ids,
            chunk_tokens=settings.chunk_tokens,
            exact_prefill=settings.exact_prefill,
            reuse=self.reuse,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            incidents=self.incidents,
            report_load=self._report_load,
        )
        log.info(
            "engine ready: model %s from %s, %s on %s, reuse %s",
            self._model_name,
            model_dir,
            dtype_name(dtype),
            device,
            "on" if self.reuse is not None else "off",
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        store: ContextStoreLike | None,
        metrics: Metrics,
        incidents: IncidentLog,
        console: Console | None = None,
    ) -> HFEngine:
        """Resolve the model (``settings.model`` or the converted default) and load it."""
        model_dir = resolve_model_dir(settings, console=console)
        return cls(
            model_dir,
            settings=settings,
            store=store,
            metrics=metrics,
            incidents=incidents,
            console=console,
        )

    def _make_reuse(self, store: ContextStoreLike | None) -> PrefixReuse | None:
        if store is None or not self.settings.reuse:
            return None
        if not supports_block_reuse(self.runner.new_cache()):
            log.warning("%s uses sliding-window attention: KV reuse is off", self._model_name)
            return None
        geometry = KVGeometry.from_model_dir(self.model_dir)
        codec = BlockCodec(geometry, self.settings.chunk_tokens, self.runner.dtype)
        return PrefixReuse(store, codec, self.incidents)

    def _report_load(self, running: int, waiting: int) -> None:
        self.metrics.serving.running.labels(model=self._model_name).set(running)
        self.metrics.serving.waiting.labels(model=self._model_name).set(waiting)

    # -- Engine protocol -----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def context_window(self) -> int:
        return self.runner.context_window

    def namespace_for(self, tenant: str = "default", tenant_salt: bytes = b"") -> Namespace:
        return Namespace.create(self.fingerprint, tenant_salt, tenant)

    def tokenize(self, text: str) -> list[int]:
        return self._text.tokenize(text)

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self._text.tokenize_chat(messages)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self._text.detokenize(token_ids)

    def _validate(self, request: GenerationRequest) -> None:
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        vocab = self.runner.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is outside this model's vocabulary [0, {vocab})", param="prompt"
            )
        check_context(len(prompt), request.sampling.max_tokens, self.context_window)

    def make_sequence(self, request: GenerationRequest) -> EngineSequence:
        """A fresh, unqueued sequence for ``request`` (validated by ``generate``)."""
        namespace = (
            self.namespace_for(request.tenant, request.tenant_salt)
            if self.reuse is not None
            else None
        )
        if namespace is not None and self._store_budgets is not None:
            self._store_budgets.register(namespace)  # before any of its blocks is stored
        return EngineSequence(
            request=request,
            channel=EventChannel(),
            sampler=TokenSampler(request.sampling),
            text=TextStream.create(
                self._stream_tokenizer, request.prompt_token_ids, request.sampling.stop
            ),
            namespace=namespace,
        )

    def generate(self, request: GenerationRequest) -> EventStream:
        """Validate and queue ``request``; raises ``ContextLengthExceededError``,
        ``InvalidRequestError`` or ``EngineOverloadedError`` before anything streams."""
        self._validate(request)
        seq = self.make_sequence(request)
        self.scheduler.submit(seq)
        scheduler = self.scheduler
        return EventStream(seq.channel, lambda: scheduler.abort(seq))

    async def start(self) -> None:
        self.scheduler.start()

    async def shutdown(self) -> None:
        """Stop the scheduler, then wait (bounded) for pending KV writes to reach the store."""
        await asyncio.to_thread(self.scheduler.stop)
        if self.reuse is not None:
            flushed = await asyncio.to_thread(self.reuse.close, SHUTDOWN_FLUSH_TIMEOUT_S)
            if not flushed:
                log.warning("some KV writes were still pending at shutdown")

    async def exported_metrics(self) -> list[Metric]:
        return []  # the store reports into the gateway's registry itself

    def health(self) -> dict[str, object]:
        alive = self.scheduler.alive
        return {
            "status": "ok" if alive else "stopped",
            "model": self._model_name,
            "model_dir": str(self.model_dir),
            "device": str(self.runner.device),
            "dtype": dtype_name(self.runner.dtype),
            "reuse": self.reuse is not None,
            "exact_prefill": self.settings.exact_prefill,
            "chunk_tokens": self.settings.chunk_tokens,
            "running": self.scheduler.running,
            "waiting": self.scheduler.waiting,
        }


__all__ = ["HFEngine"]
