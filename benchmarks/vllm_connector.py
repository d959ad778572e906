"""TTFT of vLLM's CPU build: cold vs its own prefix cache vs kvfactory and ExampleConnector
after a restart, measured side by side in one run.

For each context length (2k and 4k tokens by default) and each of ``--repeats`` distinct
prompts (median reported):

* **cold**: first sight of the prompt in an engine with the kvfactory connector (it pays
  the connector's save as well, which is what a user of the connector pays);
* **cold, no connector** and **prefix cache**: the prompt twice in a plain vLLM engine (no
  connector), the second time served by vLLM's own in-process prefix cache;
* **kvfactory after restart**: a vLLM process started after the cold one exited, on the
  same store directory: its first request for the prompt is served from the disk tier;
* **ExampleConnector after restart**: vLLM's built-in disk connector, filled by one
  process and read by a fresh one.

The three warm paths run in three engines alive at once and are measured prompt by prompt,
one right after the other (in an order that rotates per prompt), so a noisy neighbour on a
shared machine slows all three alike rather than whichever phase it overlapped. The cold
engines (kvfactory's, and the one filling ExampleConnector) have exited first, so no
background write overlaps a warm measurement. All warm paths use the *same* prompt,
because ExampleConnector only matches an identical prompt. TTFT is the wall time of
``LLM.generate`` with ``max_tokens=1`` inside the engine process (no HTTP). Targets:
kvfactory after restart <= 0.12x cold, <= 1.3x the prefix cache, and faster than
ExampleConnector after restart.

Run: ``make vllm && .venv/bin/python benchmarks/vllm_connector.py`` (prints a table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engines" / "connector"))

from vllm_harness import VLLMDriver, synthetic_prompt, vllm_available

from model_dir import default_model_dir

COLD_TARGET = 0.12
PREFIX_CACHE_TARGET = 1.3
QUESTION_TOKENS = 32


def ttft(driver: VLLMDriver, prompt: list[int]) -> tuple[float, int]:
    reply = driver.generate([prompt], max_tokens=1)
    return float(reply["seconds"]), int(reply["outputs"][0]["num_cached_tokens"])


def paired_ratio(times: dict[tuple[str, int], list[float]], length: int, baseline: str) -> float:
    """Median over prompts of kvfactory's TTFT over ``baseline``'s for the same prompt: the
    warm paths of one prompt are measured back to back, so each ratio sees one moment."""
    ours = times[("kvfactory after restart", length)]
    theirs = times[(baseline, length)]
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    args = parser.parse_args()
    if not vllm_available():
        raise SystemExit("vLLM's CPU build is not installed: run `make vllm`")
    model = str(default_model_dir())
    prompts = {
        length: [
            synthetic_prompt(length, seed=1000 * length + r)
            + synthetic_prompt(QUESTION_TOKENS, seed=7 + r)
            for r in range(args.repeats)
        ]
        for length in args.lengths
    }
    warmup = synthetic_prompt(300, seed=999)
    root = Path(tempfile.mkdtemp(prefix="kvf-vllm-bench-"))
    common = {
        "model": model,
        "block_size": args.block_size,
        "max_model_len": max(args.lengths) + QUESTION_TOKENS + 64,
        "max_num_batched_tokens": max(args.lengths) + QUESTION_TOKENS + 64,
    }
    kvf = {
        **common,
        "connector": "kvfactory",
        "store": {
            "home": str(root / "home"),
            "store_dir": str(root / "store"),
            "chunk_tokens": args.chunk_tokens,
        },
    }
    example = {**common, "connector": "example", "example_path": str(root / "example")}
    (root / "example").mkdir()
    times: dict[tuple[str, int], list[float]] = {}
    cached: dict[tuple[str, int], list[int]] = {}

    def note(name: str, length: int, seconds: float, hit: int) -> None:
        print(f"{name:>31} {length:5d}: {seconds:.3f} s (cached {hit})", file=sys.stderr)
        times.setdefault((name, length), []).append(seconds)
        cached.setdefault((name, length), []).append(hit)

    print("vLLM with the kvfactory connector (cold)...", file=sys.stderr)
    with VLLMDriver(kvf) as driver:
        ttft(driver, warmup)
        for length, batch in prompts.items():
            for prompt in batch:
                note("cold", length, *ttft(driver, prompt))
    print("ExampleConnector: filling its directory...", file=sys.stderr)
    with VLLMDriver(example) as fill:
        for batch in prompts.values():
            for prompt in batch:
                ttft(fill, prompt)
    print("fresh engines: plain vLLM, kvfactory, ExampleConnector...", file=sys.stderr)
    with VLLMDriver(common) as plain, VLLMDriver(kvf) as restarted, VLLMDriver(example) as disk:
        warm = [
            ("prefix cache", plain),
            ("kvfactory after restart", restarted),
            ("ExampleConnector after restart", disk),
        ]
        for driver in (plain, restarted, disk):
            ttft(driver, warmup)
        for length, batch in prompts.items():
            for turn, prompt in enumerate(batch):
                note("cold, no connector", length, *ttft(plain, prompt))
                for name, driver in warm[turn % 3 :] + warm[: turn % 3]:
                    note(name, length, *ttft(driver, prompt))

    names = [
        "cold",
        "cold, no connector",
        "prefix cache",
        "kvfactory after restart",
        "ExampleConnector after restart",
    ]
    print(
        f"\nvLLM {args.block_size}-token blocks, kvfactory {args.chunk_tokens}-token chunks, "
        f"median of {args.repeats}; TTFT in seconds (cached tokens); ratios are medians of "
        "per-prompt ratios\n"
    )
    print("| prompt | " + " | ".join(names) + " | kvf/cold | kvf/prefix cache | kvf/Example |")
    print("|---:|" + "---:|" * (len(names) + 3))
    for length in args.lengths:
        med = {name: statistics.median(times[(name, length)]) for name in names}
        hits = {name: min(cached[(name, length)]) for name in names}
        cells = [f"{med[n]:.3f} ({hits[n]})" for n in names]
        r_cold = paired_ratio(times, length, "cold")
        r_prefix = paired_ratio(times, length, "prefix cache")
        r_example = paired_ratio(times, length, "ExampleConnector after restart")
        verdict = (
            f"{r_cold:.3f} {'PASS' if r_cold <= COLD_TARGET else 'FAIL'}",
            f"{r_prefix:.2f} {'PASS' if r_prefix <= PREFIX_CACHE_TARGET else 'FAIL'}",
            f"{r_example:.2f} {'PASS' if r_example < 1.0 else 'FAIL'}",
        )
        print(
            f"| {length + QUESTION_TOKENS:,} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(verdict)
            + " |"
        )


if __name__ == "__main__":
    main()
