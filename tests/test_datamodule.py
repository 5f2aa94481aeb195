"""TextDataModule: batches, caching, splits, DDP shards, tokenizers, .bin / dataset / default sources, errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DistributedSampler

import datamodules.text as text_module
from datamodules import TextDataModule, default_corpus_files
from tests.helpers.text import make_text

pytestmark = pytest.mark.usefixtures("hf_offline")  # nothing here may reach the Hugging Face hub


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of three small text files (about 40k characters), one in a subfolder, one binary file."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(make_text(400, seed=1))
    (root / "b.md").write_text("# Notes\n" + make_text(300, seed=2) + "ünïcödé ✓\n")
    (root / "sub" / "c.py").write_text(make_text(300, seed=3))
    (root / "image.bin.dat").write_bytes(bytes(range(256)) * 4)
    return root


def make_dm(source: Path | str | None, tmp_path: Path, **kwargs) -> TextDataModule:
    defaults = {"tokenizer": "bpe", "bpe_vocab_size": 300, "block_size": 16, "batch_size": 4}
    return TextDataModule(
        sources=None if source is None else str(source),
        cache_dir=str(tmp_path / "cache"),
        **{**defaults, **kwargs},
    )


# ----------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("tokenizer", ["bpe", "bytes"])
def test_batches_are_shifted_windows(corpus: Path, tmp_path: Path, tokenizer: str) -> None:
    dm = make_dm(corpus, tmp_path, tokenizer=tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < dm.vocab_size
    ds = dm.train_dataset
    assert 0 <= ds.offset < dm.block_size
    xi, yi = ds[3]
    start = ds.start(3)
    assert torch.equal(xi, torch.from_numpy(ds.tokens[start : start + 16].astype(np.int64)))
    assert torch.equal(yi, torch.from_numpy(ds.tokens[start + 1 : start + 17].astype(np.int64)))
    assert dm.val_dataset.offset == 0


def test_dataloader_options(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, tokenizer="bytes", batch_size=3, num_workers=1, prefetch_factor=3)
    dm.setup("fit")  # prepare_data was never called on this process
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last and not val.drop_last and not train.pin_memory
    assert train.persistent_workers and train.prefetch_factor == 3
    assert sum(len(x) for x, _ in val) == len(dm.val_dataset)  # every val window, partial batch kept
    assert dm.test_dataloader().dataset is dm.val_dataset
    plain = make_dm(corpus, tmp_path, tokenizer="bytes", persistent_workers=True)
    plain.trainer = Trainer(accelerator="cpu", devices=1, logger=False)
    loader = plain.train_dataloader()
    assert loader.num_workers == 0 and not loader.persistent_workers and not loader.pin_memory
    assert make_dm(corpus, tmp_path, tokenizer="bytes", pin_memory=True).val_dataloader().pin_memory


def test_bpe_trained_vocab_fits(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, bpe_vocab_size=320)
    assert dm.vocab_size == 320  # known before any work
    dm.setup()
    assert dm.tokenizer.tokenizer.get_vocab_size() <= 320
    tokens = np.concatenate([dm.train_dataset.tokens, dm.val_dataset.tokens])
    assert tokens.dtype == np.uint16 and int(tokens.max()) < 320


# ------------------------------------------------------------------------------------------------- cache
def test_cache_reused_and_keyed(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_dm(corpus, tmp_path)
    first.prepare_data()
    assert first.cache_hit is False
    tokenizer_json = first.cache_path / "tokenizer.json"
    stamp = tokenizer_json.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("BPE retrained despite the cache")

    monkeypatch.setattr(text_module, "train_bpe", no_training)
    second = make_dm(corpus, tmp_path)
    second.prepare_data()
    second.prepare_data()  # idempotent
    assert second.cache_hit is True and second.cache_path == first.cache_path
    assert tokenizer_json.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    assert not list(first.cache_path.glob("*.tmp")) and not list(first.cache_path.glob(".*"))

    def fresh_cache(dm: TextDataModule) -> Path:
        dm.prepare_data()
        assert dm.cache_hit is False and dm.cache_path != first.cache_path
        return dm.cache_path

    paths = [
        fresh_cache(make_dm(corpus, tmp_path, tokenizer="bytes")),
        fresh_cache(make_dm(corpus, tmp_path, bpe_vocab_size=301)),
        fresh_cache(make_dm(corpus, tmp_path, max_chars=5000)),
    ]
    (corpus / "a.txt").write_text(make_text(400, seed=99))
    paths.append(fresh_cache(make_dm(corpus, tmp_path)))
    assert len(set(paths)) == len(paths)


def test_failed_tokenisation_leaves_no_cache(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(self, texts):
        raise RuntimeError("crash while tokenising")

    monkeypatch.setattr(text_module.ByteTokenizer, "encode_array", crash)
    dm = make_dm(corpus, tmp_path, tokenizer="bytes")
    with pytest.raises(RuntimeError, match="crash"):
        dm.prepare_data()
    assert list(dm.cache_path.iterdir()) == []
    monkeypatch.undo()
    again = make_dm(corpus, tmp_path, tokenizer="bytes")
    again.setup()
    assert again.cache_hit is False and again.cache_path == dm.cache_path


# ------------------------------------------------------------------------------------------------ splits
def test_split_is_deterministic_and_disjoint(corpus: Path, tmp_path: Path) -> None:
    a = make_dm(corpus, tmp_path / "one")
    b = make_dm(corpus, tmp_path / "two")
    a.setup()
    b.setup()
    assert a.cache_path != b.cache_path  # tokenised independently
    assert np.array_equal(a.train_dataset.tokens, b.train_dataset.tokens)
    assert np.array_equal(a.val_dataset.tokens, b.val_dataset.tokens)
    assert a.train_dataset.offset == b.train_dataset.offset
    train, val = a.train_dataset.span, a.val_dataset.span
    assert train.path == val.path and train.begin == 0 and train.end == val.begin
    assert len(val) == int((len(train) + len(val)) * 0.05)


def test_distributed_shards_are_disjoint_and_cover(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, tokenizer="bytes")
    dm.setup()
    ds = dm.train_dataset
    shards = [
        [ds.start(i) for i in DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=5)]
        for r in (0, 1)
    ]
    everything = {ds.start(i) for i in range(len(ds))}
    padding = (2 - len(ds) % 2) % 2  # DistributedSampler repeats this many windows to even out the shards
    assert set(shards[0]) | set(shards[1]) == everything
    assert len(set(shards[0]) & set(shards[1])) == padding
    assert len(shards[0]) == len(shards[1]) == math.ceil(len(ds) / 2)
    assert all(s % dm.block_size == ds.offset for s in everything)  # non-overlapping windows


# ---------------------------------------------------------------------------------------------- tokenizers
def test_bytes_round_trip(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, tokenizer="bytes")
    assert dm.vocab_size == 256
    text = "héllo, wörld ✓\n\tdef f(): pass"
    assert dm.encode(text) == list(text.encode("utf-8"))
    assert dm.decode(dm.encode(text)) == text


def test_bpe_round_trip(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path)
    with pytest.raises(RuntimeError, match="setup"):
        dm.encode("x")
    dm.setup()
    for text in ["def total(self):\n    return value", "ünïcödé ✓ and 😀 emoji", ""]:
        ids = dm.encode(text)
        assert all(0 <= i < 300 for i in ids)
        assert dm.decode(ids) == text
    assert len(dm.encode("def return class import")) < len("def return class import")


def test_hf_tokenizer_from_local_directory(corpus: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    raw.train_from_iterator([make_text(200)], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>").save_pretrained(tmp_path / "tok")

    dm = make_dm(corpus, tmp_path, tokenizer=str(tmp_path / "tok"))
    assert dm.vocab_size == raw.get_vocab_size()
    dm.setup()
    text = "def value(self):\n    return ünï"
    assert dm.decode(dm.encode(text)) == text
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16) and int(x.max()) < dm.vocab_size
    assert "<eos>" not in dm.decode(dm.train_dataset.tokens[:200].tolist())  # no special tokens added


# ---------------------------------------------------------------------------------------------- .bin files
def write_bin(path: Path, tokens: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = np.memmap(path, dtype=tokens.dtype, mode="w+", shape=tokens.shape)
    out[:] = tokens
    out.flush()


def test_bin_directory_with_val(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 256, 5000, dtype=np.uint16), rng.integers(0, 256, 600, dtype=np.uint16)
    write_bin(tmp_path / "nano" / "train.bin", train)
    write_bin(tmp_path / "nano" / "val.bin", val)
    dm = make_dm(tmp_path / "nano", tmp_path, tokenizer="bytes")
    dm.setup()
    assert np.array_equal(dm.train_dataset.tokens, train) and np.array_equal(dm.val_dataset.tokens, val)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_single_bin_file_is_split(tmp_path: Path, dtype: str) -> None:
    tokens = np.arange(10_000, dtype=dtype) % 256
    write_bin(tmp_path / "tokens.bin", tokens)
    dm = make_dm(tmp_path / "tokens.bin", tmp_path, tokenizer="bytes", bin_dtype=dtype, val_fraction=0.1)
    dm.setup()
    assert np.array_equal(dm.train_dataset.tokens, tokens[:9000])
    assert np.array_equal(dm.val_dataset.tokens, tokens[9000:])


def test_bin_token_ids_beyond_vocab(tmp_path: Path) -> None:
    write_bin(tmp_path / "tokens.bin", np.array([1, 2, 50256] * 1000, dtype=np.uint16))
    dm = make_dm(tmp_path / "tokens.bin", tmp_path, tokenizer="bytes")
    with pytest.raises(ValueError, match="50256.*vocab_size=256"):
        dm.setup()


def test_bin_with_bpe_needs_its_tokenizer(corpus: Path, tmp_path: Path) -> None:
    write_bin(tmp_path / "nano" / "train.bin", np.arange(3000, dtype=np.uint16) % 300)
    dm = make_dm(tmp_path / "nano", tmp_path, tokenizer="bpe")
    with pytest.raises(ValueError, match="tokenizer.json"):
        dm.setup()
    trained = make_dm(corpus, tmp_path)  # a BPE of 300 tokens, placed beside the .bin
    trained.setup()
    (tmp_path / "nano" / "tokenizer.json").write_text((trained.cache_path / "tokenizer.json").read_text())
    dm = make_dm(tmp_path / "nano", tmp_path, tokenizer="bpe")
    dm.setup()
    assert dm.decode(dm.encode("def value")) == "def value"


# ------------------------------------------------------------------------------------------ default corpus
def test_default_corpus_files() -> None:
    files = default_corpus_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    banned = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    assert not any(banned & set(f.parts) for f in files)
    assert any(f.name == "functools.py" for f in files)


def test_default_corpus_datamodule(tmp_path: Path) -> None:
    dm = make_dm(None, tmp_path, tokenizer="bytes", max_chars=200_000, block_size=64)
    dm.setup()
    n_tokens = len(dm.train_dataset.tokens) + len(dm.val_dataset.tokens)
    assert 200_000 <= n_tokens < 220_000  # 200k characters, a few multi-byte ones
    assert "def " in dm.decode(dm.train_dataset.tokens[:5000].tolist())
    assert TextDataModule(tokenizer="bytes").max_chars == 6_000_000


# ---------------------------------------------------------------------------------------------- datasets
def test_local_datasets_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = [make_text(50, seed=i) for i in range(8)]
    datasets.Dataset.from_dict({"body": texts, "n": list(range(8))}).save_to_disk(str(tmp_path / "ds"))
    dm = TextDataModule(
        dataset_name=str(tmp_path / "ds"),
        text_column="body",
        tokenizer="bytes",
        block_size=16,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup()
    tokens = np.concatenate([dm.train_dataset.tokens, dm.val_dataset.tokens])
    assert bytes(tokens.astype(np.uint8)) == "\n\n".join(texts).encode()
    again = TextDataModule(
        dataset_name=str(tmp_path / "ds"),
        text_column="body",
        tokenizer="bytes",
        cache_dir=str(tmp_path / "cache"),
    )
    again.prepare_data()
    assert again.cache_hit is True
    wrong = TextDataModule(
        dataset_name=str(tmp_path / "ds"), text_column="txt", cache_dir=str(tmp_path / "c2")
    )
    with pytest.raises(ValueError, match="'txt'.*body"):
        wrong.setup()


def test_streaming_local_data_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (tmp_path / "jsonl").mkdir()
    rows = [{"text": f"row {i}: " + make_text(5, seed=i)} for i in range(100)]
    (tmp_path / "jsonl" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = TextDataModule(
        dataset_name=str(tmp_path / "jsonl"),
        streaming=True,
        max_chars=3000,
        tokenizer="bytes",
        block_size=16,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup()
    tokens = np.concatenate([dm.train_dataset.tokens, dm.val_dataset.tokens])
    assert bytes(tokens.astype(np.uint8)) == "\n\n".join(r["text"] for r in rows).encode()[:3000]


# ------------------------------------------------------------------------------------------------ entropy
def test_unigram_entropy_of_known_bytes(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("x" * 900 + "aaab" * 25)
    dm = make_dm(tmp_path / "t.txt", tmp_path, tokenizer="bytes", val_fraction=0.1, block_size=8)
    dm.setup()
    assert bytes(dm.val_dataset.tokens.astype(np.uint8)) == b"aaab" * 25
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert dm.unigram_entropy() == pytest.approx(expected, abs=1e-12)
    assert dm.unigram_entropy("train") == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="'test'"):
        dm.unigram_entropy("test")


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"block_size": 0}, "block_size=0"),
        ({"batch_size": -2}, "batch_size=-2"),
        ({"val_fraction": 0.0}, "val_fraction=0.0"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"bpe_vocab_size": 256}, "bpe_vocab_size=256"),
        ({"bin_dtype": "int8"}, "bin_dtype='int8'.*uint16"),
        ({"max_chars": 0}, "max_chars=0"),
        ({"sources": "a.txt", "dataset_name": "wikitext"}, "not both"),
    ],
)
def test_bad_numbers_fail_in_init(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        TextDataModule(**kwargs)


@pytest.mark.parametrize("name", ["no-such-tokenizer-xyz", "/no/such/tokenizer/dir"])
def test_unknown_tokenizer(name: str) -> None:
    dm = TextDataModule(tokenizer=name)  # loaded lazily: configs instantiate before the directory exists
    assert dm.vocab_size is None
    with pytest.raises(ValueError, match=f"{name}.*'bpe'.*'bytes'.*local tokenizer directory"):
        dm.prepare_data()


@pytest.mark.parametrize("pattern", ["missing.txt", "nothing/**/*.txt", "no_dir/"])
def test_missing_source(tmp_path: Path, pattern: str) -> None:
    dm = make_dm(tmp_path / pattern, tmp_path)
    with pytest.raises(FileNotFoundError, match=pattern.split("/")[0]):
        dm.prepare_data()


def test_missing_bin_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gone.bin"):
        make_dm(tmp_path / "gone.bin", tmp_path, tokenizer="bytes").setup()


@pytest.mark.parametrize("tokenizer", ["bpe", "bytes"])
def test_empty_files(tmp_path: Path, tokenizer: str) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02" * 10)
    dm = make_dm(tmp_path / "*.txt", tmp_path, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no text.*empty.txt"):
        dm.prepare_data()


def test_corpus_shorter_than_a_window(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("a" * 300)
    dm = make_dm(tmp_path / "short.txt", tmp_path, tokenizer="bytes", block_size=64)
    with pytest.raises(ValueError, match=r"train has 285 tokens and val 15.*block_size \+ 1 = 65"):
        dm.setup()


def test_no_tmp_files_left(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path)
    dm.setup()
    assert sorted(p.name for p in dm.cache_path.iterdir()) == ["meta.json", "tokenizer.json", "tokens.bin"]
    assert os.path.getsize(dm.cache_path / "tokens.bin") == 2 * (
        len(dm.train_dataset.tokens) + len(dm.val_dataset.tokens)
    )
