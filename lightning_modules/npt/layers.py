"""NPT decoder layers: a frozen pre-norm block whose attention output modulates its MLP weights (pure PyTorch).

An :class:`NPTLayer` wraps one decoder block of the target (our GPT ``Block``, `transformers`'
``GPT2Block`` or ``LlamaDecoderLayer``) and takes its place in the model's layer list, so the target's own
forward still drives the model (embeddings, RoPE tables, causal/GQA masks, final norm, head). Modes:

* ``"original"``: calls the wrapped block unchanged (teacher; exact parity with the unconverted model);
* ``"npt"``: ``out = h + MLP_mod(norm2(h))`` with ``a = attn(norm1(h))`` NOT added to the residual but
  turned by the :class:`~lightning_modules.npt.components.NPComponent` into a per-token rank-k update of
  the MLP input weight (and up / down in dual / triple mode): ``u (W + ΔW)``, factored, never forming ΔW;
* ``"exact"``: the same NPT structure with the exact rank-1 patches of Dherin et al. (exact_patch.py) in
  place of the learned modulation; reproduces the original layer (a check and the gap's reference);
* ``"dropped"``: the baseline NPT must beat: ``out = h + MLP(norm2(h))``, the attention output simply
  dropped (the NPT layer with its modulation forced to zero; the MLP still runs).

The attention is always the block's own module called with the arguments the target model passed
(RoPE position embeddings, causal mask, GQA), never a re-implementation.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.npt.components import NPComponent
from lightning_modules.npt.exact_patch import (
    exact_down_patch,
    exact_rank1_patch,
    modulation_gap,
    rank1_modulation,
)


def is_conv1d(module: nn.Module) -> bool:
    """A `transformers` Conv1D ((in, out) weight), also once parametrized (frozen_dtype storage)."""
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)


LAYER_MODES = ("npt", "original", "exact", "dropped")


class NPTLayer(nn.Module):
    """A converted decoder layer: frozen ``block`` + trainable ``np``; subclasses adapt one block family."""

    family = "base"

    def __init__(self, block: nn.Module, np_component: NPComponent, layer_idx: int) -> None:
        """Wrap ``block`` (frozen elsewhere); ``np_component`` must match its MLP sizes (d, f)."""
        super().__init__()
        self.block = block
        self.np = np_component
        self.layer_idx = layer_idx
        self.mode = "npt"
        self.capture = False  # store inputs/outputs of the next forward in self.io (see NPTModel)
        self.compute_target = False  # npt mode: also compute the original output on the same input
        self.force_input: Tensor | None = None  # teacher forcing: use this (b, s, d) instead of the input
        self.io: dict[str, Tensor] = {}
        self._signature = inspect.signature(block.forward)
        if not self.gated and np_component.mode != "single":
            raise ValueError(
                f"np mode {np_component.mode!r} modulates an up projection, which the non-gated MLP of layer "
                f"{layer_idx} ({type(block).__name__}) lacks; valid for this target: 'single'"
            )

    # ------------------------------------------------------------------ family hooks
    gated: bool = False

    def norm1(self, h: Tensor) -> Tensor:
        """The attention's input norm."""
        raise NotImplementedError

    def norm2(self, h: Tensor) -> Tensor:
        """The MLP's input norm."""
        raise NotImplementedError

    def attention(self, x: Tensor, call: dict[str, Any]) -> Tensor:
        """The block's own attention on x (b, s, d) -> (b, s, d), with the arguments its forward got."""
        raise NotImplementedError

    def mlp_modules(self) -> tuple[nn.Module, nn.Module | None, nn.Module]:
        """(input projection (GELU input / SwiGLU gate), up projection or None, down projection)."""
        raise NotImplementedError

    def act(self, g: Tensor) -> Tensor:
        """The MLP activation."""
        raise NotImplementedError

    def mlp_dropout(self, y: Tensor) -> Tensor:
        """Dropout after the down projection (identity in eval)."""
        return y

    def original_mlp(self, x: Tensor) -> Tensor:
        """The block's own MLP on x (b, s, d) -> (b, s, d)."""
        return self.block.mlp(x)

    @staticmethod
    def linear_weight(module: nn.Module) -> Tensor:
        """Weight in nn.Linear layout (out, in); GPT-2 ``Conv1D`` stores (in, out) and is transposed."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
            raise ValueError(
                f"no dense float weight in {type(module).__name__} (8-bit?); the exact patch needs one"
            )
        return weight.t() if is_conv1d(module) else weight

    # ------------------------------------------------------------------ forward
    def extra_repr(self) -> str:
        """Index, family and mode for print(module)."""
        return f"layer={self.layer_idx}, family={self.family!r}, mode={self.mode!r}"

    def _bind(self, hidden_states: Tensor, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The block forward's arguments by name (the target model may pass some positionally)."""
        bound = self._signature.bind(hidden_states, *args, **kwargs)
        call = dict(bound.arguments)
        extra = call.pop("kwargs", None) or {}
        call.pop("hidden_states", None)
        return {**call, **extra}

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Same call and return as the wrapped block: (b, s, d) -> (b, s, d)."""
        h = hidden_states if self.force_input is None else self.force_input
        if self.mode == "original":
            out = self.block(h, *args, **kwargs)
            if self.capture:
                self.io["teacher_input"], self.io["teacher_output"] = h.detach(), out.detach()
            return out
        if self.mode not in LAYER_MODES:
            raise ValueError(f"unknown layer mode {self.mode!r}; valid: {LAYER_MODES}")
        if self.mode == "dropped":
            return h + self.original_mlp(self.norm2(h))
        call = self._bind(h, args, kwargs)
        a = self.attention(self.norm1(h), call)  # (b, s, d): NOT added to the residual
        u = self.norm2(h)  # (b, s, d)
        z = self.np.project(a) if self.mode == "npt" else None  # (b, s, k, r)
        y = self.mlp_exact(h, a, u) if z is None else self.mlp_npt(a, u, z)
        out = h + y
        if self.capture:
            self.io.update(input=h.detach(), output=out, a=a.detach(), u=u.detach())
            if z is not None:
                self.io["z"] = z  # keeps its graph: the regulariser reuses it
            if self.compute_target:
                with torch.no_grad():
                    self.io["target"] = self.original_from_attention(h.detach(), a.detach())
        return out

    def mlp_npt(self, a: Tensor, u: Tensor, z: Tensor | None = None) -> Tensor:
        """MLP with modulated weights: down(act(u(W_in+ΔW)) [* u(W_up+ΔW_up)]) [+ s ΔW_down]; (b,s,d)."""
        in_proj, up_proj, down_proj = self.mlp_modules()
        if z is None:
            z = self.np.project(a)  # (b, s, k, r), shared by every target
        targets = self.np.targets
        if self.np.modulation_kind == "linear":
            return self.mlp_linear(u, z)
        g = in_proj(u) + self.np.modulation(a, u, "in", z=z)  # (b, s, f)
        if up_proj is None:
            s = self.act(g)
        else:
            up = up_proj(u)
            if "up" in targets:
                up = up + self.np.modulation(a, u, "up", z=z)
            s = self.act(g) * up  # (b, s, f)
        y = down_proj(s)
        if "down" in targets:
            y = y + self.np.modulation(a, s, "down", z=z)
        return self.mlp_dropout(y)

    def mlp_linear(self, u: Tensor, z: Tensor) -> Tensor:
        """Linear ablation: each target's input gets Σ_i v_a_i and its output Σ_i v_b_i; (b, s, d)."""
        in_proj, up_proj, down_proj = self.mlp_modules()
        targets = self.np.targets
        x = u + self.np.linear_input(z, "in")  # the MLP input, shared by the gate and up projections
        g = in_proj(x) + self.np.linear_output(z, "in")
        if up_proj is None:
            s = self.act(g)
        else:
            up = up_proj(x)
            if "up" in targets:
                up = up + self.np.linear_output(z, "up")
            s = self.act(g) * up
        if "down" in targets:
            s = s + self.np.linear_input(z, "down")
            return self.mlp_dropout(down_proj(s) + self.np.linear_output(z, "down"))
        return self.mlp_dropout(down_proj(s))

    def in_modulation(self, a: Tensor, u: Tensor) -> Tensor:
        """What a adds to the MLP input projection's output (b, s, f): u ΔW, or the linear kind's shift."""
        if self.np.modulation_kind == "quadratic":
            return self.np.modulation(a, u, "in")
        z = self.np.project(a)
        in_proj = self.mlp_modules()[0]
        return in_proj(u + self.np.linear_input(z, "in")) - in_proj(u) + self.np.linear_output(z, "in")

    def mlp_exact(self, h: Tensor, a: Tensor, u: Tensor) -> Tensor:
        """MLP with the exact rank-1 patches (in, up, down) of Dherin et al.: equals a + MLP(norm2(h + a))."""
        in_proj, up_proj, down_proj = self.mlp_modules()
        zn = self.norm2(h + a)
        g = in_proj(u) + rank1_modulation(u, *exact_rank1_patch(u, zn, self.linear_weight(in_proj)))
        s = self.act(g)
        if up_proj is not None:
            s = s * (up_proj(u) + rank1_modulation(u, *exact_rank1_patch(u, zn, self.linear_weight(up_proj))))
        y = down_proj(s) + rank1_modulation(s, *exact_down_patch(s, a))
        return self.mlp_dropout(y)

    def original_from_attention(self, h: Tensor, a: Tensor) -> Tensor:
        """The original block's output given its attention output a: h + a + MLP(norm2(h + a))."""
        x = h + a
        return x + self.original_mlp(self.norm2(x))

    @torch.no_grad()
    def np_stats(self) -> dict[str, Tensor]:
        """|v_a|, |v_b|, |u ΔW|, cos(v_a, a) and the gap to the exact patch, from the last captured forward."""
        if "a" not in self.io:
            return {}
        h, a, u = self.io["input"], self.io["a"], self.io["u"]
        out = self.np.stats(a, u, "in")
        m_learned = self.in_modulation(a, u).float()
        out["modulation_norm"] = m_learned.norm(dim=-1).mean()
        in_proj = self.mlp_modules()[0]
        try:
            weight = self.linear_weight(in_proj)
        except ValueError:
            return out
        v_a, v_b = exact_rank1_patch(u, self.norm2(h + a), weight)  # exact: u·v_a = 1, v_b = W δ
        m_exact = rank1_modulation(u, v_a, v_b)  # (b, s, f)
        out["modulation_gap"] = modulation_gap(m_learned, m_exact.float())
        return out


class GPTNPTLayer(NPTLayer):
    """Our GPT ``Block`` (``ln_1``, ``attn``, ``ln_2``, ``mlp.{c_fc, c_up, c_proj}``; GELU or SwiGLU)."""

    family = "gpt"

    @property
    def gated(self) -> bool:
        """SwiGLU (gate c_fc, up c_up) or GELU (c_fc only)."""
        return bool(self.block.mlp.swiglu)

    def norm1(self, h: Tensor) -> Tensor:
        """ln_1."""
        return self.block.ln_1(h)

    def norm2(self, h: Tensor) -> Tensor:
        """ln_2."""
        return self.block.ln_2(h)

    def attention(self, x: Tensor, call: dict[str, Any]) -> Tensor:
        """CausalSelfAttention (RoPE, GQA, windows inside)."""
        return self.block.attn(x)

    def mlp_modules(self) -> tuple[nn.Module, nn.Module | None, nn.Module]:
        """(c_fc, c_up, c_proj)."""
        mlp = self.block.mlp
        return mlp.c_fc, mlp.c_up, mlp.c_proj

    def act(self, g: Tensor) -> Tensor:
        """SiLU for SwiGLU, tanh-GELU otherwise."""
        return F.silu(g) if self.gated else F.gelu(g, approximate="tanh")

    def mlp_dropout(self, y: Tensor) -> Tensor:
        """mlp.dropout."""
        return self.block.mlp.dropout(y)


class GPT2NPTLayer(NPTLayer):
    """`transformers` ``GPT2Block``: ``Conv1D`` (in, out) weights with biases, GELU (``mlp.act``)."""

    family = "gpt2"
    gated = False

    def norm1(self, h: Tensor) -> Tensor:
        """ln_1."""
        return self.block.ln_1(h)

    def norm2(self, h: Tensor) -> Tensor:
        """ln_2."""
        return self.block.ln_2(h)

    def attention(self, x: Tensor, call: dict[str, Any]) -> Tensor:
        """GPT2Attention with the cache/mask/kwargs the model passed (as GPT2Block.forward does)."""
        if call.get("encoder_hidden_states") is not None:
            raise ValueError("NPT conversion of GPT-2 cross-attention blocks is not supported")
        skip = ("encoder_hidden_states", "encoder_attention_mask", "past_key_values", "attention_mask")
        rest = {k: v for k, v in call.items() if k not in skip}
        out, _ = self.block.attn(
            x, past_key_values=call.get("past_key_values"), attention_mask=call.get("attention_mask"), **rest
        )
        return out

    def mlp_modules(self) -> tuple[nn.Module, nn.Module | None, nn.Module]:
        """(c_fc, None, c_proj): Conv1D modules (x @ W + b with W (in, out))."""
        return self.block.mlp.c_fc, None, self.block.mlp.c_proj

    def act(self, g: Tensor) -> Tensor:
        """mlp.act (gelu_new)."""
        return self.block.mlp.act(g)

    def mlp_dropout(self, y: Tensor) -> Tensor:
        """mlp.dropout."""
        return self.block.mlp.dropout(y)


class LlamaNPTLayer(NPTLayer):
    """`transformers` ``LlamaDecoderLayer``: RMSNorms, RoPE + GQA attention, SwiGLU (gate, up, down)."""

    family = "llama"
    gated = True

    def norm1(self, h: Tensor) -> Tensor:
        """input_layernorm."""
        return self.block.input_layernorm(h)

    def norm2(self, h: Tensor) -> Tensor:
        """post_attention_layernorm."""
        return self.block.post_attention_layernorm(h)

    def attention(self, x: Tensor, call: dict[str, Any]) -> Tensor:
        """LlamaAttention with the model's position embeddings (RoPE cos/sin) and causal mask."""
        out, _ = self.block.self_attn(hidden_states=x, **call)
        return out

    def mlp_modules(self) -> tuple[nn.Module, nn.Module | None, nn.Module]:
        """(gate_proj, up_proj, down_proj)."""
        mlp = self.block.mlp
        return mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def act(self, g: Tensor) -> Tensor:
        """mlp.act_fn (SiLU)."""
        return self.block.mlp.act_fn(g)


class SkipLayer(nn.Module):
    """Stands in for a layer whose output is not needed (its successor's input is forced): returns input."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Identity on hidden_states (b, s, d)."""
        return hidden_states
