"""Weight conversion between our GPT and `transformers`' GPT2LMHeadModel.

HF GPT-2 stores its projections as `Conv1D` with weight (in, out); ours are `nn.Linear` (out, in),
so every projection is transposed on the way across. Both models use the same module names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_modules.gpt.config import GPTConfig
from lightning_modules.gpt.model import GPT

_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def load_hf_gpt2(model_or_path: Any) -> Any:
    """A GPT2LMHeadModel from memory or a local directory (never the hub)."""
    from transformers import GPT2LMHeadModel

    if isinstance(model_or_path, GPT2LMHeadModel):
        return model_or_path
    path = Path(str(model_or_path))
    if not path.is_dir():
        raise FileNotFoundError(
            f"no local transformers model directory at {str(model_or_path)!r}; pass a GPT2LMHeadModel "
            "or a directory written by save_pretrained()"
        )
    return GPT2LMHeadModel.from_pretrained(path, local_files_only=True)


def config_from_hf(hf_config: Any, **overrides: Any) -> GPTConfig:
    """Translate a GPT2Config into a GPTConfig, rejecting options our GPT does not implement."""
    if hf_config.activation_function not in _TANH_GELUS:
        raise ValueError(
            f"GPT-2 activation_function={hf_config.activation_function!r} is not supported; valid: {_TANH_GELUS}"
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(hf_config, flag, False):
            raise ValueError(f"GPT-2 option {flag}=True is not supported by our GPT")
    if not getattr(hf_config, "scale_attn_weights", True):
        raise ValueError("GPT-2 option scale_attn_weights=False is not supported by our GPT")
    n_inner = hf_config.n_inner or 4 * hf_config.n_embd
    fields = dict(
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=hf_config.vocab_size,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        bias=True,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        norm_eps=hf_config.layer_norm_epsilon,
        embd_dropout=hf_config.embd_pdrop,
        attn_dropout=hf_config.attn_pdrop,
        resid_dropout=hf_config.resid_pdrop,
        mlp_ratio=n_inner / hf_config.n_embd,
    )
    return GPTConfig(**{**fields, **overrides})


def gpt_from_hf(model_or_path: Any, **overrides: Any) -> GPT:
    """Our GPT with the weights of a GPT2LMHeadModel; logits match to float32 precision."""
    hf_model = load_hf_gpt2(model_or_path)
    config = config_from_hf(hf_model.config, **overrides)
    model = GPT(config)
    hf_state = {
        k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.bias", ".masked_bias"))
    }
    ours = model.state_dict()
    converted = {}
    for name, tensor in hf_state.items():
        if name not in ours:
            raise ValueError(f"unexpected GPT-2 weight {name!r}; expected names like {next(iter(ours))!r}")
        tensor = tensor.t() if name.endswith(_CONV1D_SUFFIXES) else tensor
        if name == "transformer.wte.weight" and tensor.size(0) < config.padded_vocab_size:
            tensor = torch.cat(
                [tensor, tensor.new_zeros(config.padded_vocab_size - tensor.size(0), tensor.size(1))]
            )
        converted[name] = tensor
    if config.tie_embeddings:
        converted.pop("lm_head.weight", None)
    missing = set(ours) - set(converted) - ({"lm_head.weight"} if config.tie_embeddings else set())
    if missing:
        raise ValueError(f"GPT-2 checkpoint lacks weights {sorted(missing)[:5]}")
    model.load_state_dict(converted, strict=not config.tie_embeddings)
    return model


def gpt_to_hf(model: GPT) -> Any:
    """A GPT2LMHeadModel equal to `model`; only the GPT-2 baseline architecture converts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    unsupported = {
        "n_kv_head": c.n_kv_head != c.n_head,
        "rope": c.rope,
        "norm": c.norm != "layernorm",
        "mlp": c.mlp != "gelu",
        "qk_norm": c.qk_norm,
        "sliding_window": c.sliding_window is not None,
        "bias": not c.bias,
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(
            f"GPT-2 (transformers) cannot represent these switches: {bad}; turn them off to export"
        )
    hf_config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.mlp_hidden,
        activation_function="gelu_new",
        layer_norm_epsilon=c.norm_eps,
        embd_pdrop=c.embd_dropout,
        attn_pdrop=c.attn_dropout,
        resid_pdrop=c.resid_dropout,
        tie_word_embeddings=c.tie_embeddings,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().clone()
        if name.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t().contiguous()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: c.vocab_size]
        state[name] = tensor
    result = hf_model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys]
    missing = [
        k for k in result.missing_keys if not k.endswith((".attn.bias", ".masked_bias", "lm_head.weight"))
    ]
    if unexpected or missing:
        raise RuntimeError(f"weight conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    hf_model.tie_weights()
    return hf_model.eval()
