"""A long-lived vLLM (CPU build) process the connector tests and benchmark talk to.

Run with vLLM's own interpreter (``.venv-vllm/bin/python``); the first argument is a JSON
object of options, then one JSON command per stdin line gets one JSON reply per stdout
line:

* ``{"op": "generate", "prompts": [[ids...], ...], "max_tokens": 8, "cache_salts": [...]}``
  -> ``{"outputs": [{"token_ids": [...], "num_cached_tokens": n}], "seconds": s}``
* ``{"op": "counters"}`` -> the worker-side connector's counters (loaded, saved chunks...)
* ``{"op": "metrics"}`` -> vLLM's own counters by name
* ``{"op": "exit"}``

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the
connector object can be asked for its counters.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def build_llm(options: dict[str, Any]) -> Any:
    from vllm import LLM

    from kvfactory.engines.vllm_kv.launcher import vllm_dtype

    kwargs: dict[str, Any] = {
        "model": options["model"],
        "dtype": vllm_dtype(options.get("dtype", "auto")),
        "max_model_len": options.get("max_model_len", 4096),
        "block_size": options.get("block_size", 128),
        "enforce_eager": True,
        "enable_prefix_caching": options.get("prefix_caching", True),
        "max_num_seqs": options.get("max_num_seqs", 8),
        "max_num_batched_tokens": options.get("max_num_batched_tokens", 4096),
        "seed": 0,
        "disable_log_stats": False,
    }
    if options.get("tensor_parallel_size", 1) > 1:
        kwargs["tensor_parallel_size"] = options["tensor_parallel_size"]
        kwargs["distributed_executor_backend"] = "mp"
    if options.get("num_gpu_blocks"):
        kwargs["num_gpu_blocks_override"] = options["num_gpu_blocks"]
    connector = options.get("connector")
    if connector == "kvfactory":
        kwargs["kv_transfer_config"] = {
            "kv_connector": "KVFactoryConnector",
            "kv_connector_module_path": "kvfactory.engines.vllm_connector",
            "kv_role": options.get("kv_role", "kv_both"),
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": options["store"],
        }
    elif connector == "example":
        kwargs["kv_transfer_config"] = {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": options["example_path"]},
        }
    return LLM(**kwargs)


def generate(llm: Any, command: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams, TokensPrompt

    salts = command.get("cache_salts") or [None] * len(command["prompts"])
    prompts = []
    for ids, salt in zip(command["prompts"], salts, strict=True):
        prompt = TokensPrompt(prompt_token_ids=ids)
        if salt:
            prompt["cache_salt"] = salt
        prompts.append(prompt)
    params = SamplingParams(
        temperature=0.0, max_tokens=command.get("max_tokens", 8), ignore_eos=True
    )
    started = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    outputs = [
        {
            "token_ids": list(result.outputs[0].token_ids),
            "num_cached_tokens": int(result.num_cached_tokens or 0),
        }
        for result in results
    ]
    return {"outputs": outputs, "seconds": seconds}


def counters() -> dict[str, Any]:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return {}
    return dict(getattr(get_kv_transfer_group(), "counters", {}))


def metrics(llm: Any) -> dict[str, Any]:
    """vLLM's own counters (e.g. ``vllm:num_preemptions``), summed over labels."""
    totals: dict[str, float] = {}
    for metric in llm.get_metrics():
        value = getattr(metric, "value", None)
        if isinstance(value, int | float):
            totals[metric.name] = totals.get(metric.name, 0.0) + float(value)
    return totals


def main() -> None:
    options = json.loads(sys.argv[1])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = build_llm(options)
    reply = sys.stdout
    # vLLM logs to stdout too; replies are the lines that start with the marker.
    print("KVF-READY", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "exit":
            break
        try:
            if op == "generate":
                answer: dict[str, Any] = generate(llm, command)
            elif op == "counters":
                answer = counters()
            elif op == "metrics":
                answer = metrics(llm)
            else:
                answer = {"error": f"unknown op {op}"}
        except Exception as exc:  # reported to the test, which fails with it
            answer = {"error": repr(exc)}
        reply.write("KVF-REPLY " + json.dumps(answer) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
