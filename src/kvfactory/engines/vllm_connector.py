"""``KVFactoryConnector``: stock vLLM (v1) reads and writes KV through the context store.

Load it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVFactoryConnector",
      "kv_connector_module_path": "kvfactory.engines.vllm_connector",
      "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
      "kv_connector_extra_config": {"store_dir": "...", "chunk_tokens": 256}}'

``kv_connector_extra_config`` takes ``kvfactory.config.Settings`` fields (``home``,
``store_dir``, ``memory_bytes``, ``disk_bytes``, ``chunk_tokens``, ``eviction``,
``admission``, ``remote_url``, ``host_reserve_bytes``; ``KVFACTORY_*`` variables apply
too) plus
``save_generated`` (default true: generated tokens' chunks are stored as well, as vLLM's
own prefix cache does).

Scheduler side (``plan.TransferPlanner``): ``get_num_new_matched_tokens`` is a
``ContextStore.lookup`` of the prompt under the request's namespace (model fingerprint +
``cache_salt``), in whole store chunks beyond vLLM's local prefix-cache hit;
``update_state_after_alloc`` turns a granted hit into a load of the allocated blocks;
``build_connector_meta`` sends the loads and the chunks that become fully computed this
step (and the requests whose failed load vLLM now recomputes). Worker side:
``start_load_kv`` reads and verifies every block of the step's loads and copies them into
the paged tensors before the forward starts (on the CPU without promoting them into the
store's memory tier: vLLM's KV space holds them). On the CPU the copy shares the cores the
forward would use; copying layer by layer on a thread under the forward, and verifying
checksums behind the copy, were both measured slower here than this synchronous load. A
block that fails its checksum or is gone is reported by ``get_block_ids_with_load_errors``
and vLLM recomputes it (``kv_load_failure_policy: recompute``; with vLLM's default
``fail`` the request fails instead), and the request's saves are skipped until the
scheduler reports it recovered, so nothing computed over the bad block is stored; the
recomputed chunks are then saved again — never wrong output, never a wrong stored block.
``wait_for_save`` copies the step's newly complete chunks out of the paged
tensors into the store right after the forward; the store writes them through to disk and
remote tiers on its own bounded background queue, so no vLLM block is held after the step
and ``get_finished`` never has requests to report.

Roles: ``kv_both`` loads and saves. A ``kv_producer`` (a prefill instance) only saves, and
its step ends once the saves have reached the store's lasting tiers, so the decode
instance a proxy calls next finds them; a ``kv_consumer`` (a decode instance) only loads.
Through a shared disk, shm or remote tier that is prefill/decode disaggregation without a
transfer engine.

Tensor parallelism: each worker holds only its KV heads, so each rank saves and loads its
own part of every chunk, under its own namespace (``identity``); the scheduler keeps one
planner per rank and offers a chunk only when every rank's part is stored. The workers
are separate processes then, each with its own store on the same directories and a
``1/tp`` share of each budget; the scheduler sees their blocks through the disk (and shm)
tier, which processes share. A rank whose load failed computed the step over wrong KV for
its heads, and the all-reduce after attention carried that into every rank's activations,
so the workers agree (one all-reduce over the TP group, in steps that load) that no rank
saves what that step computed for the request. Pipeline and context parallelism are
refused.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvfactory._types import BlockKey, NamespaceId
from kvfactory.config import Settings, load_settings
from kvfactory.engines.host_memory import reserve_and_report
from kvfactory.engines.vllm_kv import shared_store
from kvfactory.engines.vllm_kv.identity import (
    SaltNamespaces,
    VLLMModelIdentity,
    shard_fingerprints,
)
from kvfactory.engines.vllm_kv.paged import PagedKV, dtype_name
from kvfactory.engines.vllm_kv.parallel import tensor_parallel_size, worker_share
from kvfactory.engines.vllm_kv.plan import LoadSpec, SaveSpec, TransferPlanner
from kvfactory.engines.vllm_kv.prom_stats import KVFactoryConnectorStats, KVFactoryPromMetrics
from kvfactory.errors import ConfigError
from kvfactory.store.codec import BlockHeader, KVBlock

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvfactory.vllm")

CONNECTOR_OPTIONS = frozenset({"save_generated"})
HAND_OFF_TIMEOUT_S = 30.0
"""How long a ``kv_producer``'s step waits for its saves to reach the lasting tiers."""


class KVFactoryConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """What the scheduler tells the workers for one step."""

    def __init__(self, loads: list[LoadSpec], saves: list[SaveSpec], recovered: list[str]) -> None:
        self.loads = loads
        self.saves = saves
        self.recovered = recovered
        """Requests whose failed load the scheduler has seen (vLLM recomputes them from
        this step on), so their saves are trusted again."""


def connector_settings(extra: dict[str, Any]) -> Settings:
    fields = {k: v for k, v in extra.items() if k in Settings.model_fields}
    unknown = set(extra) - set(fields) - CONNECTOR_OPTIONS
    if unknown:
        raise ConfigError(f"unknown kv_connector_extra_config keys: {', '.join(sorted(unknown))}")
    return load_settings(fields)


def model_identity(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> VLLMModelIdentity:
    import vllm

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(
            f"KVFactoryConnector supports one KV cache group, this model has {len(groups)}"
        )
    spec: Any = groups[0].kv_cache_spec
    model_config = vllm_config.model_config
    return VLLMModelIdentity(
        model=str(model_config.model),
        revision=model_config.revision,
        tokenizer=str(model_config.tokenizer) if model_config.tokenizer else None,
        device_type=str(vllm_config.device_config.device_type),
        vllm_version=str(vllm.__version__),
        block_size=int(spec.block_size),
        num_kv_heads=int(spec.num_kv_heads),
        head_size=int(spec.head_size),
        num_layers=len(groups[0].layer_names),
        kv_dtype=dtype_name(spec.dtype),
    )


class KVFactoryConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """vLLM v1 KV connector backed by kvfactory's ``ContextStore``."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._tp_size = tensor_parallel_size(vllm_config.parallel_config)
        worker = role == KVConnectorRole.WORKER
        self._shard = _tensor_parallel_rank() if worker and self._tp_size > 1 else 0
        """This worker's rank: the part of each block it saves and loads."""
        transfer = self._kv_transfer_config
        self._loads = bool(transfer.is_kv_consumer)
        self._saves = bool(transfer.is_kv_producer)
        self._hand_off = self._saves and not self._loads
        """A prefill instance: saves are written through before its step ends."""
        extra = dict(transfer.kv_connector_extra_config or {})
        # with TP the workers are processes of their own, each with a store; with one
        # worker it shares the scheduler's process and store
        settings = connector_settings(extra)
        self._settings = worker_share(settings, self._tp_size) if worker else settings
        if getattr(self._kv_transfer_config, "kv_load_failure_policy", "fail") != "recompute":
            log.warning(
                "kv_load_failure_policy is not 'recompute': a corrupt stored block will "
                "fail its request instead of being recomputed"
            )
        self._identity = model_identity(vllm_config, kv_cache_config)
        self._block_size = self._identity.block_size
        self._store, self._incidents = shared_store.acquire(self._settings)
        self._released = False
        if self._tp_size > 1 and not any(t.outlives_process for t in self._store.tiers):
            log.warning(
                "tensor parallel workers save into their own processes' memory tiers, which "
                "the scheduler cannot see: give the store a disk, shm or remote tier"
            )
        fingerprints = shard_fingerprints(
            self._identity,
            chunk_tokens=self._store.chunk_tokens,
            home=self._settings.home,
            shards=self._tp_size,
        )
        self._blocks_per_chunk = self._store.chunk_tokens // self._block_size
        # scheduler side: per rank, the namespaces of its parts and their planner
        self._namespaces = tuple(SaltNamespaces(f) for f in fingerprints)
        self._planners = tuple(
            TransferPlanner(
                self._store,
                block_size=self._block_size,
                save_generated=bool(extra.get("save_generated", True)),
                shard=rank,
            )
            for rank in range(self._tp_size)
        )
        self._requests: dict[str, Request] = {}
        self._pending_loads: list[LoadSpec] = []
        self._recovered: list[str] = []
        # worker side
        self._paged: PagedKV | None = None
        self._load_errors: set[int] = set()
        self._tainted: set[str] = set()
        """Requests whose load failed: KV computed over it is not saved until vLLM has
        recomputed (the scheduler says so through ``recovered``)."""
        self.counters = {"hit_tokens": 0, "loaded_chunks": 0, "saved_chunks": 0, "load_errors": 0}
        log.info(
            "kvfactory connector (%s) on store %s, chunk %d tokens, layout %s",
            role.name.lower(),
            self._settings.resolved_store_dir,
            self._store.chunk_tokens,
            fingerprints[self._shard].kv_layout,
        )

    # -- scheduler side -------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        prompt = list(request.prompt_token_ids or [])
        self._requests[request.request_id] = request
        # every rank's part must be stored for a chunk to be offered
        matched = min(
            planner.matched_tokens(
                request.request_id, prompt, names.for_salt(request.cache_salt), num_computed_tokens
            )
            for planner, names in zip(self._planners, self._namespaces, strict=True)
        )
        if not self._loads:
            return 0, False  # a producer: tracked for its saves only
        if matched:
            log.debug("request %s: %d tokens from the store", request.request_id, matched)
        return matched, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        block_ids = blocks.get_block_ids()[0]
        loads = []
        for planner in self._planners:
            planner.allocated(request.request_id, num_external_tokens)
            spec = planner.take_load(request.request_id, block_ids)
            if spec is not None:
                loads.append(spec)
        if loads:
            self.counters["hit_tokens"] += num_external_tokens
            self._pending_loads += loads

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        saves = self._saves_this_step(scheduler_output) if self._saves else []
        loads, self._pending_loads = self._pending_loads, []
        recovered, self._recovered = self._recovered, []
        return KVFactoryConnectorMetadata(loads, saves, recovered)

    def _saves_this_step(self, scheduler_output: SchedulerOutput) -> list[SaveSpec]:
        saves: list[SaveSpec] = []
        scheduled = scheduler_output.num_scheduled_tokens
        progress = [
            (new.req_id, new.num_computed_tokens) for new in scheduler_output.scheduled_new_reqs
        ]
        cached = scheduler_output.scheduled_cached_reqs
        progress += list(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        for req_id, computed in progress:
            request = self._requests.get(req_id)
            if request is None or self._kv_cache_manager is None:
                continue
            block_ids = self._kv_cache_manager.get_block_ids(req_id)[0]
            for planner in self._planners:
                spec = planner.take_save(
                    req_id,
                    request.all_token_ids,
                    computed + scheduled.get(req_id, 0),
                    request.num_prompt_tokens,
                    block_ids,
                )
                if spec is not None:
                    saves.append(spec)
        return saves

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        invalid = connector_output.invalid_block_ids
        if invalid:
            failed = [r for planner in self._planners for r in planner.loads_failed(set(invalid))]
            self._recovered += dict.fromkeys(failed)  # each request once, in order

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        for planner in self._planners:
            planner.finished(request.request_id)
        self._requests.pop(request.request_id, None)
        return False, None

    # -- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._paged = PagedKV.from_vllm(kv_caches, self._kv_cache_config.num_blocks)
        log.info(
            "kvfactory connector: %d KV layers, %s, %s",
            len(self._paged.tensors),
            self._paged.describe(),
            self._paged.dtype,
        )
        # after vLLM allocated its KV tensors, so the reserve is left for block payloads
        reserve_and_report(self._settings.host_reserve_bytes, "kvfactory connector blocks")

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, KVFactoryConnectorMetadata)
        self._tainted.difference_update(metadata.recovered)
        for spec in metadata.loads:
            if spec.shard == self._shard:
                self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        paged = self._require_paged()
        keys: list[BlockKey] = [chunk.key for chunk in spec.chunks]
        # vLLM's KV space is the fastest tier here; on the CPU it is host memory already, so
        # a promoted copy in the memory tier would double the host footprint and, growing the
        # heap past the pre-faulted reserve, cost a page fault per 4 KiB of every later load
        # (~0.8 s per 4k-token prompt measured); a copy in the shm tier serves the next
        # restart instead. On a GPU, host memory is a tier below HBM: promote everywhere.
        blocks = self._store.load(keys, promote=True if paged.device.type != "cpu" else "lasting")
        expected = paged.chunk_shape(self._blocks_per_chunk)
        kind = dtype_name(paged.dtype)
        good: list[torch.Tensor] = []
        for block in blocks:
            if block.header.shape != expected or block.header.dtype != kind:
                log.warning("stored block %s has another layout; recomputing", block.key.hex())
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only buffer, only read
                raw = torch.frombuffer(block.payload, dtype=torch.uint8)
            good.append(raw.view(paged.dtype).view(expected))
        loaded = len(good)
        targets = spec.target_block_ids
        written = 0
        for position, data in enumerate(good):
            # chunk by chunk straight into the paged tensors: no staging copy of the prefix
            skip = spec.skip_blocks if position == 0 else 0
            count = self._blocks_per_chunk - skip
            paged.scatter(targets[written : written + count], data[:, skip:])
            written += count
        if loaded < len(spec.chunks):
            self._load_errors.update(targets[written:])
            self._tainted.add(spec.request_id)
            self.counters["load_errors"] += len(spec.chunks) - loaded
        self.counters["loaded_chunks"] += loaded

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv has already written every layer

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # wait_for_save copies whole chunks once all layers are written

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, KVFactoryConnectorMetadata)
        if self._tp_size > 1 and metadata.loads:
            self._agree_on_failed_loads(metadata.loads)
        saved = False
        for spec in metadata.saves:
            if spec.shard != self._shard:
                continue
            if spec.request_id in self._tainted:
                log.info("request %s: not saving KV computed over a failed load", spec.request_id)
                continue
            self._save(spec)
            saved = True
        if saved and self._hand_off and not self._store.flush(HAND_OFF_TIMEOUT_S):
            log.warning(
                "kv_producer: saves not written through within %.0f s; the decode instance "
                "may recompute them",
                HAND_OFF_TIMEOUT_S,
            )

    def _agree_on_failed_loads(self, loads: list[LoadSpec]) -> None:
        """Taint, on every rank, the requests whose load failed on any rank this step.

        Every rank gets the same metadata, so all of them reach this collective together."""
        from vllm.distributed.parallel_state import get_tp_group

        requests = sorted({spec.request_id for spec in loads})
        failed = torch.tensor([r in self._tainted for r in requests], dtype=torch.int32)
        torch.distributed.all_reduce(
            failed, op=torch.distributed.ReduceOp.MAX, group=get_tp_group().cpu_group
        )
        self._tainted.update(r for r, flag in zip(requests, failed.tolist(), strict=True) if flag)

    def _save(self, spec: SaveSpec) -> None:
        paged = self._require_paged()
        block_ids = [b for chunk in spec.chunks for b in chunk.block_ids]
        data = paged.gather(block_ids)
        per = self._blocks_per_chunk
        shape = paged.chunk_shape(per)
        kind = dtype_name(paged.dtype)
        for position, chunk in enumerate(spec.chunks):
            piece = data[:, position * per : (position + 1) * per].contiguous()
            header = BlockHeader(
                dtype=kind,
                shape=shape,
                namespace=NamespaceId(spec.namespace),
                key=chunk.key,
                parent=chunk.parent,
                chunk_index=chunk.chunk_index,
                num_tokens=self._store.chunk_tokens,
            )
            payload = piece.view(torch.uint8).numpy().tobytes()
            self._store.put(KVBlock(header, payload))
        self.counters["saved_chunks"] += len(spec.chunks)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None  # saves copy out within the step; see the module docstring

    # -- metrics (both sides) ------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """The store's metrics since the last report; vLLM's API server records them
        (``build_prom_metrics``), so its ``/metrics`` shows this process's store."""
        data = shared_store.report(self._store)
        return None if data is None else KVFactoryConnectorStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return KVFactoryConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[Any], type[Any]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVFactoryPromMetrics:
        return KVFactoryPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        log.info("kvfactory connector (%s) stats: %s", self.role.name.lower(), self.counters)
        if not self._released:
            self._released = True
            shared_store.release(self._store)

    def _require_paged(self) -> PagedKV:
        if self._paged is None:
            raise RuntimeError("register_kv_caches was not called before a transfer")
        return self._paged


def _tensor_parallel_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


__all__ = ["KVFactoryConnector", "KVFactoryConnectorMetadata", "connector_settings"]
