"""Token shard files, as `python -m datamodules.prepare` writes them and `TextDataModule` reads them.

A shard is `<split>-<index:05d>.bin` (split "train" or "val"): a HEADER_BYTES JSON header (padded with
spaces, so `head -c 4096 train-00000.bin` shows it) followed by the token ids, little-endian uint16 or uint32.
The header names the format, the dtype, the token count and the tokenizer's identity. A directory of shards
holds `shards.json` (the settings and, once complete, every shard) and, when the tokenizer is the project's
byte-level BPE, its `tokenizer.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, TextTokenizer

FORMAT = "lmc-token-shard"
VERSION = 1
HEADER_BYTES = 4096  # page-sized, so the tokens after it memory-map at an aligned offset
INDEX_NAME = "shards.json"
BPE_NAME = "tokenizer.json"
SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")


def shard_name(split: str, index: int) -> str:
    """The file name of shard `index` of `split`."""
    return f"{split}-{index:05d}.bin"


def token_dtype(dtype: str) -> np.dtype:
    """The little-endian NumPy dtype of a shard's tokens."""
    if dtype not in DTYPES:
        raise ValueError(f"token dtype {dtype!r} is not one of {DTYPES}")
    return np.dtype(dtype).newbyteorder("<")


# ---------------------------------------------------------------------------------------- tokenizer identity
def _fingerprint(serialised: str) -> str:
    """A short hash of a tokenizer's JSON, leaving out run-time settings (truncation, padding)."""
    try:
        obj = json.loads(serialised)
    except ValueError:
        obj = serialised
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in ("truncation", "padding")}
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_identity(tokenizer: TextTokenizer) -> dict[str, Any]:
    """What identifies a tokenizer's ids, by content: kind, vocabulary size and a hash of its definition."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "bytes", "vocab_size": 256}
    if isinstance(tokenizer, BPETokenizer):
        raw = tokenizer.tokenizer
        return {"kind": "bpe", "vocab_size": raw.get_vocab_size(), "sha256": _fingerprint(raw.to_str())}
    if isinstance(tokenizer, HFTokenizer):
        backend = getattr(tokenizer.tokenizer, "backend_tokenizer", None)
        text = (
            backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.tokenizer.get_vocab()))
        )
        return {
            "kind": "transformers",
            "name": tokenizer.name,
            "class": type(tokenizer.tokenizer).__name__,
            "vocab_size": tokenizer.vocab_size,
            "sha256": _fingerprint(text),
        }
    raise TypeError(f"no identity for tokenizer type {type(tokenizer).__name__}")


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two identities give the same ids (names may differ: 'gpt2' and a saved copy of it match)."""
    return a.get("kind") == b.get("kind") and a.get("sha256") == b.get("sha256")


def describe_identity(identity: dict[str, Any]) -> str:
    """A tokenizer identity in words, for messages."""
    kind = identity.get("kind")
    if kind == "bytes":
        return "UTF-8 bytes"
    if kind == "bpe":
        return f"a byte-level BPE of {identity.get('vocab_size')} tokens (sha256 {identity.get('sha256')})"
    return (
        f"the transformers tokenizer {identity.get('name')!r} ({identity.get('class')}, "
        f"{identity.get('vocab_size')} tokens, sha256 {identity.get('sha256')})"
    )


# ---------------------------------------------------------------------------------------------- one shard
def encode_header(header: dict[str, Any]) -> bytes:
    """The HEADER_BYTES bytes of a shard header: the JSON, spaces, a newline."""
    raw = json.dumps(header, sort_keys=True).encode("utf-8")
    if len(raw) >= HEADER_BYTES:
        raise ValueError(f"a shard header is {len(raw)} bytes, more than {HEADER_BYTES - 1}: {header}")
    return raw + b" " * (HEADER_BYTES - 1 - len(raw)) + b"\n"


def read_header(path: Path) -> dict[str, Any]:
    """A shard's header, checked against the file's size (ValueError for anything but a complete shard)."""
    try:
        with path.open("rb") as file:
            raw = file.read(HEADER_BYTES)
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(
            f"{str(path)!r} is not a token shard: its first {HEADER_BYTES} bytes are not JSON"
        ) from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a token shard (format {FORMAT!r})")
    expected = HEADER_BYTES + int(header["n_tokens"]) * token_dtype(header["dtype"]).itemsize
    size = path.stat().st_size
    if size != expected:
        raise ValueError(
            f"{str(path)!r} has {size} bytes but its header announces {header['n_tokens']} {header['dtype']} "
            f"tokens ({expected} bytes): the file is truncated or was changed"
        )
    return header


class ShardWriter:
    """Writes one shard into a hidden temporary file beside it and renames it into place when finished, so a
    shard under its final name is always complete."""

    def __init__(self, path: Path, dtype: str) -> None:
        self.path = path
        self.tmp = temporary_path(path)
        self.dtype = token_dtype(dtype)
        self.n_tokens = 0
        self._file = self.tmp.open("wb")
        self._file.write(b" " * HEADER_BYTES)

    def write(self, tokens: np.ndarray) -> None:
        """Append token ids."""
        if len(tokens):
            self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
            self.n_tokens += len(tokens)

    def finish(self, header: dict[str, Any]) -> dict[str, Any]:
        """Write the header (with format, dtype and token count), sync, and rename; returns the header."""
        header = {
            **header,
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.name,
            "n_tokens": self.n_tokens,
        }
        self._file.seek(0)
        self._file.write(encode_header(header))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return header

    def abort(self) -> None:
        """Close and delete the temporary file."""
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def temporary_path(path: Path) -> Path:
    """Where a shard is written before it is complete."""
    return path.with_name(f".{path.name}.tmp")


# -------------------------------------------------------------------------------------- reading shards back
@dataclass(frozen=True)
class ShardSpan:
    """The tokens of several shard files read as one stream (for `TokenWindows`, like a `TokenSpan`)."""

    paths: tuple[Path, ...]
    counts: tuple[int, ...]
    dtype: str

    def __len__(self) -> int:
        return sum(self.counts)

    def tokens(self) -> ShardedTokens:
        """The stream as a read-only array-like; each shard is memory-mapped on first use."""
        return ShardedTokens(self)


class ShardedTokens:
    """Slicing returns a NumPy array (joined across shard boundaries); integers return one token id."""

    def __init__(self, span: ShardSpan) -> None:
        self.span = span
        self.bounds = np.concatenate([[0], np.cumsum(span.counts, dtype=np.int64)])
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            count = self.span.counts[i]
            dtype = token_dtype(self.span.dtype)
            self._maps[i] = np.memmap(
                self.span.paths[i], dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,)
            )
        return self._maps[i]

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[start:stop][::step]
            return self._range(start, max(start, stop))
        index = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"token {key} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self.bounds, index, side="right")) - 1
        return self._shard(shard)[index - self.bounds[shard]]

    def _range(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        shard = max(int(np.searchsorted(self.bounds, start, side="right")) - 1, 0)
        while start < stop and shard < len(self.span.counts):
            begin, end = int(self.bounds[shard]), int(self.bounds[shard + 1])
            take = min(stop, end)
            if take > start:
                pieces.append(self._shard(shard)[start - begin : take - begin])
                start = take
            shard += 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=token_dtype(self.span.dtype))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        tokens = np.asarray(self[:])
        return tokens if dtype is None else tokens.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}


@dataclass(frozen=True)
class ShardDir:
    """A complete shard directory: its index (`shards.json`) and the train / val token streams."""

    folder: Path
    index: dict[str, Any]
    train: ShardSpan
    val: ShardSpan

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The identity of the tokenizer that made the shards."""
        return self.index["tokenizer"]

    def describe(self) -> str:
        """Where the tokens came from and how many there are, for messages."""
        splits = self.index["splits"]
        return (
            f"the token shards in {str(self.folder)!r} ({splits['train']['tokens']:,} training tokens in "
            f"{len(self.train.paths)} shard(s), {splits['val']['tokens']:,} validation tokens; made from "
            f"{self.index.get('source', {}).get('describe', 'an unrecorded source')})"
        )

    def check_tokenizer(self, tokenizer: TextTokenizer, configured: str) -> None:
        """Raise ValueError, naming both, when `tokenizer` (configured as `configured`) is not the shards' one."""
        ours = tokenizer_identity(tokenizer)
        if same_tokenizer(ours, self.tokenizer):
            return
        theirs = self.tokenizer
        suggestion = {"bytes": "'bytes'", "bpe": f"'bpe' (with its {BPE_NAME} beside the shards)"}.get(
            theirs.get("kind"), f"{theirs.get('name')!r} (or a directory holding the same tokenizer)"
        )
        raise ValueError(
            f"the token shards in {str(self.folder)!r} were made with {describe_identity(theirs)}, but "
            f"tokenizer={configured!r} is {describe_identity(ours)}: the ids would mean other text. Set "
            f"data.init_args.tokenizer to {suggestion}, or prepare the data again with this tokenizer"
        )


def is_shard_dir(path: Path) -> bool:
    """Whether `path` is a directory written by `python -m datamodules.prepare` (it holds shards.json)."""
    return path.is_dir() and (path / INDEX_NAME).is_file()


def shard_source(sources: list[str]) -> Path | None:
    """The shard directory `sources` names, else None; it must be the only source."""
    dirs = [Path(s).expanduser() for s in sources if is_shard_dir(Path(s).expanduser())]
    if not dirs:
        return None
    if len(sources) != 1:
        raise ValueError(
            f"sources={sources!r}: a token-shard directory ({str(dirs[0])!r}, written by python -m "
            "datamodules.prepare) must be the only source"
        )
    return dirs[0]


def read_index(folder: Path) -> dict[str, Any] | None:
    """The directory's shards.json, or None when there is none."""
    path = folder / INDEX_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); prepare the directory again") from err


def open_shard_dir(folder: Path) -> ShardDir:
    """Read a complete shard directory, checking every shard's header against the index."""
    index = read_index(folder)
    if index is None:
        raise FileNotFoundError(
            f"{str(folder)!r} has no {INDEX_NAME}: it is not a directory written by python -m datamodules.prepare"
        )
    if not index.get("complete"):
        command = index.get("command") or "python -m datamodules.prepare ... (the same arguments)"
        raise ValueError(
            f"the token shards in {str(folder)!r} are not complete (preparation was stopped or is still "
            f"running). Run `{command}` again to finish it: finished shards are kept"
        )
    spans = {}
    for split in SPLITS:
        paths, counts = [], []
        for entry in index["splits"][split]["shards"]:
            path = folder / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"shard {str(path)!r}, listed in {INDEX_NAME}, does not exist")
            header = read_header(path)
            if header["n_tokens"] != entry["n_tokens"] or header["dtype"] != index["dtype"]:
                raise ValueError(
                    f"shard {str(path)!r} does not match {INDEX_NAME}; prepare the directory again"
                )
            if not same_tokenizer(header["tokenizer"], index["tokenizer"]):
                raise ValueError(
                    f"shard {str(path)!r} was made with another tokenizer than {INDEX_NAME} names"
                )
            if header["n_tokens"]:
                paths.append(path)
                counts.append(int(header["n_tokens"]))
        spans[split] = ShardSpan(tuple(paths), tuple(counts), index["dtype"])
    return ShardDir(folder, index, spans["train"], spans["val"])
