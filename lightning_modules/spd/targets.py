"""Loading the frozen model SPD decomposes: a toy target file, a toy-target or GPT Lightning checkpoint,
or a local `transformers` GPT-2 directory.

Toy target file (written by `ToyTargetLightningModule` at the end of fit, or `save_toy_target`): a
`torch.save`d dict {"spd_toy_target": {"model_type", "model_kwargs"}, "state_dict", "checks"}. The
toy-target trainer's Lightning checkpoints carry the same "spd_toy_target" entry, so they load too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .toy_models import ResidMLP, TMSModel

TOY_MODEL_TYPES = {"tms": TMSModel, "resid_mlp": ResidMLP}
TOY_KEY = "spd_toy_target"


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


def load_target(path: str) -> nn.Module:
    """The target model at `path` (see the module docstring); clear errors naming the path."""
    source = Path(path).expanduser()
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(
                f"target {str(source)!r} is a directory without config.json; give a transformers GPT-2 "
                "directory (save_pretrained), a toy target file or a Lightning .ckpt"
            )
        from lightning_modules.gpt.checkpoint import load_gpt_weights

        return load_gpt_weights(str(source))
    if not source.is_file():
        raise FileNotFoundError(
            f"target {str(source)!r} does not exist; train one first (e.g. configs/spd/*_target.yaml) or "
            "give a GPT .ckpt / transformers GPT-2 directory"
        )
    try:
        payload = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as err:  # corrupt / truncated / not a torch file
        raise ValueError(f"target {str(source)!r} could not be loaded ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict):
        raise ValueError(f"target {str(source)!r} holds a {type(payload).__name__}, not a checkpoint dict")
    if TOY_KEY in payload:
        info = payload[TOY_KEY]
        model = build_toy_model(info["model_type"], info["model_kwargs"])
        state = _strip_prefix(payload["state_dict"], "model.")
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"target {str(source)!r}: weights do not fit its model: {err}") from err
        return model
    if "gpt_architecture" in payload:
        from lightning_modules.gpt.checkpoint import load_gpt_weights

        return load_gpt_weights(str(source))
    raise ValueError(
        f"target {str(source)!r} is neither a toy target (no {TOY_KEY!r} entry) nor a GPT checkpoint of "
        f"this project (no 'gpt_architecture'); keys: {sorted(payload)[:10]}"
    )


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
    if not is_toy and vocab_size is None:
        raise ValueError(f"LM target {path!r} needs token data (vocab_size is None: use TextDataModule)")
    rows = getattr(getattr(target, "config", None), "padded_vocab_size", None)
    if rows is not None and vocab_size is not None and vocab_size > rows:
        raise ValueError(f"the data has {vocab_size} tokens but the target {path!r} embeds only {rows}")
