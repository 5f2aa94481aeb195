"""Tokenisation throughput of `python -m datamodules.prepare` with 1 and 2 worker processes against a
single-process loop, all with the same byte-level BPE, on text files taken from the embedded default corpus.

    python benchmarks/tokenize_speed.py                                  # 4M characters, 3 rounds
    python benchmarks/tokenize_speed.py --corpus_chars 20000000 --procs 1 2 4 8

Variants (interleaved in every round, each writing its own output; medians over rounds):
  loop        read each file, `BPETokenizer.encode_array([text + separator])`, append the ids to one .bin
  prepare_N   `datamodules.prepare.prepare` with num_proc=N (N worker processes, one tokenizer thread each)
tokens/s = tokens written / wall seconds of the whole call (reading, tokenising, writing, pool start); CPU
seconds = user + system time of this process and of the worker processes it reaped, for the same call: on a
machine whose cores are busy with other work the wall-clock ratio understates what the processes split.
Writes benchmarks/results/tokenize_speed.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/tokenize_speed.py

import numpy as np  # noqa: E402

from benchmarks.results import run_metadata, write_results  # noqa: E402
from datamodules.corpus import DOC_SEPARATOR, default_corpus_files, read_text  # noqa: E402
from datamodules.prepare import PrepareConfig, prepare  # noqa: E402
from datamodules.tokenizer import BPETokenizer, train_bpe  # noqa: E402


def build_corpus(folder: Path, chars: int) -> tuple[list[Path], int]:
    """Copy standard-library files (in the default corpus's order) into `folder` until `chars` characters."""
    files, total = [], 0
    for i, source in enumerate(default_corpus_files()):
        text = read_text(source)
        if not text:
            continue
        path = folder / f"{i:05d}.py"
        path.write_text(text, encoding="utf-8")
        files.append(path)
        total += len(text)
        if total >= chars:
            break
    return files, total


def loop(files: list[Path], tokenizer: BPETokenizer, out: Path) -> int:
    """The baseline: one process, one document at a time; returns the tokens written."""
    n_tokens = 0
    with out.open("wb") as f:
        for path in files:
            ids = tokenizer.encode_array([path.read_text(encoding="utf-8") + DOC_SEPARATOR])
            f.write(ids.astype(np.uint16).tobytes())
            n_tokens += len(ids)
    return n_tokens


def run_prepare(corpus: Path, tokenizer_file: Path, vocab: int, num_proc: int, out: Path) -> int:
    """prepare() into `out`; returns the tokens written."""
    config = PrepareConfig(
        out_dir=out,
        files=[str(corpus)],
        tokenizer=str(tokenizer_file),
        bpe_vocab_size=vocab,
        num_proc=num_proc,
        progress=False,
    )
    splits = prepare(config)["splits"]
    return splits["train"]["tokens"] + splits["val"]["tokens"]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its reaped children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    """Measure, print a summary and write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus_chars", type=int, default=4_000_000, help="corpus size in characters")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="prepare's num_proc values")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/tokenize_speed.json)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="tokenize_speed_") as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        corpus.mkdir()
        files, chars = build_corpus(corpus, args.corpus_chars)
        tokenizer_file = work / "tokenizer.json"
        trained = train_bpe((p.read_text(encoding="utf-8") for p in files), args.vocab)
        tokenizer_file.write_text(trained.to_str(), encoding="utf-8")
        tokenizer = BPETokenizer.from_file(tokenizer_file, args.vocab)
        print(
            f"corpus: {len(files)} files, {chars:,} characters; BPE of {args.vocab} tokens", file=sys.stderr
        )

        meta = run_metadata()
        variants = ["loop"] + [f"prepare_{n}" for n in args.procs]
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        tokens: dict[str, int] = {}
        for round_ in range(args.rounds):
            for variant in variants:
                out = work / f"out_{variant}"
                shutil.rmtree(out, ignore_errors=True)
                started, cpu_before = time.perf_counter(), cpu_seconds()
                if variant == "loop":
                    out.mkdir()
                    count = loop(files, tokenizer, out / "tokens.bin")
                else:
                    count = run_prepare(corpus, tokenizer_file, args.vocab, int(variant.split("_")[1]), out)
                seconds[variant].append(time.perf_counter() - started)
                cpu[variant].append(cpu_seconds() - cpu_before)
                tokens[variant] = count
                rate = count / seconds[variant][-1]
                print(
                    f"round {round_ + 1}: {variant}: {count:,} tokens, {rate:,.0f} tokens/s", file=sys.stderr
                )

    base = tokens["loop"] / statistics.median(seconds["loop"])
    rows: dict[str, Any] = {}
    for variant in variants:
        rate = tokens[variant] / statistics.median(seconds[variant])
        rows[variant] = {
            "processes": 1 if variant == "loop" else int(variant.split("_")[1]),
            "tokens": tokens[variant],
            "seconds": [round(s, 4) for s in seconds[variant]],
            "tokens_per_s": round(rate, 1),
            "cpu_seconds": [round(s, 3) for s in cpu[variant]],
            "cpu_s": round(statistics.median(cpu[variant]), 3),
            "tokens_per_cpu_s": round(tokens[variant] / statistics.median(cpu[variant]), 1),
            "vs_loop": round(rate / base, 3),
        }
    first = f"prepare_{args.procs[0]}"
    for row in rows.values():
        row["vs_first_prepare"] = round(row["tokens_per_s"] / rows[first]["tokens_per_s"], 3)
    results = {
        "corpus": {"files": len(files), "chars": chars, "source": "the embedded default corpus"},
        "tokenizer": {"kind": "bpe", "vocab_size": args.vocab},
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "first_prepare": first,
        "variants": rows,
    }
    for name, row in rows.items():
        print(f"{name:>12}: {row['tokens_per_s']:>12,.0f} tokens/s  ({row['vs_loop']:.2f}x the loop)")
    write_results("tokenize_speed", meta, results, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
