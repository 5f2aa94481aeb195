"""SPD of transformers language models from local directories: tiny GPT-2 and Llama (GQA) targets built
in code and saved with save_pretrained, loaded by `load_target`, decomposed through `train.py fit` with
the shipped configs (configs/spd/hf_gpt2.yaml, hf_llama.yaml) shrunk to seconds on the embedded corpus."""

import json
import math
from pathlib import Path

import pytest
import torch

from datamodules.text import TextDataModule
from lightning_modules.spd.component_model import ComponentModel
from lightning_modules.spd.objective import SPDObjective, eval_batch
from lightning_modules.spd.targets import HFCausalLM, check_target_data, load_target
from tests.helpers.cli import ROOT, run_train

transformers = pytest.importorskip("transformers")

SPD_CONFIGS = ROOT / "configs" / "spd"
VOCAB = 256  # the `bytes` tokenizer's vocabulary
GPT2_PATTERNS = {
    "transformer.h.*.attn.c_attn": 8,
    "transformer.h.*.attn.c_proj": 6,
    "transformer.h.*.mlp.c_fc": 8,
    "transformer.h.*.mlp.c_proj": 6,
}
LLAMA_PATTERNS = {"model.layers.*.self_attn.*_proj": 6, "model.layers.*.mlp.*_proj": 8}
LLAMA_PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLAMA_PROJS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_gpt2(**overrides) -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama(**overrides) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k_proj / v_proj are 32 -> 16
        max_position_embeddings=64,
        **overrides,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    tiny_gpt2().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    tiny_llama().save_pretrained(path)
    return path


def tokens(seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))


def assert_components_reproduce_target(target: torch.nn.Module, patterns: dict[str, int]) -> ComponentModel:
    """With every mask 1 and the weight delta added, each module computes W x + b: the target's logits."""
    cm = ComponentModel(target, patterns, "shared_mlp", [8])
    x = tokens()
    with torch.no_grad():
        clean = cm(x)
        ones = {name: torch.ones(*x.shape, C) for name, C in cm.module_to_c.items()}
        deltas = {name: (delta, None) for name, delta in cm.weight_deltas().items()}
        torch.testing.assert_close(
            cm(x, masks=ones, weight_deltas_and_masks=deltas), clean, atol=2e-5, rtol=0
        )
    return cm


# ----------------------------------------------------------------------------- loading (in process)


def test_llama_directory_loads_with_equal_logits_and_decomposes(llama_dir):
    target = load_target(str(llama_dir))
    assert isinstance(target, HFCausalLM) and not target.training
    names = [name for name, _ in target.named_modules()]
    assert {f"model.layers.{i}.{proj}" for i in range(2) for proj in LLAMA_PROJS} <= set(names)
    original = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    x = tokens()
    with torch.no_grad():
        logits = target(x)
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, 12, VOCAB)
        torch.testing.assert_close(logits, original(x).logits, atol=0, rtol=0)
    cm = assert_components_reproduce_target(target, LLAMA_PATTERNS)
    assert len(cm.module_names) == 14
    assert cm.component("model.layers.0.self_attn.k_proj").U.shape == (6, 16)  # GQA: 2 kv heads x 8
    check_target_data(target, VOCAB, None, str(llama_dir))
    with pytest.raises(ValueError, match=f"300 tokens.*{llama_dir.name}.*{VOCAB}"):
        check_target_data(target, 300, None, str(llama_dir))


def test_llama_with_tied_embeddings_and_objective_step(tmp_path):
    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    target = load_target(str(tmp_path / "tied"))
    assert target.lm_head.weight is target.model.embed_tokens.weight
    cm = ComponentModel(target, LLAMA_PATTERNS, "shared_mlp", [8])
    objective = SPDObjective(
        {"faithfulness": 1.0, "stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0,
         "importance_minimality": 1e-3},
        output_loss_type="kl",
    )  # fmt: skip
    out = objective(cm, tokens(), 0.5)
    out.total.backward()
    assert math.isfinite(out.total.item())
    assert cm.component("model.layers.1.mlp.down_proj").V.grad is not None
    assert target.model.embed_tokens.weight.grad is None  # the target stays frozen
    metrics, _ = eval_batch(cm, tokens(), "kl", True, labels=tokens())
    assert all(math.isfinite(float(v)) for v in metrics.values())


def test_gpt2_directory_becomes_our_gpt_with_equal_logits(gpt2_dir):
    from lightning_modules.gpt.model import GPT

    target = load_target(str(gpt2_dir))
    assert isinstance(target, GPT) and not target.training
    with torch.no_grad():
        expected = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()(tokens()).logits
        torch.testing.assert_close(target(tokens()), expected, atol=2e-5, rtol=0)


def test_gpt2_our_gpt_cannot_represent_is_decomposed_as_conv1d(tmp_path):
    original = tiny_gpt2(activation_function="relu")  # our GPT implements only the tanh GELUs
    original.save_pretrained(tmp_path / "relu")
    target = load_target(str(tmp_path / "relu"))
    assert isinstance(target, HFCausalLM)
    assert type(target.get_submodule("transformer.h.0.attn.c_attn")).__name__ == "Conv1D"
    with torch.no_grad():
        torch.testing.assert_close(target(tokens()), original(tokens()).logits, atol=0, rtol=0)
    cm = assert_components_reproduce_target(target, GPT2_PATTERNS)
    assert cm.component("transformer.h.0.attn.c_attn").weight.shape == (96, 32)  # nn.Linear layout
    metrics, _ = eval_batch(cm, tokens(), "kl", True, labels=tokens())
    assert all(math.isfinite(float(v)) for v in metrics.values())


def test_unsupported_or_broken_directories_fail_naming_the_path(tmp_path):
    bert = tmp_path / "bert_model"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ValueError, match=r"bert_model.*model_type 'bert'.*\['gpt2', 'llama'\]"):
        load_target(str(bert))
    untyped = tmp_path / "untyped"
    untyped.mkdir()
    (untyped / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="untyped.*model_type None"):
        load_target(str(untyped))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir.*config.json"):
        load_target(str(empty))
    base = tmp_path / "no_head"  # a LlamaModel: no LM head, which transformers would initialise randomly
    tiny_llama().model.save_pretrained(base)
    with pytest.raises(ValueError, match="no_head.*lm_head"):
        load_target(str(base))
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(ValueError, match="weightless.*could not be loaded"):
        load_target(str(weightless))


def test_tokenizer_directory_loads_lazily(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    (tmp_path / "corpus.txt").write_text("def value(self):\n    return self.x + 1\n" * 200)
    tok_dir = tmp_path / "models" / "tok"
    dm = TextDataModule(
        sources=str(tmp_path / "corpus.txt"),
        tokenizer=str(tok_dir),
        block_size=8,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    assert dm.vocab_size is None  # what train.py links to the model while the directory is missing
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(ValueError, match=f"no directory '{tok_dir}'"):
            step()
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["def value(self): return x"] * 50, trainer=trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tok_dir)
    assert dm.vocab_size == raw.get_vocab_size()
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 8) and int(x.max()) < dm.vocab_size


# ----------------------------------------------------------------------------- train.py end to end


def fit_shrunk(cwd: Path, config: str, target: Path, patterns: dict[str, int]) -> dict:
    """Decompose `target` with a shipped config shrunk to seconds; returns spd_results.json."""
    run_train(
        cwd,
        "fit",
        "--config",
        str(SPD_CONFIGS / config),
        f"--model.init_args.target={target}",
        f"--model.init_args.target_module_patterns={json.dumps(patterns)}",
        "--model.init_args.components.ci_fn_hidden_dims=[8]",
        "--model.init_args.faithfulness_warmup.steps=2",
        "--model.init_args.warmup_steps=1",
        "--model.init_args.evaluation.final_eval_batches=1",
        "--model.init_args.compile=false",
        "--model.init_args.cpu_threads=1",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        "--data.init_args.sources=null",  # the embedded corpus
        "--data.init_args.tokenizer=bytes",
        "--data.init_args.max_chars=20000",
        "--data.init_args.block_size=16",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        f"--data.init_args.cache_dir={cwd / 'cache'}",
    )
    (results,) = (cwd / "lightning_logs").glob("version_*/spd_results.json")
    return json.loads(results.read_text())


def check_results(results: dict, target: Path, expected_c: dict[str, int]) -> None:
    assert results["target"] == str(target) and results["global_step"] == 6
    assert {name: row["C"] for name, row in results["modules"].items()} == expected_c
    for name, row in results["modules"].items():
        assert 0 <= row["alive_components"] <= row["C"], name
        assert math.isfinite(row["l0_ci_gt_0"]) and 0 <= row["l0_ci_gt_0"] <= row["C"], name
    lm = results["lm"]
    kinds = ("ci_masked", "unmasked", "stochastic", "rounded", "zero")
    wanted = ["ce_target", *(f"ce_{k}" for k in kinds), *(f"kl_{k}" for k in kinds)]
    assert all(math.isfinite(lm[key]) for key in wanted), lm
    assert min(lm[f"kl_{k}"] for k in kinds) >= 0
    assert abs(lm["ce_target"] - math.log(VOCAB)) < 1.0  # a random tiny model: near-uniform predictions


def test_train_cli_decomposes_hf_gpt2(tmp_path, gpt2_dir):
    results = fit_shrunk(tmp_path, "hf_gpt2.yaml", gpt2_dir, GPT2_PATTERNS)
    expected = {
        f"transformer.h.{i}.{suffix}": C
        for i in range(2)
        for suffix, C in zip(("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), GPT2_PATTERNS.values())
    }
    check_results(results, gpt2_dir, expected)


def test_train_cli_decomposes_hf_llama(tmp_path, llama_dir):
    results = fit_shrunk(tmp_path, "hf_llama.yaml", llama_dir, LLAMA_PATTERNS)
    expected = {
        f"model.layers.{i}.{proj}": LLAMA_PATTERNS[f"model.layers.*.{proj.split('.')[0]}.*_proj"]
        for i in range(2)
        for proj in LLAMA_PROJS
    }
    check_results(results, llama_dir, expected)
