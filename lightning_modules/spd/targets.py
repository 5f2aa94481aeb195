"""Loading the frozen model SPD decomposes: a toy target file, a toy-target or GPT Lightning checkpoint,
or a local `transformers` causal-LM directory (save_pretrained; GPT-2 or Llama, never the hub).

Toy target file (written by `ToyTargetLightningModule` at the end of fit, or `save_toy_target`): a
`torch.save`d dict {"spd_toy_target": {"model_type", "model_kwargs"}, "state_dict", "checks"}. The
toy-target trainer's Lightning checkpoints carry the same "spd_toy_target" entry, so they load too.

GPT checkpoints and transformers directories are read by `lightning_modules.common.targets`, in float32.
A GPT-2 directory becomes our GPT (same module names, `nn.Linear` projections, logits equal to float32
precision) unless it uses an option our GPT does not implement; then, like Llama, the transformers model
itself is the target, wrapped in `HFCausalLM` so its forward returns the logits tensor and its module
names stay the transformers ones (`model.layers.0.self_attn.q_proj`, `transformer.h.0.attn.c_attn` as a
`Conv1D`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.common.compat import check_data_fits
from lightning_modules.common.targets import detect_family, embedding_rows, load_target_model

from .toy_models import ResidMLP, TMSModel

log = logging.getLogger(__name__)

TOY_MODEL_TYPES = {"tms": TMSModel, "resid_mlp": ResidMLP}
TOY_KEY = "spd_toy_target"
TOY_TARGET = "a toy target file (train one with configs/spd/*_target.yaml)"  # named in the loader's errors


def build_toy_model(model_type: str, model_kwargs: dict[str, Any]) -> TMSModel | ResidMLP:
    """A fresh toy model; ValueError naming the valid types / the bad keyword otherwise."""
    if model_type not in TOY_MODEL_TYPES:
        raise ValueError(f"unknown toy model_type {model_type!r}; valid: {sorted(TOY_MODEL_TYPES)}")
    try:
        return TOY_MODEL_TYPES[model_type](**model_kwargs)
    except TypeError as err:
        raise ValueError(f"bad model_kwargs {model_kwargs!r} for {model_type!r}: {err}") from None


def save_toy_target(
    path: str | Path,
    model: nn.Module,
    model_type: str,
    model_kwargs: dict[str, Any],
    checks: dict[str, Any] | None = None,
) -> Path:
    """Write a toy target file SPD's `target` argument accepts (atomically: temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        TOY_KEY: {"model_type": model_type, "model_kwargs": dict(model_kwargs)},
        "state_dict": state,
        "checks": checks or {},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Drop `prefix` from keys when every key has it (Lightning's `model.` prefix)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def output_head_name(target: nn.Module) -> str | None:
    """'lm_head' where the target's output is exactly lm_head(final hidden states), as in our GPT and the
    transformers GPT-2 and Llama: the KL losses may then fuse that projection into the KL
    (ComponentModel's output_head); None for other targets (the toys)."""
    try:
        detect_family(target)
    except ValueError:
        return None
    return "lm_head" if isinstance(getattr(target, "lm_head", None), nn.Linear) else None


class HFCausalLM(nn.Module):
    """A transformers causal LM as an SPD target: forward(input_ids) -> logits (b, s, vocab).

    The wrapped model's children are registered as this module's own, so module names (the SPD patterns)
    and state-dict keys are the transformers ones; the model itself is held outside the module tree.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        for name, param in hf_model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in hf_model.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        object.__setattr__(self, "hf_model", hf_model)  # not a submodule: names stay unprefixed
        self.config = hf_model.config

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.hf_model(input_ids=input_ids, use_cache=False).logits

    def train(self, mode: bool = True) -> HFCausalLM:
        super().train(mode)
        self.hf_model.train(mode)  # the top-level model's own flag (its children are ours)
        return self

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding table."""
        return self.hf_model.get_input_embeddings()


def hf_target(hf_model: nn.Module, source: Path) -> nn.Module:
    """A loaded transformers model as SPD's target: our GPT for a GPT-2 it can represent, else HFCausalLM."""
    if hf_model.config.model_type == "gpt2":
        from lightning_modules.gpt.hf import config_from_hf, gpt_from_hf

        try:
            config_from_hf(hf_model.config)
        except ValueError as err:
            log.info("target %s: decomposing transformers' GPT2LMHeadModel itself (%s)", source, err)
            return HFCausalLM(hf_model).eval()
        return gpt_from_hf(hf_model).eval()
    return HFCausalLM(hf_model).eval()


def _read_checkpoint(source: Path) -> dict[str, Any]:
    """The dict in a checkpoint file; ValueError unless it is a toy target or one of our GPT checkpoints."""
    try:
        payload = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as err:  # corrupt / truncated / not a torch file
        raise ValueError(f"target {str(source)!r} could not be loaded ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict):
        raise ValueError(f"target {str(source)!r} holds a {type(payload).__name__}, not a checkpoint dict")
    if TOY_KEY not in payload and "gpt_architecture" not in payload:
        raise ValueError(
            f"target {str(source)!r} is neither a toy target (no {TOY_KEY!r} entry) nor a GPT checkpoint of "
            f"this project (no 'gpt_architecture'); keys: {sorted(payload)[:10]}"
        )
    return payload


def load_target(path: str) -> nn.Module:
    """The target model at `path` (see the module docstring); clear errors naming the path."""
    source = Path(path).expanduser()
    payload = _read_checkpoint(source) if source.is_file() else {}
    if TOY_KEY in payload:
        info = payload[TOY_KEY]
        model = build_toy_model(info["model_type"], info["model_kwargs"])
        state = _strip_prefix(payload["state_dict"], "model.")
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"target {str(source)!r}: weights do not fit its model: {err}") from err
        return model
    model, family = load_target_model(source, dtype=torch.float32, also=(TOY_TARGET,))
    return model if family == "gpt" else hf_target(model, source)


def random_gpt(fields: dict[str, Any], vocab_size: int | None) -> nn.Module:
    """A freshly initialised GPT from GPTConfig fields (vocab from the data when given): smoke runs only."""
    from lightning_modules.gpt.config import GPTConfig
    from lightning_modules.gpt.model import GPT

    fields = dict(fields)
    if vocab_size is not None:
        fields.update(vocab_size=vocab_size, padded_vocab_size=None)
    return GPT(GPTConfig(**fields))


def check_target_data(
    target: nn.Module, vocab_size: int | None, n_features: int | None, path: str | None
) -> None:
    """ValueError unless the data fits the target: token ids within its vocabulary, toy feature counts equal."""
    is_toy = hasattr(target, "n_features")
    if is_toy and vocab_size is not None:
        raise ValueError(
            f"toy target {path!r} takes sparse features, but the data has tokens (vocab {vocab_size})"
        )
    if is_toy and n_features is not None and n_features != target.n_features:
        raise ValueError(
            f"data.n_features={n_features} but the target {path!r} has {target.n_features} features"
        )
    if is_toy:
        return
    if vocab_size is None:
        raise ValueError(f"LM target {path!r} needs token data (vocab_size is None: use TextDataModule)")
    check_data_fits(f"the target {path!r}", vocab_size=vocab_size, embed_rows=embedding_rows(target))
