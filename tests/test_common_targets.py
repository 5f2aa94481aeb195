"""The shared target adapter: our GPT .ckpt and local transformers GPT-2 / Llama directories (tiny models
built in code, saved to tmp_path), their layout (layers, attention / MLP names, embedding rows, positions)
and the errors for paths it cannot load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_modules.common.targets import (
    FAMILIES,
    LAYOUTS,
    TARGET_FORMATS,
    decoder_layers,
    detect_family,
    embedding_rows,
    layer_names,
    load_causal_lm,
    load_target_model,
    max_positions,
    supported_targets,
)
from lightning_modules.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

VOCAB = 61  # our GPT pads its embedding to 64 rows; the transformers models keep 61
N_LAYER = 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second BLAS thread only adds contention (conftest restores the count)."""
    torch.set_num_threads(1)
    yield


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=24, vocab_size=VOCAB, n_layer=N_LAYER, n_head=2, n_embd=16)).eval()


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=N_LAYER, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=N_LAYER,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def save_gpt_checkpoint(model: GPT, path: Path) -> Path:
    """The two entries of our Lightning checkpoints that the loader reads."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"gpt_architecture": model.config.architecture(), "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """family -> (original model, its path on disk)."""
    root = tmp_path_factory.mktemp("targets")
    gpt, gpt2, llama = tiny_gpt(), tiny_gpt2(), tiny_llama()
    gpt2.save_pretrained(root / "gpt2")
    llama.save_pretrained(root / "llama")
    return {
        "gpt": (gpt, save_gpt_checkpoint(gpt, root / "gpt.ckpt")),
        "gpt2": (gpt2, root / "gpt2"),
        "llama": (llama, root / "llama"),
    }


def logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("family", FAMILIES)
def test_each_format_loads_as_stored_with_equal_logits(targets, family: str) -> None:
    original, path = targets[family]
    model, loaded_family = load_target_model(str(path))
    assert loaded_family == family == detect_family(model)
    assert type(model) is type(original) and not model.training
    torch.testing.assert_close(logits(model, tokens()), logits(original, tokens()), atol=0, rtol=0)


def test_gpt2_directory_reads_into_our_gpt(targets) -> None:
    original, path = targets["gpt2"]
    model, family = load_target_model(path, "gpt", config={"resid_dropout": 0.25, "n_layer": N_LAYER})
    assert family == "gpt" and isinstance(model, GPT)
    assert model.config.resid_dropout == 0.25  # a training-only field is applied, not compared
    torch.testing.assert_close(logits(model, tokens()), logits(original, tokens()), atol=2e-5, rtol=0)


def test_load_causal_lm_returns_the_transformers_model(targets) -> None:
    original, path = targets["llama"]
    model = load_causal_lm(path, dtype=torch.bfloat16)
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert model.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.lm_head.weight, original.lm_head.weight.to(torch.bfloat16))


@pytest.mark.parametrize("family", FAMILIES)
def test_dtype_applies_to_every_format(targets, family: str) -> None:
    model, _ = load_target_model(targets[family][1], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_config_fields_must_match_the_weights(targets) -> None:
    with pytest.raises(ValueError, match=r"gpt\.ckpt.*n_layer: target_config=5 checkpoint=3"):
        load_target_model(targets["gpt"][1], config={"n_layer": 5})
    with pytest.raises(ValueError, match="num_hidden_layers.*no_such_field: unknown field"):
        load_target_model(targets["llama"][1], config={"num_hidden_layers": 9, "no_such_field": 1})


# ---------------------------------------------------------------------------------------------- layout
EXPECTED = {  # family -> (layers, attention type, MLP projections, embedding rows, positions)
    "gpt": ("transformer.h", "CausalSelfAttention", ("c_fc", "c_proj"), 64, 24),
    "gpt2": ("transformer.h", "GPT2Attention", ("c_fc", "c_proj"), VOCAB, 32),
    "llama": ("model.layers", "LlamaAttention", ("gate_proj", "up_proj", "down_proj"), VOCAB, 48),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_names_layers_attention_mlp_embedding_and_positions(targets, family: str) -> None:
    model = targets[family][0]
    layers_path, attention_type, parts, rows, positions = EXPECTED[family]
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == N_LAYER
    assert layers is model.get_submodule(layers_path) and LAYOUTS[family].mlp_parts == parts
    modules = dict(model.named_modules())
    names = layer_names(family, 2)
    assert modules[names.attention] is layers[2].get_submodule(LAYOUTS[family].attention)
    assert type(modules[names.attention]).__name__ == attention_type
    assert modules[names.mlp] is layers[2].mlp
    assert names.mlp_parts == tuple(f"{names.mlp}.{p}" for p in parts)
    assert all(names.mlp.startswith(f"{layers_path}.2.") and name in modules for name in names.mlp_parts)
    embedding = model.get_submodule("model.embed_tokens" if family == "llama" else "transformer.wte")
    assert embedding_rows(model) == rows == embedding.num_embeddings
    assert max_positions(model) == max_positions(model, family) == positions


def test_decoder_layers_can_be_replaced_in_place(targets) -> None:
    model, _ = load_target_model(targets["llama"][1])
    decoder_layers(model)[0] = nn.Identity()
    assert isinstance(model.model.layers[0], nn.Identity)


def test_unsupported_model_in_memory() -> None:
    with pytest.raises(ValueError, match="unsupported target Linear.*valid: our GPT"):
        detect_family(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- errors
def test_missing_path_names_it_and_the_supported_formats(tmp_path) -> None:
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.ckpt' does not exist.*\.ckpt.*'gpt2' or 'llama'"):
        load_target_model(missing)
    with pytest.raises(FileNotFoundError, match="or null for a fresh one$"):
        load_target_model(missing, also=("null for a fresh one",))


def test_directory_without_config_json(tmp_path) -> None:
    (tmp_path / "weights_only").mkdir()
    with pytest.raises(FileNotFoundError, match="weights_only' is a directory without config.json"):
        load_target_model(tmp_path / "weights_only")


def test_unsupported_or_unreadable_config(tmp_path) -> None:
    bert = tmp_path / "bert"
    transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(bert)
    with pytest.raises(
        ValueError, match=r"bert' is a transformers model of model_type 'bert'.*\['gpt2', 'llama'\]"
    ):
        load_target_model(bert)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken': config.json could not be read"):
        load_target_model(broken)


def test_missing_weights_are_refused_not_initialised(tmp_path) -> None:
    headless = tmp_path / "headless"  # a LlamaModel: no LM head, which transformers would initialise randomly
    tiny_llama().model.save_pretrained(headless)
    with pytest.raises(ValueError, match=r"headless': the weights lack \['lm_head.weight'\]"):
        load_target_model(headless)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((headless / "config.json").read_text())
    with pytest.raises(ValueError, match="weightless': the transformers llama model could not be loaded"):
        load_causal_lm(weightless)


def test_files_that_are_not_our_gpt_checkpoints(tmp_path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="no 'gpt_architecture'"):
        load_target_model(tmp_path / "other.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.ckpt' could not be loaded as our GPT checkpoint"):
        load_target_model(tmp_path / "notes.ckpt")


def test_family_must_fit_the_stored_target(targets) -> None:
    with pytest.raises(ValueError, match=r"target_family='gpt2'.*llama.*valid: 'llama' or null"):
        load_target_model(targets["llama"][1], "gpt2")
    with pytest.raises(ValueError, match=r"target_family='llama'.*gpt\.ckpt.*valid: 'gpt' or null"):
        load_target_model(targets["gpt"][1], "llama")
    with pytest.raises(ValueError, match="unknown target family 'mistral'"):
        load_target_model(targets["llama"][1], "mistral")


def test_load_in_8bit_needs_a_transformers_target_on_cuda(targets) -> None:
    with pytest.raises(ValueError, match="load_in_8bit supports transformers targets only"):
        load_target_model(targets["gpt2"][1], "gpt", load_in_8bit=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="load_in_8bit needs CUDA and the bitsandbytes package"):
            load_target_model(targets["llama"][1], load_in_8bit=True)


def test_supported_targets_text_lists_every_format() -> None:
    assert supported_targets() == f"{TARGET_FORMATS[0]} or {TARGET_FORMATS[1]}"
    assert supported_targets("a toy file") == f"{TARGET_FORMATS[0]}, {TARGET_FORMATS[1]}, or a toy file"
    assert ".ckpt" in TARGET_FORMATS[0] and "'gpt2' or 'llama'" in TARGET_FORMATS[1]
