"""Tokenizers behind one small interface: raw UTF-8 bytes, a byte-level BPE trained with `tokenizers`, and
any `transformers` tokenizer (hub name or local directory)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class TextTokenizer:
    """Text <-> token ids. Subclasses implement `encode_array` and `decode`."""

    vocab_size: int

    def encode_array(self, texts: Sequence[str]) -> np.ndarray:
        """The token ids of the concatenation of `texts` (each encoded separately), as one int64 array."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return self.encode_array([text]).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids."""
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """The UTF-8 byte length of every token id below `vocab_size` (int64, shape (vocab_size,)): what
        bits per byte divides by."""
        raise NotImplementedError

    def describe(self) -> str:
        """The tokenizer's kind, for messages."""
        raise NotImplementedError

    def to_fast(self, model_max_length: int | None = None) -> Any:
        """This tokenizer as a `transformers` PreTrainedTokenizerFast that encodes and decodes as it does (no
        special tokens added, no clean-up of spaces): what a model exported with it loads."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What rebuilds this tokenizer without the corpus (`tokenizer_from_state`); checkpoints carry it."""
        raise NotImplementedError


class ByteTokenizer(TextTokenizer):
    """One token per UTF-8 byte (vocab 256); undecodable byte sequences decode to U+FFFD."""

    vocab_size = 256

    def encode_array(self, texts: Sequence[str]) -> np.ndarray:
        return np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def describe(self) -> str:
        return "UTF-8 bytes"

    def state(self) -> dict[str, Any]:
        return {"kind": "bytes"}

    def to_fast(self, model_max_length: int | None = None) -> Any:
        return fast_tokenizer(byte_tokenizer_backend(), model_max_length)


def _ids_of(encodings: Iterable[Any]) -> np.ndarray:
    arrays = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


class BPETokenizer(TextTokenizer):
    """A `tokenizers.Tokenizer` (byte-level BPE) whose ids are < `vocab_size`."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @classmethod
    def from_file(cls, path: Path, vocab_size: int) -> BPETokenizer:
        """Load a tokenizer JSON, checking that its vocabulary fits in `vocab_size`."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        if tokenizer.get_vocab_size() > vocab_size:
            raise ValueError(
                f"the tokenizer {str(path)!r} has {tokenizer.get_vocab_size()} tokens, more than "
                f"bpe_vocab_size={vocab_size}; raise bpe_vocab_size"
            )
        return cls(tokenizer, vocab_size)

    def encode_array(self, texts: Sequence[str]) -> np.ndarray:
        return _ids_of(self.tokenizer.encode_batch(list(texts), add_special_tokens=False))

    def state(self) -> dict[str, Any]:
        return {"kind": "bpe", "vocab_size": self.vocab_size, "json": self.tokenizer.to_str()}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Exact: each character of a byte-level token string stands for one byte; ids the trained
        vocabulary lacks (below bpe_vocab_size) have 0 bytes and never occur."""
        tokens = (self.tokenizer.id_to_token(i) for i in range(self.vocab_size))
        return np.fromiter((len(t) if t is not None else 0 for t in tokens), np.int64, self.vocab_size)

    def describe(self) -> str:
        return "byte-level BPE"

    def to_fast(self, model_max_length: int | None = None) -> Any:
        return fast_tokenizer(self.tokenizer, model_max_length)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a GPT-2-style byte-level BPE `tokenizers.Tokenizer` with at most `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


class HFTokenizer(TextTokenizer):
    """A `transformers` tokenizer; special tokens are never added."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tokenizer = load_hf_tokenizer(name)
        self.vocab_size = len(self.tokenizer)

    def encode_array(self, texts: Sequence[str]) -> np.ndarray:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # fast tokenizer: batch-encode in Rust, no max-length warnings
            return _ids_of(backend.encode_batch(list(texts), add_special_tokens=False))
        ids = [self.tokenizer.encode(text, add_special_tokens=False) for text in texts]
        return np.asarray([i for row in ids for i in row], dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def token_bytes(self) -> np.ndarray:
        """An approximation: the UTF-8 length of each token decoded alone (a token holding part of a
        multi-byte character decodes to U+FFFD, 3 bytes; decoders may drop or add spaces)."""
        texts = self.tokenizer.batch_decode([[i] for i in range(self.vocab_size)])
        return np.fromiter((len(t.encode("utf-8")) for t in texts), np.int64, self.vocab_size)

    def describe(self) -> str:
        return f"transformers {self.name!r} ({type(self.tokenizer).__name__})"

    def state(self) -> dict[str, Any]:
        return {"kind": "transformers", "name": self.name}

    def to_fast(self, model_max_length: int | None = None) -> Any:
        """A copy of the transformers tokenizer itself (it must be a fast one); it keeps its own special-token
        settings, which may add tokens (e.g. BOS) that this class never adds."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                f"the transformers tokenizer {self.name!r} is a slow ({type(self.tokenizer).__name__}) one; "
                "export needs a fast tokenizer (a directory with tokenizer.json)"
            )
        tokenizer = copy.deepcopy(self.tokenizer)
        if model_max_length is not None:
            tokenizer.model_max_length = model_max_length
        return tokenizer

    def identity(self) -> dict[str, Any]:
        """What identifies this tokenizer for the cache (local files by size and modification time)."""
        path = Path(self.name).expanduser()
        files = (
            [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()]
            if path.is_dir()
            else None
        )
        return {
            "name": self.name,
            "class": type(self.tokenizer).__name__,
            "len": self.vocab_size,
            "files": files,
        }


def byte_level_chars() -> list[str]:
    """The character byte-level BPE writes for each byte value 0..255: printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) for 256, 257, ... in byte order (GPT-2's mapping)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1)}
    printable |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def byte_tokenizer_backend() -> Any:
    """A `tokenizers.Tokenizer` with ByteTokenizer's ids: one token per UTF-8 byte, id = the byte's value
    (a byte-level BPE without merges); invalid UTF-8 decodes to U+FFFD, as in ByteTokenizer.decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(byte_level_chars())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def fast_tokenizer(backend: Any, model_max_length: int | None = None) -> Any:
    """A `transformers` PreTrainedTokenizerFast around a `tokenizers.Tokenizer` (copied), decoding without
    transformers' clean-up of spaces before punctuation, so decode(encode(text)) == text."""
    from transformers import PreTrainedTokenizerFast

    kwargs: dict[str, Any] = {"clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [""])[0]


def load_hf_tokenizer(name: str) -> Any:
    """`AutoTokenizer.from_pretrained(name)`, with a clear ValueError when it cannot be loaded."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as err:
        raise ValueError(
            f"tokenizer={name!r} could not be loaded ({type(err).__name__}: {_first_line(err)}). "
            "Valid choices: 'bpe' (byte-level BPE trained on the corpus), 'bytes' (UTF-8 bytes, vocab 256), "
            "a local tokenizer directory (save_pretrained), or a Hugging Face hub name when online"
        ) from err


def tokenizer_from_state(state: dict[str, Any]) -> TextTokenizer:
    """The tokenizer a `TextTokenizer.state()` describes (a trained BPE comes back from its own JSON)."""
    kind = state.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_str(state["json"]), int(state["vocab_size"]))
    if kind == "transformers":
        return HFTokenizer(state["name"])
    raise ValueError(f"unknown tokenizer state kind {kind!r}; valid: 'bytes', 'bpe', 'transformers'")
