"""Continue a prompt with a trained GPT, printing the text as it is produced:

    python -m lightning_modules.gpt.generate --ckpt_path CKPT --prompt TEXT --max_new_tokens N
        [--temperature T] [--top_k K] [--seed S] [--tokenizer NAME] [--device auto] [--no_cache]

CKPT is one of our `.ckpt` files (or a local `transformers` GPT-2 directory). The tokenizer is the run's own,
rebuilt from the data module's init arguments saved in the checkpoint (`run_artifacts`; run it from the
directory the training ran in, so the data cache holding a trained BPE is found), or `--tokenizer`. The
prompt and then each new piece of text go to stdout as soon as they are decoded; the token count and speed
go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch

from datamodules.tokenizer import HFTokenizer, TextTokenizer
from lightning_modules.common.compat import check_data_fits
from lightning_modules.common.devices import resolve_device
from lightning_modules.common.targets import load_target_model
from lightning_modules.common.user_errors import run_reporting_user_errors
from lightning_modules.gpt.model import GPT
from lightning_modules.gpt.run_artifacts import tokenizer_from_checkpoint, tokenizer_from_spec

REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence


class StreamingDecoder:
    """Token ids in, new text out: decodes the whole sequence after each token and returns what was added,
    holding back a trailing U+FFFD (a character whose bytes are split across tokens) until it completes."""

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.text = ""  # what has been returned so far

    def _new_text(self, final: bool) -> str:
        full = self.tokenizer.decode(self.ids)
        if not final:
            full = full.rstrip(REPLACEMENT)
        if full.startswith(self.text):
            piece = full[len(self.text) :]
        else:  # a decoder that rewrites earlier text (shown already, it stays): go on after its length
            piece = full[len(self.text) :] if len(full) > len(self.text) else ""
        if piece:
            self.text = full
        return piece

    def start(self) -> str:
        """The prompt's text (as the tokenizer decodes it)."""
        return self._new_text(final=False)

    def push(self, token_id: int) -> str:
        """The text `token_id` adds (may be empty while a character is incomplete)."""
        self.ids.append(token_id)
        return self._new_text(final=False)

    def finish(self) -> str:
        """Whatever was held back."""
        return self._new_text(final=True)


def load_tokenizer(spec: str | None, ckpt_path: str, vocab_size: int) -> TextTokenizer:
    """The tokenizer `--tokenizer` names ('bytes', a BPE tokenizer.json, a transformers directory or hub
    name), else the run's own: the checkpoint's (or a transformers directory's own tokenizer)."""
    if spec is None:
        if Path(ckpt_path).is_dir():
            return HFTokenizer(ckpt_path)
        return tokenizer_from_checkpoint(ckpt_path)
    return tokenizer_from_spec(spec, vocab_size)[0]


def generate_text(
    ckpt_path: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    use_cache: bool = True,
    out: TextIO | None = None,
) -> tuple[str, int, float]:
    """Write the prompt and its continuation to `out` (default stdout) piece by piece, flushing each;
    returns (the whole text, new tokens, seconds spent generating)."""
    out = sys.stdout if out is None else out
    if max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens {max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top_k {top_k} must be >= 1 (or left out for no limit)")
    target = resolve_device(device)
    model, _ = load_target_model(ckpt_path, "gpt")
    assert isinstance(model, GPT)
    text_tokenizer = load_tokenizer(tokenizer, ckpt_path, model.config.vocab_size)
    check_data_fits(f"the model in {ckpt_path!r}", text_tokenizer.vocab_size, model.config.padded_vocab_size)
    prompt_ids = text_tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError(f"--prompt {prompt!r} encodes to no tokens; give some text")
    model.to(target)
    generator = torch.Generator(target).manual_seed(seed) if seed is not None else None
    decoder = StreamingDecoder(text_tokenizer, prompt_ids)
    pieces = [decoder.start()]
    out.write(pieces[0])
    out.flush()
    start = time.perf_counter()
    tokens = model.generate_tokens(
        torch.tensor([prompt_ids], device=target), max_new_tokens, temperature, top_k, generator, use_cache
    )
    count = 0
    for token in tokens:
        count += 1
        piece = decoder.push(int(token))
        if piece:
            pieces.append(piece)
            out.write(piece)
            out.flush()
    seconds = time.perf_counter() - start
    pieces.append(decoder.finish())
    out.write(pieces[-1] + "\n")
    out.flush()
    return "".join(pieces), count, seconds


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m lightning_modules.gpt.generate`."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.gpt.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--ckpt_path", required=True, help="one of our .ckpt files, or a local transformers GPT-2 directory"
    )
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate (default 200)")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)"
    )
    parser.add_argument(
        "--top_k", type=int, default=50, help="sample among the k most likely tokens (default 50; 0 = all)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: random)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="instead of the run's own: 'bytes', a BPE tokenizer.json, or a transformers tokenizer "
        "directory / hub name",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument(
        "--no_cache", action="store_true", help="recompute the whole context for every token (reference path)"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Generate and stream the text; 0 on success, 2 with a short message on a user error."""
    args = build_parser().parse_args(argv)
    ok, result = run_reporting_user_errors(
        lambda: generate_text(
            args.ckpt_path, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed,
            args.tokenizer, args.device, use_cache=not args.no_cache,
        ),
        args.debug,
    )  # fmt: skip
    if not ok:
        return 2
    _, count, seconds = result
    rate = count / seconds if seconds > 0 else float("inf")
    cache = "off" if args.no_cache else "on"
    print(f"[{count} tokens in {seconds:.2f} s, {rate:.1f} tokens/s, KV cache {cache}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
