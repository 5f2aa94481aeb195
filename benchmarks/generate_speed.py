"""Generation speed with and without the KV cache: tokens/s of `GPT.generate` for 512 new tokens (greedy, batch
1) on the tiny model's architecture (configs/gpt2/tiny.yaml: 4 layers, 4 heads, 128 wide, its 4096-token BPE
vocabulary) with random weights. Medians over interleaved rounds; each round times both paths for every
context setting, and the greedy tokens of the two paths are checked to be equal.

Context settings:
  long    block_size 1024: prompt + new tokens fit, so every step after the prompt runs one token
  tiny    block_size 256 as in tiny.yaml: once the context passes 256 tokens the window slides, every position
          shifts, and the cached path recomputes the whole window for each token (as the cache-free path does)

    python benchmarks/generate_speed.py                      # CPU, 1 thread, 3 rounds (a few minutes)
    python benchmarks/generate_speed.py --device cuda

Prints a table and writes benchmarks/results/generate_speed_<device>.json (or --json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/generate_speed.py

import torch  # noqa: E402

from benchmarks.results import run_metadata, write_results  # noqa: E402
from benchmarks.timing import sync  # noqa: E402
from lightning_modules.gpt import GPT, GPTConfig  # noqa: E402

TINY = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=4096)  # configs/gpt2/tiny.yaml's model and BPE size
CONTEXTS = {"long": 1024, "tiny": 256}  # block_size of each setting


def timed_generate(
    model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool
) -> tuple[float, torch.Tensor]:
    """(seconds, output ids) of one greedy generation."""
    sync(prompt.device)
    start = time.perf_counter()
    out = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
    sync(prompt.device)
    return time.perf_counter() - start, out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build one model per context setting, warm up, then time interleaved rounds of both paths."""
    device = torch.device(args.device)
    models, prompts = {}, {}
    for name, block_size in CONTEXTS.items():
        torch.manual_seed(0)
        models[name] = GPT(GPTConfig(block_size=block_size, **TINY)).to(device).eval()
        prompts[name] = torch.randint(0, TINY["vocab_size"], (1, args.prompt_tokens), device=device)
        for use_cache in (True, False):
            timed_generate(models[name], prompts[name], args.warmup_tokens, use_cache)
    times: dict[str, dict[str, list[float]]] = {n: {"cache": [], "no_cache": []} for n in CONTEXTS}
    equal = {name: True for name in CONTEXTS}
    for round_index in range(args.rounds):
        for name in CONTEXTS:
            outs = {}
            for path in ("cache", "no_cache") if round_index % 2 == 0 else ("no_cache", "cache"):
                seconds, outs[path] = timed_generate(
                    models[name], prompts[name], args.new_tokens, path == "cache"
                )
                times[name][path].append(seconds)
            equal[name] = equal[name] and torch.equal(outs["cache"], outs["no_cache"])
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    settings = {}
    for name, block_size in CONTEXTS.items():
        ratios = [nc / c for c, nc in zip(times[name]["cache"], times[name]["no_cache"])]
        settings[name] = {
            "block_size": block_size,
            "slides_after_new_tokens": max(0, block_size - args.prompt_tokens),
            "cache_tokens_per_s": args.new_tokens / statistics.median(times[name]["cache"]),
            "no_cache_tokens_per_s": args.new_tokens / statistics.median(times[name]["no_cache"]),
            "speedup_median": statistics.median(ratios),
            "speedup_rounds": ratios,
            "seconds": times[name],
            "greedy_tokens_equal": equal[name],
        }
    model = models["tiny"]
    return {
        "args": {
            "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens,
            "rounds": args.rounds,
            "warmup_tokens": args.warmup_tokens,
        },
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "dtype": "float32",
        "model": {**TINY, "parameters": model.num_parameters()},
        "settings": settings,
    }


def to_markdown(results: dict[str, Any]) -> str:
    """The table printed at the end of a run (docs/benchmarks.md's comes from benchmarks.report)."""
    lines = [
        "| context | KV cache tokens/s | cache-free tokens/s | speed-up | equal |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in results["settings"].items():
        lines.append(
            f"| {name} (block_size {row['block_size']}) | {row['cache_tokens_per_s']:.0f} | "
            f"{row['no_cache_tokens_per_s']:.0f} | {row['speedup_median']:.1f}x | {row['greedy_tokens_equal']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the table and write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--new_tokens", type=int, default=512, help="tokens generated per timing (default 512)"
    )
    parser.add_argument("--prompt_tokens", type=int, default=32, help="random prompt length (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--warmup_tokens", type=int, default=32, help="tokens generated before timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="write here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    for name in ("new_tokens", "prompt_tokens", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.prompt_tokens + args.new_tokens > CONTEXTS["long"]:
        parser.error(f"--prompt_tokens + --new_tokens must fit the long context ({CONTEXTS['long']} tokens)")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    meta = run_metadata()
    results = run(args)
    print(to_markdown(results))
    write_results(f"generate_speed_{torch.device(args.device).type}", meta, results, out=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
