"""Multiple-choice evaluation (HellaSwag format): scoring, the data file, the callback and the command."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks.multiple_choice import (
    Counts,
    Example,
    MultipleChoiceEval,
    choice_tokens,
    ending_log_likelihoods,
    load_examples,
    score_examples,
    scoring_window,
)
from datamodules.text import TextDataModule
from lightning_modules.common.targets import load_target_model
from lightning_modules.gpt import GPT, GPTConfig, GPTLightningModule
from lightning_modules.gpt.evaluate import main as evaluate_main
from lightning_modules.gpt.run_artifacts import tokenizer_from_checkpoint
from tests.helpers.text import make_text
from tests.helpers.trainers import quiet_trainer

CHARS = " abcdxyz"  # the stub tokenizer: one token per character


def encode_chars(text: str) -> list[int]:
    """Token ids of the stub tokenizer."""
    return [CHARS.index(ch) for ch in text]


def bigram_log_probs(entries: dict[str, float]) -> torch.Tensor:
    """(vocab, vocab) next-token log-probabilities: entries {"ca": log p(a | c)}, the rest of each row's
    probability mass spread evenly over its other tokens."""
    n = len(CHARS)
    probs = torch.zeros(n, n, dtype=torch.float64)
    fixed = torch.zeros(n, n, dtype=torch.bool)
    for pair, log_p in entries.items():
        prev, nxt = (CHARS.index(ch) for ch in pair)
        probs[prev, nxt], fixed[prev, nxt] = math.exp(log_p), True
    for row in range(n):
        free = ~fixed[row]
        probs[row, free] = (1.0 - probs[row].sum()) / free.sum()
    return probs.log()


class Bigram(torch.nn.Module):
    """A stub language model with exact log-probabilities that depend on the previous token only."""

    def __init__(self, log_probs: torch.Tensor, max_length: int | None = None) -> None:
        super().__init__()
        self.register_buffer("table", log_probs.float())
        self.max_length = max_length
        self.calls: list[tuple[int, ...]] = []

    @property
    def device(self) -> torch.device:
        return self.table.device

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        assert self.max_length is None or idx.size(1) <= self.max_length, "the window was not truncated"
        self.calls.append(tuple(idx.shape))
        return self.table[idx]  # (batch, seq, vocab) logits = log-probabilities


def lp(table: torch.Tensor, pair: str) -> float:
    """log p(pair[1] | pair[0]) of a bigram table."""
    return float(table[CHARS.index(pair[0]), CHARS.index(pair[1])])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- scoring
def test_per_token_mean_and_sum_pick_different_endings():
    # "ab" after "c": two tokens of log-probability -1 (sum -2, mean -1); "x": one token of -1.5 (sum -1.5).
    table = bigram_log_probs({"ca": -1.0, "ab": -1.0, "cx": -1.5})
    model = Bigram(table)
    examples = [Example("c", ("ab", "x"), 0), Example("c", ("ab", "x"), 1)]
    pairs = [p for e in examples[:1] for p in choice_tokens(e, encode_chars, separator="")]
    sums, counts = ending_log_likelihoods(model, pairs, max_length=8)
    torch.testing.assert_close(sums, torch.tensor([-2.0, -1.5], dtype=torch.float64), atol=1e-5, rtol=0)
    assert counts.tolist() == [2, 1]
    counts = score_examples(model, encode_chars, examples, max_length=8, separator="")
    # the mean picks "ab" (right for the first example), the sum picks "x" (right for the second)
    assert counts == Counts(correct_norm=1, correct_sum=1, total=2)
    only_first = score_examples(model, encode_chars, examples[:1], max_length=8, separator="")
    assert (only_first.acc_norm, only_first.acc) == (1.0, 0.0)


def test_the_endings_first_token_is_scored_given_the_context_and_the_context_is_not():
    table = bigram_log_probs({"ca": -0.5, "da": -3.0, "ab": -1.0, "dc": -4.0, "c ": -2.0, " a": -0.25})
    model = Bigram(table)
    example = Example("dc", ("ab", "bb"), 0)
    assert choice_tokens(example, encode_chars, " ") == [
        (encode_chars("dc"), encode_chars(" ab")),
        (encode_chars("dc"), encode_chars(" bb")),
    ]
    pairs = [(encode_chars("dc"), encode_chars("ab")), (encode_chars("cd"), encode_chars("ab"))]
    sums, counts = ending_log_likelihoods(model, pairs, max_length=8)
    # p(a | c) or p(a | d) from the context's last token, then p(b | a); p(c | d) of the context is not counted
    assert sums.tolist() == pytest.approx(
        [lp(table, "ca") + lp(table, "ab"), lp(table, "da") + lp(table, "ab")]
    )
    assert counts.tolist() == [2, 2]
    # with the separator, its token is the ending's first: " ab" after "dc" scores p(' ' | c) p(a | ' ') p(b | a)
    pairs = choice_tokens(example, encode_chars, " ")[:1]
    sums, counts = ending_log_likelihoods(model, pairs, max_length=8)
    assert sums.item() == pytest.approx(lp(table, "c ") + lp(table, " a") + lp(table, "ab"))
    assert counts.tolist() == [3]


def test_long_contexts_are_cut_from_the_left_to_the_window():
    table = bigram_log_probs({"ca": -0.7, "ab": -1.2})
    model = Bigram(table, max_length=3)
    sums, counts = ending_log_likelihoods(
        model, [(encode_chars("ddddddc"), encode_chars("ab"))], max_length=3
    )
    assert sums.item() == pytest.approx(lp(table, "ca") + lp(table, "ab"))  # the context's last token is kept
    assert counts.tolist() == [2]
    assert model.calls == [(1, 3)]
    # the window keeps the newest positions; an ending longer than it keeps its last tokens scored
    assert scoring_window([1, 2, 3, 4], [5, 6], max_length=3) == ([3, 4, 5], [4, 5, 6], 2)
    assert scoring_window([1], [5, 6, 7, 8], max_length=2) == ([6, 7], [7, 8], 2)


def test_batched_padded_scores_equal_each_sequence_scored_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    lengths = [(3, 2), (1, 5), (9, 1), (20, 3), (2, 2), (6, 4), (14, 6)]  # (context, ending); one over 16
    pairs = [(torch.randint(0, 32, (c,)).tolist(), torch.randint(0, 32, (e,)).tolist()) for c, e in lengths]
    sums, counts = ending_log_likelihoods(model, pairs, max_length=16, batch_size=3)
    for (context, ending), total, count in zip(pairs, sums, counts):
        tokens = torch.tensor(context + ending)[-17:]
        with torch.no_grad():
            log_probs = model(tokens[None, :-1])[0].log_softmax(-1)  # (seq, vocab)
        per_token = log_probs.gather(1, tokens[1:, None])[:, 0]
        assert count == len(ending)
        assert total.item() == pytest.approx(per_token[-len(ending) :].sum().item(), abs=1e-4)


def test_every_rank_runs_the_agreed_number_of_forward_passes():
    model = Bigram(bigram_log_probs({}))
    pairs = [(encode_chars("c"), encode_chars("ab"))] * 3
    ending_log_likelihoods(model, pairs, max_length=8, batch_size=2, forward_calls=5)
    assert len(model.calls) == 5 and model.calls[2:] == [(1, 1)] * 3


# -------------------------------------------------------------------------------------------------- data
def test_load_examples_reads_hellaswag_lines(tmp_path):
    rows = [
        {"ind": 4, "activity_label": "x", "ctx": "a b", "endings": ["c", "d", "x", "y"], "label": 2},
        {"ctx": "b", "endings": ["a", "c"], "label": 0},
        {"ctx": "d", "endings": ["a", "c"], "label": 1},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    path.write_text(path.read_text() + "\n\n")  # trailing blank lines are skipped
    assert load_examples(path) == [
        Example("a b", ("c", "d", "x", "y"), 2),
        Example("b", ("a", "c"), 0),
        Example("d", ("a", "c"), 1),
    ]
    assert len(load_examples(path, max_examples=2)) == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"ctx": "a", "endings": ["b", "c"]}', "missing \\['label'\\]"),
        ('{"ctx": "", "endings": ["b", "c"], "label": 0}', "'ctx' must be a non-empty string"),
        (
            '{"ctx": "a", "endings": ["b"], "label": 0}',
            "'endings' must be a list of 2 or more non-empty strings",
        ),
        ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', "'label' must be an integer in \\[0, 2\\)"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": true}', "'label' must be an integer"),
    ],
)
def test_bad_lines_name_the_line_and_the_problem(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"line 2: {message}"):
        load_examples(path)


def test_missing_file_and_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="max_examples=0"):
        load_examples(tmp_path / "missing.jsonl", max_examples=0)
    with pytest.raises(ValueError, match="every_n_validations=0"):
        MultipleChoiceEval("any.jsonl", every_n_validations=0)


# ---------------------------------------------------------------------------------------------- callback
def fake_trainer(rank: int, world: int, forced_calls: int) -> SimpleNamespace:
    """What MultipleChoiceEval.evaluate uses of a Trainer, as rank `rank` of `world`; 'max' answers forced_calls."""
    reduce = lambda t, reduce_op: torch.tensor(forced_calls) if reduce_op == "max" else t  # noqa: E731
    return SimpleNamespace(
        global_rank=rank,
        world_size=world,
        datamodule=SimpleNamespace(encode=encode_chars),
        strategy=SimpleNamespace(reduce=reduce),
        precision_plugin=SimpleNamespace(forward_context=nullcontext),
    )


def test_ranks_score_disjoint_shares_that_add_up_to_the_whole(tmp_path):
    table = bigram_log_probs({"ca": -1.0, "ab": -1.0, "cx": -1.5, "da": -0.1, "dx": -2.0})
    examples = [Example(c, ("ab", "x"), label) for c in "cdcdc" for label in (0, 1)]
    whole = score_examples(Bigram(table), encode_chars, examples, max_length=8, separator="")
    shares = []
    for rank in (0, 1):
        callback = MultipleChoiceEval("unused.jsonl", batch_size=4, separator="")
        callback._examples, callback._window = examples, 8
        model = Bigram(table)
        shares.append(callback.evaluate(fake_trainer(rank, 2, forced_calls=3), model))
        assert len(model.calls) == 3  # its own passes plus one-token passes up to the agreed count
    assert shares[0] + shares[1] == whole and whole.total == 10


def tiny_text_setup(tmp_path: Path, tokenizer: str = "bytes") -> tuple[TextDataModule, GPTLightningModule]:
    """A data module over a small generated text and a one-layer GPT for it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(400), encoding="utf-8")
    data = TextDataModule(
        sources=str(corpus),
        tokenizer=tokenizer,
        bpe_vocab_size=300,
        block_size=16,
        batch_size=4,
        val_windows=4,
        cache_dir=str(tmp_path / "cache"),
    )
    config = GPTConfig(block_size=32, vocab_size=data.vocab_size, n_layer=1, n_head=2, n_embd=16)
    return data, GPTLightningModule(config, warmup_steps=1, sample_tokens=0)


MC_ROWS = [
    {"ctx": "def value", "endings": ["index", "return", "yield"], "label": 0},
    {"ctx": "class self", "endings": ["for", "print"], "label": 1},
    {"ctx": "import while if", "endings": ["value", "def", "zzz qq"], "label": 2},
    {"ctx": "return", "endings": ["self", "while for"], "label": 0},
    {"ctx": "print", "endings": ["yield", "index"], "label": 1},
]


def test_callback_logs_both_accuracies_during_a_real_fit(tmp_path):
    data, module = tiny_text_setup(tmp_path)
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    callback = MultipleChoiceEval(str(path), max_examples=4, every_n_validations=2, batch_size=3)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=4,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        logger=CSVLogger(tmp_path, name="csv"),
        log_every_n_steps=1,
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=data)
    assert callback.validations == 4  # the sanity check is not counted
    rows = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [dict(zip(header, r.split(","))) for r in rows[1:]]
    steps = [int(r["step"]) for r in logged if r.get("val/mc_acc_norm")]
    assert steps == [1, 3]  # validations 2 and 4 of 4 (every_n_validations=2), at steps 2 and 4
    assert all(r.get("val/mc_acc") for r in logged if r.get("val/mc_acc_norm"))
    # the last validation saw the final weights: the logged figures are what scoring them directly gives
    expected = score_examples(
        module.model.eval(), data.encode, load_examples(path, 4), max_length=32, batch_size=3
    )
    assert trainer.callback_metrics["val/mc_acc_norm"].item() == pytest.approx(expected.acc_norm)
    assert trainer.callback_metrics["val/mc_acc"].item() == pytest.approx(expected.acc)
    assert callback.state_dict() == {"validations": 4}


def test_callback_with_a_missing_file_stops_fit_before_training(tmp_path):
    data, module = tiny_text_setup(tmp_path)
    trainer = quiet_trainer(
        tmp_path, max_steps=2, callbacks=[MultipleChoiceEval(str(tmp_path / "none.jsonl"))]
    )
    with pytest.raises(FileNotFoundError, match="none.jsonl"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0


# ----------------------------------------------------------------------------------------------- command
def fitted_checkpoint(tmp_path: Path, tokenizer: str) -> tuple[Path, TextDataModule]:
    """Train the tiny GPT one step and save its checkpoint (the datamodule's init arguments included)."""
    data, module = tiny_text_setup(tmp_path, tokenizer)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path, data


def test_evaluate_command_scores_a_checkpoint_with_its_runs_bpe_tokenizer(tmp_path, capsys):
    ckpt, data = fitted_checkpoint(tmp_path, "bpe")
    tokenizer = tokenizer_from_checkpoint(ckpt)
    text = "def index(self):\n    return value"
    assert tokenizer is not data.tokenizer and tokenizer.encode(text) == data.encode(text)
    assert len(data.encode("return")) == 1  # a learned merge: the BPE, not bytes

    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    out = tmp_path / "result" / "mc.json"
    assert (
        evaluate_main(["--ckpt_path", str(ckpt), "--data", str(mc), "--batch_size", "2", "--out", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    model, _ = load_target_model(ckpt, "gpt")
    expected = score_examples(model, data.encode, load_examples(mc), max_length=32)
    assert (result["acc_norm"], result["acc"], result["examples"]) == (expected.acc_norm, expected.acc, 5)
    printed = capsys.readouterr().out
    assert f"acc_norm {expected.acc_norm:.4f}" in printed and f"acc      {expected.acc:.4f}" in printed


def test_evaluate_command_user_errors_are_short_messages(tmp_path, capsys):
    ckpt, _ = fitted_checkpoint(tmp_path, "bytes")
    assert evaluate_main(["--ckpt_path", str(ckpt), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "error: multiple-choice data" in capsys.readouterr().err
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    assert evaluate_main(["--ckpt_path", str(tmp_path / "none.ckpt"), "--data", str(mc)]) == 2
    assert "none.ckpt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="datamodule_hyper_parameters"):
        tokenizer_from_checkpoint({"state_dict": {}})
    assert tokenizer_from_checkpoint(ckpt).describe() == "UTF-8 bytes"


def test_ddp_ranks_share_the_file_and_log_what_the_command_finds(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers.cli import FAST, ROOT, TINY, run_train

    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)  # 5 examples: 3 on rank 0, 2 on rank 1
    preset = ROOT / "configs" / "callbacks" / "multiple_choice.yaml"
    ddp = ROOT / "configs" / "trainer" / "ddp_cpu.yaml"
    fit = run_train(
        tmp_path, "fit", "--config", str(TINY), "--config", str(ddp), "--config", str(preset),
        "--trainer.callbacks.init_args.path", str(mc), *FAST, "--trainer.max_steps=3", "--model.init_args.sample_tokens=0",
        timeout=900,
    )  # fmt: skip
    assert "on 5 examples of" in fit.stdout + fit.stderr  # the counts of both ranks, summed
    run = tmp_path / "lightning_logs" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    logged = {tag: events.Scalars(tag)[-1].value for tag in ("val/mc_acc_norm", "val/mc_acc")}
    out = tmp_path / "mc.json"
    ckpt = run / "checkpoints" / "last.ckpt"  # the weights of the last validation (step 3)
    assert (
        evaluate_main(["--ckpt_path", str(ckpt), "--data", str(mc), "--device", "cpu", "--out", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    assert logged["val/mc_acc_norm"] == pytest.approx(result["acc_norm"])
    assert logged["val/mc_acc"] == pytest.approx(result["acc"])
