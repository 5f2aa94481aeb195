"""Where the text comes from: files, globs and directories, nanoGPT-style `.bin` token files, `datasets`
datasets, and the embedded default corpus (the Python standard library's own source files)."""

from __future__ import annotations

import glob
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DOC_SEPARATOR = "\n\n"
DEFAULT_CORPUS_CHARS = 6_000_000
PIECE_CHARS = 1 << 20  # corpus pieces handed to the tokenizer end at a line break after this many characters
_STDLIB_EXCLUDED = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules"})
_SNIFF_BYTES = 8192


def default_corpus_files() -> list[Path]:
    """The standard library's own `*.py` files, sorted by path (no tests, idlelib, lib2to3, site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_EXCLUDED and d not in _SKIPPED_DIRS]
        files.extend(Path(folder) / name for name in names if name.endswith(".py"))
    return sorted(files)


@dataclass(frozen=True)
class BinSource:
    """nanoGPT-style token files: one `.bin` file to split, or `train.bin` with an optional `val.bin`."""

    train: Path
    val: Path | None = None


def resolve_bin_source(sources: list[str]) -> BinSource | None:
    """The `.bin` source that `sources` names (a `.bin` file, or a directory holding `train.bin`), else None."""
    is_bin = [_bin_source_of(s) for s in sources]
    if not any(is_bin):
        return None
    if len(sources) != 1:
        raise ValueError(
            f"sources={sources!r}: a .bin source (a .bin file or a directory with train.bin) must be the only "
            "source; list text files, globs and directories without it"
        )
    return is_bin[0]


def _bin_source_of(source: str) -> BinSource | None:
    path = Path(source).expanduser()
    if path.is_dir() and (path / "train.bin").is_file():
        val = path / "val.bin"
        return BinSource(path / "train.bin", val if val.is_file() else None)
    if path.suffix == ".bin":
        if not path.is_file():
            raise FileNotFoundError(f"sources: the .bin file {source!r} does not exist")
        return BinSource(path)
    return None


def resolve_text_files(sources: list[str]) -> list[Path]:
    """Expand files, globs and directories (recursively, hidden and cache folders skipped) into a list of
    files: each source's matches sorted, sources in the given order, duplicates dropped."""
    files: dict[Path, None] = {}
    for source in sources:
        matches = _expand(source)
        if not matches:
            raise FileNotFoundError(
                f"sources: {source!r} matches no file (give text files, globs such as 'data/**/*.txt', "
                "directories, or one nanoGPT .bin file / directory with train.bin)"
            )
        files.update(dict.fromkeys(matches))
    return list(files)


def _expand(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        return sorted(_walk_files(path))
    return sorted(Path(p).resolve() for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def _walk_files(root: Path) -> Iterator[Path]:
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS]
        yield from (Path(folder, name).resolve() for name in names if not name.startswith("."))


def file_identity(path: Path) -> list[Any]:
    """What identifies a file's contents for the cache: resolved path, size and modification time."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def read_text(path: Path) -> str | None:
    """A file's UTF-8 text, or None when it looks binary (NUL bytes) or is not valid UTF-8."""
    data = path.read_bytes()
    if b"\0" in data[:_SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def iter_file_texts(files: Iterable[Path]) -> Iterator[str]:
    """The text of each file, skipping binary and non-UTF-8 files."""
    for path in files:
        text = read_text(path)
        if text is None:
            log.debug("skipping %s: binary or not UTF-8", path)
            continue
        yield text


@dataclass
class CorpusStats:
    """What one pass of `corpus_pieces` read: documents and characters kept, and whether `max_chars` cut the
    source (`available`: the source's characters, when counted)."""

    documents: int = 0
    chars: int = 0
    truncated: bool = False
    available: int | None = None


def corpus_pieces(
    docs: Iterable[str], max_chars: int | None, stats: CorpusStats | None = None, count_rest: bool = False
) -> Iterator[str]:
    """Join non-empty documents with DOC_SEPARATOR, stop after `max_chars` characters, and yield the result
    in pieces of about PIECE_CHARS characters that end at line breaks (their concatenation is the corpus).

    `stats` (when given) records what was read; when the cap cuts the source, it notes that, and with
    `count_rest` it also reads the remaining documents to count the characters available."""
    stats = CorpusStats() if stats is None else stats
    remaining = max_chars
    first = True
    docs = iter(docs)
    for doc in docs:
        if not doc:
            continue
        text = doc if first else DOC_SEPARATOR + doc
        first = False
        full = len(text)
        if remaining is not None:
            text = text[:remaining]
            remaining -= len(text)
        stats.documents += 1
        stats.chars += len(text)
        yield from _split_at_lines(text, PIECE_CHARS)
        if remaining == 0:
            rest = (len(DOC_SEPARATOR) + len(d) for d in docs if d)
            if count_rest:
                stats.available = stats.chars + full - len(text) + sum(rest)
                stats.truncated = stats.available > stats.chars
            else:
                stats.truncated = len(text) < full or next(rest, 0) > 0
            return


def _split_at_lines(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        newline = text.find("\n", start + size)
        end = len(text) if newline < 0 else newline + 1
        yield text[start:end]
        start = end


def take_chars(pieces: Iterable[str], count: int) -> Iterator[str]:
    """The first `count` characters of a stream of pieces."""
    for piece in pieces:
        if count <= 0:
            return
        yield piece[:count]
        count -= len(piece)


def load_text_dataset(name: str, config: str | None, streaming: bool) -> Any:
    """The train split of a `datasets` dataset: a `save_to_disk` folder, or anything `load_dataset` takes."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"dataset_name={name!r} needs the `datasets` package (pip install datasets); or pass text files as "
            "sources"
        ) from err
    try:
        if _is_saved_dataset(Path(name)):
            dataset = datasets.load_from_disk(name)
        else:
            dataset = datasets.load_dataset(name, config, split="train", streaming=streaming)
    except Exception as err:
        raise ValueError(
            f"could not load dataset_name={name!r} (dataset_config={config!r}): {err}. Give a local dataset "
            "folder (save_to_disk or data files) or a hub dataset name (online)"
        ) from err
    if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
        if "train" not in dataset:
            raise ValueError(f"dataset_name={name!r} has no 'train' split; its splits are {list(dataset)}")
        dataset = dataset["train"]
    return dataset


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def iter_dataset_texts(dataset: Any, column: str, name: str) -> Iterator[str]:
    """The non-empty strings of one column of a (possibly streaming) `datasets` dataset."""
    columns = dataset.column_names
    if columns is not None and column not in columns:
        raise ValueError(
            f"text_column={column!r} is not a column of dataset {name!r}; its columns are {columns}"
        )
    for batch in dataset.iter(batch_size=1000):
        if column not in batch:
            raise ValueError(f"text_column={column!r} is not a column of dataset {name!r}; got {list(batch)}")
        yield from (text for text in batch[column] if isinstance(text, str) and text)


def dataset_chars(dataset: Any, column: str) -> int | None:
    """The characters of a dataset's non-empty texts joined by DOC_SEPARATOR, counted by Arrow without reading
    rows into Python; None when that is not possible (a streaming or re-indexed dataset)."""
    try:
        import pyarrow.compute as pc

        if getattr(dataset, "_indices", None) is not None:  # select/shuffle: the table is not the dataset
            return None
        lengths = pc.utf8_length(dataset.data.column(column))
        total = pc.sum(lengths).as_py() or 0
        documents = pc.sum(pc.greater(lengths, 0)).as_py() or 0
    except Exception:  # not Arrow-backed, not a string column
        return None
    return int(total) + len(DOC_SEPARATOR) * max(int(documents) - 1, 0)


def dataset_identity(name: str, config: str | None, column: str) -> dict[str, Any]:
    """What identifies a dataset for the cache: name, config and column (plus file identities when local)."""
    path = Path(name).expanduser()
    files = [file_identity(p) for p in sorted(_walk_files(path))] if path.is_dir() else None
    return {"dataset": name, "config": config, "column": column, "files": files}
