"""Architecture and speed switches: each is proven equal to its reference form."""

import itertools

import pytest
import torch

from lightning_modules.gpt import GPT, GPTConfig
from lightning_modules.gpt.model import CausalSelfAttention, RotaryEmbedding, math_attention

BASE = dict(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=32)


def config(**switches) -> GPTConfig:
    return GPTConfig(**{**BASE, **switches})


def test_gqa_equals_mha_with_repeated_kv_weights():
    """GQA with 2 KV heads equals MHA whose K/V heads are copies of the shared ones."""
    gqa = GPT(config(n_kv_head=2)).eval()
    mha = GPT(config()).eval()
    state = gqa.state_dict()
    h, d, kv = 4, 8, 2

    def repeat_heads(t: torch.Tensor) -> torch.Tensor:  # (kv * d, ...) -> (h * d, ...)
        return t.view(kv, d, *t.shape[1:]).repeat_interleave(h // kv, 0).reshape(h * d, *t.shape[1:])

    for i in range(BASE["n_layer"]):
        for kind in ("weight", "bias"):
            name = f"transformer.h.{i}.attn.c_attn.{kind}"
            q, k, v = state[name].split([h * d, kv * d, kv * d])
            state[name] = torch.cat([q, repeat_heads(k), repeat_heads(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-5, rtol=1e-5)


def test_gqa_with_n_kv_head_equal_n_head_is_mha():
    a, b = GPT(config(n_kv_head=4)).eval(), GPT(config()).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(a(idx), b(idx))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_gqa_shrinks_the_kv_projection(n_kv_head):
    attn = GPT(config(n_kv_head=n_kv_head)).transformer.h[0].attn
    assert attn.c_attn.weight.shape == ((4 + 2 * n_kv_head) * 8, 32)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_window_at_least_sequence_equals_full_attention(backend):
    full = GPT(config(attn_backend=backend)).eval()
    windowed = GPT(config(attn_backend=backend, sliding_window=16)).eval()
    windowed.load_state_dict(full.state_dict())
    idx = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(windowed(idx), full(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_short_window_never_sees_past_it(backend):
    """With window w, position i's output depends only on tokens i-w+1..i (one layer)."""
    cfg = GPTConfig(**{**BASE, "n_layer": 1}, sliding_window=3, attn_backend=backend)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 96, (1, 16))
    changed = idx.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 96
    diff = (model(idx) - model(changed)).abs().amax(dim=-1)[0]
    assert torch.all(diff[:5] == 0)  # the past never sees the future
    assert torch.all(diff[5:8] > 0)  # positions 5, 6, 7 have token 5 within their window of 3
    assert torch.all(diff[8:] == 0)  # position 8 and later are beyond it


def test_global_every_makes_hybrid_stacks():
    cfg = GPTConfig(**{**BASE, "n_layer": 6}, sliding_window=4, global_every=3)
    windows = [cfg.window_for_layer(i) for i in range(6)]
    assert windows == [4, 4, None, 4, 4, None]
    model = GPT(cfg)
    assert [b.attn.window for b in model.transformer.h] == windows


@pytest.mark.parametrize(
    "switches", [{}, {"n_kv_head": 1}, {"rope": True, "qk_norm": True}, {"sliding_window": 5}]
)
def test_sdpa_and_math_paths_agree(switches):
    sdpa = GPT(config(**switches)).eval()
    math_path = GPT(config(**switches, attn_backend="math")).eval()
    math_path.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 96, (2, 20))
    torch.testing.assert_close(sdpa(idx), math_path(idx), atol=1e-5, rtol=1e-5)


def test_math_attention_matches_explicit_loop():
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    out = math_attention(q, k, v, window=None, dropout_p=0.0)
    for i in range(6):
        scores = (q[:, :, i : i + 1] @ k[:, :, : i + 1].transpose(-2, -1)) / 2.0
        expected = scores.softmax(-1) @ v[:, :, : i + 1]
        torch.testing.assert_close(out[:, :, i : i + 1], expected)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_size=8, max_seq_len=64, base=10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(pos_q: int, pos_k: int) -> torch.Tensor:
        seq = torch.zeros(1, 1, 64, 8)
        seq_q, seq_k = seq.clone(), seq.clone()
        seq_q[0, 0, pos_q], seq_k[0, 0, pos_k] = q, k
        return rope(seq_q)[0, 0, pos_q] @ rope(seq_k)[0, 0, pos_k]

    torch.testing.assert_close(score(10, 3), score(40, 33), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score(5, 5), score(50, 50), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(10, 3), score(10, 4))


def test_rope_model_has_no_position_table():
    model = GPT(config(rope=True))
    assert model.transformer.wpe is None
    assert not [k for k in model.state_dict() if "cos" in k or "sin" in k]  # caches are not saved


def test_rmsnorm_and_swiglu_and_qk_norm_build_the_right_modules():
    model = GPT(config(norm="rmsnorm", mlp="swiglu", mlp_ratio=3.0, qk_norm=True))
    block = model.transformer.h[0]
    assert isinstance(block.ln_1, torch.nn.RMSNorm)
    assert block.mlp.c_fc.out_features == 128  # 3 * 32 = 96, rounded up to a multiple of 64
    assert block.mlp.c_up is not None and block.attn.q_norm is not None


def test_mlp_ratio_sets_gelu_hidden_size():
    assert GPT(config(mlp_ratio=3.0)).transformer.h[0].mlp.c_fc.out_features == 96


def test_qk_norm_normalises_queries_and_keys_per_head():
    cfg = config(qk_norm=True)
    attn = CausalSelfAttention(cfg, 0)
    seen = {}
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    attn(torch.randn(2, 5, 32) * 10)
    rms = seen["q"].pow(2).mean(-1).sqrt()  # (b, s, heads): unit RMS per head
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("switches", [{}, {"rope": True, "n_kv_head": 2, "mlp": "swiglu"}])
def test_gradient_checkpointing_gives_identical_gradients(switches):
    plain = GPT(config(**switches))
    ckpt = GPT(config(**switches, gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 96, (2, 16))
    plain(idx).square().mean().backward()
    ckpt(idx).square().mean().backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


SWITCHES = {
    "n_kv_head": [None, 1],
    "rope": [False, True],
    "norm": ["layernorm", "rmsnorm"],
    "mlp": ["gelu", "swiglu"],
    "qk_norm": [False, True],
    "sliding_window": [None, 4],
}


@pytest.mark.parametrize(
    "combo", [dict(zip(SWITCHES, values)) for values in itertools.product(*SWITCHES.values())], ids=str
)
def test_every_switch_combination_trains_and_round_trips(combo, tmp_path):
    model = GPT(config(**combo, n_layer=1))
    idx = torch.randint(0, 96, (2, 12))
    logits = model(idx)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.save(model.state_dict(), tmp_path / "m.pt")
    clone = GPT(config(**combo, n_layer=1))
    clone.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    torch.testing.assert_close(clone.eval()(idx), model.eval()(idx))


def test_architecture_diff_names_switches_and_ignores_training_only_ones():
    base = config()
    assert base.architecture_diff(config(attn_backend="math", gradient_checkpointing=True)) == {}
    diff = base.architecture_diff(config(rope=True, mlp="swiglu"))
    assert set(diff) == {"rope", "mlp"}


def test_flash_attn_backend_without_package_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="flash-attn"):
        GPT(config(attn_backend="flash_attn"))
