"""The pure-PyTorch GPT: shapes, causality, tying, initialisation, presets and HF parity."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_modules.gpt import GPT, GPTConfig


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(block_size=32, vocab_size=100, n_layer=2, n_head=4, n_embd=32), **overrides})


def tiny_hf(**overrides) -> GPT2LMHeadModel:
    kwargs = dict(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(GPT2Config(**{**kwargs, **overrides})).eval()


def test_shapes_and_vocab_padding():
    model = GPT(tiny_config())
    assert model.config.padded_vocab_size == 128  # 100 rounded up to a multiple of 64
    logits = model(torch.randint(0, 100, (3, 16)))
    assert logits.shape == (3, 16, 128)
    assert model.transformer.wte.weight.shape == (128, 32)


def test_sequence_longer_than_block_size_is_rejected():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    "switches", [{}, {"rope": True}, {"n_kv_head": 1}, {"sliding_window": 4}, {"attn_backend": "math"}]
)
def test_causality(switches):
    """Changing a future token never changes an earlier position's logits."""
    model = GPT(tiny_config(**switches)).eval()
    idx = torch.randint(0, 100, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 100
    out, out_changed = model(idx), model(changed)
    torch.testing.assert_close(out[:, :12], out_changed[:, :12])
    assert not torch.allclose(out[:, 12:], out_changed[:, 12:])


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = GPT(tiny_config())
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert tied.num_parameters() == sum(p.numel() for p in set(tied.parameters()))
    untied = GPT(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_parameters() == tied.num_parameters() + 128 * 32


def test_gpt2_initialisation_statistics():
    config = GPTConfig(block_size=64, vocab_size=1000, n_layer=6, n_head=4, n_embd=256)
    model = GPT(config)
    block = model.transformer.h[0]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0)
    assert torch.all(block.ln_1.weight == 1)


def test_bias_switch_removes_all_biases():
    model = GPT(tiny_config(bias=False))
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]


def test_d12_preset_is_gpt2_small():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("d12"))
    assert model.config.padded_vocab_size == 50304
    # GPT-2 small: 124M parameters with the padded vocabulary (85M without embeddings).
    assert model.num_parameters() == 124_475_904
    assert model.num_parameters(include_embeddings=False) == 85_056_000


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="tiny"):
        GPTConfig.from_name("nope")


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n_embd=30), "divisible"),
        (dict(n_kv_head=3), "n_kv_head=3"),
        (dict(norm="batchnorm"), "batchnorm"),
        (dict(padded_vocab_size=64), "vocab_size=100"),
        (dict(attn_backend="xformers"), "xformers"),
    ],
)
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)


def test_from_hf_matches_transformers_logits():
    hf = tiny_hf()
    ours = GPT.from_hf(hf).eval()
    idx = torch.randint(0, 100, (2, 24))
    torch.testing.assert_close(ours(idx)[..., :100], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_from_hf_local_directory(tmp_path):
    hf = tiny_hf(n_inner=96)  # a non-default MLP width survives the round trip
    hf.save_pretrained(tmp_path)
    ours = GPT.from_hf(str(tmp_path)).eval()
    assert ours.config.mlp_hidden == 96
    idx = torch.randint(0, 100, (2, 24))
    torch.testing.assert_close(ours(idx)[..., :100], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_to_hf_matches_our_logits():
    ours = GPT(tiny_config()).eval()
    hf = ours.to_hf()
    idx = torch.randint(0, 100, (2, 24))
    torch.testing.assert_close(hf(idx).logits, ours(idx)[..., :100], atol=1e-5, rtol=1e-5)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


def test_to_hf_rejects_switches_gpt2_cannot_represent():
    with pytest.raises(ValueError, match="rope"):
        GPT(tiny_config(rope=True)).to_hf()


def test_from_hf_missing_directory_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        GPT.from_hf(str(tmp_path / "no-such-model"))


def test_generate_greedy_is_deterministic_and_in_vocab():
    model = GPT(tiny_config()).eval()
    prompt = torch.randint(0, 100, (1, 5))
    out1 = model.generate(prompt, max_new_tokens=40, temperature=0)
    out2 = model.generate(prompt, max_new_tokens=40, temperature=0)
    assert out1.shape == (1, 45) and torch.equal(out1, out2)
    assert torch.equal(out1[:, :5], prompt)
    sampled = model.generate(prompt, max_new_tokens=40, temperature=1.0, top_k=5)
    assert sampled.max() < 100  # padding rows of the embedding are never sampled


def test_top_k_one_equals_greedy():
    model = GPT(tiny_config()).eval()
    prompt = torch.randint(0, 100, (2, 3))
    greedy = model.generate(prompt, 10, temperature=0)
    torch.testing.assert_close(model.generate(prompt, 10, temperature=1.0, top_k=1), greedy)
