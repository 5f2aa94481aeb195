"""Tokenizers behind one small interface: raw UTF-8 bytes, a byte-level BPE trained with `tokenizers`, and
any `transformers` tokenizer (hub name or local directory)."""

from __future__ import annotations

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


class ByteTokenizer(TextTokenizer):
    """One token per UTF-8 byte (vocab 256); undecodable byte sequences decode to U+FFFD."""

    vocab_size = 256

    def encode_array(self, texts: Sequence[str]) -> np.ndarray:
        return np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


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

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


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
