"""A GPT-2 style decoder in plain PyTorch, with switches for GQA, RoPE, RMSNorm, SwiGLU, QK-norm and
sliding-window attention. Module names follow `transformers`' GPT-2 (`transformer.h.0.attn.c_attn`, ...)
so weight conversion and name patterns (SPD, NPT) read the same on both."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_modules.gpt.config import GPTConfig


def build_norm(config: GPTConfig, size: int | None = None) -> nn.Module:
    """LayerNorm (optionally bias-free) or RMSNorm over the last dimension."""
    size = size or config.n_embd
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.bias)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention, as in `transformers`' Llama)."""

    def __init__(self, head_size: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        self.head_size, self.base = head_size, base
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(max_seq_len)

    def _build(self, seq_len: int, device: torch.device | None = None) -> None:
        inv_freq = 1.0 / (
            self.base ** (torch.arange(0, self.head_size, 2, device=device).float() / self.head_size)
        )
        angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (seq, head/2)
        angles = torch.cat([angles, angles], dim=-1)  # (seq, head)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, offset: int = 0
    ) -> torch.Tensor:
        """Rotate x (batch, heads, seq, head_size) by its positions (default offset..offset+seq-1)."""
        seq = x.size(-2)
        end = offset + seq
        if self.cos.device.type == "meta" or self.cos.size(0) < end:
            self._build(max(end, self.cos.size(0)), device=x.device)
        cos = self.cos[offset:end] if positions is None else self.cos[positions]
        sin = self.sin[offset:end] if positions is None else self.sin[positions]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        half = x.size(-1) // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def sliding_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean (seq, seq) mask, True where query i may attend key j: j <= i and i - j < window."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


def offset_window_mask(
    q_start: int, q_len: int, k_start: int, k_len: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean (q_len, k_len) mask for queries at positions q_start.. and keys at k_start..: True where
    query position i may attend key position j (j <= i and, with a window, i - j < window)."""
    i = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    j = torch.arange(k_start, k_start + k_len, device=device)[None, :]
    mask = j <= i
    return mask if window is None else mask & (i - j < window)


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    dropout_p: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference attention: explicit causal (optionally windowed) softmax. q (b, h, s, d); k, v (b, kv, t, d).

    mask: boolean (s, t), True where a query may attend a key; None = the causal (windowed) mask of s == t."""
    if k.size(1) != q.size(1):
        repeat = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if mask is None:
        seq = q.size(-2)
        mask = sliding_window_mask(seq, window or seq, q.device)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return probs @ v


class KVCache:
    """Every layer's keys and values (after RoPE) for the tokens processed so far, so that generation runs
    only the new tokens through the model. Per layer (batch, n_kv_head, capacity, head_size), slot = position;
    allocated on the first write with the keys' dtype and device. `GPT.hidden_states(idx, cache)` reads and
    advances it; windowed layers keep every slot but attend only to their window."""

    def __init__(self, n_layer: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"KVCache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.length = 0  # tokens cached = the position of the next token
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def reset(self) -> None:
        """Forget the cached tokens (the buffers are kept and overwritten)."""
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, n_kv_head, new, head_size) at positions length..length+new-1 of `layer`; returns
        that layer's keys and values at positions 0..length+new-1."""
        start, end = self.length, self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KVCache holds {self.capacity} positions; {start} cached + {k.size(2)} new")
        buffer = self.keys[layer]
        if (
            buffer is None
            or buffer.shape[:2] != k.shape[:2]
            or buffer.dtype != k.dtype
            or buffer.device != k.device
        ):
            shape = (*k.shape[:2], self.capacity, k.size(3))
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional GQA/MQA, RoPE, QK-norm and a sliding window."""

    def __init__(self, config: GPTConfig, layer_idx: int, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.config = config
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.n_kv_head, config.head_size
        self.layer_idx = layer_idx  # its slot in a KVCache
        self.window = config.window_for_layer(layer_idx)
        qkv_out = (config.n_head + 2 * config.n_kv_head) * config.head_size
        self.c_attn = nn.Linear(config.n_embd, qkv_out, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = nn.RMSNorm(config.head_size, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_size, eps=config.norm_eps) if config.qk_norm else None
        self.rope = rope  # shared across layers; holds only non-persistent buffers
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x (batch, seq, n_embd) -> (batch, seq, n_embd); with a cache, x holds the tokens at positions
        cache.length.. and attends to the cached ones too."""
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_size, self.n_kv_head * self.head_size, self.n_kv_head * self.head_size],
            dim=-1,
        )
        q = q.view(b, s, self.n_head, self.head_size)
        k = k.view(b, s, self.n_kv_head, self.head_size)
        v = v.view(b, s, self.n_kv_head, self.head_size)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            y = self._cached_attention(q, k, v, cache).transpose(1, 2)  # (b, s, h, d)
        elif self.config.attn_backend == "flash_attn":
            y = self._flash_attn(q, k, v)  # (b, s, h, d)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, s, d)
            if self.rope is not None:
                q, k = self.rope(q), self.rope(k)
            dropout_p = self.config.attn_dropout if self.training else 0.0
            if self.config.attn_backend == "math":
                y = math_attention(q, k, v, self.window, dropout_p)
            else:
                y = self._sdpa(q, k, v, dropout_p)
            y = y.transpose(1, 2)  # (b, s, h, d)
        return self.resid_dropout(self.c_proj(y.reshape(b, s, self.config.n_embd)))

    def _cached_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """Attention of new tokens q, k, v (b, s, heads, d) at positions offset.. (offset = cache.length) over
        the cached keys and their own; stores k, v. Returns (b, h, s, d). The flash_attn backend uses SDPA."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, s, d)
        offset, s = cache.length, q.size(-2)
        if self.rope is not None:
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        keys, values = cache.update(self.layer_idx, k, v)  # (b, kv, offset + s, d)
        dropout_p = self.config.attn_dropout if self.training else 0.0
        math_backend = self.config.attn_backend == "math"
        if offset == 0:  # nothing cached before: the same kernels as the cache-free forward
            return (
                math_attention(q, k, v, self.window, dropout_p)
                if math_backend
                else self._sdpa(q, k, v, dropout_p)
            )
        start = 0 if self.window is None else max(0, offset - self.window + 1)  # the first query's window
        keys, values = keys[:, :, start:], values[:, :, start:]
        mask = None  # one query sees every key from its window's start
        if s > 1 or math_backend:
            mask = offset_window_mask(offset, s, start, keys.size(2), self.window, q.device)
        if math_backend:
            return math_attention(q, keys, values, self.window, dropout_p, mask=mask)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, dropout_p=dropout_p, enable_gqa=self.n_kv_head != self.n_head
        )

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        gqa = self.n_kv_head != self.n_head
        seq = q.size(-2)
        if self.window is None or self.window >= seq:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa
            )
        mask = sliding_window_mask(seq, self.window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)

    def _flash_attn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from flash_attn import flash_attn_func  # optional extra; checked in GPT.__init__

        if self.rope is not None:
            q = self.rope(q.transpose(1, 2)).transpose(1, 2)
            k = self.rope(k.transpose(1, 2)).transpose(1, 2)
        window = (-1, -1) if self.window is None else (self.window - 1, 0)
        dropout_p = self.config.attn_dropout if self.training else 0.0
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True, window_size=window)


class MLP(nn.Module):
    """GELU (tanh approximation, as GPT-2) or SwiGLU feed-forward block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)  # GELU input / SwiGLU gate
        self.c_up = nn.Linear(config.n_embd, hidden, bias=config.bias) if self.swiglu else None
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, seq, n_embd) -> (batch, seq, n_embd)."""
        if self.swiglu:
            h = F.silu(self.c_fc(x)) * self.c_up(x)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.ln_1 = build_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx, rope)
        self.ln_2 = build_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model. forward(idx (b, s)) -> logits (b, s, padded_vocab_size)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.attn_backend == "flash_attn":
            _require_flash_attn()
        self.config = config
        rope = RotaryEmbedding(config.head_size, config.block_size, config.rope_base) if config.rope else None
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=None if config.rope else nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.embd_dropout),
                h=nn.ModuleList(Block(config, i, rope) for i in range(config.n_layer)),
                ln_f=build_norm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for block in self.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (batch, seq) token ids -> logits (batch, seq, padded_vocab_size); see `hidden_states`."""
        return self.lm_head(self.hidden_states(idx, cache))

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (batch, seq) -> final normalised hidden states (batch, seq, n_embd).

        With a cache (`new_cache`), idx holds the tokens at positions cache.length.. (the whole window when
        the cache is empty), attention also sees the cached tokens, and the cache advances by seq."""
        seq = idx.size(1)
        offset = 0 if cache is None else cache.length
        if offset + seq > self.config.block_size:
            where = f"{offset} cached + {seq} new tokens" if cache is not None else f"sequence length {seq}"
            raise ValueError(f"{where} exceeds block_size={self.config.block_size}")
        if cache is not None and not self.supports_kv_cache:
            raise ValueError(f"a KVCache needs this model's own blocks; layer types: {self._layer_types()}")
        x = self.transformer.wte(idx)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(torch.arange(offset, offset + seq, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if cache is not None:
                x = block(x, cache)
            elif self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if cache is not None:
            cache.length += seq
        return self.transformer.ln_f(x)

    @property
    def supports_kv_cache(self) -> bool:
        """Whether every layer is this model's own `Block` (converted layers, e.g. NPT's, take no cache)."""
        return all(isinstance(block, Block) for block in self.transformer.h)

    def _layer_types(self) -> list[str]:
        return sorted({type(block).__name__ for block in self.transformer.h})

    def new_cache(self) -> KVCache:
        """An empty KV cache for this model: one slot per position up to block_size, for every layer."""
        return KVCache(self.config.n_layer, self.config.block_size)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample continuations of prompt_ids (batch, seq) -> (batch, seq + max_new_tokens).

        temperature 0 is greedy decoding; top_k keeps the k most likely tokens. Only real vocabulary
        entries (not the padding rows of the embedding) are ever sampled. See `generate_tokens`."""
        prompt_ids = prompt_ids[None] if prompt_ids.dim() == 1 else prompt_ids
        new = list(self.generate_tokens(prompt_ids, max_new_tokens, temperature, top_k, generator, use_cache))
        return torch.cat([prompt_ids, *new], dim=1)

    def generate_tokens(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield each sampled token (batch, 1) as soon as it is chosen (for streaming).

        The model sees the last block_size tokens. use_cache runs only the newest token through the model,
        attending to cached keys and values, until the context passes block_size: from then on each step
        recomputes the window of the last block_size tokens (its positions shift), so the tokens equal the
        cache-free path's (use_cache=False: the whole window for every token). Models whose layers are not
        this model's own blocks (e.g. NPT-converted) always take the cache-free path."""
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.size(1) == 0:
            raise ValueError("generate needs a prompt of at least one token")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        return self._token_stream(prompt_ids, max_new_tokens, temperature, top_k, generator, use_cache)

    @torch.no_grad()
    def _token_stream(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
        use_cache: bool,
    ) -> Iterator[torch.Tensor]:
        block, vocab = self.config.block_size, self.config.vocab_size
        cache = self.new_cache() if use_cache and self.supports_kv_cache else None
        idx = prompt_ids
        for _ in range(max_new_tokens):
            if cache is None:
                logits = self(idx[:, -block:])[:, -1, :vocab]
            else:
                if cache.length in (0, block):  # first step, or the window slid: (re)fill the cache
                    cache.reset()
                    window = idx[:, -block:]
                else:
                    window = idx[:, -1:]
                logits = self.lm_head(self.hidden_states(window, cache)[:, -1])[:, :vocab]
            next_id = sample_next(logits.float(), temperature, top_k, generator)
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Number of unique parameters; without embeddings excludes token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.transformer.wte.weight.numel()
            if self.transformer.wpe is not None:
                n -= self.transformer.wpe.weight.numel()
        return n

    # --- interop with transformers ---------------------------------------------------------------
    @classmethod
    def from_hf(cls, model_or_path: Any, **overrides: Any) -> GPT:
        """Build a GPT from a `transformers` GPT2LMHeadModel / LlamaForCausalLM (in memory) or a local directory."""
        from lightning_modules.gpt.hf import gpt_from_hf

        return gpt_from_hf(model_or_path, **overrides)

    def to_hf(self) -> Any:
        """An equivalent `transformers` model: GPT2LMHeadModel for the GPT-2 switches, LlamaForCausalLM for
        RoPE + RMSNorm + SwiGLU; ValueError naming any switch neither layout has (see hf.layout_problems)."""
        from lightning_modules.gpt.hf import gpt_to_hf

        return gpt_to_hf(self)


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids (batch, 1) from logits (batch, vocab): argmax at temperature 0, else a draw from the
    softmax of logits / temperature restricted to the top_k most likely."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


def _require_flash_attn() -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError as err:
        raise ValueError(
            "attn_backend='flash_attn' needs the flash-attn package on CUDA "
            "(pip install -e '.[flash]'); valid alternatives: 'sdpa' (default), 'math'"
        ) from err
