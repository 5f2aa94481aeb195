"""`python -m datamodules.prepare` and reading its token shards with `TextDataModule`: the split, parallel and
resumed runs giving the same bytes, tokenizer identity checks, sources, errors. Nothing downloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules import TextDataModule
from datamodules.prepare import (
    PRESETS,
    PrepareConfig,
    build_parser,
    config_from_args,
    is_validation,
    main,
    prepare,
    split_document,
)
from datamodules.shards import HEADER_BYTES, ShardSpan, read_header
from tests.helpers.text import make_text

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("hf_offline")  # nothing here may reach the Hugging Face hub


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Twelve text files of 2-6k characters (one with non-ASCII text) and a binary file that is skipped."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(12):
        (root / f"doc{i:02d}.txt").write_text(
            make_text(60 + 25 * (i % 5), seed=i) + ("ünï ✓\n" if i == 3 else "")
        )
    (root / "blob.dat").write_bytes(bytes(range(256)) * 8)
    return root


def run(corpus: Path, out: Path, **kwargs) -> dict:
    settings = {
        "tokenizer": "bytes",
        "num_proc": 0,
        "progress": False,
        "shard_tokens": 8000,
        "val_fraction": 0.25,
    }
    settings.update(kwargs)
    return prepare(PrepareConfig(out_dir=out, files=[str(corpus)], **settings))


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def dm_of(folder: Path, **kwargs) -> TextDataModule:
    defaults = {"tokenizer": "bytes", "block_size": 16, "batch_size": 4, "pin_memory": False}
    return TextDataModule(
        sources=str(folder), cache_dir=str(folder.parent / "cache"), **{**defaults, **kwargs}
    )


# ---------------------------------------------------------------------------------------------- the split
def test_documents_are_cut_at_line_breaks() -> None:
    text = make_text(200, seed=7)
    pieces = split_document(text, 500)
    assert "".join(pieces) == text and len(pieces) > 1
    assert all(len(p) <= 500 for p in pieces) and all(p.endswith("\n") for p in pieces)
    assert split_document("x" * 1200, 500) == ["x" * 500, "x" * 500, "x" * 200]  # no line break: hard cut


def test_validation_is_every_nth_piece() -> None:
    assert [i for i in range(12) if is_validation(i, 0.25)] == [3, 7, 11]
    assert sum(is_validation(i, 0.05) for i in range(1000)) == 50


def test_validation_documents_are_fixed_and_tokens_round_trip(corpus: Path, tmp_path: Path) -> None:
    index = run(corpus, tmp_path / "out", separator="\n")
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]  # one piece each (< max_doc_chars)
    dm = dm_of(tmp_path / "out")
    dm.setup()
    val = bytes(np.asarray(dm.val_dataset.tokens).astype(np.uint8)).decode()
    train = bytes(np.asarray(dm.train_dataset.tokens).astype(np.uint8)).decode()
    assert val == "".join(texts[i] + "\n" for i in (3, 7, 11))  # every 4th document
    assert train == "".join(t + "\n" for i, t in enumerate(texts) if i not in (3, 7, 11))
    assert index["splits"]["val"]["pieces"] == 3 and index["complete"]
    assert len(index["splits"]["train"]["shards"]) > 2  # shard_tokens=8000 cut the corpus into several


# ------------------------------------------------------------------------------------ parallel and resumed
def test_worker_processes_write_the_same_bytes(corpus: Path, tmp_path: Path) -> None:
    run(corpus, tmp_path / "serial", tokenizer="bpe", bpe_vocab_size=300)
    run(corpus, tmp_path / "parallel", tokenizer="bpe", bpe_vocab_size=300, num_proc=2)
    serial, parallel = shard_bytes(tmp_path / "serial"), shard_bytes(tmp_path / "parallel")
    assert len(serial) >= 4 and serial == parallel
    assert (tmp_path / "serial" / "tokenizer.json").read_text() == (
        tmp_path / "parallel" / "tokenizer.json"
    ).read_text()


KILL_AT_FIFTH_SHARD = """
import os, signal, sys
from datamodules import prepare, shards
finish, calls = shards.ShardWriter.finish, []
def finish_then_die(self, header):
    calls.append(1)
    if len(calls) == 5:  # two chunks complete, the third one's shards written but not renamed
        os.kill(os.getpid(), signal.SIGKILL)
    return finish(self, header)
shards.ShardWriter.finish = finish_then_die
sys.exit(prepare.main(sys.argv[1:]))
"""


def test_killed_run_resumes_keeping_finished_shards(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["--files", str(corpus), "--out_dir", str(out), "--tokenizer", "bytes", "--shard_tokens", "8000"]
    args += ["--val_fraction", "0.25", "--no_progress"]
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_FIFTH_SHARD, *args, "--num_proc", "0"], env=env, cwd=ROOT, timeout=120
    )
    assert killed.returncode == -9
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert sorted(finished) == ["train-00000.bin", "train-00001.bin", "val-00000.bin", "val-00001.bin"]
    assert list(out.glob(".*.tmp"))  # the interrupted shards, under temporary names
    assert json.loads((out / "shards.json").read_text())["complete"] is False
    with pytest.raises(ValueError, match="not complete.*again"):
        dm_of(out).setup()

    assert main([*args, "--num_proc", "2"]) == 0
    assert "resuming after 2 finished shard(s)" in capsys.readouterr().err
    assert all(out.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in finished.items())  # kept
    assert not list(out.glob(".*.tmp"))
    run(corpus, tmp_path / "clean")
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")  # as if it had never stopped
    assert main([*args, "--num_proc", "0"]) == 0  # complete: nothing to do
    assert "is complete" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(corpus: Path, tmp_path: Path) -> None:
    run(corpus, tmp_path / "out")
    with pytest.raises(ValueError, match=r"val_fraction: 0\.25 there, 0\.1 now"):
        run(corpus, tmp_path / "out", val_fraction=0.1)


# ------------------------------------------------------------------------------------------- TextDataModule
def test_datamodule_reads_shards_by_rank_and_resumes_mid_epoch(corpus: Path, tmp_path: Path) -> None:
    run(corpus, tmp_path / "out", shard_tokens=3000)
    dm = dm_of(tmp_path / "out")
    dm.setup()
    windows = dm.train_dataset
    assert len(windows.span.paths) >= 5  # windows cross shard boundaries
    flat = np.concatenate([np.fromfile(p, np.uint16, offset=HEADER_BYTES) for p in windows.span.paths])
    x, y = windows[7]
    start = windows.start(7)
    assert torch.equal(x, torch.from_numpy(flat[start : start + 16].astype(np.int64)))
    assert torch.equal(x[1:], y[:-1])

    starts = []
    for rank in (0, 1):
        ranked = dm_of(tmp_path / "out")
        ranked.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = ranked.train_dataloader()
        starts.append({windows.start(i) for i in loader.sampler})
    assert starts[0] | starts[1] == {windows.start(i) for i in range(len(windows))}
    assert len(starts[0] & starts[1]) <= 1  # DistributedSampler pads by at most one window

    full = [x for x, _ in dm.train_dataloader()]
    first = dm_of(tmp_path / "out").train_dataloader()
    batches = iter(first)
    for _ in range(3):
        next(batches)
    state = first.state_dict()
    resumed = dm_of(tmp_path / "out").train_dataloader()
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert len(rest) == len(full) - 3 and all(torch.equal(a, b) for a, b in zip(rest, full[3:]))


def test_datamodule_checks_the_shards_tokenizer(corpus: Path, tmp_path: Path) -> None:
    run(corpus, tmp_path / "bpe", tokenizer="bpe", bpe_vocab_size=300)
    dm = dm_of(tmp_path / "bpe", tokenizer="bpe", bpe_vocab_size=300)
    dm.setup()
    assert dm.decode(dm.encode("def value(self):")) == "def value(self):"
    assert "return" in dm.decode(dm.train_dataset.tokens[:400].tolist())
    with pytest.raises(
        ValueError, match=r"made with a byte-level BPE.*tokenizer='bytes' is UTF-8 bytes.*'bpe'"
    ):
        dm_of(tmp_path / "bpe", tokenizer="bytes").setup()
    run(corpus, tmp_path / "bytes")
    with pytest.raises(ValueError, match=r"tokenizer\.json.*made with UTF-8 bytes"):
        dm_of(tmp_path / "bytes", tokenizer="bpe").setup()


def _hf_tokenizer(path: Path, vocab_size: int, seed: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    raw.train_from_iterator([make_text(200, seed=seed)], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>").save_pretrained(path)
    return path


def test_transformers_tokenizer_directory(corpus: Path, tmp_path: Path) -> None:
    tok = _hf_tokenizer(tmp_path / "tok", 290, seed=0)
    run(corpus, tmp_path / "out", tokenizer=str(tok), separator="<eos>")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tok.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    dm = dm_of(tmp_path / "out", tokenizer=str(copy))  # another path, the same tokenizer: accepted
    dm.setup()
    eos = dm.tokenizer.tokenizer.convert_tokens_to_ids("<eos>")
    assert (np.asarray(dm.train_dataset.tokens) == eos).sum() == 9  # one per training document
    other = _hf_tokenizer(tmp_path / "other", 295, seed=1)
    with pytest.raises(ValueError, match=r"were made with the transformers tokenizer .*tok"):
        dm_of(tmp_path / "out", tokenizer=str(other)).setup()


def test_gpt2_tokenizer_when_available_locally(corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained("gpt2", local_files_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the reason, it is not in the local cache
        pytest.skip(f"GPT-2's tokenizer is not in the local Hugging Face cache ({type(err).__name__})")
    index = run(corpus, tmp_path / "out", tokenizer="gpt2", separator="<|endoftext|>")
    assert index["dtype"] == "uint16" and index["vocab_size"] == 50257
    dm = dm_of(tmp_path / "out", tokenizer="gpt2")
    dm.setup()
    assert 50256 in np.asarray(dm.train_dataset.tokens)


def test_train_py_fits_on_shards(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train import cli_main

    run(corpus, tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs" / "gpt2" / "tiny.yaml"), "--trainer.max_steps", "2"]
    args += ["--data.init_args.sources", str(tmp_path / "out"), "--data.init_args.tokenizer", "bytes"]
    args += ["--data.init_args.block_size", "32", "--data.init_args.batch_size", "2"]
    args += ["--data.init_args.num_workers", "0", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false"]
    args += ["--model.init_args.sample_tokens", "4", "--trainer.default_root_dir", str(tmp_path)]
    cli = cli_main(args)
    assert cli.trainer.global_step == 2 and cli.model.model.config.vocab_size == 256


# ------------------------------------------------------------------------------------------------- sources
def test_local_dataset_and_streaming_data_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    texts = [make_text(30, seed=i) for i in range(10)]
    datasets.Dataset.from_dict({"body": texts, "n": list(range(10))}).save_to_disk(str(tmp_path / "ds"))
    config = {"num_proc": 0, "progress": False, "tokenizer": "bytes", "separator": "", "val_fraction": 0.2}
    index = prepare(
        PrepareConfig(out_dir=tmp_path / "a", dataset=str(tmp_path / "ds"), text_column="body", **config)
    )
    assert index["splits"]["val"]["tokens"] == len((texts[4] + texts[9]).encode())
    with pytest.raises(ValueError, match="'txt'.*body"):
        prepare(
            PrepareConfig(out_dir=tmp_path / "b", dataset=str(tmp_path / "ds"), text_column="txt", **config)
        )
    # nothing was written under the wrong column, so the corrected command starts afresh in the same directory
    prepare(PrepareConfig(out_dir=tmp_path / "b", dataset=str(tmp_path / "ds"), text_column="body", **config))

    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    streamed = prepare(
        PrepareConfig(
            out_dir=tmp_path / "c", dataset=str(tmp_path / "jsonl"), streaming=True, max_docs=5, **config
        )
    )
    assert streamed["splits"]["val"]["tokens"] == len(texts[4].encode())
    assert streamed["splits"]["train"]["tokens"] == len("".join(texts[:4]).encode())


def test_presets_name_hub_datasets_without_loading_them(tmp_path: Path) -> None:
    parser = build_parser()
    config = config_from_args(parser.parse_args(["--preset", "fineweb-edu", "--out_dir", str(tmp_path)]))
    assert (config.dataset, config.dataset_config, config.text_column) == (
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
        "text",
    )
    assert set(PRESETS) == {"tinyshakespeare", "openwebtext", "fineweb-edu"}
    assert all(p.dataset.count("/") == 1 and p.text_column for p in PRESETS.values())


# -------------------------------------------------------------------------------------------------- errors
def test_user_errors_are_one_line(corpus: Path, tmp_path: Path, capsys) -> None:
    out = ["--out_dir", str(tmp_path / "x"), "--no_progress", "--num_proc", "0"]
    assert main(out) == 2
    assert "exactly one source" in capsys.readouterr().err
    assert main([*out, "--files", str(tmp_path / "missing*.txt")]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert main([*out, "--files", str(corpus), "--preset", "openwebtext"]) == 2
    assert "--preset openwebtext names the dataset" in capsys.readouterr().err
    assert main([*out, "--files", str(corpus), "--val_fraction", "0.9"]) == 2
    assert "val_fraction=0.9 must be in (0, 0.5]" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("a single short document\n")
    assert main([*out, "--files", str(tmp_path / "one.txt"), "--tokenizer", "bytes"]) == 2
    assert "validation split" in capsys.readouterr().err


def test_truncated_shard_is_detected(corpus: Path, tmp_path: Path) -> None:
    run(corpus, tmp_path / "out")
    shard = tmp_path / "out" / "train-00001.bin"
    header = read_header(shard)
    assert header["tokenizer"] == {"kind": "bytes", "vocab_size": 256} and header["split"] == "train"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        dm_of(tmp_path / "out").setup()


def test_sharded_tokens_slice_across_files(tmp_path: Path) -> None:
    from datamodules.shards import ShardWriter

    arrays = [np.arange(5), np.arange(100, 103), np.arange(200, 207)]
    paths = []
    for i, a in enumerate(arrays):
        writer = ShardWriter(tmp_path / f"train-{i:05d}.bin", "uint32")
        writer.write(a)
        writer.finish({"tokenizer": {"kind": "bytes"}})
        paths.append(tmp_path / f"train-{i:05d}.bin")
    tokens = ShardSpan(tuple(paths), (5, 3, 7), "uint32").tokens()
    flat = np.concatenate(arrays)
    assert len(tokens) == 15 and np.array_equal(np.asarray(tokens), flat)
    for a, b in [(0, 15), (3, 9), (5, 8), (4, 5), (7, 7), (-4, None)]:
        assert np.array_equal(tokens[a:b], flat[a:b]), (a, b)
    assert tokens[8] == 200 and tokens[-1] == 206 and np.array_equal(tokens[1:12:3], flat[1:12:3])
