"""Convert chosen layers of a target LM into NPT layers, load targets, and run teacher / student passes.

Targets are read by :mod:`lightning_modules.common.targets` (our ``.ckpt``, a local transformers GPT-2 or
Llama directory) or built fresh and tiny here. Families: ``"gpt"`` our GPT (GELU or SwiGLU MLP),
``"gpt2"`` `transformers`' GPT2LMHeadModel (Conv1D weights (in, out), ``c_fc`` bias), ``"llama"``
`transformers`' LlamaForCausalLM (RoPE, causal mask, GQA). Each converted block is replaced in the
model's own layer list by an :class:`NPTLayer` wrapping it, so the target's forward still computes
embeddings, RoPE tables and masks. Base weights are frozen; only the NP components train. Pure PyTorch
(no Lightning).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.common.targets import (
    FAMILIES,
    LAYOUTS,
    check_family,
    decoder_layers,
    detect_family,
    embedding_rows,
    load_target_model,
    max_positions,
)
from lightning_modules.gpt.config import GPTConfig
from lightning_modules.gpt.model import GPT
from lightning_modules.npt.components import MODES, NPComponent
from lightning_modules.npt.layers import (
    LAYER_MODES,
    GPT2NPTLayer,
    GPTNPTLayer,
    LlamaNPTLayer,
    NPTLayer,
    SkipLayer,
    is_conv1d,
)

__all__ = ["FAMILIES", "NPTModel", "convert", "load_target", "mlp_sizes", "parse_layers"]

_LAYER_CLASSES: dict[str, type[NPTLayer]] = {"gpt": GPTNPTLayer, "gpt2": GPT2NPTLayer, "llama": LlamaNPTLayer}
FRESH_TARGET = "null for a fresh tiny target"  # NPT's own alternative, named in the loader's errors
# Fresh tiny targets (target_path None), overridable by target_config.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt": {},  # GPTConfig.from_name("tiny"): 4 layers, 4 heads, 128 dims
    "gpt2": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=4096),
    "llama": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        vocab_size=4096,
    ),
}


# ---------------------------------------------------------------------------------------------- targets
def _build_fresh(family: str, config: dict[str, Any]) -> nn.Module:
    """A tiny randomly initialised target of ``family`` (TINY_CONFIGS overridden by ``config``)."""
    if family == "gpt":
        return GPT(GPTConfig.from_name("tiny", **config))
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if family == "gpt2":  # GPT-2's special-token ids (50256) would lie outside a small vocabulary
        defaults = {**TINY_CONFIGS[family], "bos_token_id": 0, "eos_token_id": 0}
        return GPT2LMHeadModel(GPT2Config(**{**defaults, **config}))
    return LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIGS[family], **config}))


def load_target(
    path: str | None = None,
    family: str | None = None,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    load_in_8bit: bool = False,
) -> tuple[nn.Module, str]:
    """(model in eval mode, family) from our ``.ckpt``, a local transformers dir, or fresh when path is None.

    ``family``: None keeps a transformers GPT-2 directory as GPT2LMHeadModel; 'gpt' reads it into our GPT.
    ``config``: for a fresh target, overrides of TINY_CONFIGS[family]; for loaded weights, fields that
    must match the checkpoint (training-only GPT fields such as dropout are applied instead).
    ``load_in_8bit``: HF targets on CUDA through bitsandbytes (optional extra).
    """
    check_family(family)
    if path is not None:
        return load_target_model(
            path, family, config=config, dtype=dtype, load_in_8bit=load_in_8bit, also=(FRESH_TARGET,)
        )
    if load_in_8bit:
        raise ValueError("load_in_8bit needs pretrained weights: set target_path to a transformers directory")
    family = family or "gpt"
    model = _build_fresh(family, dict(config or {}))
    if dtype is not None:
        model.to(dtype)
    return model.eval(), family


# ---------------------------------------------------------------------------------------------- conversion
def parse_layers(spec: str | int | Sequence[int] | None, n_layer: int) -> list[int]:
    """Layer indices from None/'upper' (upper half), 'all', 'a:b' (a <= i < b; ends optional), '1,3' or ints."""
    valid = f"0..{n_layer - 1}, 'all', 'upper', 'a:b' or a list"
    if spec is None or spec == "upper":
        indices = list(range(n_layer // 2, n_layer))
    elif spec == "all":
        indices = list(range(n_layer))
    elif isinstance(spec, str):
        try:
            if ":" in spec:
                start_s, stop_s = spec.split(":", 1)
                start = int(start_s) if start_s.strip() else 0
                stop = int(stop_s) if stop_s.strip() else n_layer
                if not 0 <= start < stop <= n_layer:
                    raise ValueError
                indices = list(range(start, stop))
            else:
                indices = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"bad layer spec {spec!r} for a {n_layer}-layer target; valid: {valid}"
            ) from None
    elif isinstance(spec, int) and not isinstance(spec, bool):
        indices = [spec]
    else:
        indices = list(spec)
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layer:
            raise ValueError(f"layer index {i!r} out of range for a {n_layer}-layer target; valid: {valid}")
    if not indices:
        raise ValueError(f"layer spec {spec!r} selects no layer; valid: {valid}")
    return sorted(set(indices))


def mlp_sizes(block: nn.Module, family: str, index: int) -> tuple[int, int]:
    """(d_model, d_ffn) of a block's MLP; ValueError if it lacks the family's MLP projections."""
    layout = LAYOUTS[family]
    mlp = getattr(block, layout.mlp, None)
    parts = layout.mlp_parts
    missing = [n for n in parts if getattr(mlp, n, None) is None] if mlp is not None else [layout.mlp]
    if missing:
        raise ValueError(
            f"layer {index} ({type(block).__name__}) has no supported MLP: missing {missing}; valid "
            f"{family} MLPs have {parts}"
        )
    first = mlp.gate_proj if family == "llama" else mlp.c_fc
    if is_conv1d(first):  # weight (in, out)
        return int(first.weight.shape[0]), int(first.weight.shape[1])
    return int(first.in_features), int(first.out_features)


def convert(
    model: nn.Module,
    layers: str | int | Sequence[int] | None = None,
    rank: int = 8,
    num_ranks: int = 1,
    mode: str = "single",
    init_scale: float = 0.01,
    seed: int | None = None,
    np_dtype: torch.dtype = torch.float32,
    modulation: str = "quadratic",
    init: str = "default",
) -> NPTModel:
    """Freeze ``model`` and replace the chosen layers (default: upper half) by NPT layers, in place.

    Each layer gets its own NPComponent(d, f, rank, num_ranks, mode, modulation=, init=) in ``np_dtype``
    (default float32, so the optimizer state stays precise under bf16 mixed precision); ``seed + layer``
    seeds it.
    """
    family = detect_family(model)
    if family != "gpt":
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:
            raise ValueError(
                f"NPT conversion of transformers models needs transformers >= 5 (decoder layers return a "
                f"tensor); found {transformers.__version__}"
            )
    if mode not in MODES:
        raise ValueError(f"unknown np mode {mode!r}; valid: {sorted(MODES)}")
    blocks = decoder_layers(model, family)
    if any(isinstance(b, NPTLayer) for b in blocks):
        raise ValueError("model is already converted; convert the original model")
    indices = parse_layers(layers, len(blocks))
    model.requires_grad_(False)
    cls = _LAYER_CLASSES[family]
    for i in indices:
        block = blocks[i]
        d, f = mlp_sizes(block, family, i)
        device = next(block.parameters()).device
        component = NPComponent(
            d,
            f,
            rank,
            num_ranks,
            mode,
            init_scale,
            seed=None if seed is None else seed + i,
            dtype=np_dtype,
            device=device,
            modulation=modulation,
            init=init,
        )
        blocks[i] = cls(block, component, i)
    return NPTModel(model, family, indices)


class NPTModel(nn.Module):
    """A target with converted layers: logits, mode switch, teacher pass, teacher-forced / free student pass."""

    def __init__(self, model: nn.Module, family: str, indices: list[int]) -> None:
        """Use :func:`convert` to build one."""
        super().__init__()
        self.model = model
        self.family = family
        self.indices = list(indices)
        self.model.eval()

    # ------------------------------------------------------------------ properties
    @property
    def layers(self) -> nn.ModuleList:
        """All decoder layers (converted ones are NPTLayers)."""
        return decoder_layers(self.model, self.family)

    @property
    def npt_layers(self) -> list[NPTLayer]:
        """The converted layers, in order."""
        return [self.layers[i] for i in self.indices]

    @property
    def vocab_size(self) -> int:
        """Real vocabulary size of the target (logits beyond it are padding)."""
        return int(self.model.config.vocab_size)

    @property
    def embed_size(self) -> int:
        """Rows of the token embedding (largest token id + 1 it accepts)."""
        return embedding_rows(self.model, self.family)

    @property
    def max_seq_len(self) -> int:
        """Longest sequence the target's positions allow."""
        return max_positions(self.model, self.family)

    def np_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trainable NP parameters, named as in state_dict()."""
        for i, layer in zip(self.indices, self.npt_layers):
            yield from layer.np.named_parameters(prefix=f"layer{i}")

    def np_parameters(self) -> list[nn.Parameter]:
        """The trainable NP parameters."""
        return [p for _, p in self.np_named_parameters()]

    def train(self, mode: bool = True) -> NPTModel:
        """Set the flag; the frozen target always runs in eval mode (no dropout), teacher and student alike."""
        super().train(mode)
        self.model.eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, idx: Tensor) -> Tensor:
        """idx (b, s) -> logits (b, s, vocab) with the layers' current modes."""
        if self.family == "gpt":
            return self.model(idx)
        return self.model(input_ids=idx, use_cache=False).logits

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator[NPTModel]:
        """Run every converted layer in ``mode`` ('npt', 'original', 'exact') inside the block."""
        if mode not in LAYER_MODES:
            raise ValueError(f"unknown layer mode {mode!r}; valid: {LAYER_MODES}")
        before = [layer.mode for layer in self.npt_layers]
        for layer in self.npt_layers:
            layer.mode = mode
        try:
            yield self
        finally:
            for layer, m in zip(self.npt_layers, before):
                layer.mode = m

    def original(self) -> contextlib.AbstractContextManager[NPTModel]:
        """Context manager: the converted layers behave exactly like the unconverted model."""
        return self.mode("original")

    @contextlib.contextmanager
    def _skipping(self, indices: list[int]) -> Iterator[None]:
        """Temporarily replace layers whose outputs are unused by identity stand-ins."""
        layers = self.layers
        saved = {i: layers[i] for i in indices}
        for i in indices:
            layers[i] = SkipLayer()
        try:
            yield
        finally:
            for i, module in saved.items():
                layers[i] = module

    def clear(self) -> None:
        """Drop the tensors captured by the last passes (frees their activations)."""
        for layer in self.npt_layers:
            layer.io = {}
            layer.force_input = None
            layer.capture = layer.compute_target = False

    @torch.no_grad()
    def teacher_forward(self, idx: Tensor) -> Tensor:
        """Original-model logits (b, s, vocab); each converted layer keeps its input and output (no grad)."""
        for layer in self.npt_layers:
            layer.io, layer.capture, layer.force_input = {}, True, None
        try:
            with self.original():
                return self(idx)
        finally:
            for layer in self.npt_layers:
                layer.capture = False

    def student_forward(
        self, idx: Tensor, teacher_forced: bool, layers: Sequence[int] | None = None
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """NPT logits (b, s, vocab), per-layer outputs and targets (b, s, d) after :meth:`teacher_forward`.

        ``layers``: the converted layers that run as NPT layers (default: all); the other converted layers
        run as the original blocks (sequential training: only the active layer, or it and those below).
        Outputs and targets are those of ``layers``, in order.

        Teacher-forced: every NPT layer reads the teacher's hidden state (its target is the teacher's
        output there); layers below the last NPT layer are skipped, and the logits see only the last NPT
        layer's error. Free-running: layers below the first NPT layer are skipped (it reads the teacher's
        input, which they would reproduce); each later layer reads the previous output and its target is the
        original layer on that same input (attention shared, original MLP recomputed without grad).
        """
        chosen = self.indices if layers is None else sorted(layers)
        if any(i not in self.indices for i in chosen) or not chosen:
            raise ValueError(f"layers {list(chosen)} must be a non-empty subset of converted {self.indices}")
        npt = [self.layers[i] for i in chosen]
        if any("teacher_input" not in layer.io for layer in npt):
            raise RuntimeError("student_forward needs teacher_forward(idx) on the same batch first")
        last = chosen[-1] if teacher_forced else chosen[0]
        skip = [i for i in range(last) if i not in chosen]
        for n, layer in enumerate(npt):
            layer.capture, layer.compute_target = True, not teacher_forced
            layer.force_input = layer.io["teacher_input"] if teacher_forced or n == 0 else None
        before = [layer.mode for layer in self.npt_layers]
        for i, layer in zip(self.indices, self.npt_layers):
            layer.mode = "npt" if i in chosen else "original"
        try:
            with self._skipping(skip):
                logits = self(idx)
        finally:
            for layer, m in zip(self.npt_layers, before):
                layer.mode = m
            for layer in npt:
                layer.capture, layer.compute_target, layer.force_input = False, False, None
        outputs = [layer.io["output"] for layer in npt]
        targets = [layer.io["teacher_output" if teacher_forced else "target"] for layer in npt]
        return logits, outputs, targets

    @torch.no_grad()
    def layer_stats(self) -> dict[int, dict[str, Tensor]]:
        """Per converted layer: NP statistics and the exact-patch gap from the last student pass."""
        return {i: layer.np_stats() for i, layer in zip(self.indices, self.npt_layers)}
