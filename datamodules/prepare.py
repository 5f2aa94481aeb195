"""Tokenise a corpus into token shards for `TextDataModule`: in parallel, resumable, with a fixed split.

    python -m datamodules.prepare --preset tinyshakespeare --tokenizer bytes --out_dir data/shakespeare
    python -m datamodules.prepare --preset fineweb-edu --streaming --tokenizer gpt2 --out_dir data/fwe
    python -m datamodules.prepare --files "books/**/*.txt" --tokenizer bpe --out_dir data/books
    python train.py fit --config configs/gpt2/tiny.yaml --data.init_args.sources data/books

The source is a `datasets` dataset (its train split: a hub name when online, or a local folder / data files;
`--streaming` reads it without downloading it whole) or text files. Each document (a row, or a file) is
tokenised with `--separator` appended; documents longer than `--max_doc_chars` are cut at line breaks into
several. Those pieces are numbered in corpus order and piece i goes to validation when
floor((i + 1) * val_fraction) > floor(i * val_fraction): exactly val_fraction of them, evenly spread, the
same on every run and for any `--num_proc`. Worker processes tokenise; the main process writes
`train-NNNNN.bin` and `val-NNNNN.bin` (see datamodules/shards.py), closing shard N of both splits at the
first document end after `--shard_tokens` tokens. A shard is written under a temporary name and renamed when
complete, so after a kill the same command keeps the finished shards and continues after them; the result
is the same bytes as an uninterrupted run. `shards.json` records the settings (a resumed run must repeat
them) and, at the end, every shard.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import re
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.corpus import (
    DOC_SEPARATOR,
    dataset_identity,
    file_identity,
    iter_dataset_texts,
    iter_file_texts,
    load_text_dataset,
    resolve_text_files,
)
from datamodules.shards import (
    BPE_NAME,
    INDEX_NAME,
    SPLITS,
    ShardWriter,
    describe_identity,
    read_header,
    read_index,
    same_tokenizer,
    shard_name,
    temporary_path,
    tokenizer_identity,
)
from datamodules.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, TextTokenizer, train_bpe


@dataclass(frozen=True)
class Preset:
    """A well-known corpus on the Hugging Face hub: where it is and which column holds the text."""

    dataset: str
    config: str | None
    text_column: str
    about: str


PRESETS = {
    "tinyshakespeare": Preset(
        "Trelis/tiny-shakespeare", None, "Text", "about 1M characters of Shakespeare (its train split)"
    ),
    "openwebtext": Preset("Skylion007/openwebtext", None, "text", "8M web documents, ~9B GPT-2 tokens"),
    "fineweb-edu": Preset(
        "HuggingFaceFW/fineweb-edu", "sample-10BT", "text", "educational web pages, a 10B GPT-2-token sample"
    ),
}

_BATCH_CHARS = 1 << 18  # characters handed to a worker at a time
_SHARD_FILE = re.compile(r"^(train|val)-(\d{5})\.bin$")


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class PrepareConfig:
    """Everything `prepare` needs; the fields that shape the output are recorded in shards.json."""

    out_dir: Path
    files: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    text_column: str = "text"
    streaming: bool = False
    tokenizer: str = "bpe"
    bpe_vocab_size: int = 4096
    bpe_train_chars: int = 20_000_000
    val_fraction: float = 0.05
    max_doc_chars: int = 16_384
    separator: str = DOC_SEPARATOR
    shard_tokens: int = 100_000_000
    max_docs: int | None = None
    num_proc: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: bool = True
    command: str | None = None

    def validate(self) -> None:
        """Raise ValueError for a bad value, naming it and what is valid."""
        if (self.files is None) == (self.dataset is None):
            raise ValueError(
                "give exactly one source: --files (text files, globs, directories) or --dataset / --preset"
            )
        if self.files is not None and not self.files:
            raise ValueError("--files names no file; give text files, globs or directories")
        if not 0.0 < self.val_fraction <= 0.5:
            raise ValueError(f"val_fraction={self.val_fraction!r} must be in (0, 0.5], e.g. 0.05")
        for name in ("max_doc_chars", "shard_tokens", "bpe_train_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.bpe_vocab_size < 257:
            raise ValueError(
                f"bpe_vocab_size={self.bpe_vocab_size!r} must be >= 257 (the 256 bytes + merges)"
            )
        if self.num_proc < 0:
            raise ValueError(f"num_proc={self.num_proc!r} must be >= 0 (0: tokenise in this process)")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"max_docs={self.max_docs!r} must be >= 1 (or unset for every document)")

    def tokenizer_spec(self) -> dict[str, Any]:
        """The tokenizer setting as recorded (a trained BPE also by how it was trained)."""
        if self.tokenizer == "bpe":
            return {
                "tokenizer": "bpe",
                "bpe_vocab_size": self.bpe_vocab_size,
                "bpe_train_chars": self.bpe_train_chars,
            }
        return {"tokenizer": self.tokenizer}


class Source:
    """A corpus as a sequence of documents. A dataset is loaded on first use (`load`), so a finished
    directory is recognised without loading it."""

    def __init__(
        self, describe: str, identity: Any, load: Callable[[], tuple[Callable[[], Iterator[str]], int | None]]
    ):
        self.describe = describe
        self.identity = identity
        self._load = load
        self._loaded: tuple[Callable[[], Iterator[str]], int | None] | None = None

    def load(self) -> None:
        """Load the corpus now (a dataset that cannot be loaded fails here)."""
        if self._loaded is None:
            self._loaded = self._load()

    @property
    def total(self) -> int | None:
        """The number of documents, when known (for the progress bar)."""
        self.load()
        return self._loaded[1]  # type: ignore[index]

    def documents(self) -> Iterator[str]:
        """A fresh pass over the documents in order (empty ones included: they count as positions)."""
        self.load()
        return self._loaded[0]()  # type: ignore[index]


def open_source(config: PrepareConfig) -> Source:
    """The files (resolved now: FileNotFoundError when missing) or the dataset (loaded on first use) that
    `config` names."""
    if config.files is not None:
        files = resolve_text_files(config.files)
        more = f" and {len(files) - 3:,} more" if len(files) > 3 else ""
        shown = ", ".join(repr(str(f)) for f in files[:3]) + more
        identity = {"files": [file_identity(f) for f in files]}
        return Source(
            f"{len(files):,} file(s) ({shown})",
            identity,
            lambda: (lambda: iter_file_texts(files), len(files)),
        )
    name, column = str(config.dataset), config.text_column

    def load() -> tuple[Callable[[], Iterator[str]], int | None]:
        dataset = load_text_dataset(name, config.dataset_config, config.streaming)
        total = None if config.streaming else getattr(dataset, "num_rows", None)
        return (lambda: iter_dataset_texts(dataset, column, name)), total

    streaming = ", streaming" if config.streaming else ""
    return Source(
        f"dataset {name!r} (config {config.dataset_config!r}, text_column {column!r}{streaming})",
        dataset_identity(name, config.dataset_config, column),
        load,
    )


# ------------------------------------------------------------------------------------------------ documents
def split_document(text: str, max_chars: int) -> list[str]:
    """`text` cut into pieces of at most `max_chars` characters, at the last line break before the limit
    when there is one (the pieces joined give `text`)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = text.rfind("\n", start, start + max_chars)
        end = cut + 1 if cut >= start else start + max_chars
        pieces.append(text[start:end])
        start = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def is_validation(piece: int, val_fraction: float) -> bool:
    """Whether piece number `piece` (0-based, in corpus order) belongs to the validation split."""
    return math.floor((piece + 1) * val_fraction) > math.floor(piece * val_fraction)


@dataclass
class Batch:
    """Consecutive pieces for one worker call, with their split and whether each ends a document."""

    texts: list[str]
    is_val: np.ndarray  # (pieces,) bool
    ends_doc: np.ndarray  # (pieces,) bool
    doc_index: np.ndarray  # (pieces,) int64: the document each piece belongs to
    piece_start: int  # number of the first piece
    docs_done: int  # documents read when this batch was formed (for the progress bar)


def batches(
    documents: Iterator[str], first_doc: int, first_piece: int, config: PrepareConfig
) -> Iterator[Batch]:
    """Cut documents (numbered from `first_doc`) into pieces (from `first_piece`), in batches of about
    _BATCH_CHARS characters."""
    texts: list[str] = []
    flags: list[tuple[bool, bool, int]] = []
    size, piece, doc = 0, first_piece, first_doc
    start = first_piece
    for doc, text in enumerate(documents, start=first_doc):
        pieces = split_document(text, config.max_doc_chars) if text else []
        for i, part in enumerate(pieces):
            last = i == len(pieces) - 1
            texts.append(part + config.separator if last else part)
            flags.append((is_validation(piece, config.val_fraction), last, doc))
            size += len(part)
            piece += 1
        if size >= _BATCH_CHARS:
            yield _batch(texts, flags, start, doc + 1)
            texts, flags, size, start = [], [], 0, piece
    if texts:
        yield _batch(texts, flags, start, doc + 1)


def _batch(texts: list[str], flags: list[tuple[bool, bool, int]], start: int, docs_done: int) -> Batch:
    is_val, ends, docs = zip(*flags)
    return Batch(
        texts, np.array(is_val, bool), np.array(ends, bool), np.array(docs, np.int64), start, docs_done
    )


# ------------------------------------------------------------------------------------------------- workers
def encode_each(tokenizer: TextTokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """The token ids of each text separately (one batched call where the tokenizer has one)."""
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    raw = tokenizer.tokenizer if isinstance(tokenizer, BPETokenizer) else None
    if isinstance(tokenizer, HFTokenizer):
        raw = getattr(tokenizer.tokenizer, "backend_tokenizer", None)
    if raw is not None:
        return [
            np.asarray(e.ids, dtype=np.int64) for e in raw.encode_batch(list(texts), add_special_tokens=False)
        ]
    return [tokenizer.encode_array([t]) for t in texts]


_worker_tokenizer: TextTokenizer | None = None


def _init_worker(tokenizer: TextTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_batch(
    texts: list[str], dtype: str, tokenizer: TextTokenizer | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(every text's tokens concatenated, as `dtype`; tokens per text)."""
    ids = encode_each(tokenizer or _worker_tokenizer, texts)  # type: ignore[arg-type]
    lengths = np.fromiter((len(a) for a in ids), np.int64, len(ids))
    tokens = np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype)
    return tokens, lengths


def _pool(num_proc: int, tokenizer: TextTokenizer) -> Any:
    """`num_proc` worker processes holding the tokenizer, each tokenising with one thread (the processes are
    the parallelism; `tokenizers`' own threads would compete with them)."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the workers at start
    try:
        return multiprocessing.get_context(method).Pool(num_proc, _init_worker, (tokenizer,))
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


# ------------------------------------------------------------------------------------------------- shards
class Chunk:
    """Shard `index` of every split, being written: they cover the same documents and close together."""

    def __init__(self, out_dir: Path, index: int, dtype: str, first_doc: int, first_piece: int) -> None:
        self.index = index
        self.writers = {split: ShardWriter(out_dir / shard_name(split, index), dtype) for split in SPLITS}
        self.pieces = dict.fromkeys(SPLITS, 0)
        self.first_doc, self.end_doc = first_doc, first_doc
        self.first_piece, self.end_piece = first_piece, first_piece

    @property
    def n_tokens(self) -> int:
        return sum(w.n_tokens for w in self.writers.values())

    def add(self, tokens: np.ndarray, lengths: np.ndarray, batch: Batch, begin: int, end: int) -> None:
        """Pieces begin:end of `batch` (their tokens: `tokens`, `lengths` per piece)."""
        is_val = batch.is_val[begin:end]
        mask = np.repeat(is_val, lengths)
        self.writers["train"].write(tokens[~mask])
        self.writers["val"].write(tokens[mask])
        self.pieces["val"] += int(is_val.sum())
        self.pieces["train"] += int(end - begin - is_val.sum())
        self.end_doc = int(batch.doc_index[end - 1]) + 1
        self.end_piece = batch.piece_start + end

    def finish(self, common: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Close every split's shard (train first): the chunk is complete once the last is renamed."""
        return {
            split: writer.finish(
                {
                    **common,
                    "split": split,
                    "index": self.index,
                    "pieces": self.pieces[split],
                    "documents": [self.first_doc, self.end_doc],
                    "piece_range": [self.first_piece, self.end_piece],
                }
            )
            for split, writer in self.writers.items()
        }

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def finished_chunks(out_dir: Path, identity: dict[str, Any], dtype: str) -> list[dict[str, dict[str, Any]]]:
    """The headers of the complete chunks 0, 1, ... (every split's shard present, whole and consistent)."""
    chunks = []
    for index in itertools.count():
        headers = {}
        for split in SPLITS:
            path = out_dir / shard_name(split, index)
            try:
                header = read_header(path) if path.is_file() else None
            except ValueError:
                header = None
            if (
                header is None
                or header["dtype"] != dtype
                or not same_tokenizer(header["tokenizer"], identity)
            ):
                return chunks
            headers[split] = header
        chunks.append(headers)
    return chunks


def _remove_unfinished(out_dir: Path, keep: int) -> None:
    """Delete temporary shards and the shards of chunks from `keep` on (an interrupted chunk's leftovers)."""
    for path in out_dir.iterdir():
        name = path.name
        temporary = name.startswith(".") and name.endswith(".tmp") and _SHARD_FILE.match(name[1:-4])
        later = (m := _SHARD_FILE.match(name)) and int(m[2]) >= keep
        if temporary or later:
            path.unlink()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    _write_text(path, json.dumps(payload, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------ tokenizer
def load_tokenizer(name: str, bpe_vocab_size: int) -> TextTokenizer | None:
    """The tokenizer `name` names: 'bytes', a BPE tokenizer.json file, a transformers directory / hub name;
    None for 'bpe' (trained on the corpus by `train_or_reuse_bpe`)."""
    if name == "bpe":
        return None
    if name == "bytes":
        return ByteTokenizer()
    path = Path(name).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer={name!r}: there is no tokenizer file {str(path)!r}")
        try:
            return BPETokenizer.from_file(path, bpe_vocab_size)
        except ValueError:
            raise
        except Exception as err:  # tokenizers raises a bare Exception for a file it cannot read
            raise ValueError(f"tokenizer={name!r} is not a tokenizers JSON file ({err})") from err
    return HFTokenizer(name)  # a local directory or a hub name (ValueError naming it when it cannot load)


def train_or_reuse_bpe(config: PrepareConfig, source: Source, out_dir: Path, reuse: bool) -> BPETokenizer:
    """The BPE saved in out_dir/tokenizer.json when resuming, else one trained on the training split's first
    `bpe_train_chars` characters and saved there (where `TextDataModule` with tokenizer 'bpe' finds it)."""
    saved = out_dir / BPE_NAME
    if reuse and saved.is_file():
        return BPETokenizer.from_file(saved, config.bpe_vocab_size)
    _log(
        f"training a byte-level BPE ({config.bpe_vocab_size:,} tokens) on up to {config.bpe_train_chars:,} "
        "characters of the training split"
    )
    trained = train_bpe(_training_texts(source, config), config.bpe_vocab_size)
    _write_text(saved, trained.to_str())
    return BPETokenizer(trained, config.bpe_vocab_size)


def _training_texts(source: Source, config: PrepareConfig) -> Iterator[str]:
    """The first `bpe_train_chars` characters of the training split's pieces."""
    remaining = config.bpe_train_chars
    for batch in batches(_capped(source.documents(), config.max_docs), 0, 0, config):
        for text, is_val in zip(batch.texts, batch.is_val):
            if not is_val:
                yield text[:remaining]
                remaining -= len(text)
                if remaining <= 0:
                    return


def _capped(documents: Iterator[str], max_docs: int | None) -> Iterator[str]:
    return documents if max_docs is None else itertools.islice(documents, max_docs)


def _dtype_for(tokenizer: TextTokenizer) -> str:
    return "uint16" if tokenizer.vocab_size <= 65535 else "uint32"


def _log(message: str) -> None:
    print(f"prepare: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- prepare
def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Tokenise `config`'s source into shards in `config.out_dir` (continuing an interrupted run); returns
    the completed index (what shards.json holds). Bad settings, sources and tokenizers fail before anything
    is written."""
    config.validate()
    source = open_source(config)
    tokenizer = load_tokenizer(config.tokenizer, config.bpe_vocab_size)
    out_dir = Path(config.out_dir)
    settings = {
        "source": source.identity,
        **config.tokenizer_spec(),
        "val_fraction": config.val_fraction,
        "max_doc_chars": config.max_doc_chars,
        "separator": config.separator,
        "shard_tokens": config.shard_tokens,
        "max_docs": config.max_docs,
    }
    index = read_index(out_dir) if out_dir.is_dir() else None
    if index is not None and not _same_settings(index["settings"], settings):
        if _has_shards(out_dir):
            _settings_error(out_dir, index["settings"], settings)
        index = None  # nothing was written under those settings: start afresh
    if index is not None and index.get("complete"):
        if tokenizer is not None and not same_tokenizer(index["tokenizer"], tokenizer_identity(tokenizer)):
            _tokenizer_error(out_dir, index["tokenizer"], tokenizer_identity(tokenizer))
        splits = index["splits"]
        _log(f"{out_dir} is complete ({splits['train']['tokens']:,} training tokens); nothing to do")
        return index
    source.load()
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = train_or_reuse_bpe(config, source, out_dir, reuse=index is not None)
    elif isinstance(tokenizer, BPETokenizer):  # a tokenizer.json file: a copy goes beside the shards
        _write_text(out_dir / BPE_NAME, tokenizer.tokenizer.to_str())
    identity = tokenizer_identity(tokenizer)
    dtype = _dtype_for(tokenizer)
    if index is not None and not same_tokenizer(index["tokenizer"], identity):
        _tokenizer_error(out_dir, index["tokenizer"], identity)
    index = {
        "format": "lmc-token-shards",
        "complete": False,
        "command": config.command,
        "source": {"describe": source.describe},
        "tokenizer": identity,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        "settings": settings,
    }
    _write_json(out_dir / INDEX_NAME, index)

    done = finished_chunks(out_dir, identity, dtype)
    _remove_unfinished(out_dir, len(done))
    first_doc = done[-1]["train"]["documents"][1] if done else 0
    first_piece = done[-1]["train"]["piece_range"][1] if done else 0
    if done:
        _log(f"resuming after {len(done)} finished shard(s) per split, at document {first_doc:,}")
    _log(
        f"tokenising {source.describe} with {describe_identity(identity)} into {out_dir} "
        f"({config.num_proc or 'no'} worker process(es))"
    )
    started = time.perf_counter()
    new = _tokenise(config, source, tokenizer, identity, dtype, len(done), first_doc, first_piece)
    seconds = time.perf_counter() - started
    chunks = done + new
    splits = {
        split: {
            "tokens": sum(c[split]["n_tokens"] for c in chunks),
            "pieces": sum(c[split]["pieces"] for c in chunks),
            "shards": [
                {"file": shard_name(split, c[split]["index"]), "n_tokens": c[split]["n_tokens"]}
                for c in chunks
            ],
        }
        for split in SPLITS
    }
    if splits["train"]["tokens"] == 0 and splits["val"]["tokens"] == 0:
        raise ValueError(f"no text in {source.describe}: the documents are empty")
    if splits["val"]["tokens"] == 0 or splits["train"]["tokens"] == 0:
        pieces = splits["train"]["pieces"] + splits["val"]["pieces"]
        raise ValueError(
            f"the {'validation' if splits['val']['tokens'] == 0 else 'training'} split of {source.describe} is "
            f"empty: {pieces} piece(s) of text with val_fraction={config.val_fraction}. Delete {str(out_dir)!r} "
            f"and run again with a larger corpus, a lower --max_doc_chars (now {config.max_doc_chars}) or another "
            "--val_fraction"
        )
    index.update(complete=True, splits=splits)
    _write_json(out_dir / INDEX_NAME, index)
    new_tokens = sum(c[s]["n_tokens"] for c in new for s in SPLITS)
    _log(
        f"done: {splits['train']['tokens']:,} training and {splits['val']['tokens']:,} validation tokens in "
        f"{len(chunks)} shard(s) per split ({new_tokens:,} tokenised now in {seconds:.1f} s, "
        f"{new_tokens / max(seconds, 1e-9):,.0f} tokens/s)"
    )
    return index


def _same_settings(recorded: dict[str, Any], settings: dict[str, Any]) -> bool:
    return json.loads(json.dumps(recorded)) == json.loads(json.dumps(settings))  # tuples and lists alike


def _has_shards(out_dir: Path) -> bool:
    return any(_SHARD_FILE.match(p.name) for p in out_dir.iterdir())


def _settings_error(out_dir: Path, recorded: dict[str, Any], settings: dict[str, Any]) -> None:
    recorded, current = json.loads(json.dumps(recorded)), json.loads(json.dumps(settings))
    differ = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    shown = [f"{k}: {recorded.get(k)!r} there, {current.get(k)!r} now" for k in differ if k != "source"]
    if "source" in differ:
        shown.insert(0, "the source (its files or dataset differ)")
    raise ValueError(
        f"{str(out_dir)!r} holds shards prepared with other settings ({'; '.join(shown)}). Repeat that run's "
        "arguments to finish it, or use another --out_dir"
    )


def _tokenizer_error(out_dir: Path, recorded: dict[str, Any], identity: dict[str, Any]) -> None:
    raise ValueError(
        f"{str(out_dir)!r} holds shards made with {describe_identity(recorded)}, but the tokenizer now loads as "
        f"{describe_identity(identity)}; use another --out_dir or delete {str(out_dir)!r}"
    )


def _write_text(path: Path, text: str) -> None:
    tmp = temporary_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _tokenise(
    config: PrepareConfig,
    source: Source,
    tokenizer: TextTokenizer,
    identity: dict[str, Any],
    dtype: str,
    first_chunk: int,
    first_doc: int,
    first_piece: int,
) -> list[dict[str, dict[str, Any]]]:
    """Tokenise the documents from `first_doc` on; returns the headers of the chunks written."""
    from tqdm import tqdm

    out_dir = Path(config.out_dir)
    common = {"tokenizer": identity, "vocab_size": tokenizer.vocab_size}
    documents = itertools.islice(_capped(source.documents(), config.max_docs), first_doc, None)
    total = source.total if config.max_docs is None else min(source.total or config.max_docs, config.max_docs)
    pool = _pool(config.num_proc, tokenizer) if config.num_proc > 0 else None  # before the bar's thread
    bar = tqdm(
        total=total,
        initial=first_doc,
        unit="doc",
        disable=None if config.progress else True,
        dynamic_ncols=True,
    )
    pending: deque[tuple[Batch, Any]] = deque()
    written: list[dict[str, dict[str, Any]]] = []
    chunk = Chunk(out_dir, first_chunk, dtype, first_doc, first_piece)
    tokens_seen = 0

    def consume(batch: Batch, result: tuple[np.ndarray, np.ndarray]) -> None:
        nonlocal chunk, tokens_seen
        tokens, lengths = result
        ends = np.cumsum(lengths)
        begin = 0
        while begin < len(lengths):
            offset = int(ends[begin - 1]) if begin else 0
            totals = chunk.n_tokens + ends[begin:] - offset
            closes = np.flatnonzero(batch.ends_doc[begin:] & (totals >= config.shard_tokens))
            end = begin + int(closes[0]) + 1 if len(closes) else len(lengths)
            chunk.add(tokens[offset : int(ends[end - 1])], lengths[begin:end], batch, begin, end)
            if len(closes):
                written.append(chunk.finish(common))
                chunk = Chunk(out_dir, chunk.index + 1, dtype, chunk.end_doc, chunk.end_piece)
            begin = end
        tokens_seen += int(ends[-1]) if len(ends) else 0
        bar.update(batch.docs_done - bar.n)
        bar.set_postfix(tokens=f"{tokens_seen:,}", refresh=False)

    try:
        for batch in batches(documents, first_doc, first_piece, config):
            if pool is None:
                consume(batch, _encode_batch(batch.texts, dtype, tokenizer))
                continue
            pending.append((batch, pool.apply_async(_encode_batch, (batch.texts, dtype))))
            while len(pending) > 2 * config.num_proc:  # bounded: a corpus larger than memory streams through
                done_batch, result = pending.popleft()
                consume(done_batch, result.get())
        while pending:
            done_batch, result = pending.popleft()
            consume(done_batch, result.get())
        if chunk.n_tokens or chunk.end_piece > chunk.first_piece:
            written.append(chunk.finish(common))
        else:
            chunk.abort()
    except BaseException:
        chunk.abort()
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
    if pool is not None:
        pool.close()
        pool.join()
    return written


# ----------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m datamodules.prepare`."""
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out_dir", required=True, type=Path, help="where the shards go (created; resumed if it exists)"
    )
    src = parser.add_argument_group("source (one of)")
    src.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a known hub corpus: "
        + "; ".join(
            f"{k}: {p.dataset}{f' ({p.config})' if p.config else ''}, {p.about}" for k, p in PRESETS.items()
        ),
    )
    src.add_argument("--dataset", help="a datasets dataset: hub name (online) or local folder / data files")
    src.add_argument("--files", nargs="+", help="text files, globs ('data/**/*.txt') or directories")
    src.add_argument("--dataset_config", help="the dataset's configuration name")
    src.add_argument("--text_column", help="the column holding the text (default 'text', or the preset's)")
    src.add_argument(
        "--streaming", action="store_true", help="stream the dataset (corpora larger than disk/RAM)"
    )
    src.add_argument("--max_docs", type=int, help="read at most this many documents")
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument(
        "--tokenizer",
        default="bpe",
        help="'bpe' (train a byte-level BPE here), 'bytes', a BPE tokenizer.json file, or a transformers "
        "tokenizer directory / hub name such as 'gpt2' (default: bpe)",
    )
    tok.add_argument("--bpe_vocab_size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    tok.add_argument(
        "--bpe_train_chars", type=int, default=20_000_000, help="train the BPE on this many characters (20M)"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--val_fraction", type=float, default=0.05, help="fraction of pieces for validation (0.05)"
    )
    out.add_argument(
        "--max_doc_chars", type=int, default=16_384, help="cut longer documents at line breaks (16384)"
    )
    out.add_argument(
        "--separator",
        default=DOC_SEPARATOR,
        help=r"text appended to every document (default '\n\n'; e.g. '<|endoftext|>' with gpt2)",
    )
    out.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (100M)")
    out.add_argument(
        "--num_proc",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenising processes (0: this one; default: CPUs)",
    )
    out.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace, command: str | None = None) -> PrepareConfig:
    """A PrepareConfig from parsed arguments (a preset fills the dataset, its config and column)."""
    dataset, dataset_config, column = args.dataset, args.dataset_config, args.text_column
    if args.preset:
        if args.dataset or args.files:
            raise ValueError(
                f"--preset {args.preset} names the dataset; give no --dataset or --files with it"
            )
        preset = PRESETS[args.preset]
        dataset, dataset_config = preset.dataset, dataset_config or preset.config
        column = column or preset.text_column
    if dataset and args.files:
        raise ValueError("give either --dataset (or --preset) or --files, not both")
    return PrepareConfig(
        out_dir=args.out_dir,
        files=args.files,
        dataset=dataset,
        dataset_config=dataset_config,
        text_column=column or "text",
        streaming=args.streaming,
        tokenizer=args.tokenizer,
        bpe_vocab_size=args.bpe_vocab_size,
        bpe_train_chars=args.bpe_train_chars,
        val_fraction=args.val_fraction,
        max_doc_chars=args.max_doc_chars,
        separator=_unescape(args.separator),
        shard_tokens=args.shard_tokens,
        max_docs=args.max_docs,
        num_proc=args.num_proc,
        progress=not args.no_progress,
        command=command,
    )


def _unescape(text: str) -> str:
    r"""Backslash escapes typed on a command line ('\n\n') as the characters they stand for."""
    if "\\" not in text:
        return text
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; a user error prints one message and returns 2."""
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(words)
    command = shlex.join(["python", "-m", "datamodules.prepare", *words])
    try:
        prepare(config_from_args(args, command))
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
