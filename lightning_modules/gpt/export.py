"""Export a trained GPT as a `transformers` model directory that loads without this project.

    python -m lightning_modules.gpt.export --ckpt_path CKPT --out_dir DIR [--tokenizer PATH] [--config YAML]

DIR receives config.json, model.safetensors and generation_config.json of a GPT2LMHeadModel or a
LlamaForCausalLM (whichever represents the model's switches, `hf.hf_layout`), and the run's tokenizer as a
PreTrainedTokenizerFast (tokenizer.json, tokenizer_config.json). CKPT is one of our Lightning checkpoints,
or what DeepSpeed's / FSDP's conversion step makes of a checkpoint directory (docs/gpt.md, "Export").

The tokenizer is --tokenizer when given, else the one TextDataModule saves in the checkpoint, else the one
the run's data settings name (`datamodule_hyper_parameters`, which LightningCLI stores): 'bytes', a
transformers tokenizer, or the BPE in the run's data cache, which is looked up but never retrained. Before
it returns, the export loads DIR back with transformers and checks that its logits and its tokenizer agree
with ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import pickle
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datamodules.text import TextDataModule
from datamodules.tokenizer import ByteTokenizer, HFTokenizer, tokenizer_from_state
from lightning_modules.gpt.config import TRAINING_ONLY_FIELDS, GPTConfig
from lightning_modules.gpt.hf import gpt_to_hf, hf_layout
from lightning_modules.gpt.model import GPT
from lightning_modules.gpt.run_artifacts import bpe_from_file, tokenizer_from_spec

LOGIT_TOLERANCE = 1e-4  # float32 logits of the exported model may differ from ours by at most this
# What the export checks the tokenizer and the logits on: code, unicode and runs of whitespace.
CHECK_TEXT = "def f(x):\n    return x  # héllo wörld, naïve café, 日本語 🙂\n\n\t  tabs\tand  spaces \r\n"
# Files a transformers model directory may hold; --overwrite removes these before writing.
_MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)  # fmt: skip
# Wrappers that DeepSpeed, FSDP, activation checkpointing and torch.compile add to parameter names.
_WRAPPER_PREFIXES = ("_forward_module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_DEEPSPEED_CONVERT = (
    'python -c "from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict '
    "as c; c('{path}', 'model_fp32.ckpt')\""
)
_FSDP_CONVERT = "python -m lightning.pytorch.utilities.consolidate_checkpoint {path}"


@dataclass
class RunWeights:
    """A checkpoint read for export: the model and what the run says about its data and sampling."""

    model: GPT
    architecture_from: str  # where the architecture came from, for messages
    data_args: dict[str, Any] | None  # the run's TextDataModule init arguments, if known
    data_from: str  # where data_args came from
    sampling: dict[str, Any]  # the run's sample_temperature / sample_top_k, if known
    tokenizer_state: dict[str, Any] | None = None  # the tokenizer TextDataModule saved in the checkpoint


# ---------------------------------------------------------------------------------------------- weights
def read_checkpoint_file(path: Path) -> dict[str, Any]:
    """The dict in a checkpoint file, or the merged weights of a directory that DeepSpeed's zero_to_fp32.py
    wrote (pytorch_model*.bin or model*.safetensors, sharded or not); an unconverted DeepSpeed / FSDP
    checkpoint directory is an error that gives the conversion command."""
    if path.is_dir():
        if (path / "latest").is_file() or (path / "checkpoint").is_dir():
            command = _DEEPSPEED_CONVERT.format(path=path)
            raise ValueError(
                f"{str(path)!r} is a DeepSpeed checkpoint directory; convert it to one file first, then export "
                f"that file:\n  {command}"
            )
        if (path / "meta.pt").is_file() or (path / ".metadata").is_file():
            raise ValueError(
                f"{str(path)!r} is a sharded (FSDP) checkpoint directory; consolidate it first (this writes "
                f"{str(path)}.consolidated), then export that file:\n  {_FSDP_CONVERT.format(path=path)}"
            )
        if (path / "config.json").is_file():
            raise ValueError(f"{str(path)!r} is already a transformers model directory; nothing to export")
        files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise ValueError(
                f"{str(path)!r} is a directory without weights; give one of our .ckpt files, a converted "
                "DeepSpeed / FSDP file, or the directory zero_to_fp32.py wrote"
            )
        merged: dict[str, Any] = {}
        for file in files:  # the shards of one state dict
            merged.update(_read_file(file))
        return merged
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {str(path)!r} does not exist; give one of our .ckpt files")
    return _read_file(path)


def _read_file(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors, or the dict torch.load(weights_only=True) reads from a checkpoint."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises its own error type for a corrupt file
            raise ValueError(f"{str(path)!r} could not be read as safetensors ({err})") from err
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first = (str(err).splitlines() or [""])[0]
        raise ValueError(
            f"{str(path)!r} could not be read as a checkpoint with torch.load(weights_only=True) "
            f"({type(err).__name__}: {first})"
        ) from err
    if not isinstance(payload, dict):
        raise ValueError(f"{str(path)!r} holds a {type(payload).__name__}, not a checkpoint dict")
    return payload


def gpt_state_dict(payload: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Our GPT's weights from a checkpoint dict: a Lightning `state_dict` (keys `model.*`), or the bare state
    dict DeepSpeed's own zero_to_fp32.py writes; wrapper prefixes (DeepSpeed, FSDP, compile) removed."""
    state = payload.get("state_dict")
    if not isinstance(state, Mapping):
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            state = payload  # a bare state dict
        else:
            raise ValueError(f"{source!r} holds no 'state_dict'; keys: {sorted(payload)[:8]}")
    clean = {}
    for name, tensor in state.items():
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        clean[name] = tensor
    if any(name.startswith("model.") for name in clean):  # GPTLightningModule keeps the GPT in `model`
        clean = {n.removeprefix("model."): t for n, t in clean.items() if n.startswith("model.")}
    if "transformer.wte.weight" not in clean:
        raise ValueError(
            f"{source!r} holds no GPT weights (no 'model.transformer.wte.weight'); keys: {sorted(clean)[:5]}"
        )
    return clean


def read_run_config(path: Path) -> tuple[dict[str, Any] | None, int | None, dict[str, Any] | None]:
    """(GPTConfig fields, linked vocab_size, TextDataModule init args) from a run's config.yaml (LightningCLI:
    `model.init_args.config`, `data.init_args`) or from a YAML / JSON file of GPTConfig fields."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r} does not exist; give the run's config.yaml")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--config {str(path)!r} could not be read as YAML / JSON ({err})") from err
    if not isinstance(content, dict):
        raise ValueError(f"--config {str(path)!r} holds a {type(content).__name__}, not a mapping")
    if "model" not in content and "data" not in content:
        return content, None, None
    model_args = (content.get("model") or {}).get("init_args") or {}
    fields = model_args.get("config")
    if fields is not None and not isinstance(fields, dict):
        raise ValueError(
            f"--config {str(path)!r}: model.init_args.config is {fields!r}, not a mapping of fields"
        )
    data = content.get("data") or {}
    data_args = data.get("init_args") if isinstance(data, dict) else None
    if data_args is not None:
        data_args = {**data_args, "_class_path": data.get("class_path", "")}
    return fields, model_args.get("vocab_size"), data_args


def _architecture(fields: Mapping[str, Any], vocab_size: int | None = None) -> GPTConfig:
    """A GPTConfig from stored fields (training-only switches left at their defaults), with the data's
    vocab_size applied as GPTLightningModule applies it."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown GPTConfig fields {unknown}; valid: {sorted(known)}")
    config = GPTConfig(**{k: v for k, v in fields.items() if k not in TRAINING_ONLY_FIELDS})
    if vocab_size is not None and vocab_size != config.vocab_size:
        config = dataclasses.replace(config, vocab_size=vocab_size, padded_vocab_size=None)
    return config


def load_run(ckpt_path: str | Path, config_path: str | Path | None = None) -> RunWeights:
    """Our GPT from a checkpoint file, the architecture from the checkpoint (`gpt_architecture`, else the
    module's `hyper_parameters`) or else from --config; the run's data settings likewise."""
    source = Path(ckpt_path).expanduser()
    payload = read_checkpoint_file(source)
    state = gpt_state_dict(payload, str(source))
    run_fields, run_vocab, run_data = (
        read_run_config(Path(config_path)) if config_path else (None, None, None)
    )
    hparams = payload.get("hyper_parameters") if isinstance(payload.get("hyper_parameters"), dict) else {}
    if isinstance(payload.get("gpt_architecture"), dict):
        config, architecture_from = _architecture(payload["gpt_architecture"]), "the checkpoint"
    elif isinstance(hparams.get("config"), dict):
        config, architecture_from = _architecture(hparams["config"]), "the checkpoint's hyper_parameters"
    elif run_fields is not None:
        if run_vocab is None and run_data is not None:
            run_vocab = _data_vocab_size(run_data)
        config, architecture_from = _architecture(run_fields, run_vocab), f"--config {str(config_path)!r}"
    else:
        raise ValueError(
            f"{str(source)!r} holds weights but not the model's architecture (no 'gpt_architecture' or "
            "'hyper_parameters'); pass --config with the run's config.yaml (lightning_logs/version_N/config.yaml) "
            "or a YAML file of GPTConfig fields"
        )
    model = GPT(config)
    _load_weights(model, state, f"{str(source)!r} (architecture from {architecture_from})")
    data_args = payload.get("datamodule_hyper_parameters")
    data_from = "the checkpoint's datamodule_hyper_parameters"
    if not isinstance(data_args, dict):
        data_args, data_from = run_data, f"--config {str(config_path)!r}"
    sampling = {k: hparams[k] for k in ("sample_temperature", "sample_top_k") if k in hparams}
    saved = payload.get(
        TextDataModule.__qualname__
    )  # Lightning keeps a datamodule's state_dict under its name
    tokenizer_state = saved.get("tokenizer") if isinstance(saved, dict) else None
    return RunWeights(
        model.eval(), architecture_from, data_args, data_from, sampling, tokenizer_state or None
    )


def _load_weights(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model` (float32); ValueError naming what does not fit."""
    tied = model.config.tie_embeddings
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if tied:
        state.pop("lm_head.weight", None)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = (str(err).splitlines() or [""])[0]
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ValueError(f"the weights in {source} do not fit the architecture: {first} {detail}") from err
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the weights in {source} do not fit the architecture: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )


# ---------------------------------------------------------------------------------------------- tokenizer
def _data_module(data_args: Mapping[str, Any]) -> Any:
    """The run's TextDataModule, built from its init arguments (nothing is read or tokenised)."""
    class_path = str(data_args.get("_class_path") or "datamodules.TextDataModule")
    if not class_path.endswith("TextDataModule"):
        raise ValueError(
            f"the run's data module is {class_path!r}, which has no tokenizer to export; pass --tokenizer"
        )
    accepted = inspect.signature(TextDataModule).parameters
    return TextDataModule(**{k: v for k, v in data_args.items() if k in accepted})


def _data_vocab_size(data_args: Mapping[str, Any]) -> int:
    """The vocab_size train.py links from the data to the model."""
    vocab_size = _data_module(data_args).vocab_size
    if vocab_size is None:
        raise ValueError(
            f"the vocabulary of data.tokenizer={data_args.get('tokenizer')!r} is unknown offline; pass a "
            "--config whose model.init_args.config has vocab_size"
        )
    return vocab_size


def _cache_roots(cache_dir: str, ckpt_path: Path) -> list[Path]:
    """Where a relative cache_dir may be: the working directory, then the checkpoint's parent folders."""
    path = Path(cache_dir).expanduser()
    if path.is_absolute():
        return [path]
    roots = [Path.cwd() / path] + [parent / path for parent in ckpt_path.resolve().parents]
    return list(dict.fromkeys(roots))


def _run_bpe_path(data_args: Mapping[str, Any], ckpt_path: Path) -> Path:
    """The tokenizer.json of a run with tokenizer='bpe': beside a .bin source, else in the data cache folder
    whose key the run's data settings give (datamodules/text.py); FileNotFoundError saying where it looked."""
    from datamodules.corpus import resolve_bin_source

    dm = _data_module(data_args)
    cache_dir = str(data_args.get("cache_dir", "data_cache"))
    bin_source = resolve_bin_source(dm.sources) if dm.sources is not None else None
    if bin_source is not None:
        candidates = [bin_source.train.parent / "tokenizer.json"]
        reason = f"the .bin source {str(bin_source.train)!r} keeps it beside itself"
    else:
        try:
            folder = dm.cache_folder_name()
        except (ValueError, FileNotFoundError) as err:
            raise FileNotFoundError(
                f"the run's BPE tokenizer cannot be located: its corpus is not readable here ({err}); pass "
                "--tokenizer with the run's tokenizer.json"
            ) from err
        candidates = [root / folder / "tokenizer.json" for root in _cache_roots(cache_dir, ckpt_path)]
        reason = f"cache_dir={cache_dir!r} keeps it in {folder}/"
    for path in candidates:
        if path.is_file():
            return path
    found = sorted(str(p) for p in _cache_roots(cache_dir, ckpt_path)[0].glob("bpe-*/tokenizer.json"))
    shown = f"; tokenizers found under {cache_dir!r}: {found[:5]}" if found else ""
    raise FileNotFoundError(
        f"the run's BPE tokenizer was not found: data.tokenizer='bpe' with {reason}, but "
        f"{str(candidates[0])!r} does not exist (the cache was deleted, the corpus changed since the run, or "
        f"this is another working directory){shown}. Pass --tokenizer with the run's tokenizer.json"
    )


def run_tokenizer(data_args: Mapping[str, Any], data_from: str, ckpt_path: Path) -> tuple[Any, str]:
    """(TextTokenizer, how it was found) from the run's data settings."""
    name = str(data_args.get("tokenizer", "bpe"))
    if name == "bytes":
        return ByteTokenizer(), f"data.tokenizer='bytes' from {data_from}"
    if name == "bpe":
        path = _run_bpe_path(data_args, ckpt_path)
        tokenizer = bpe_from_file(path, int(data_args.get("bpe_vocab_size", 4096)))
        return tokenizer, f"{str(path)!r}, found from data.tokenizer='bpe' in {data_from}"
    return HFTokenizer(name), f"data.tokenizer={name!r} (transformers) from {data_from}"


def find_tokenizer(run: RunWeights, spec: str | None, ckpt_path: Path) -> tuple[Any, str]:
    """The tokenizer to export: --tokenizer when given, else the one saved in the checkpoint, else the one the
    run's data settings name; ValueError / FileNotFoundError saying what is missing when there is none, or
    when its vocabulary does not fit the model's."""
    if spec is not None:
        tokenizer, how = tokenizer_from_spec(spec, run.model.config.vocab_size)
    elif run.tokenizer_state is not None:
        tokenizer, how = tokenizer_from_state(run.tokenizer_state), "the tokenizer saved in the checkpoint"
    elif run.data_args is not None:  # a checkpoint without the tokenizer itself: find it as the run did
        tokenizer, how = run_tokenizer(run.data_args, run.data_from, ckpt_path)
    else:
        raise ValueError(
            f"no tokenizer: {str(ckpt_path)!r} holds neither the tokenizer nor the data settings "
            "('datamodule_hyper_parameters'), and "
            "no --config gave them; pass --tokenizer: 'bytes', the run's tokenizer.json (data_cache/bpe-*/), or "
            "a transformers tokenizer directory / hub name"
        )
    size = token_count(tokenizer)
    config = run.model.config
    if size > config.vocab_size:
        raise ValueError(
            f"the tokenizer ({how}) has {size} tokens but the model's vocabulary is {config.vocab_size} "
            f"(embedding padded to {config.padded_vocab_size} rows): the padded vocabulary cannot be cut to a "
            "vocabulary the tokenizer fits in; is it the run's tokenizer?"
        )
    return tokenizer, how


def token_count(tokenizer: Any) -> int:
    """The number of token ids the tokenizer itself produces (a trained BPE may have fewer than asked)."""
    backend = getattr(tokenizer, "tokenizer", None)
    if hasattr(backend, "get_vocab_size"):  # our BPE: the tokenizers.Tokenizer
        return int(backend.get_vocab_size())
    return len(backend) if backend is not None else int(tokenizer.vocab_size)


# ---------------------------------------------------------------------------------------------- export
def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out_dir {str(out_dir)!r} is a file; give a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(
                f"--out_dir {str(out_dir)!r} is not empty; give a new directory or --overwrite (which replaces "
                "the model and tokenizer files in it)"
            )
        for name in _MODEL_FILES:
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def generation_config(config: GPTConfig, sampling: Mapping[str, Any]) -> Any:
    """generation_config.json: the run's sampling settings (greedy when unknown or temperature 0), at most
    block_size tokens, and no BOS / EOS / PAD ids (our tokenizers have no special tokens)."""
    from transformers import GenerationConfig

    temperature = sampling.get("sample_temperature")
    kwargs: dict[str, Any] = {"max_length": config.block_size}
    if temperature:
        kwargs.update(
            do_sample=True, temperature=float(temperature), top_k=int(sampling.get("sample_top_k") or 0)
        )
    return GenerationConfig(bos_token_id=None, eos_token_id=None, pad_token_id=None, **kwargs)


def _patch_json(path: Path, update: Callable[[dict[str, Any]], None]) -> None:
    content = json.loads(path.read_text(encoding="utf-8"))
    update(content)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_model_dir(hf_model: Any, fast_tokenizer: Any, out_dir: Path, ours_is_hf: bool) -> None:
    """save_pretrained both, readable by transformers 4.x as well as 5.x: Llama's config.json also carries
    `rope_theta` (5.x writes it only inside `rope_parameters`), and our tokenizers are written as
    PreTrainedTokenizerFast (5.x names that class TokenizersBackend, which 4.x lacks)."""
    hf_model.save_pretrained(out_dir)
    fast_tokenizer.save_pretrained(out_dir)
    if hf_model.config.model_type == "llama":
        theta = (getattr(hf_model.config, "rope_parameters", None) or {}).get("rope_theta")
        if theta is not None:
            _patch_json(out_dir / "config.json", lambda c: c.setdefault("rope_theta", theta))
    if not ours_is_hf:
        fast_class = "PreTrainedTokenizerFast"
        _patch_json(out_dir / "tokenizer_config.json", lambda c: c.update(tokenizer_class=fast_class))


def check_export(out_dir: Path, model: GPT, tokenizer: Any) -> dict[str, Any]:
    """Load `out_dir` with transformers' Auto classes and compare with ours: the tokenizer on CHECK_TEXT
    (ids and decoded text) and the float32 logits on its tokens. RuntimeError when they differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(
        out_dir, local_files_only=True, dtype=torch.float32
    ).eval()
    ours_ids = tokenizer.encode(CHECK_TEXT)
    theirs_ids = hf_tokenizer(CHECK_TEXT, add_special_tokens=False, verbose=False)["input_ids"]
    if ours_ids != theirs_ids or hf_tokenizer.decode(theirs_ids) != tokenizer.decode(ours_ids):
        raise RuntimeError(
            f"the exported tokenizer differs from ours on {CHECK_TEXT!r}: ours {ours_ids[:12]}..., exported "
            f"{theirs_ids[:12]}..."
        )
    config = model.config
    ids = torch.tensor([ours_ids[: config.block_size] or [0]])
    with torch.no_grad():
        ours = model(ids)[..., : config.vocab_size]
        theirs = hf_model(ids).logits
    diff = float((ours - theirs).abs().max())
    if theirs.shape != ours.shape or not diff <= LOGIT_TOLERANCE:
        raise RuntimeError(
            f"the exported model's logits differ from ours: shapes {tuple(theirs.shape)} / {tuple(ours.shape)}, "
            f"max |diff| {diff:.3g} > {LOGIT_TOLERANCE}"
        )
    return {"max_logit_diff": diff, "check_tokens": ids.size(1)}


def export(
    ckpt_path: str | Path,
    out_dir: str | Path,
    tokenizer: str | None = None,
    config: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write `out_dir` (see the module) and return what was used and checked."""
    source, out = Path(ckpt_path).expanduser(), Path(out_dir).expanduser()
    run = load_run(source, config)
    model, c = run.model, run.model.config
    layout = hf_layout(c)  # before the tokenizer search: an architecture error comes first
    text_tokenizer, how = find_tokenizer(run, tokenizer, source)
    _prepare_out_dir(out, overwrite)
    hf_model = gpt_to_hf(model)
    fast = text_tokenizer.to_fast(model_max_length=c.block_size)
    hf_model.generation_config = generation_config(c, run.sampling)
    write_model_dir(hf_model, fast, out, ours_is_hf=isinstance(text_tokenizer, HFTokenizer))
    checked = check_export(out, model, text_tokenizer)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    cut = f", embedding cut from {c.padded_vocab_size} rows" if c.padded_vocab_size != c.vocab_size else ""
    log(f"export: weights   {str(source)!r} (architecture from {run.architecture_from})")
    log(
        f"export: model     {type(hf_model).__name__} ({layout} layout): {c.n_layer} layers, {c.n_head} heads"
        f" ({c.n_kv_head} KV), width {c.n_embd}, {c.block_size} positions, vocabulary {c.vocab_size}{cut}"
    )
    log(f"export: tokenizer {text_tokenizer.describe()}, {token_count(text_tokenizer):,} tokens, from {how}")
    log(f"export: wrote     {str(out)!r}: {', '.join(files)}")
    log(
        f"export: checked   transformers loads it; logits max |diff| {checked['max_logit_diff']:.2g} over "
        f"{checked['check_tokens']} tokens; the tokenizer encodes and decodes as ours"
    )
    return {
        "layout": layout,
        "class": type(hf_model).__name__,
        "tokenizer": text_tokenizer.describe(),
        "tokenizer_from": how,
        "files": files,
        **checked,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_modules.gpt.export",
        description=(
            "Write a transformers model directory (config.json, model.safetensors, generation_config.json and "
            "the run's tokenizer) from one of our GPT checkpoints; AutoModelForCausalLM / AutoTokenizer load it "
            "without this project."
        ),
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="our Lightning .ckpt, the single file a DeepSpeed / FSDP checkpoint directory converts to, or the "
        "output directory of DeepSpeed's zero_to_fp32.py",
    )
    parser.add_argument("--out_dir", required=True, help="the directory to write (new or empty)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer to export instead of the run's: 'bytes', a tokenizer.json (the run's is in "
        "data_cache/bpe-*/), a transformers tokenizer directory or hub name (default: the one saved in the "
        "checkpoint, else the one its data settings name)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="the run's config.yaml (or a YAML of GPTConfig fields), for a checkpoint file that lacks the "
        "architecture or the data settings (e.g. DeepSpeed's zero_to_fp32.py output)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the model and tokenizer files of a non-empty --out_dir",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the export; a user error prints a short message and returns 2."""
    from lightning_modules.common.user_errors import run_reporting_user_errors

    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the summary lines say what happened
    ok, _ = run_reporting_user_errors(
        lambda: export(args.ckpt_path, args.out_dir, args.tokenizer, args.config, args.overwrite), args.debug
    )
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
