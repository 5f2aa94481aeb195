"""Multiple-choice evaluation in the HellaSwag format, at validation time and from a checkpoint.

Data: a JSONL file, one example per line: `{"ctx": str, "endings": [str, ...], "label": int}` (other keys,
such as HellaSwag's `activity_label`, are ignored). Each ending is scored by the log-likelihood the model
gives its tokens after the context; an example is correct when the labelled ending scores highest. Two
accuracies, kept apart by name:

- `acc_norm`: endings ranked by the mean log-probability per ending token (length-normalised, as llm.c's
  HellaSwag evaluation does), so an ending is not penalised for being longer;
- `acc`: endings ranked by the summed log-probability (unnormalised).

Context and ending are encoded separately, `encode(context)` and `encode(separator + ending)` (HellaSwag's
contexts end without a space and its endings start without one; `separator=" "` joins them), and the ids
concatenated: the boundary is a token boundary and the ending's first token is scored given the whole
context. A context + ending longer than the model's window keeps its last `max_length` positions (the
context is cut from the left). Nothing here imports `lightning_modules`: the model is any callable mapping
token ids (batch, seq) to logits (batch, seq, vocab).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

Model = Callable[[torch.Tensor], Any]  # token ids (batch, seq) -> logits (batch, seq, vocab)
Encode = Callable[[str], Sequence[int]]


@dataclass(frozen=True)
class Example:
    """One multiple-choice question: a context, its candidate endings and the index of the right one."""

    context: str
    endings: tuple[str, ...]
    label: int


def _parse_example(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'ctx', 'endings' and 'label', got {row!r:.80}")
    missing = [key for key in ("ctx", "endings", "label") if key not in row]
    if missing:
        raise ValueError(f"{where}: missing {missing}; each line needs 'ctx', 'endings' and 'label'")
    context, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(context, str) or not context:
        raise ValueError(f"{where}: 'ctx' must be a non-empty string, got {context!r:.80}")
    if (
        not isinstance(endings, list)
        or len(endings) < 2
        or not all(isinstance(e, str) and e for e in endings)
    ):
        raise ValueError(
            f"{where}: 'endings' must be a list of 2 or more non-empty strings, got {endings!r:.80}"
        )
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise ValueError(f"{where}: 'label' must be an integer in [0, {len(endings)}), got {label!r}")
    return Example(context, tuple(endings), label)


def load_examples(path: str | Path, max_examples: int | None = None) -> list[Example]:
    """The first `max_examples` (None: all) examples of a HellaSwag-format JSONL file; blank lines are
    skipped. FileNotFoundError / ValueError name the file, the line and what is wrong."""
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples!r} must be >= 1 (or None for every example)")
    source = Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(
            f"multiple-choice data {str(path)!r} is not a file ({str(source.absolute())!r}); give a JSONL file "
            'with one {"ctx": ..., "endings": [...], "label": ...} object per line (e.g. HellaSwag\'s '
            "hellaswag_val.jsonl)"
        )
    examples: list[Example] = []
    with source.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            examples.append(_parse_example(line, f"{str(path)!r} line {number}"))
            if max_examples is not None and len(examples) >= max_examples:
                break
    if not examples:
        raise ValueError(f"multiple-choice data {str(path)!r} holds no example")
    return examples


@dataclass(frozen=True)
class Counts:
    """Correct answers under each ranking, out of `total` examples; add them across ranks or shards."""

    correct_norm: int  # ranked by the mean log-probability per ending token
    correct_sum: int  # ranked by the summed log-probability
    total: int

    @property
    def acc_norm(self) -> float:
        """Accuracy with length-normalised scores (mean log-probability per token)."""
        return self.correct_norm / self.total if self.total else math.nan

    @property
    def acc(self) -> float:
        """Accuracy with unnormalised scores (summed log-probability)."""
        return self.correct_sum / self.total if self.total else math.nan

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.correct_norm + other.correct_norm,
            self.correct_sum + other.correct_sum,
            self.total + other.total,
        )


def choice_tokens(
    example: Example, encode: Encode, separator: str = " "
) -> list[tuple[list[int], list[int]]]:
    """(context ids, ending ids) of each ending: `encode(context)` and `encode(separator + ending)`."""
    context = list(encode(example.context))
    return [(context, list(encode(separator + ending))) for ending in example.endings]


def scoring_window(
    context: Sequence[int], ending: Sequence[int], max_length: int
) -> tuple[list[int], list[int], int]:
    """(inputs, targets, n_scored) for one context + ending: targets are the inputs shifted by one, at most
    `max_length` positions (the oldest dropped), and the last `n_scored` targets are the ending's tokens
    (all of them unless the ending alone is longer than the window)."""
    tokens = [*context, *ending]
    inputs, targets = tokens[:-1][-max_length:], tokens[1:][-max_length:]
    n_scored = min(len(ending), len(targets))
    if n_scored < 1:
        raise ValueError(
            f"nothing to score: the context encodes to {len(context)} and the ending to {len(ending)} tokens"
        )
    return inputs, targets, n_scored


def _default_device(model: Model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def ending_log_likelihoods(
    model: Model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_length: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    forward_calls: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of the ending's tokens (float64), number of tokens scored (int64)) for each
    (context ids, ending ids) pair, both of shape (len(pairs),) on the CPU.

    Pairs run `batch_size` at a time, longest first, right-padded (the model is causal, so padding after a
    row never reaches its scored positions); log-softmax in float32 at the scored positions only.
    `forward_calls`: run this many forward passes in all (one-token passes after the real ones), so that
    every rank of a model whose forward holds collectives runs the same number."""
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"max_length={max_length!r} and batch_size={batch_size!r} must be >= 1")
    device = torch.device(device) if device is not None else _default_device(model)
    windows = [scoring_window(context, ending, max_length) for context, ending in pairs]
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    sums = torch.zeros(len(windows), dtype=torch.float64)
    counts = torch.zeros(len(windows), dtype=torch.int64)
    calls = 0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = len(windows[rows[0]][0])
        inputs = torch.zeros(len(rows), length, dtype=torch.long)
        targets = torch.zeros(len(rows), length, dtype=torch.long)
        scored = torch.zeros(len(rows), length, dtype=torch.bool)
        for r, i in enumerate(rows):
            row_inputs, row_targets, n_scored = windows[i]
            n = len(row_inputs)
            inputs[r, :n] = torch.tensor(row_inputs)
            targets[r, :n] = torch.tensor(row_targets)
            scored[r, n - n_scored : n] = True
        out = model(inputs.to(device))
        logits = getattr(out, "logits", out)  # (rows, length, vocab); transformers models return an object
        calls += 1
        scored = scored.to(logits.device)
        log_probs = logits[scored].float().log_softmax(dim=-1)  # (scored tokens, vocab)
        picked = log_probs.gather(1, targets.to(logits.device)[scored][:, None])[:, 0]
        row_of = torch.arange(len(rows), device=logits.device)[:, None].expand_as(scored)[scored]
        row_sums = torch.zeros(len(rows), dtype=torch.float64, device=logits.device)
        row_sums.index_add_(0, row_of, picked.double())
        sums[rows] = row_sums.cpu()
        counts[rows] = scored.sum(dim=1).cpu()
    while forward_calls is not None and calls < forward_calls:
        model(torch.zeros(1, 1, dtype=torch.long, device=device))
        calls += 1
    return sums, counts


def count_correct(examples: Sequence[Example], sums: torch.Tensor, counts: torch.Tensor) -> Counts:
    """Counts of examples whose label has the highest mean (acc_norm) and summed (acc) log-probability;
    `sums` / `counts` hold one entry per ending, examples after each other. A tie goes to the first ending."""
    correct_norm = correct_sum = 0
    offset = 0
    for example in examples:
        n = len(example.endings)
        total, tokens = sums[offset : offset + n], counts[offset : offset + n]
        correct_norm += int(torch.argmax(total / tokens).item() == example.label)
        correct_sum += int(torch.argmax(total).item() == example.label)
        offset += n
    if offset != len(sums):
        raise ValueError(f"{len(sums)} ending scores for {offset} endings")
    return Counts(correct_norm, correct_sum, len(examples))


def score_examples(
    model: Model,
    encode: Encode,
    examples: Sequence[Example],
    max_length: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    separator: str = " ",
) -> Counts:
    """Multiple-choice counts of `model` on `examples` (see the module docstring)."""
    pairs = [pair for example in examples for pair in choice_tokens(example, encode, separator)]
    sums, counts = ending_log_likelihoods(model, pairs, max_length, batch_size, device)
    return count_correct(examples, sums, counts)


class MultipleChoiceEval(Callback):
    """Logs `val/mc_acc_norm` (mean log-probability per ending token) and `val/mc_acc` (summed) on a
    HellaSwag-format JSONL file at validation time (not during the sanity check).

    The module is called as `pl_module(idx) -> logits` and the text encoded with the datamodule's `encode`.
    Under DDP each rank scores every world_size-th example and the counts are summed across ranks (every rank
    runs the same number of forward passes). The file is read in `setup`, so a missing or malformed file
    stops `fit` / `validate` before the first step; a config naming it instantiates without it.

    Args:
        path: the JSONL file (`{"ctx", "endings", "label"}` per line).
        max_examples: score the file's first N examples (None: all).
        every_n_validations: score at every N-th validation (the counter survives a resume).
        batch_size: context + ending sequences per forward pass.
        separator: put between a context and each ending (" " for HellaSwag; "" when the file has its own).
        max_length: the model's window, positions kept per sequence (None: the module's `config.block_size`,
            else the datamodule's `block_size`).
    """

    def __init__(
        self,
        path: str,
        max_examples: int | None = None,
        every_n_validations: int = 1,
        batch_size: int = 32,
        separator: str = " ",
        max_length: int | None = None,
    ) -> None:
        for name, value in (
            ("max_examples", max_examples),
            ("every_n_validations", every_n_validations),
            ("batch_size", batch_size),
            ("max_length", max_length),
        ):
            if value is not None and value < 1:
                raise ValueError(f"MultipleChoiceEval {name}={value!r} must be >= 1")
        self.path = path
        self.max_examples = max_examples
        self.every_n_validations = every_n_validations
        self.batch_size = batch_size
        self.separator = separator
        self.max_length = max_length
        self.validations = 0  # validations seen (sanity checks excluded)
        self._examples: list[Example] | None = None
        self._pairs: list[tuple[list[int], list[int]]] | None = None  # this rank's share, encoded
        self._window: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "MultipleChoiceEval calls the module outside the strategy's forward, which FSDP does not gather "
                "parameters for; use DDP, or score a checkpoint with python -m lightning_modules.gpt.evaluate"
            )
        datamodule = getattr(trainer, "datamodule", None)
        if not callable(getattr(datamodule, "encode", None)):
            raise ValueError(
                f"MultipleChoiceEval needs a datamodule with encode(text) -> token ids (e.g. TextDataModule); "
                f"got {type(datamodule).__name__}"
            )
        self._window = self.max_length or getattr(getattr(pl_module, "config", None), "block_size", None)
        self._window = self._window or getattr(datamodule, "block_size", None)
        if not isinstance(self._window, int) or self._window < 1:
            raise ValueError(
                "MultipleChoiceEval could not tell the model's window (no config.block_size on the module, no "
                "block_size on the datamodule); set max_length"
            )
        if self._examples is None:
            self._examples = load_examples(self.path, self.max_examples)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._examples is None:
            return
        self.validations += 1
        if self.validations % self.every_n_validations:
            return
        counts = self.evaluate(trainer, pl_module)
        pl_module.log("val/mc_acc_norm", counts.acc_norm, sync_dist=False)
        pl_module.log("val/mc_acc", counts.acc, sync_dist=False)
        rank_zero_info(
            f"multiple choice: acc_norm {counts.acc_norm:.4f}, acc {counts.acc:.4f} on {counts.total} examples "
            f"of {self.path}"
        )

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Counts:
        """Counts over the whole file: this rank scores its share, the counts are summed across ranks."""
        assert self._examples is not None and self._window is not None
        rank, world = trainer.global_rank, trainer.world_size
        share = self._examples[rank::world]
        if self._pairs is None:
            encode = trainer.datamodule.encode
            self._pairs = [
                pair for example in share for pair in choice_tokens(example, encode, self.separator)
            ]
        device = pl_module.device
        needed = math.ceil(len(self._pairs) / self.batch_size)
        calls = trainer.strategy.reduce(torch.tensor(needed, device=device), reduce_op="max")
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                sums, counts = ending_log_likelihoods(
                    pl_module, self._pairs, self._window, self.batch_size, device, forward_calls=int(calls)
                )
        finally:
            pl_module.train(was_training)
        local = count_correct(share, sums, counts)
        totals = torch.tensor([local.correct_norm, local.correct_sum, local.total], device=device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        return Counts(*(int(v) for v in totals.tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))
