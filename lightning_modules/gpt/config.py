"""GPT configuration: one dataclass, architecture switches and named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

NormKind = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "swiglu"]
AttentionBackend = Literal["sdpa", "flash_attn", "math"]

# Fields that only change how the model is run, never the parameters in a checkpoint.
TRAINING_ONLY_FIELDS = frozenset(
    {"attn_backend", "gradient_checkpointing", "embd_dropout", "attn_dropout", "resid_dropout"}
)


@dataclass
class GPTConfig:
    """Hyper-parameters of a decoder-only transformer; all switches off gives GPT-2."""

    block_size: int = 1024  # maximum sequence length (learned positions / RoPE cache)
    vocab_size: int = 50257  # tokens the tokenizer produces
    padding_multiple: int = 64  # the embedding is padded up to a multiple of this
    padded_vocab_size: int | None = None  # None = vocab_size rounded up to padding_multiple
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True  # biases in linear layers and LayerNorms
    tie_embeddings: bool = True  # lm_head shares the token embedding
    norm_eps: float = 1e-5
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    # --- architecture switches (all off = GPT-2) ---
    n_kv_head: int | None = None  # None = n_head (MHA); fewer = GQA; 1 = MQA
    rope: bool = False  # rotary position embeddings instead of learned positions
    rope_base: float = 10000.0
    norm: NormKind = "layernorm"
    mlp: MLPKind = "gelu"
    mlp_ratio: float = 4.0  # hidden = mlp_ratio * n_embd (SwiGLU: rounded up to a multiple of 64)
    qk_norm: bool = False  # RMSNorm on queries and keys, per head, before attention
    sliding_window: int | None = None  # attend to at most this many previous tokens (incl. self)
    global_every: int = 0  # with sliding_window: every k-th layer (k, 2k, ...) attends globally
    # --- training-only switches (never change the checkpoint) ---
    attn_backend: AttentionBackend = "sdpa"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.padded_vocab_size is None:
            self.padded_vocab_size = _round_up(self.vocab_size, self.padding_multiple)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field and what would be valid."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "padding_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must be >= 1 and divide n_head={self.n_head}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"vocab_size={self.vocab_size} exceeds the embedding (padded_vocab_size="
                f"{self.padded_vocab_size}); use a tokenizer with at most {self.padded_vocab_size} tokens"
            )
        if self.rope and self.head_size % 2:
            raise ValueError(f"RoPE needs an even head size, got n_embd/n_head={self.head_size}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm={self.norm!r}; valid: 'layernorm', 'rmsnorm'")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp={self.mlp!r}; valid: 'gelu', 'swiglu'")
        if self.attn_backend not in ("sdpa", "flash_attn", "math"):
            raise ValueError(f"attn_backend={self.attn_backend!r}; valid: 'sdpa', 'flash_attn', 'math'")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.global_every < 0:
            raise ValueError(f"global_every must be >= 0, got {self.global_every}")
        for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.mlp_ratio * self.n_embd)
        return _round_up(hidden, 64) if self.mlp == "swiglu" else hidden

    def window_for_layer(self, layer: int) -> int | None:
        """Attention window of layer `layer` (None = full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.global_every and (layer + 1) % self.global_every == 0:
            return None
        return self.sliding_window

    def architecture(self) -> dict[str, Any]:
        """The fields that decide parameter shapes and semantics (what a checkpoint depends on)."""
        skip = TRAINING_ONLY_FIELDS
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    def architecture_diff(self, other: GPTConfig | dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Architecture fields whose values differ: {name: (ours, theirs)}."""
        theirs = other.architecture() if isinstance(other, GPTConfig) else dict(other)
        ours = self.architecture()
        return {k: (ours[k], theirs.get(k)) for k in ours if k in theirs and ours[k] != theirs[k]}

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named preset (see PRESETS) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; valid: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


PRESETS: dict[str, dict[str, Any]] = {
    # ~0.8M non-embedding parameters: trains on a 2-core CPU in minutes.
    "tiny": dict(block_size=256, n_layer=4, n_head=4, n_embd=128),
    # GPT-2 small (124M).
    "d12": dict(block_size=1024, n_layer=12, n_head=12, n_embd=768, vocab_size=50257),
    "gpt2-medium": dict(block_size=1024, n_layer=24, n_head=16, n_embd=1024, vocab_size=50257),
    "gpt2-large": dict(block_size=1024, n_layer=36, n_head=20, n_embd=1280, vocab_size=50257),
    "gpt2-xl": dict(block_size=1024, n_layer=48, n_head=25, n_embd=1600, vocab_size=50257),
}
