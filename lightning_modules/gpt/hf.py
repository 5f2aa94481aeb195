"""Weight conversion between our GPT and `transformers`: GPT2LMHeadModel and LlamaForCausalLM.

Which layout a GPT converts to follows from its switches (`hf_layout`): the GPT-2 baseline (learned
positions, LayerNorm with biases, GELU MLP, multi-head attention) is GPT-2; RoPE + RMSNorm + SwiGLU (with
or without GQA, biases, tied embeddings) is Llama; anything else (QK-norm, a sliding window, a mix of the
two) is a ValueError naming the switches. HF GPT-2 stores its projections as `Conv1D` with weight
(in, out); ours are `nn.Linear` (out, in), so those are transposed. Llama keeps q/k/v as three matrices
where we keep one `c_attn`, and uses the same rotate-half RoPE and head order, so no permutation is needed.
The embedding's padding rows (`padded_vocab_size` > `vocab_size`) are dropped on export: no token id
reaches them, and the logits of the real vocabulary are unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_modules.gpt.config import GPTConfig
from lightning_modules.gpt.model import GPT

_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
HF_LAYOUTS = ("gpt2", "llama")  # transformers model_type of each layout we read and write
_HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
# Llama weight names of layer i (after "model.layers.{i}.") -> ours (after "transformer.h.{i}.")
_LLAMA_LAYER_NAMES = {
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj": "attn.c_proj",
    "mlp.gate_proj": "mlp.c_fc",
    "mlp.up_proj": "mlp.c_up",
    "mlp.down_proj": "mlp.c_proj",
}


# ---------------------------------------------------------------------------------------------- layouts
def layout_problems(config: GPTConfig) -> dict[str, list[str]]:
    """For each transformers layout, the switches of `config` it cannot represent (empty: it can)."""
    c = config
    shared = []
    if c.qk_norm:
        shared.append("qk_norm=True")
    if c.sliding_window is not None:
        shared.append(f"sliding_window={c.sliding_window}")
    gpt2 = [
        *(["rope=True"] if c.rope else []),
        *([f"norm={c.norm!r}"] if c.norm != "layernorm" else []),
        *([f"mlp={c.mlp!r}"] if c.mlp != "gelu" else []),
        *([f"n_kv_head={c.n_kv_head} (GQA)"] if c.n_kv_head != c.n_head else []),
        *(["bias=False"] if not c.bias else []),
        *shared,
    ]
    llama = [
        *(["rope=False (learned positions)"] if not c.rope else []),
        *([f"norm={c.norm!r}"] if c.norm != "rmsnorm" else []),
        *([f"mlp={c.mlp!r}"] if c.mlp != "swiglu" else []),
        *shared,
    ]
    return {"gpt2": gpt2, "llama": llama}


def hf_layout(config: GPTConfig) -> str:
    """'gpt2' or 'llama': the transformers layout that represents `config` exactly; ValueError naming the
    switches each layout lacks when neither does."""
    problems = layout_problems(config)
    for layout in HF_LAYOUTS:
        if not problems[layout]:
            return layout
    raise ValueError(
        "no transformers layout can represent this GPT: GPT-2 (GPT2LMHeadModel) needs the GPT-2 switches "
        f"and cannot take {problems['gpt2']}; Llama (LlamaForCausalLM) needs rope=True, norm='rmsnorm', "
        f"mlp='swiglu' and cannot take {problems['llama']}. Train with the switches of one of them to export"
    )


# ---------------------------------------------------------------------------------------------- loading
def load_hf_model(model_or_path: Any) -> Any:
    """A GPT2LMHeadModel or LlamaForCausalLM from memory or a local directory (never the hub)."""
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path
    path = Path(str(model_or_path))
    if not path.is_dir():
        raise FileNotFoundError(
            f"no local transformers model directory at {str(model_or_path)!r}; pass a GPT2LMHeadModel / "
            "LlamaForCausalLM or a directory written by save_pretrained()"
        )
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def config_from_hf(hf_config: Any, **overrides: Any) -> GPTConfig:
    """Translate a GPT2Config or LlamaConfig into a GPTConfig, rejecting options our GPT does not implement."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "gpt2":
        fields = _fields_from_gpt2(hf_config)
    elif model_type == "llama":
        fields = _fields_from_llama(hf_config)
    else:
        raise ValueError(
            f"transformers model_type {model_type!r} is not supported; valid: {list(HF_LAYOUTS)}"
        )
    config = GPTConfig(**{**fields, **overrides})
    if model_type == "llama" and config.mlp_hidden != hf_config.intermediate_size:
        raise ValueError(
            f"Llama intermediate_size={hf_config.intermediate_size} cannot be expressed by our GPT, whose "
            f"SwiGLU width is mlp_ratio * n_embd rounded up to a multiple of 64 (here {config.mlp_hidden})"
        )
    return config


def _fields_from_gpt2(hf_config: Any) -> dict[str, Any]:
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
    return dict(
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


def rope_theta(hf_config: Any) -> float:
    """The RoPE base of a Llama config (`rope_parameters` in transformers >= 5, `rope_theta` before);
    ValueError for scaled RoPE variants (linear, dynamic, YaRN, Llama 3), which our GPT does not implement."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"Llama rope_type={rope_type!r} is not supported by our GPT; valid: 'default'")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return 10000.0 if theta is None else float(theta)


def _fields_from_llama(hf_config: Any) -> dict[str, Any]:
    if hf_config.hidden_act != "silu":
        raise ValueError(f"Llama hidden_act={hf_config.hidden_act!r} is not supported; valid: 'silu'")
    attention_bias, mlp_bias = bool(hf_config.attention_bias), bool(getattr(hf_config, "mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ValueError(
            f"Llama attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported: our GPT's `bias` "
            "switch turns biases on or off in every linear layer"
        )
    n_embd, n_head = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise ValueError(
            f"Llama head_dim={head_dim} with num_attention_heads={n_head} and hidden_size={n_embd} is not "
            "supported: our GPT's head size is n_embd / n_head"
        )
    return dict(
        block_size=hf_config.max_position_embeddings,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=hf_config.vocab_size,
        n_layer=hf_config.num_hidden_layers,
        n_head=n_head,
        n_kv_head=hf_config.num_key_value_heads or n_head,
        n_embd=n_embd,
        bias=attention_bias,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        norm_eps=hf_config.rms_norm_eps,
        attn_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        rope=True,
        rope_base=rope_theta(hf_config),
        norm="rmsnorm",
        mlp="swiglu",
        mlp_ratio=hf_config.intermediate_size / n_embd,
    )


# ---------------------------------------------------------------------------------------------- HF -> ours
def gpt_from_hf(model_or_path: Any, **overrides: Any) -> GPT:
    """Our GPT with the weights of a GPT2LMHeadModel or LlamaForCausalLM; logits match to float32 precision."""
    hf_model = load_hf_model(model_or_path)
    config = config_from_hf(hf_model.config, **overrides)
    model = GPT(config)
    hf_state = hf_model.state_dict()
    if config.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
    if hf_model.config.model_type == "gpt2":
        converted = _state_from_gpt2(hf_state)
    else:
        converted = _state_from_llama(hf_state, config)
    ours = model.state_dict()
    for name in converted:
        if name not in ours:
            raise ValueError(
                f"unexpected transformers weight {name!r}; expected names like {next(iter(ours))!r}"
            )
    wte = converted.get("transformer.wte.weight")
    if wte is not None and wte.size(0) < config.padded_vocab_size:
        pad = wte.new_zeros(config.padded_vocab_size - wte.size(0), wte.size(1))
        converted["transformer.wte.weight"] = torch.cat([wte, pad])
    missing = set(ours) - set(converted) - ({"lm_head.weight"} if config.tie_embeddings else set())
    if missing:
        raise ValueError(f"the transformers model lacks weights {sorted(missing)[:5]}")
    model.load_state_dict(converted, strict=not config.tie_embeddings)
    return model


def _state_from_gpt2(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for name, tensor in hf_state.items():
        if name.endswith((".attn.bias", ".masked_bias")):  # causal-mask buffers, not weights
            continue
        converted[name] = tensor.t() if name.endswith(_CONV1D_SUFFIXES) else tensor
    return converted


def _state_from_llama(hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # "transformer.h.{i}.attn.c_attn.{weight,bias}" -> q/k/v
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer our RoPE recomputes
            continue
        if name == "model.embed_tokens.weight":
            converted["transformer.wte.weight"] = tensor
        elif name == "model.norm.weight":
            converted["transformer.ln_f.weight"] = tensor
        elif name == "lm_head.weight":
            converted[name] = tensor
        elif name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            prefix = f"transformer.h.{index}."
            part = rest.split(".")[1] if rest.startswith("self_attn.") else ""
            if part in ("q_proj", "k_proj", "v_proj"):
                kind = rest.rsplit(".", 1)[1]  # weight / bias
                qkv.setdefault(f"{prefix}attn.c_attn.{kind}", {})[part[0]] = tensor
                continue
            for theirs, our_name in _LLAMA_LAYER_NAMES.items():
                if rest.startswith(theirs):
                    converted[prefix + our_name + rest.removeprefix(theirs)] = tensor
                    break
            else:
                raise ValueError(f"unexpected Llama weight {name!r}")
        else:
            raise ValueError(f"unexpected Llama weight {name!r}")
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"Llama layer lacks some of q/k/v_proj for {name!r}: has {sorted(parts)}")
        converted[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


# ---------------------------------------------------------------------------------------------- ours -> HF
def gpt_to_hf(model: GPT) -> Any:
    """A transformers model equal to `model`: GPT2LMHeadModel or LlamaForCausalLM, as `hf_layout` says."""
    layout = hf_layout(model.config)
    hf_model = _gpt2_from_gpt(model) if layout == "gpt2" else _llama_from_gpt(model)
    return hf_model.eval()


def _load_into(hf_model: Any, state: dict[str, torch.Tensor], ignored: tuple[str, ...]) -> Any:
    """Copy `state` into `hf_model`; RuntimeError for any weight left out or left over (not `ignored`)."""
    result = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(ignored)]
    if result.unexpected_keys or missing:
        raise RuntimeError(
            f"weight conversion mismatch: missing={missing[:5]} unexpected={result.unexpected_keys[:5]}"
        )
    if hf_model.config.tie_word_embeddings:
        hf_model.tie_weights()
    return hf_model


def _gpt2_from_gpt(model: GPT) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
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
        bos_token_id=None,
        eos_token_id=None,
    )
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().clone()
        if name.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t().contiguous()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: c.vocab_size]
        state[name] = tensor
    if c.tie_embeddings:
        state.pop("lm_head.weight", None)
    return _load_into(GPT2LMHeadModel(hf_config), state, (".attn.bias", ".masked_bias", "lm_head.weight"))


def _llama_from_gpt(model: GPT) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        head_dim=c.head_size,
        hidden_act="silu",
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_base,
        attention_bias=c.bias,
        mlp_bias=c.bias,
        attention_dropout=c.attn_dropout,
        tie_word_embeddings=c.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    ours_to_llama = {ours: theirs for theirs, ours in _LLAMA_LAYER_NAMES.items()}
    q_size, kv_size = c.n_head * c.head_size, c.n_kv_head * c.head_size
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().clone()
        if name == "transformer.wte.weight":
            state["model.embed_tokens.weight"] = tensor[: c.vocab_size]
        elif name == "lm_head.weight":
            if not c.tie_embeddings:
                state[name] = tensor[: c.vocab_size]
        elif name.startswith("transformer.ln_f."):
            state["model.norm." + name.removeprefix("transformer.ln_f.")] = tensor
        elif name.startswith("transformer.h."):
            index, rest = name.removeprefix("transformer.h.").split(".", 1)
            prefix = f"model.layers.{index}."
            if rest.startswith("attn.c_attn."):
                kind = rest.removeprefix("attn.c_attn.")
                q, k, v = tensor.split([q_size, kv_size, kv_size])
                for part, value in (("q", q), ("k", k), ("v", v)):
                    state[f"{prefix}self_attn.{part}_proj.{kind}"] = value.contiguous()
                continue
            for ours, theirs in ours_to_llama.items():
                if rest.startswith(ours):
                    state[prefix + theirs + rest.removeprefix(ours)] = tensor
                    break
            else:
                raise RuntimeError(f"no Llama name for our weight {name!r}")
        else:
            raise RuntimeError(f"no Llama name for our weight {name!r}")
    return _load_into(LlamaForCausalLM(hf_config), state, ("rotary_emb.inv_freq", "lm_head.weight"))
