"""What the text data path tells its user and how validation is measured: the data messages, max_chars on
user sources, evenly spread validation windows, the sample prompt from validation data, and bits per byte."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DistributedSampler

from datamodules import TextDataModule
from datamodules.corpus import DOC_SEPARATOR, CorpusStats, corpus_pieces
from datamodules.text import evenly_spread
from lightning_modules.gpt import GPTConfig, GPTLightningModule
from tests.helpers.cli import FAST, TINY, run_train
from tests.helpers.text import make_text
from tests.helpers.trainers import quiet_trainer

GPT_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "gpt2").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("hf_offline")  # nothing here may reach the Hugging Face hub


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def messages():
    """The rank-zero info lines (what train.py shows) emitted during the test."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler = _Lines()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Three small ASCII text files (about 33k characters)."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i, n in enumerate((400, 300, 300)):
        (root / f"{i}.txt").write_text(make_text(n, seed=i))
    return root


def corpus_text(root: Path) -> str:
    """The corpus as TextDataModule reads it: the files in order, joined by DOC_SEPARATOR."""
    return DOC_SEPARATOR.join(p.read_text() for p in sorted(root.iterdir()))


def make_dm(source: Path | None, tmp_path: Path, **kwargs) -> TextDataModule:
    defaults = {"tokenizer": "bpe", "bpe_vocab_size": 300, "block_size": 16, "batch_size": 4}
    return TextDataModule(
        sources=None if source is None else str(source),
        cache_dir=str(tmp_path / "cache"),
        **{**defaults, **kwargs},
    )


def _number(text: str) -> int:
    return int(text.replace(",", ""))


# ---------------------------------------------------------------------------------------------- messages
def test_messages_say_corpus_tokenizer_splits_and_cache(corpus: Path, tmp_path: Path, messages) -> None:
    dm = make_dm(corpus, tmp_path)
    dm.prepare_data()
    dm.setup()
    chars = len(corpus_text(corpus))
    first = [m for m in messages if m.startswith("data: ")]
    assert len(first) == len(messages) <= 6, messages
    text = "\n".join(first)
    assert "tokenising 3 files" in text and str(dm.cache_path) in text
    assert re.search(rf"corpus: 3 files .*: {chars:,} characters, 3 documents", text), text
    assert re.search(r"tokenizer: byte-level BPE, vocabulary 300.*trained now", text), text
    train_tokens, val_tokens = len(dm.train_dataset.span), len(dm.val_dataset.span)
    split = re.search(
        r"tokens: train ([\d,]+) \(([\d,]+) windows of 16\), validation ([\d,]+) \(([\d,]+) windows", text
    )
    assert split, text
    assert [_number(g) for g in split.groups()] == [
        train_tokens, len(dm.train_dataset), val_tokens, len(dm.val_dataset)
    ]  # fmt: skip
    assert sum(1 for m in first if "tokens: train" in m) == 1  # setup after prepare_data says nothing new

    messages.clear()
    again = make_dm(corpus, tmp_path)
    again.setup()
    text = "\n".join(messages)
    assert f"reusing the tokenised corpus in {again.cache_path}" in text
    assert f"{chars:,} characters" in text  # the corpus figures come back from the cache
    assert f"loaded from {again.cache_path / 'tokenizer.json'}" in text and "trained now" not in text
    assert "tokenising" not in text and "training" not in text


def test_messages_for_bytes_and_bin_sources(corpus: Path, tmp_path: Path, messages) -> None:
    make_dm(corpus, tmp_path, tokenizer="bytes").setup()
    assert any(m == "data: tokenizer: UTF-8 bytes, vocabulary 256" for m in messages), messages
    messages.clear()
    (tmp_path / "nano").mkdir()
    (np.arange(3000) % 256).astype(np.uint16).tofile(tmp_path / "nano" / "train.bin")
    dm = make_dm(tmp_path / "nano", tmp_path, tokenizer="bytes")
    dm.setup()
    text = "\n".join(messages)
    assert "train.bin" in text and "tokens: train 2,850" in text and "validation 150" in text, text


# ------------------------------------------------------------------------------------------- max_chars
def test_corpus_stats_count_what_was_cut() -> None:
    docs = ["a" * 10, "", "b" * 10, "c" * 5]
    full = len(DOC_SEPARATOR.join(d for d in docs if d))
    for cap, truncated in [(None, False), (full, False), (full - 1, True), (10, True), (12, True)]:
        counted, peeked = CorpusStats(), CorpusStats()
        text = "".join(corpus_pieces(docs, cap, counted, count_rest=True))
        assert text == DOC_SEPARATOR.join(d for d in docs if d)[:cap]
        assert "".join(corpus_pieces(docs, cap, peeked)) == text
        assert counted.chars == peeked.chars == len(text)
        assert counted.truncated is peeked.truncated is truncated, cap
        assert counted.available == (None if cap is None else full)  # counted once the cap is reached
        assert peeked.available is None


def test_max_chars_on_user_sources_warns_with_numbers(corpus: Path, tmp_path: Path) -> None:
    chars = len(corpus_text(corpus))
    with pytest.warns(UserWarning, match=rf"max_chars=5,000 cuts the corpus: 5,000 of {chars:,} characters"):
        dm = make_dm(corpus, tmp_path, tokenizer="bytes", max_chars=5000)
        dm.setup()
    assert len(dm.train_dataset.span) + len(dm.val_dataset.span) == 5000  # the cap does apply
    with pytest.warns(
        UserWarning, match="max_chars=5,000 cuts"
    ):  # and is said again when the cache is reused
        again = make_dm(corpus, tmp_path, tokenizer="bytes", max_chars=5000)
        again.setup()
    assert again.cache_hit is True


@pytest.mark.filterwarnings("error::UserWarning")
def test_no_warning_when_nothing_is_cut(corpus: Path, tmp_path: Path) -> None:
    chars = len(corpus_text(corpus))
    whole = make_dm(corpus, tmp_path, tokenizer="bytes")  # max_chars None: all of the user's text
    whole.setup()
    assert len(whole.train_dataset.span) + len(whole.val_dataset.span) == chars
    exact = make_dm(corpus, tmp_path, tokenizer="bytes", max_chars=chars)  # a cap the corpus fits
    exact.setup()
    assert exact.cache_path != whole.cache_path
    default = make_dm(None, tmp_path, tokenizer="bytes", max_chars=20_000)  # the embedded corpus: by design
    default.setup()
    assert len(default.train_dataset.span) + len(default.val_dataset.span) >= 20_000


def test_max_chars_on_a_dataset_counts_its_characters(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = [make_text(20, seed=i) for i in range(10)] + [""]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    available = len(DOC_SEPARATOR.join(t for t in texts if t))
    with pytest.warns(UserWarning, match=rf"2,000 of {available:,} characters of dataset_name="):
        dm = TextDataModule(
            dataset_name=str(tmp_path / "ds"), tokenizer="bytes", max_chars=2000, block_size=16,
            cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        dm.setup()


# -------------------------------------------------------------------------------------- validation windows
def test_evenly_spread_indices() -> None:
    for total in (1, 7, 100, 684):
        for count in (1, 2, 5, 320, 1000):
            picked = evenly_spread(count, total)
            assert len(picked) == min(count, total) and picked == sorted(set(picked))
            assert picked[0] >= 0 and picked[-1] < total
            step = total / len(picked)  # one index in each of len(picked) equal parts: none left out
            assert set(np.diff(picked).tolist()) <= {math.floor(step), math.ceil(step)}
            assert picked[0] <= step / 2 and picked[-1] >= total - 1 - step / 2
    assert evenly_spread(4, 100) == [12, 37, 62, 87]


def test_val_windows_are_an_even_fixed_subset(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, tokenizer="bytes", val_fraction=0.2, val_windows=10, batch_size=3)
    dm.setup()
    total = len(dm.val_dataset)
    assert total > 100
    starts = [dm.val_dataset.start(i) for i in evenly_spread(10, total)]
    windows = [(x, y) for x, y in dm.val_dataloader()]
    xs = torch.cat([x for x, _ in windows])
    assert xs.shape == (10, 16)  # the last partial batch is kept
    expected = torch.stack(
        [torch.from_numpy(dm.val_dataset.tokens[s : s + 16].astype(np.int64)) for s in starts]
    )
    assert torch.equal(xs, expected)
    assert starts[0] < dm.val_dataset.start(total // 10) and starts[-1] > dm.val_dataset.start(
        total - total // 10
    )
    same = make_dm(corpus, tmp_path, tokenizer="bytes", val_fraction=0.2, val_windows=10, batch_size=3)
    assert torch.equal(torch.cat([x for x, _ in same.val_dataloader()]), xs)  # the same in every run
    subset = dm.val_dataloader().dataset
    shards = [set(DistributedSampler(subset, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert shards[0] | shards[1] == set(range(10)) and not shards[0] & shards[1]  # each rank its share
    assert sum(len(x) for x, _ in dm.test_dataloader()) == total  # testing reads every window
    everything = make_dm(corpus, tmp_path, tokenizer="bytes", val_fraction=0.2, val_windows=10_000)
    assert everything.val_dataloader().dataset is everything.val_dataset


def test_val_windows_must_be_positive() -> None:
    with pytest.raises(ValueError, match="val_windows=0"):
        TextDataModule(val_windows=0)


@pytest.mark.parametrize("path", GPT_CONFIGS, ids=lambda p: p.name)
def test_gpt_configs_validate_on_the_data_with_a_data_prompt(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    assert "limit_val_batches" not in config["trainer"]
    assert "sample_prompt" not in config["model"]["init_args"]
    assert "val_windows" in config["data"]["init_args"]


# ------------------------------------------------------------------------------------------ sample prompt
def test_sample_prompt_is_a_line_of_the_validation_data(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, block_size=64)
    prompt = dm.sample_prompt()
    val_text = dm.decode(dm.val_dataset.tokens.tolist())
    assert prompt.strip() and "\n" not in prompt and "\ufffd" not in prompt
    assert f"\n{prompt}" in val_text[: len(dm.decode(dm.val_dataset.tokens[:65].tolist()))]
    assert len(dm.encode(prompt)) <= 16
    assert make_dm(corpus, tmp_path, block_size=64).sample_prompt() == prompt


@pytest.mark.parametrize(("setting", "starts_with"), [(None, "data"), ("zebra ", "zebra ")])
def test_gpt_sample_starts_from_the_data_prompt_or_the_given_one(
    corpus: Path, tmp_path: Path, setting: str | None, starts_with: str
) -> None:
    dm = make_dm(corpus, tmp_path, tokenizer="bytes", val_windows=2)
    module = GPTLightningModule(
        GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16), vocab_size=256, sample_prompt=setting,
        sample_tokens=4, warmup_steps=0,
    )  # fmt: skip
    trainer = quiet_trainer(tmp_path, max_steps=1, val_check_interval=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    sample = (tmp_path / "samples.txt").read_text()  # no logger: the run directory is default_root_dir
    prompt = dm.sample_prompt() if starts_with == "data" else starts_with
    assert sample.split("\n", 1)[1].startswith(prompt), sample


# ---------------------------------------------------------------------------------------------- token bytes
def test_token_bytes_bytes_and_bpe(corpus: Path, tmp_path: Path) -> None:
    (corpus / "3.txt").write_text("ünïcödé ✓ and 😀 emoji\n" * 50)  # multi-byte characters too
    byte_dm = make_dm(corpus, tmp_path, tokenizer="bytes")
    assert torch.equal(byte_dm.token_bytes, torch.ones(256, dtype=torch.long))
    dm = make_dm(corpus, tmp_path)
    table = dm.token_bytes
    assert table.shape == (300,) and table.dtype == torch.long
    tokens = np.concatenate([dm.train_dataset.tokens, dm.val_dataset.tokens]).astype(np.int64)
    assert int(table[torch.from_numpy(tokens)].sum()) == len(corpus_text(corpus).encode("utf-8"))  # exact
    for i in range(dm.tokenizer.tokenizer.get_vocab_size()):
        alone = dm.decode([i])
        if "\ufffd" not in alone:  # a token holding a whole number of characters
            assert int(table[i]) == len(alone.encode("utf-8")), i


def test_token_bytes_of_a_transformers_tokenizer_decode_each_token(corpus: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([make_text(200)], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path / "tok")
    dm = make_dm(corpus, tmp_path, tokenizer=str(tmp_path / "tok"))
    table = dm.token_bytes
    assert table.shape == (dm.vocab_size,)
    assert [int(b) for b in table] == [len(dm.decode([i]).encode("utf-8")) for i in range(dm.vocab_size)]
    tokens = torch.from_numpy(dm.val_dataset.tokens.astype(np.int64))
    assert int(table[tokens].sum()) == len(dm.decode(tokens.tolist()).encode("utf-8"))  # ASCII text: exact


# ---------------------------------------------------------------------------------------------- bits per byte
def tiny_gpt(vocab_size: int) -> GPTLightningModule:
    config = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)
    return GPTLightningModule(config, vocab_size=vocab_size, sample_tokens=0).eval()


def test_bpb_is_loss_over_ln2_with_bytes(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, tokenizer="bytes", val_windows=9)
    module = tiny_gpt(256)
    (val,) = quiet_trainer(tmp_path).validate(module, datamodule=dm, verbose=False)
    assert val["val/bpb"] == pytest.approx(val["val/loss"] / math.log(2), rel=1e-5)
    (test,) = quiet_trainer(tmp_path).test(module, datamodule=dm, verbose=False)
    assert test["test/bpb"] == pytest.approx(test["test/loss"] / math.log(2), rel=1e-5)
    assert test["test/loss"] != pytest.approx(val["val/loss"], rel=1e-6)  # test read every window


def test_bpb_with_bpe_matches_a_direct_computation(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, val_fraction=0.02, batch_size=64)
    module = tiny_gpt(dm.vocab_size)
    (metrics,) = quiet_trainer(tmp_path).validate(module, datamodule=dm, verbose=False)
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            nats += F.cross_entropy(module(x).flatten(0, 1), y.flatten(), reduction="sum").item()
            n_bytes += len(dm.decode(y.flatten().tolist()).encode("utf-8"))  # windows are contiguous
    assert n_bytes > 2 * (len(dm.val_dataset) * 16)  # BPE tokens average more than one byte here
    assert metrics["val/bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert metrics["val/bpb"] < metrics["val/loss"] / math.log(2) / 2


def test_no_bpb_without_token_bytes(tmp_path: Path) -> None:
    module = tiny_gpt(64)
    data = torch.randint(0, 64, (4, 17))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:]))
    (metrics,) = quiet_trainer(tmp_path).validate(module, loader, verbose=False)
    assert "val/loss" in metrics and "val/bpb" not in metrics


# ---------------------------------------------------------------------------------------------- train.py
def test_train_py_shows_the_data_messages_and_logs_bpb(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [
        *FAST,
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--data.init_args.val_windows=4",
    ]
    result = run_train(tmp_path, "fit", "--config", str(TINY), *args)
    for line in (
        "data: tokenising the embedded default corpus",
        "data: corpus:",
        "data: tokenizer:",
        "data: tokens:",
    ):
        assert line in result.stderr, result.stderr[-3000:]
    assert "4 of them evaluated, evenly spread" in result.stderr
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0")).Reload()
    assert "val/bpb" in events.Tags()["scalars"]


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_checkpoints_carry_the_tokenizer_itself(kind, corpus, tmp_path):
    from datamodules.tokenizer import tokenizer_from_state

    dm = TextDataModule(
        sources=str(corpus), tokenizer=kind, bpe_vocab_size=300, block_size=16, batch_size=2,
        cache_dir=str(tmp_path / "cache"), num_workers=0,
    )  # fmt: skip
    if kind == "bpe":
        assert dm.state_dict() == {}  # nothing before the BPE is trained or loaded
    dm.setup()
    state = dm.state_dict()["tokenizer"]
    rebuilt = tokenizer_from_state(state)
    text = "def f(x):\n    return x  # ünïcödé\n"
    assert rebuilt.encode(text) == dm.encode(text) and rebuilt.decode(dm.encode(text)) == dm.decode(
        dm.encode(text)
    )
    assert rebuilt.vocab_size == dm.tokenizer.vocab_size
