"""GPT attention-pattern figures: the softmax attention of a few heads on one validation sequence.

The fast kernels (SDPA, flash-attn) never materialise the attention probabilities, so a forward pre-hook
captures each chosen layer's input and the pattern is recomputed explicitly from its q and k (the same
projections, QK-norm, RoPE, GQA sharing and causal / sliding-window mask as `model.math_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_modules.common.plotting import heatmap, new_figure

from .model import GPT, CausalSelfAttention, sliding_window_mask

MAX_TOKENS = 32  # longer sequences are cut: a 32 x 32 pattern still shows each token's label


def default_heads(model: GPT, per_layer: int = 4) -> list[tuple[int, int]]:
    """(layer, head) pairs: the first `per_layer` heads of the first and the last layer."""
    n_layer, n_head = model.config.n_layer, model.config.n_head
    layers = sorted({0, n_layer - 1})
    return [(layer, head) for layer in layers for head in range(min(per_layer, n_head))]


def _probabilities(attn: CausalSelfAttention, q: Tensor, k: Tensor) -> Tensor:
    """Attention probabilities (heads, s, s) from one sequence's q (s, heads, d) and k (s, kv_heads, d)
    as the layer's c_attn (and QK-norm) produced them: RoPE, GQA sharing and the causal / windowed mask."""
    h, kv, d = attn.n_head, attn.n_kv_head, attn.head_size
    q, k = q.float().transpose(0, 1)[None], k.float().transpose(0, 1)[None]  # (1, heads, s, d)
    if attn.rope is not None:  # the rotary tables are buffers, never sharded: usable outside forward
        q, k = attn.rope(q), attn.rope(k)
    if kv != h:
        k = k.repeat_interleave(h // kv, dim=1)
    s = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (1, h, s, s)
    mask = sliding_window_mask(s, attn.window or s, q.device)
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)[0]


@torch.no_grad()
def attention_patterns(
    model: GPT, idx: Tensor, heads: Sequence[tuple[int, int]] | None = None
) -> dict[tuple[int, int], Tensor]:
    """{(layer, head): (s, s) attention probabilities} on the first sequence of idx (batch, seq).

    Runs one eager forward of that sequence with forward hooks on the chosen layers' c_attn (and q_norm /
    k_norm): q and k are taken as the forward computes them, so sharded weights (FSDP, DeepSpeed stage 3)
    are never read outside it; every rank must call this together under such strategies."""
    heads = list(heads) if heads is not None else default_heads(model)
    layers = sorted({layer for layer, _ in heads})
    qk: dict[int, dict[str, Tensor]] = {layer: {} for layer in layers}
    handles = []
    for layer in layers:
        attn = model.transformer.h[layer].attn
        if not isinstance(attn, CausalSelfAttention):
            raise ValueError(f"layer {layer}: attention is {type(attn).__name__}, not this model's own")
        h, kv, d = attn.n_head, attn.n_kv_head, attn.head_size

        def from_qkv(_m: nn.Module, _a: tuple, out: Tensor, layer: int = layer, h=h, kv=kv, d=d) -> None:
            q, k, _ = out[0].detach().split([h * d, kv * d, kv * d], dim=-1)  # first sequence
            qk[layer].setdefault("q", q.view(-1, h, d))
            qk[layer].setdefault("k", k.view(-1, kv, d))

        def normed(name: str, layer: int = layer) -> Callable[..., None]:
            def hook(_m: nn.Module, _a: tuple, out: Tensor) -> None:
                qk[layer][name] = out[0].detach()  # (s, heads, d): replaces the un-normed one

            return hook

        handles.append(attn.c_attn.register_forward_hook(from_qkv))
        if attn.q_norm is not None:
            handles.append(attn.q_norm.register_forward_hook(normed("q")))
            handles.append(attn.k_norm.register_forward_hook(normed("k")))
    was_training = model.training
    model.eval()
    try:
        model.forward(idx[:1])  # .forward, not __call__: eager even after model.compile(), no recompile
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    out: dict[tuple[int, int], Tensor] = {}
    for layer in layers:
        probs = _probabilities(model.transformer.h[layer].attn, qk[layer]["q"], qk[layer]["k"]).cpu()
        out.update({(lay, head): probs[head] for lay, head in heads if lay == layer})
    return out


def attention_figure(
    patterns: dict[tuple[int, int], Tensor], tokens: Sequence[str] | None = None, step: int | None = None
) -> Figure:
    """A grid of heatmaps (query row attends to key column), one per head, colour scale 0-1, token labels."""
    keys = list(patterns)
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    s = next(iter(patterns.values())).shape[-1]
    side = max(3.2, 0.14 * s + 1.5)
    fig, axes = new_figure(nrows, ncols, size=(side * ncols + 1.0, side * nrows + 0.6), squeeze=False)
    labels = [repr(t)[1:-1][:8] for t in tokens] if tokens is not None else [str(i) for i in range(s)]
    for ax, key in zip(axes.flat, keys):
        heatmap(
            ax,
            patterns[key].numpy(),
            vmin=0.0,
            vmax=1.0,
            cmap="magma",
            xlabels=labels,
            ylabels=labels,
            colorbar_label="attention probability (0 to 1)",
        )
        ax.tick_params(labelsize=6)
        ax.set_xlabel("key token")
        ax.set_ylabel("query token")
        ax.set_title(f"layer {key[0]}, head {key[1]}")
    for ax in list(axes.flat)[len(keys) :]:
        ax.remove()
    at = "" if step is None else f" (step {step})"
    fig.suptitle(f"Attention patterns on a validation sequence{at}")
    return fig


def attention_sample(
    model: GPT, idx: Tensor, heads: Sequence[tuple[int, int]] | None = None
) -> tuple[dict[tuple[int, int], Tensor], list[int]]:
    """(patterns, token ids) for the first MAX_TOKENS tokens of the first sequence of idx (batch, seq);
    causal attention makes them exact for those tokens whatever follows."""
    idx = idx[:1, :MAX_TOKENS]
    return attention_patterns(model, idx, heads), idx[0].tolist()


def validation_attention_figure(
    model: GPT,
    idx: Tensor,
    decode: Callable[[list[int]], str] | None = None,
    step: int | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
) -> Figure:
    """The attention figure of `attention_sample`, tokens labelled with `decode` (the DataModule's)."""
    patterns, ids = attention_sample(model, idx, heads)
    tokens = [decode([t]) for t in ids] if decode is not None else None
    return attention_figure(patterns, tokens, step)
