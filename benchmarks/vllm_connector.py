"""TTFT of vLLM's CPU build: cold vs its own prefix cache vs kvfactory and ExampleConnector
after a restart, measured side by side in one run.

For each context length (2k and 4k tokens by default), each page-cache state and each of
``--repeats`` distinct prompts (median reported):

* **cold**: first sight of the prompt in an engine with the kvfactory connector (it pays
  the connector's save as well, which is what a user of the connector pays);
* **cold, no connector** and **prefix cache**: the prompt twice in a plain vLLM engine (no
  connector), the second time served by vLLM's own in-process prefix cache;
* **kvfactory after restart**: a vLLM process started after the cold one exited, on the
  same store directory: its first request for the prompt is served from the disk tier;
* **ExampleConnector after restart**: vLLM's built-in disk connector, filled by one
  process and read by a fresh one.

Both connectors' files are put in one state before each prompt's warm shots: **page
cache** (every file read just before: a restart on a machine with memory to spare) or
**disk** (every file dropped from the page cache with ``POSIX_FADV_DONTNEED``: a restart
after the kernel reclaimed them, as this project's VMs do to any file page idle for a
minute, DAMON ``pageout``). Leaving the state to chance would favour whichever connector
wrote its files last.

The three warm paths run in three engines alive at once and are measured prompt by prompt,
one right after the other (in an order that rotates per prompt), so a noisy neighbour on a
shared machine slows all three alike rather than whichever phase it overlapped. The cold
engines (kvfactory's, and the one filling ExampleConnector) run side by side, prompt by
prompt, and have exited first, so no background write overlaps a warm measurement. All
warm paths use the *same* prompt, because ExampleConnector only matches an identical
prompt. TTFT is the wall time of ``LLM.generate`` with ``max_tokens=1`` inside the engine
process (no HTTP). Targets: kvfactory after restart <= 0.12x cold, <= 1.3x the prefix
cache, and faster than ExampleConnector after restart.

``--shm-bytes N`` gives kvfactory's store an shm tier (host RAM on /dev/shm that outlives
the process): the restarted engine then reads from it whatever the page-cache state of the
disk files, which is what a user who enables it gets after a restart.

Run: ``make vllm && .venv/bin/python benchmarks/vllm_connector.py`` (prints a table).
"""

from __future__ import annotations

import argparse
import os
import shutil
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


Shot = tuple[str, int, str]
"""(path, context length, page-cache state)"""
STATES = ("page cache", "disk")


def paired_ratio(times: dict[Shot, list[float]], length: int, state: str, baseline: str) -> float:
    """Median over prompts of kvfactory's TTFT over ``baseline``'s for the same prompt: the
    warm paths of one prompt are measured back to back, so each ratio sees one moment."""
    ours = times[("kvfactory after restart", length, state)]
    theirs = times[(baseline, length, state)]
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def connector_files(*folders: Path) -> list[Path]:
    return sorted(path for folder in folders for path in folder.rglob("*") if path.is_file())


def put_in_page_cache(files: list[Path]) -> None:
    buffer = bytearray(8 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def drop_from_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument(
        "--shm-bytes", type=int, default=0, help="kvfactory's shm tier budget (0: none)"
    )
    args = parser.parse_args()
    if not vllm_available():
        raise SystemExit("vLLM's CPU build is not installed: run `make vllm`")
    model = str(default_model_dir())
    # each prompt is measured once per engine (the next request would hit vLLM's own cache)
    prompts = {
        (length, state): [
            synthetic_prompt(length, seed=1000 * length + 100 * s + r)
            + synthetic_prompt(QUESTION_TOKENS, seed=7 + r)
            for r in range(args.repeats)
        ]
        for length in args.lengths
        for s, state in enumerate(STATES)
    }
    warmup = synthetic_prompt(300, seed=999)
    root = Path(tempfile.mkdtemp(prefix="kvf-vllm-bench-"))
    common = {
        "model": model,
        "block_size": args.block_size,
        "max_model_len": max(args.lengths) + QUESTION_TOKENS + 64,
        "max_num_batched_tokens": max(args.lengths) + QUESTION_TOKENS + 64,
    }
    store: dict[str, object] = {
        "home": str(root / "home"),
        "store_dir": str(root / "store"),
        "chunk_tokens": args.chunk_tokens,
    }
    shm_dir = None
    if args.shm_bytes:
        shm_dir = Path(tempfile.mkdtemp(prefix="kvf-vllm-bench-", dir="/dev/shm"))
        store.update(shm_bytes=args.shm_bytes, shm_dir=str(shm_dir))
    kvf = {**common, "connector": "kvfactory", "store": store}
    example = {**common, "connector": "example", "example_path": str(root / "example")}
    (root / "example").mkdir()
    times: dict[Shot, list[float]] = {}
    cached: dict[Shot, list[int]] = {}

    def note(name: str, shot: tuple[int, str], seconds: float, hit: int) -> None:
        length, state = shot
        print(
            f"{name:>31} {length:5d} {state:>10}: {seconds:.3f} s (cached {hit})", file=sys.stderr
        )
        times.setdefault((name, length, state), []).append(seconds)
        cached.setdefault((name, length, state), []).append(hit)

    print("cold engines: kvfactory (filling its store) and ExampleConnector...", file=sys.stderr)
    with VLLMDriver(kvf) as driver, VLLMDriver(example) as fill:
        ttft(driver, warmup)
        for shot, batch in prompts.items():
            for prompt in batch:
                note("cold", shot, *ttft(driver, prompt))
                ttft(fill, prompt)
    files = connector_files(root / "store", root / "example")
    print("fresh engines: plain vLLM, kvfactory, ExampleConnector...", file=sys.stderr)
    with VLLMDriver(common) as plain, VLLMDriver(kvf) as restarted, VLLMDriver(example) as disk:
        warm = [
            ("prefix cache", plain),
            ("kvfactory after restart", restarted),
            ("ExampleConnector after restart", disk),
        ]
        for driver in (plain, restarted, disk):
            ttft(driver, warmup)
        for shot, batch in prompts.items():
            for turn, prompt in enumerate(batch):
                note("cold, no connector", shot, *ttft(plain, prompt))
                if shot[1] == "page cache":
                    put_in_page_cache(files)
                else:
                    drop_from_page_cache(files)
                for name, driver in warm[turn % 3 :] + warm[: turn % 3]:
                    note(name, shot, *ttft(driver, prompt))

    if shm_dir is not None:
        shutil.rmtree(shm_dir, ignore_errors=True)
    names = [
        "cold",
        "cold, no connector",
        "prefix cache",
        "kvfactory after restart",
        "ExampleConnector after restart",
    ]
    tiers = f", shm tier {args.shm_bytes} bytes" if args.shm_bytes else ""
    print(
        f"\nvLLM {args.block_size}-token blocks, kvfactory {args.chunk_tokens}-token chunks"
        f"{tiers}, median of {args.repeats}; TTFT in seconds (cached tokens); ratios are "
        "medians of per-prompt ratios\n"
    )
    print(
        "| prompt | connectors' files in | "
        + " | ".join(names)
        + " | kvf/cold | kvf/prefix cache | kvf/Example |"
    )
    print("|---:|---|" + "---:|" * (len(names) + 3))
    for length in args.lengths:
        for state in STATES:
            med = {name: statistics.median(times[(name, length, state)]) for name in names}
            hits = {name: min(cached[(name, length, state)]) for name in names}
            cells = [f"{med[n]:.3f} ({hits[n]})" for n in names]
            r_cold = paired_ratio(times, length, state, "cold")
            r_prefix = paired_ratio(times, length, state, "prefix cache")
            r_example = paired_ratio(times, length, state, "ExampleConnector after restart")
            verdict = (
                f"{r_cold:.3f} {'PASS' if r_cold <= COLD_TARGET else 'FAIL'}",
                f"{r_prefix:.2f} {'PASS' if r_prefix <= PREFIX_CACHE_TARGET else 'FAIL'}",
                f"{r_example:.2f} {'PASS' if r_example < 1.0 else 'FAIL'}",
            )
            print(
                f"| {length + QUESTION_TOKENS:,} | {state} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(verdict)
                + " |"
            )


if __name__ == "__main__":
    main()
