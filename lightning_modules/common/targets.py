"""One way to load a frozen target language model and to find its parts; NPT and SPD both use it.

Formats: our GPT Lightning ``.ckpt`` (``gpt_architecture`` + ``state_dict``) and local `transformers`
directories written by ``save_pretrained`` whose config.json has model_type ``gpt2`` or ``llama`` (never
the hub); either directory also reads into our GPT (family ``"gpt"``) when our GPT can express its config.
A loaded model belongs to a family: ``"gpt"`` our GPT, ``"gpt2"`` transformers' GPT2LMHeadModel (Conv1D
weights (in, out)), ``"llama"`` LlamaForCausalLM. :data:`LAYOUTS` says where each family keeps its
decoder layers, attention, MLP and MLP projections, and which config field holds its maximum positions.
Pure PyTorch; transformers is imported only when a transformers model is loaded.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_modules.gpt.config import TRAINING_ONLY_FIELDS
from lightning_modules.gpt.model import GPT

FAMILIES = ("gpt", "gpt2", "llama")
HF_MODEL_TYPES = ("gpt2", "llama")  # config.json model_type of the transformers directories we load
TARGET_FORMATS = (
    "one of our GPT Lightning .ckpt files",
    "a local transformers directory (save_pretrained) of model_type 'gpt2' or 'llama'",
)
# Families each stored form loads as; the first is the default (a GPT-2 or Llama directory can become our GPT).
_LOADS_AS = {"gpt": ("gpt",), "gpt2": ("gpt2", "gpt"), "llama": ("llama", "gpt")}
# Buffers older GPT-2 checkpoints lack and transformers rebuilds (not weights).
_BUFFER_SUFFIXES = (".attn.bias", ".masked_bias")


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its parts: ``layers`` from the model, the others from one decoder layer."""

    layers: str  # dotted path of the decoder layers' nn.ModuleList
    attention: str  # attention module of a layer
    mlp: str  # MLP module of a layer
    mlp_parts: tuple[str, ...]  # projections every MLP of the family has (our SwiGLU GPT adds c_up)
    positions: str  # config field holding the maximum sequence length


LAYOUTS: dict[str, Layout] = {
    "gpt": Layout("transformer.h", "attn", "mlp", ("c_fc", "c_proj"), "block_size"),
    "gpt2": Layout("transformer.h", "attn", "mlp", ("c_fc", "c_proj"), "n_positions"),
    "llama": Layout(
        "model.layers", "self_attn", "mlp", ("gate_proj", "up_proj", "down_proj"), "max_position_embeddings"
    ),
}


@dataclass(frozen=True)
class LayerNames:
    """Full module names of one decoder layer's attention, MLP and MLP projections."""

    attention: str
    mlp: str
    mlp_parts: tuple[str, ...]


def supported_targets(*also: str) -> str:
    """The target formats in words, with a caller's own alternatives (for errors and --help text)."""
    *first, last = (*TARGET_FORMATS, *also)
    return ", ".join(first) + ("," if len(first) > 1 else "") + f" or {last}"


# ---------------------------------------------------------------------------------------------- layout
def check_family(family: str | None) -> None:
    """ValueError unless ``family`` is None or one of FAMILIES."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown target family {family!r}; valid: {FAMILIES}")


def detect_family(model: nn.Module) -> str:
    """'gpt', 'gpt2' or 'llama' for a supported in-memory model; ValueError otherwise."""
    if isinstance(model, GPT):
        return "gpt"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "gpt2" and hasattr(model, "transformer") and hasattr(model, "lm_head"):
        return "gpt2"
    if model_type == "llama" and hasattr(model, "model") and hasattr(model, "lm_head"):
        return "llama"
    raise ValueError(
        f"unsupported target {type(model).__name__} (model_type={model_type!r}); valid: our GPT, "
        "transformers GPT2LMHeadModel (gpt2), LlamaForCausalLM (llama)"
    )


def decoder_layers(model: nn.Module, family: str | None = None) -> nn.ModuleList:
    """The model's decoder layers, in order (the ModuleList itself, so layers can be replaced)."""
    return model.get_submodule(LAYOUTS[family or detect_family(model)].layers)


def layer_names(family: str, index: int) -> LayerNames:
    """Module names (as in named_modules()) of layer ``index``'s attention, MLP and MLP projections."""
    layout = LAYOUTS[family]
    prefix = f"{layout.layers}.{index}"
    mlp = f"{prefix}.{layout.mlp}"
    return LayerNames(f"{prefix}.{layout.attention}", mlp, tuple(f"{mlp}.{p}" for p in layout.mlp_parts))


def embedding_rows(model: nn.Module, family: str | None = None) -> int:
    """Rows of the token embedding: the largest token id + 1 the model accepts."""
    if (family or detect_family(model)) == "gpt":
        return int(model.config.padded_vocab_size)
    return int(model.get_input_embeddings().num_embeddings)


def max_positions(model: nn.Module, family: str | None = None) -> int:
    """The longest sequence the model's positions allow."""
    return int(getattr(model.config, LAYOUTS[family or detect_family(model)].positions))


# ---------------------------------------------------------------------------------------------- loading
def read_model_type(source: Path, also: tuple[str, ...] = ()) -> str:
    """config.json's model_type of a transformers directory; errors name the path and what is supported."""
    config_path = source / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"target {str(source)!r} is a directory without config.json; give {supported_targets(*also)}"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"target {str(source)!r}: config.json could not be read ({err})") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"target {str(source)!r} is a transformers model of model_type {model_type!r}; supported model "
            f"types: {list(HF_MODEL_TYPES)} (causal LMs saved with save_pretrained)"
        )
    return model_type


def stored_family(path: str | Path, also: tuple[str, ...] = ()) -> str:
    """The family a target loads as by default: 'gpt' for a file, else the directory's model_type.

    ``also``: the caller's own alternatives, named in the errors (e.g. "null for a fresh tiny target").
    """
    source = Path(path).expanduser()
    if source.is_dir():
        return read_model_type(source, also)
    if not source.is_file():
        raise FileNotFoundError(f"target {str(source)!r} does not exist; give {supported_targets(*also)}")
    return "gpt"


def load_target_model(
    path: str | Path,
    family: str | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    load_in_8bit: bool = False,
    also: tuple[str, ...] = (),
) -> tuple[nn.Module, str]:
    """(model in eval mode, family) from our ``.ckpt`` or a local transformers directory (see the module).

    ``family``: None loads the target as stored; 'gpt' also reads a GPT-2 or Llama directory into our GPT.
    ``config``: fields the loaded config must equal (our GPT's training-only fields, e.g. dropout, are
    applied instead). ``load_in_8bit``: transformers models on CUDA through bitsandbytes.
    """
    check_family(family)
    source = Path(path).expanduser()
    stored = stored_family(source, also)
    valid = _LOADS_AS[stored]
    family = family or stored
    if family not in valid:
        also_gpt = ", or 'gpt' to read it into our GPT" if "gpt" in valid[1:] else ""
        raise ValueError(
            f"target_family={family!r} does not match the target at {str(source)!r} (stored as {stored!r}); "
            f"valid: {valid[0]!r} or null{also_gpt}"
        )
    wanted = dict(config or {})
    if family == "gpt":
        if load_in_8bit:
            raise ValueError(
                f"load_in_8bit supports transformers targets only (family gpt2 / llama); {str(source)!r} "
                "loads as our GPT"
            )
        training = {k: wanted.pop(k) for k in list(wanted) if k in TRAINING_ONLY_FIELDS}
        model = _load_gpt(source, stored, training, also)
    else:
        model = load_causal_lm(source, dtype, load_in_8bit, also)
    check_config(model.config, wanted, str(source))
    if dtype is not None and not load_in_8bit:
        model.to(dtype)
    return model.eval(), family


def _load_gpt(source: Path, stored: str, training: dict[str, Any], also: tuple[str, ...]) -> GPT:
    """Our GPT from our .ckpt or from a GPT-2 / Llama directory (read once, by load_causal_lm)."""
    if stored in ("gpt2", "llama"):
        from lightning_modules.gpt.hf import gpt_from_hf

        hf_model = load_causal_lm(source, also=also)
        try:
            return gpt_from_hf(hf_model, **training)
        except ValueError as err:  # a config our GPT cannot express (scaled RoPE, odd MLP width, ...)
            raise ValueError(f"target {str(source)!r} cannot be read into our GPT: {err}") from err
    from lightning_modules.gpt.checkpoint import load_gpt_weights

    try:
        return load_gpt_weights(str(source), training_overrides=training)
    except ValueError:
        raise
    except Exception as err:  # corrupt / truncated file, weights that do not fit the saved architecture
        first = (str(err).splitlines() or [""])[0]
        raise ValueError(
            f"target {str(source)!r} could not be loaded as our GPT checkpoint ({type(err).__name__}: "
            f"{first}); give {supported_targets(*also)}"
        ) from err


def load_causal_lm(
    path: str | Path,
    dtype: torch.dtype | None = None,
    load_in_8bit: bool = False,
    also: tuple[str, ...] = (),
) -> nn.Module:
    """The transformers causal LM (GPT2LMHeadModel / LlamaForCausalLM) of a local directory, in eval mode.

    ValueError when transformers cannot load it or its files lack weights (transformers would initialise
    them randomly). ``load_in_8bit`` needs CUDA and bitsandbytes.
    """
    source = Path(path).expanduser()
    model_type = stored_family(source, also)
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"target {str(source)!r} is not a transformers directory; supported model types: "
            f"{list(HF_MODEL_TYPES)} (causal LMs saved with save_pretrained)"
        )
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if load_in_8bit:
        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                "load_in_8bit needs CUDA and the bitsandbytes package (pip install bitsandbytes); "
                "valid alternatives: load_in_8bit=false with bf16 precision, or fewer converted layers"
            )
        from transformers import BitsAndBytesConfig

        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": 0})
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as err:  # missing / corrupt weights, a config transformers rejects
        first = (str(err).splitlines() or [""])[0]
        raise ValueError(
            f"target {str(source)!r}: the transformers {model_type} model could not be loaded "
            f"({type(err).__name__}: {first})"
        ) from err
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith(_BUFFER_SUFFIXES)]
    if missing:
        raise ValueError(
            f"target {str(source)!r}: the weights lack {sorted(missing)[:5]}; is it a {model_type} causal LM "
            "(with its LM head) saved with save_pretrained?"
        )
    return model.eval()


def check_config(loaded: Any, wanted: Mapping[str, Any], source: str) -> None:
    """ValueError naming every field of ``wanted`` the loaded config lacks or disagrees with."""
    bad = []
    for key, value in wanted.items():
        if not hasattr(loaded, key):
            bad.append(f"{key}: unknown field")
        elif getattr(loaded, key) != value:
            bad.append(f"{key}: target_config={value!r} checkpoint={getattr(loaded, key)!r}")
    if bad:
        raise ValueError(
            f"target_config does not match the target at {source!r}: {'; '.join(bad)}; remove these keys "
            "or give a target with matching weights"
        )
