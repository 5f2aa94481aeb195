"""`TextDataModule`: next-token language-modelling batches from text files, `datasets` datasets, nanoGPT
`.bin` token files, token-shard directories (`python -m datamodules.prepare`), or the embedded default corpus
(the Python standard library's own source files)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules.corpus import (
    DEFAULT_CORPUS_CHARS,
    BinSource,
    CorpusStats,
    corpus_pieces,
    dataset_chars,
    dataset_identity,
    default_corpus_files,
    file_identity,
    iter_dataset_texts,
    iter_file_texts,
    load_text_dataset,
    resolve_bin_source,
    resolve_text_files,
    take_chars,
)
from datamodules.resumable import ResumableDataLoader, ResumableSampler
from datamodules.shards import BPE_NAME, ShardSpan, describe_identity, open_shard_dir, shard_source
from datamodules.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    TextTokenizer,
    train_bpe,
)

CACHE_VERSION = 1
BIN_DTYPES = ("uint16", "uint32")
_ENCODE_BATCH_CHARS = 8 << 20  # characters tokenised per call (tokenizers parallelises within a call)
_COUNT_CHUNK = 1 << 24  # tokens per bincount / max chunk
_PROMPT_TOKENS = 16  # at most this many tokens in the sample prompt taken from the validation data

# A factory of corpus pieces; each call is one pass, recorded in the CorpusStats it is given.
Pieces = Callable[[CorpusStats | None], Iterator[str]]


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every token id of a vocabulary."""
    return "uint16" if vocab_size <= 65535 else "uint32"


@dataclass(frozen=True)
class TokenSpan:
    """Tokens `begin:end` of a flat token file."""

    path: Path
    dtype: str
    begin: int
    end: int

    def __len__(self) -> int:
        return self.end - self.begin

    def tokens(self) -> np.ndarray:
        """The span as a read-only memmap."""
        return np.memmap(self.path, dtype=self.dtype, mode="r")[self.begin : self.end]


class TokenWindows(Dataset):
    """Non-overlapping windows of `block_size + 1` tokens of a span; item i is `(x, y)`, y = x shifted by one.

    Window i starts at `offset + i * block_size`. The memmap is opened lazily in each process, so the dataset
    pickles cheaply into DataLoader workers."""

    def __init__(self, span: TokenSpan, block_size: int, offset: int = 0) -> None:
        self.span = span
        self.block_size = block_size
        self.offset = max(0, min(offset, len(span) - block_size - 1))
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the span (memmap)."""
        if self._tokens is None:
            self._tokens = self.span.tokens()
        return self._tokens

    def __len__(self) -> int:
        return max(0, (len(self.span) - self.offset - 1) // self.block_size)

    def start(self, index: int) -> int:
        """Position of window `index`'s first token within the span."""
        return self.offset + index * self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        start = self.start(index)
        window = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it on success and is removed on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _batches(pieces: Iterator[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_TOKENIZER_CHOICES = (
    "Valid choices: 'bpe' (byte-level BPE trained on the corpus), 'bytes' (UTF-8 bytes, vocab 256), a local "
    "tokenizer directory (save_pretrained), or a Hugging Face hub name when online"
)


def _looks_like_path(name: str) -> bool:
    """True when `name` cannot be a hub repo id ("name" or "owner/name"), so it must be a local path."""
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or (os.sep != "/" and os.sep in name)
    )


def evenly_spread(count: int, total: int) -> list[int]:
    """`count` distinct indices in [0, total), evenly spread (each the middle of one of `count` equal parts)."""
    count = min(count, total)
    return [((2 * i + 1) * total) // (2 * count) for i in range(count)]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value!r} must be >= 1")


class TextDataModule(LightningDataModule):
    """Next-token language modelling: `(x, y)` windows of `block_size` tokens, y = x shifted by one.

    The corpus is tokenised once into a memmap cached under `cache_dir` (keyed by the sources' identity,
    `max_chars` and the tokenizer); the last `val_fraction` of the token stream is validation (or `val.bin`).

    Args:
        sources: text files, globs, directories (all text files under them), or one nanoGPT `.bin` file / a
            directory with `train.bin` (+ `val.bin`), or one token-shard directory written by
            `python -m datamodules.prepare` (its own train / val shards; its tokenizer must be `tokenizer`).
            None (and no `dataset_name`): the Python standard library's own source files.
        dataset_name: a `datasets` dataset (hub name or local path) instead of `sources`.
        dataset_config: its configuration name.
        text_column: the dataset column holding the text.
        streaming: stream the dataset instead of downloading it whole (bounded by `max_chars`).
        tokenizer: "bpe" (byte-level BPE trained on the training split), "bytes" (UTF-8 bytes, vocab 256), or a
            `transformers` tokenizer name / local directory, loaded lazily: at prepare_data/setup or the first
            use of `tokenizer` / `vocab_size`, so a config naming a directory instantiates before it exists.
        bpe_vocab_size: the BPE vocabulary size (>= 257).
        block_size: tokens per training example.
        batch_size: examples per batch.
        val_fraction: the fraction of the token stream (its end) held out for validation.
        max_chars: at most this many corpus characters are read. None: the whole of `sources` / the dataset,
            6,000,000 characters of the default corpus. When the cap cuts `sources` or a dataset, a warning
            gives the characters read and available (not counted for a streaming dataset), on every run that
            uses that tokenisation.
        bin_dtype: the token dtype of `.bin` sources ("uint16" or "uint32").
        cache_dir: where token files and trained tokenizers are cached.
        num_workers, pin_memory, persistent_workers, prefetch_factor: DataLoader settings (`pin_memory=None`:
            on when training on CUDA; the last two only with workers).
        drop_last: drop the last incomplete training batch (validation keeps it).
        seed: chooses the training windows' offset and the shuffling order.
        val_windows: validation reads this many non-overlapping windows, evenly spread over the split and the
            same in every run (each rank evaluates its share). None: every window. Testing reads every window.
        predict_prompts: texts `train.py predict` continues (default: a few Python openings).
    """

    def __init__(
        self,
        sources: str | list[str] | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        streaming: bool = False,
        tokenizer: str = "bpe",
        bpe_vocab_size: int = 4096,
        block_size: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        max_chars: int | None = None,
        bin_dtype: str = "uint16",
        cache_dir: str = "data_cache",
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        drop_last: bool = True,
        seed: int = 1337,
        val_windows: int | None = None,
        predict_prompts: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sources = [sources] if isinstance(sources, str) else None if sources is None else list(sources)
        self.dataset_name = dataset_name
        self.dataset_config = dataset_config
        self.text_column = text_column
        self.streaming = streaming
        self.tokenizer_name = tokenizer
        self.bpe_vocab_size = bpe_vocab_size
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_chars = max_chars
        self.bin_dtype = bin_dtype
        self.cache_dir = Path(cache_dir)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.drop_last = drop_last
        self.seed = seed
        self.val_windows = val_windows
        self.predict_prompts = list(predict_prompts) if predict_prompts else ["def ", "class ", "import "]
        self._validate_arguments()
        if self.sources is None and dataset_name is None and max_chars is None:
            self.max_chars = DEFAULT_CORPUS_CHARS
        self._tokenizer: TextTokenizer | None = ByteTokenizer() if tokenizer == "bytes" else None
        self.cache_hit: bool | None = None  # after prepare_data/setup: True when the token cache was reused
        self.cache_path: Path | None = None  # the cache folder used (None for .bin sources)
        self._spans: tuple[TokenSpan, TokenSpan] | None = None
        self._token_bytes: torch.Tensor | None = None
        self._sample_prompt: str | None = None
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None

    # ----------------------------------------------------------------------------------------- validation
    def _validate_arguments(self) -> None:
        _check_positive(block_size=self.block_size, batch_size=self.batch_size)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r} must be in (0, 1), e.g. 0.05")
        if self.bpe_vocab_size < 257:
            raise ValueError(
                f"bpe_vocab_size={self.bpe_vocab_size!r} must be >= 257: byte-level BPE starts from the 256 "
                "bytes and adds merges"
            )
        if self.bin_dtype not in BIN_DTYPES:
            raise ValueError(f"bin_dtype={self.bin_dtype!r} must be one of {BIN_DTYPES}")
        if self.val_windows is not None and self.val_windows < 1:
            raise ValueError(f"val_windows={self.val_windows!r} must be >= 1 (or None for every window)")
        if self.max_chars is not None and self.max_chars < 1:
            raise ValueError(f"max_chars={self.max_chars!r} must be >= 1 (or None for no cap)")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers!r} must be >= 0")
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor={self.prefetch_factor!r} must be >= 1 (or None)")
        if self.sources is not None and self.dataset_name is not None:
            raise ValueError(
                f"give either sources={self.sources!r} or dataset_name={self.dataset_name!r}, not both"
            )
        if self.sources is not None and not self.sources:
            raise ValueError("sources=[] names no file; give files, globs or directories, or None")

    # ---------------------------------------------------------------------------------------- tokenizer
    @property
    def is_hf_tokenizer(self) -> bool:
        """Whether `tokenizer` names a transformers tokenizer (hub name or local directory)."""
        return self.tokenizer_name not in ("bpe", "bytes")

    @property
    def vocab_size(self) -> int | None:
        """Token ids are < vocab_size: 256 for bytes, bpe_vocab_size for BPE, len(tokenizer) for a transformers
        tokenizer (loaded here on first use).

        None while a transformers tokenizer cannot be loaded without the network: a local directory that does
        not exist (yet) or a hub name not in the local Hugging Face cache. train.py reads vocab_size when it
        instantiates a config, before anything is trained; prepare_data/setup then load the tokenizer (from
        the hub if need be) or raise an error naming it."""
        if self.tokenizer_name == "bpe":
            return self.bpe_vocab_size
        if self._tokenizer is None and not self._hf_tokenizer_is_local():
            return None
        return self.tokenizer.vocab_size

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer (for BPE: available after prepare_data/setup; a transformers one loads on first use)."""
        if self._tokenizer is None:
            if not self.is_hf_tokenizer:
                raise RuntimeError(
                    "the BPE tokenizer is trained or loaded in prepare_data()/setup(); call setup() first"
                )
            self._tokenizer = self._load_hf_tokenizer()
        return self._tokenizer

    def _hf_tokenizer_is_local(self) -> bool:
        """Whether the transformers tokenizer loads without the network: an existing path or a cached hub name."""
        name = self.tokenizer_name
        if Path(name).expanduser().exists():
            return True
        if _looks_like_path(name):
            return False
        try:
            from huggingface_hub import try_to_load_from_cache

            files = ("tokenizer_config.json", "tokenizer.json", "config.json")
            return any(isinstance(try_to_load_from_cache(name, f), str) for f in files)
        except Exception:  # not a valid repo id, huggingface_hub missing: not loadable offline
            return False

    def _load_hf_tokenizer(self) -> HFTokenizer:
        """The transformers tokenizer; a ValueError naming the path when it is neither a directory nor loadable."""
        name = self.tokenizer_name
        path = Path(name).expanduser()
        if not path.exists():
            where = f"there is no directory {str(path.absolute())!r}"
            if _looks_like_path(name):  # not a hub name either: don't wait for the hub
                raise ValueError(f"tokenizer={name!r} could not be loaded: {where}. {_TOKENIZER_CHOICES}")
            try:
                return HFTokenizer(name)
            except ValueError as err:
                cause = err.__cause__ or err
                detail = (str(cause).splitlines() or [""])[0]
                raise ValueError(
                    f"tokenizer={name!r} could not be loaded: {where} and no hub tokenizer of that name could "
                    f"be loaded ({type(cause).__name__}: {detail}). {_TOKENIZER_CHOICES}"
                ) from err
        return HFTokenizer(name)  # a local directory: load_hf_tokenizer's error names it

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(ids)

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the tokenizer itself (a trained BPE as its JSON), so generation,
        evaluation and export rebuild it from the checkpoint alone (`tokenizer_from_state`)."""
        return {"tokenizer": self._tokenizer.state()} if self._tokenizer is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the tokenizer is rebuilt from the cache (the saved one is for other tools)."""

    # ------------------------------------------------------------------------------------- preparation
    def prepare_data(self) -> None:
        """Tokenise the corpus once into the cache (and train the BPE tokenizer); later calls reuse it."""
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        """Open the token memmaps and build the train/val window datasets (preparing them if needed)."""
        if self.train_dataset is not None:
            return
        train, val = self._prepare()
        self.train_dataset = TokenWindows(train, self.block_size, offset=self._train_offset())
        self.val_dataset = TokenWindows(val, self.block_size)

    def _train_offset(self) -> int:
        """Where the training windows start (0 <= offset < block_size), chosen by the seed."""
        return int(np.random.default_rng(self.seed).integers(self.block_size))

    @property
    def is_default_corpus(self) -> bool:
        """Whether the text is the embedded default corpus (no `sources`, no `dataset_name`)."""
        return self.sources is None and self.dataset_name is None

    def _prepare(self) -> tuple[TokenSpan, TokenSpan]:
        if self._spans is None:
            if self.is_hf_tokenizer:
                self._tokenizer = self.tokenizer  # load it now: a missing one fails before any text is read
            shard_dir = shard_source(self.sources) if self.sources is not None else None
            bin_source = resolve_bin_source(self.sources) if self.sources and not shard_dir else None
            if shard_dir is not None:
                self._spans = self._prepare_shards(shard_dir)
            else:
                self._spans = self._prepare_bin(bin_source) if bin_source else self._prepare_text()
            self._check_split_lengths(*self._spans)
            self._report_splits(*self._spans)
        return self._spans

    def _prepare_text(self) -> tuple[TokenSpan, TokenSpan]:
        identity, pieces, describe = self._text_source()
        folder = self.cache_dir / self._cache_folder_name(identity)
        self.cache_path = folder
        meta = self._read_cache(folder)
        self.cache_hit = meta is not None
        if meta is None:
            rank_zero_info(f"data: tokenising {describe} into {folder}")
            meta = self._tokenise_to_cache(folder, pieces, describe)
        else:
            rank_zero_info(f"data: reusing the tokenised corpus in {folder}")
        self._report_corpus(describe, meta.get("corpus"))
        if self.tokenizer_name == "bpe":
            self._tokenizer = BPETokenizer.from_file(folder / "tokenizer.json", self.bpe_vocab_size)
            how = "trained now, saved to" if not self.cache_hit else "loaded from"
            self._report_tokenizer(f"{how} {folder / 'tokenizer.json'}")
        else:
            self._report_tokenizer()
        return self._split_stream(TokenSpan(folder / "tokens.bin", meta["dtype"], 0, meta["n_tokens"]))

    def cache_folder_name(self) -> str:
        """The folder under `cache_dir` that holds this configuration's tokens (and trained BPE,
        `tokenizer.json`): `<tokenizer>-<key of the corpus and data settings>`. Reads the corpus' file list."""
        return self._cache_folder_name(self._text_source()[0])

    def _cache_folder_name(self, identity: Any) -> str:
        return f"{self.tokenizer_name.replace('/', '_')[-40:]}-{self._cache_key(identity)}"

    def _text_source(self) -> tuple[Any, Pieces, str]:
        """(cache identity, a factory of corpus pieces, a description for messages) of a text source."""
        return self._dataset_source() if self.dataset_name is not None else self._file_source()

    def _dataset_source(self) -> tuple[Any, Pieces, str]:
        name, config, column = str(self.dataset_name), self.dataset_config, self.text_column
        dataset = functools.cache(
            lambda: load_text_dataset(name, config, self.streaming)
        )  # loaded on first use

        def pieces(stats: CorpusStats | None = None) -> Iterator[str]:
            stats = CorpusStats() if stats is None else stats
            yield from corpus_pieces(iter_dataset_texts(dataset(), column, name), self.max_chars, stats)
            if stats.truncated and not self.streaming:
                stats.available = dataset_chars(dataset(), column)

        streaming = ", streaming" if self.streaming else ""
        return (
            dataset_identity(name, config, column),
            pieces,
            f"dataset_name={name!r} (text_column={column!r}{streaming})",
        )

    def _file_source(self) -> tuple[Any, Pieces, str]:
        files = default_corpus_files() if self.sources is None else resolve_text_files(self.sources)
        if not files:
            raise FileNotFoundError("the default corpus (the standard library's *.py files) was not found")
        if self.sources is None:
            describe = f"the embedded default corpus ({len(files):,} standard-library .py files)"
        else:
            shown = ", ".join(repr(str(f)) for f in files[:3])
            more = f" and {len(files) - 3:,} more" if len(files) > 3 else ""
            describe = f"{len(files):,} file{'s' if len(files) > 1 else ''} ({shown}{more})"

        def pieces(stats: CorpusStats | None = None) -> Iterator[str]:
            return corpus_pieces(iter_file_texts(files), self.max_chars, stats, count_rest=stats is not None)

        return [file_identity(f) for f in files], pieces, describe

    def _cache_key(self, source_identity: Any) -> str:
        tokenizer = (
            self._tokenizer.identity() if isinstance(self._tokenizer, HFTokenizer) else self.tokenizer_name
        )
        spec = {
            "version": CACHE_VERSION,
            "source": source_identity,
            "max_chars": self.max_chars,
            "tokenizer": tokenizer,
        }
        if self.tokenizer_name == "bpe":  # BPE is trained on the training split, so the split matters
            spec.update(bpe_vocab_size=self.bpe_vocab_size, val_fraction=self.val_fraction)
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def _read_cache(self, folder: Path) -> dict[str, Any] | None:
        """The cache's metadata when its files are complete, else None."""
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            complete = (folder / "tokens.bin").stat().st_size == meta["n_tokens"] * np.dtype(
                meta["dtype"]
            ).itemsize
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if self.tokenizer_name == "bpe":
            complete = complete and (folder / "tokenizer.json").is_file()
        return meta if complete else None

    def _tokenise_to_cache(self, folder: Path, pieces: Pieces, describe: str) -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = (
            self._train_bpe(folder, pieces, describe) if self.tokenizer_name == "bpe" else self.tokenizer
        )
        dtype = token_dtype(self.vocab_size)
        stats = CorpusStats()
        with _atomic_path(folder / "tokens.bin") as tmp, tmp.open("wb") as out:
            n_tokens = 0
            for batch in _batches(pieces(stats), _ENCODE_BATCH_CHARS):
                ids = tokenizer.encode_array(batch)
                ids.astype(dtype).tofile(out)
                n_tokens += len(ids)
            if n_tokens == 0:
                raise self._no_text_error(describe)
        meta = {
            "n_tokens": n_tokens,
            "dtype": dtype,
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer_name,
            "corpus": dataclasses.asdict(stats),
        }
        _write_text_atomic(
            folder / "meta.json", json.dumps(meta, indent=1)
        )  # written last: marks completeness
        return meta

    def _train_bpe(self, folder: Path, pieces: Pieces, describe: str) -> BPETokenizer:
        total_chars = sum(len(piece) for piece in pieces(None))
        if total_chars == 0:
            raise self._no_text_error(describe)
        train_chars = int(total_chars * (1.0 - self.val_fraction))
        rank_zero_info(
            f"data: training a byte-level BPE tokenizer (vocabulary {self.bpe_vocab_size:,}) on the training "
            f"split's {train_chars:,} characters"
        )
        trained = train_bpe(take_chars(pieces(), train_chars), self.bpe_vocab_size)
        _write_text_atomic(folder / "tokenizer.json", trained.to_str())
        return BPETokenizer(trained, self.bpe_vocab_size)

    @staticmethod
    def _no_text_error(describe: str) -> ValueError:
        return ValueError(f"no text in {describe}: they are empty, binary or not UTF-8")

    def _prepare_bin(self, source: BinSource) -> tuple[TokenSpan, TokenSpan]:
        self.cache_hit, self.cache_path = None, None
        if self.tokenizer_name == "bpe":
            self._tokenizer = self._bpe_beside(source.train)
        files = f"{str(source.train)!r}" + (f" and {str(source.val)!r}" if source.val else "")
        rank_zero_info(f"data: corpus: the token files {files} ({self.bin_dtype}), used as they are")
        beside = source.train.parent / "tokenizer.json"
        self._report_tokenizer(f"loaded from {beside}" if self.tokenizer_name == "bpe" else "")
        train = self._bin_span(source.train)
        if source.val is None:
            return self._split_stream(train)
        return train, self._bin_span(source.val)

    def _prepare_shards(self, folder: Path) -> tuple[ShardSpan, ShardSpan]:
        """The train / val shards of a prepared directory, memory-mapped, after checking its tokenizer."""
        self.cache_hit, self.cache_path = None, None
        shards = open_shard_dir(folder)
        if self.tokenizer_name == "bpe":
            path = folder / BPE_NAME
            if not path.is_file():
                raise ValueError(
                    f"tokenizer='bpe' reads the BPE that made the shards from {str(path)!r}, which does not "
                    f"exist; the shards were made with {describe_identity(shards.tokenizer)}: set "
                    "data.init_args.tokenizer to that tokenizer"
                )
            self._tokenizer = BPETokenizer.from_file(path, self.bpe_vocab_size)
        shards.check_tokenizer(self.tokenizer, self.tokenizer_name)
        rank_zero_info(f"data: corpus: {shards.describe()}")
        self._report_tokenizer(f"loaded from {folder / BPE_NAME}" if self.tokenizer_name == "bpe" else "")
        return shards.train, shards.val

    def _bpe_beside(self, train_bin: Path) -> BPETokenizer:
        path = train_bin.parent / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"tokenizer='bpe' with the .bin source {str(train_bin)!r} needs the tokenizer that made it: put its "
                f"tokenizer.json at {str(path)!r}, or set tokenizer to 'bytes', a tokenizer directory or a hub name "
                "(e.g. 'gpt2' for nanoGPT's GPT-2 tokens)"
            )
        return BPETokenizer.from_file(path, self.bpe_vocab_size)

    def _bin_span(self, path: Path) -> TokenSpan:
        itemsize = np.dtype(self.bin_dtype).itemsize
        size = path.stat().st_size
        if size == 0 or size % itemsize:
            raise ValueError(
                f"{str(path)!r} has {size} bytes, not a positive multiple of {itemsize} "
                f"(bin_dtype={self.bin_dtype!r}); is it a token file of that dtype?"
            )
        span = TokenSpan(path, self.bin_dtype, 0, size // itemsize)
        max_id = self._max_token(span)
        if max_id >= self.vocab_size:
            raise ValueError(
                f"{str(path)!r} holds token id {max_id}, but tokenizer={self.tokenizer_name!r} has vocab_size="
                f"{self.vocab_size}; use the tokenizer that produced the file (e.g. 'gpt2'), or check bin_dtype"
            )
        return span

    @staticmethod
    def _max_token(span: TokenSpan) -> int:
        tokens = span.tokens()
        return max(int(tokens[i : i + _COUNT_CHUNK].max()) for i in range(0, len(tokens), _COUNT_CHUNK))

    def _split_stream(self, stream: TokenSpan) -> tuple[TokenSpan, TokenSpan]:
        """Train = the first (1 - val_fraction) of the tokens, val = the rest."""
        boundary = stream.end - int(len(stream) * self.val_fraction)
        return (
            TokenSpan(stream.path, stream.dtype, stream.begin, boundary),
            TokenSpan(stream.path, stream.dtype, boundary, stream.end),
        )

    # -------------------------------------------------------------------------------------------- messages
    def _report_corpus(self, describe: str, corpus: dict[str, Any] | None) -> None:
        """Say what text the tokens came from; warn when max_chars cut a user's sources or dataset."""
        if corpus is None:  # a cache written without corpus statistics
            rank_zero_info(f"data: corpus: {describe}")
            return
        chars, documents, available = corpus["chars"], corpus["documents"], corpus.get("available")
        docs = f"{documents:,} document{'s' if documents != 1 else ''}"
        if corpus["truncated"]:
            of = f"{available:,}" if available is not None else "more (not counted)"
            read = f"the first {chars:,} of {of} characters (max_chars={self.max_chars:,}), {docs}"
        else:
            read = f"{chars:,} characters, {docs}"
        rank_zero_info(f"data: corpus: {describe}: {read}")
        if corpus["truncated"] and not self.is_default_corpus:
            of = f" of {available:,}" if available is not None else ""
            rank_zero_warn(
                f"max_chars={self.max_chars:,} cuts the corpus: {chars:,}{of} characters of {describe} are "
                "used. Set data.init_args.max_chars to null (or higher) to read all of them"
            )

    def _report_tokenizer(self, how: str = "") -> None:
        """Say which tokenizer the data uses, its vocabulary, and where a BPE one came from."""
        tokenizer = self.tokenizer
        learned = ""
        if isinstance(tokenizer, BPETokenizer):
            size = tokenizer.tokenizer.get_vocab_size()
            learned = f" ({size:,} learned, the rest unused)" if size < tokenizer.vocab_size else ""
        how = f", {how}" if how else ""
        rank_zero_info(
            f"data: tokenizer: {tokenizer.describe()}, vocabulary {tokenizer.vocab_size:,}{learned}{how}"
        )

    def _report_splits(self, train: TokenSpan, val: TokenSpan) -> None:
        """Say how many tokens and windows each split has, and how many validation windows are evaluated."""
        train_windows = len(TokenWindows(train, self.block_size, offset=self._train_offset()))
        val_windows = len(TokenWindows(val, self.block_size))
        evaluated = (
            "all evaluated"
            if self.val_windows is None or self.val_windows >= val_windows
            else f"{self.val_windows:,} of them evaluated, evenly spread (val_windows)"
        )
        rank_zero_info(
            f"data: tokens: train {len(train):,} ({train_windows:,} windows of {self.block_size}), "
            f"validation {len(val):,} ({val_windows:,} windows, {evaluated})"
        )

    def _check_split_lengths(self, train: TokenSpan, val: TokenSpan) -> None:
        need = self.block_size + 1
        if len(train) < need or len(val) < need:
            raise ValueError(
                f"the corpus is too short: train has {len(train)} tokens and val {len(val)}, but each split needs "
                f"at least block_size + 1 = {need} tokens (one window). Use a smaller block_size (now "
                f"{self.block_size}), change val_fraction (now {self.val_fraction}), or add text"
            )

    # -------------------------------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> DataLoader:
        """Shuffled training windows, sharded by rank, resumable mid-epoch (see datamodules/resumable.py)."""
        dataset = self._dataset("train")
        world = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        rank = getattr(self.trainer, "global_rank", 0) if self.trainer is not None else 0
        drop_last = self.drop_last and len(dataset) // max(world, 1) >= self.batch_size
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        loader = ResumableDataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last, **self._loader_kwargs()
        )
        loader.trainer = self.trainer
        return loader

    def val_dataloader(self) -> DataLoader:
        """Validation windows in order (`val_windows` of them evenly spread, or all); the last partial batch
        is kept. Under DDP Lightning gives each rank its share with a DistributedSampler."""
        dataset: Dataset = self._dataset("val")
        if self.val_windows is not None and self.val_windows < len(dataset):
            dataset = Subset(dataset, evenly_spread(self.val_windows, len(dataset)))
        return self._loader(dataset, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        """Every validation window, in order (val_windows does not apply)."""
        return self._loader(self._dataset("val"), shuffle=False, drop_last=False)

    def _dataset(self, split: str) -> TokenWindows:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} must be 'train' or 'val'")
        self.setup()
        dataset = self.train_dataset if split == "train" else self.val_dataset
        assert dataset is not None
        return dataset

    def predict_dataloader(self) -> DataLoader:
        """The `predict_prompts`, tokenised, one per batch (prompts differ in length)."""
        self.setup()
        prompts = [torch.tensor(self.encode(p) or [0], dtype=torch.long) for p in self.predict_prompts]
        return DataLoader(prompts, batch_size=1)

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last, **self._loader_kwargs()
        )

    def _loader_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "num_workers": self.num_workers,
            "pin_memory": self._use_pin_memory(),
            # A private generator: creating an iterator draws worker seeds from it, never from the global
            # RNG, so validation and resumes don't shift the random stream dropout uses.
            "generator": torch.Generator().manual_seed(self.seed),
        }
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs

    def _use_pin_memory(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    # ------------------------------------------------------------------------------------------ statistics
    @property
    def token_bytes(self) -> torch.Tensor:
        """The UTF-8 byte length of every token id, int64 of shape (vocab_size,), for bits per byte: exact for
        "bpe" and "bytes", the length of each token decoded alone for a transformers tokenizer."""
        if self._token_bytes is None:
            self.setup()
            self._token_bytes = torch.from_numpy(self.tokenizer.token_bytes())
        return self._token_bytes

    def sample_prompt(self) -> str:
        """A prompt from the validation data, the same in every run: the first full line of the split's first
        window (its first line when there is no line break), at most 16 tokens of it."""
        if self._sample_prompt is None:
            self.setup()
            assert self.val_dataset is not None
            text = self.decode(self.val_dataset.tokens[: self.block_size + 1].tolist())
            lines = [line for line in text.split("\n")[1:-1] if line.strip()]  # whole lines only
            line = lines[0] if lines else text.split("\n")[0].lstrip("\ufffd")
            prompt = self.decode(self.encode(line)[:_PROMPT_TOKENS]).rstrip("\ufffd")
            self._sample_prompt = prompt if prompt.strip() else "\n"
        return self._sample_prompt

    def unigram_entropy(self, split: str = "val") -> float:
        """Entropy (nats/token) of the split's unigram token distribution: the loss of a model that ignores
        context."""
        tokens = self._dataset(split).tokens
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(0, len(tokens), _COUNT_CHUNK):
            counts += np.bincount(tokens[i : i + _COUNT_CHUNK], minlength=self.vocab_size)
        probs = counts[counts > 0] / counts.sum()
        return float(-(probs * np.log(probs)).sum())
