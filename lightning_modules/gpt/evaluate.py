"""Multiple-choice accuracy (HellaSwag format) of one of our GPT checkpoints, with the run's own tokenizer:

    python -m lightning_modules.gpt.evaluate --ckpt_path CKPT --data FILE [--max_examples N] [--out JSON]

Prints `acc_norm` (endings ranked by the mean log-probability per token) and `acc` (by the summed
log-probability); `--out` also writes them as JSON. Scoring: `callbacks/multiple_choice.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from callbacks.multiple_choice import load_examples, score_examples
from lightning_modules.common.compat import check_data_fits
from lightning_modules.common.devices import resolve_device
from lightning_modules.common.targets import load_target_model
from lightning_modules.common.user_errors import run_reporting_user_errors
from lightning_modules.gpt.run_artifacts import tokenizer_from_checkpoint


def evaluate(
    ckpt_path: str,
    data: str,
    max_examples: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    separator: str = " ",
) -> dict[str, Any]:
    """Score a checkpoint on a multiple-choice file; the result as a JSON-ready dict."""
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be >= 1")
    examples = load_examples(data, max_examples)  # a bad data file fails before the checkpoint is read
    target = resolve_device(device)
    tokenizer = tokenizer_from_checkpoint(ckpt_path)
    model, _ = load_target_model(ckpt_path, "gpt")
    check_data_fits(f"the model in {ckpt_path!r}", tokenizer.vocab_size, model.config.padded_vocab_size)
    model.to(target)
    counts = score_examples(
        model, tokenizer.encode, examples, model.config.block_size, batch_size, target, separator
    )
    return {
        "ckpt_path": str(ckpt_path),
        "data": str(data),
        "examples": counts.total,
        "acc_norm": counts.acc_norm,
        "acc": counts.acc,
        "correct_norm": counts.correct_norm,
        "correct": counts.correct_sum,
        "tokenizer": tokenizer.describe(),
        "max_length": model.config.block_size,
        "separator": separator,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.gpt.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt_path", required=True, help="one of our GPT .ckpt files (from train.py fit)")
    parser.add_argument(
        "--data",
        required=True,
        help='JSONL file, one {"ctx": str, "endings": [str, ...], "label": int} per line',
    )
    parser.add_argument(
        "--max_examples", type=int, default=None, help="score the first N examples (default: all)"
    )
    parser.add_argument("--batch_size", type=int, default=32, help="sequences per forward pass (default: 32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--separator",
        default=" ",
        help="text put between a context and each ending (default: one space, as HellaSwag needs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the result to this JSON file")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; 0 on success, 2 with a short message on a user error (bad file, checkpoint, value)."""
    args = build_parser().parse_args(argv)
    ok, result = run_reporting_user_errors(
        lambda: evaluate(
            args.ckpt_path, args.data, args.max_examples, args.batch_size, args.device, args.separator
        ),
        args.debug,
    )
    if not ok:
        return 2
    n = result["examples"]
    print(f"{result['data']}: {n} examples, checkpoint {result['ckpt_path']} ({result['tokenizer']})")
    print(
        f"acc_norm {result['acc_norm']:.4f}  ({result['correct_norm']}/{n}, mean log-probability per token)"
    )
    print(f"acc      {result['acc']:.4f}  ({result['correct']}/{n}, summed log-probability)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
