"""NPComponent (fast factored modulation vs explicit ΔW, memory, init, grads) and the exact rank-1 patch."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_modules.npt.components import MODES, NPComponent
from lightning_modules.npt.exact_patch import (
    exact_down_patch,
    exact_rank1_patch,
    modulation_gap,
    patch_gap,
    rank1_modulation,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second BLAS thread only adds contention (conftest restores the count)."""
    torch.set_num_threads(1)
    yield


class _OpRecorder(TorchDispatchMode):
    """Records every aten op name and the largest tensor any op produced."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket.__name__))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def _inputs(comp: NPComponent, b: int, s: int, target: str, gen_seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(gen_seed)
    d, f = comp.d_model, comp.d_ffn
    n_in, n_out = (f, d) if target == "down" else (d, f)
    a = torch.randn(b, s, d, generator=g)
    u = torch.randn(b, s, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g) / n_in**0.5  # nn.Linear layout
    bias = torch.randn(n_out, generator=g)
    return a, u, w, bias


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize(("b", "s", "d", "f", "r"), [(2, 5, 16, 24, 4), (1, 3, 12, 40, 1), (3, 2, 20, 8, 6)])
def test_fast_path_equals_explicit_delta_w(mode: str, k: int, b: int, s: int, d: int, f: int, r: int) -> None:
    comp = NPComponent(d, f, rank=r, num_ranks=k, mode=mode, init_scale=1.0, seed=k)
    for target in comp.targets:
        a, u, w, bias = _inputs(comp, b, s, target)
        dw = comp.delta_w(a, target)  # (b, s, n_in, n_out)
        assert dw.shape == (b, s, *reversed(w.shape))
        ref = torch.einsum("bsi,bsio->bso", u, w.t() + dw) + bias  # u (W + ΔW) + b
        out = comp.modulated_linear(u, a, w, bias, target=target)
        torch.testing.assert_close(out, ref, **TOL)
        mod = comp.modulation(a, u, target)
        torch.testing.assert_close(mod, comp.modulation_explicit(a, u, target), **TOL)
        torch.testing.assert_close(mod, comp.modulation_vectors(a, u, target), **TOL)
        # the modulation is not negligible next to u Wᵀ, so the comparison above means something
        assert mod.norm() > 0.05 * (u @ w.t()).norm()
        rank = torch.linalg.matrix_rank(dw[0, 0])  # float32 tolerance
        assert rank <= min(k, d, f)


def test_shared_z_and_forward_alias() -> None:
    comp = NPComponent(16, 24, rank=3, num_ranks=4, mode="triple", init_scale=1.0, seed=0)
    a, u, _, _ = _inputs(comp, 2, 3, "in")
    z = comp.project(a)
    assert z.shape == (2, 3, 4, 3)
    torch.testing.assert_close(comp.modulation(a, u, "up", z=z), comp.modulation(a, u, "up"))
    torch.testing.assert_close(comp(a, u), comp.modulation(a, u))
    fac = comp.factors(a)
    assert fac.v_a.shape == (2, 3, 4, 16) and fac.v_b.shape == (2, 3, 4, 24)
    assert (
        fac.v_b2.shape == (2, 3, 4, 24)
        and fac.v_a3.shape == (2, 3, 4, 24)
        and fac.v_b3.shape == (2, 3, 4, 16)
    )
    torch.testing.assert_close(fac.v_a, comp.v_a(a))
    torch.testing.assert_close(fac.v_b3, comp.v_b(a, "down"))
    single = NPComponent(16, 24, rank=3, num_ranks=4, seed=0)
    assert single.factors(a).v_b2 is None and single.W_b2_up is None
    with pytest.raises(ValueError, match="'up'"):
        single.modulation(a, u, "up")


def test_gpt2_conv1d_layout_with_bias() -> None:
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    mlp = GPT2MLP(48, GPT2Config(n_embd=16, resid_pdrop=0.0))
    assert mlp.c_fc.weight.shape == (16, 48)  # Conv1D stores (in, out)
    comp = NPComponent(16, 48, rank=2, num_ranks=3, init_scale=1.0, seed=0)
    a, u, _, _ = _inputs(comp, 2, 4, "in")
    with torch.no_grad():
        mlp.c_fc.bias.normal_()
    ref = torch.einsum("bsi,bsio->bso", u, mlp.c_fc.weight + comp.delta_w(a)) + mlp.c_fc.bias
    out = comp.modulated_linear(u, a, mlp.c_fc.weight.t(), mlp.c_fc.bias)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(
        comp.modulated_linear(u, torch.zeros_like(a), mlp.c_fc.weight.t(), mlp.c_fc.bias), mlp.c_fc(u)
    )


def test_fast_path_never_materialises_delta_w_or_vectors() -> None:
    b, s, d, f, k, r = 2, 5, 32, 48, 8, 2
    comp = NPComponent(d, f, rank=r, num_ranks=k, mode="triple", seed=0)
    a = torch.randn(b, s, d, requires_grad=True)
    u = torch.randn(b, s, d, requires_grad=True)
    x = torch.randn(b, s, f, requires_grad=True)
    w_in = torch.randn(f, d)
    with _OpRecorder() as rec:
        z = comp.project(a)
        loss = comp.modulated_linear(u, a, w_in, z=z).square().sum()
        loss = (
            loss + comp.modulation(a, u, "up", z=z).square().sum() + comp.modulation(a, x, "down", z=z).sum()
        )
        loss = loss + comp.regularization(a, z=z)
        loss.backward()
    # ΔW would be b·s·d·f = 15360 values, the explicit v's b·s·k·min(d, f) = 2560; the largest things
    # allowed are the (k·r, f) weights and the (b, s, f) outputs.
    assert rec.max_numel < b * s * k * min(d, f)
    assert rec.max_numel <= max(k * r * f, b * s * f, k * d * r, d * f)  # d·f: the dense base weight
    assert all(p.grad is not None for p in comp.parameters())
    # the recorder does see the big tensors of the explicit path
    with _OpRecorder() as rec2:
        comp.modulation_explicit(a, u)
    assert rec2.max_numel == b * s * d * f


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    c1 = NPComponent(24, 40, rank=4, num_ranks=5, mode="triple", seed=123)
    c2 = NPComponent(24, 40, rank=4, num_ranks=5, mode="triple", seed=123)
    c3 = NPComponent(24, 40, rank=4, num_ranks=5, mode="triple", seed=124)
    assert torch.equal(torch.get_rng_state(), state)
    for (n1, p1), p2, p3 in zip(c1.named_parameters(), c2.parameters(), c3.parameters()):
        assert torch.equal(p1, p2), n1
        assert not torch.equal(p1, p3), n1
    c1.reset_parameters(123)
    assert torch.equal(c1.W_b3_up, c2.W_b3_up)
    assert torch.equal(torch.get_rng_state(), state)
    # seed=None: reproducible under torch.manual_seed (one draw from the global generator)
    torch.manual_seed(7)
    n1 = NPComponent(8, 8, rank=2, num_ranks=2)
    torch.manual_seed(7)
    n2 = NPComponent(8, 8, rank=2, num_ranks=2)
    assert torch.equal(n1.W_down, n2.W_down)


def test_init_statistics_and_dtype() -> None:
    d, f, r, k = 256, 512, 16, 32
    comp = NPComponent(d, f, rank=r, num_ranks=k, init_scale=0.5, seed=0)
    assert (
        comp.W_down.shape == (k, d, r) and comp.W_a_up.shape == (k, r, d) and comp.W_b_up.shape == (k, r, f)
    )
    assert abs(comp.W_down.std().item() - (2 / (d + r)) ** 0.5) < 0.02 * (2 / (d + r)) ** 0.5
    assert abs(comp.W_b_up.std().item() - 0.5 / r**0.5) < 0.02 * 0.5 / r**0.5
    assert not isinstance(comp.W_down, torch.nn.ParameterList)
    bf = NPComponent(8, 12, rank=2, num_ranks=3, mode="dual", seed=0, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    meta = NPComponent(8, 12, rank=2, num_ranks=3, device="meta")
    assert meta.W_down.is_meta


def test_init_is_one_vectorised_draw_per_tensor_at_any_size() -> None:
    with _OpRecorder() as rec:
        comp = NPComponent(64, 96, rank=4, num_ranks=64, mode="triple", seed=0)
    n_params = len(list(comp.parameters()))
    assert n_params == 6
    assert rec.ops.count("normal_") == n_params  # not one per component
    assert not any("qr" in op or "orgqr" in op or "geqrf" in op for op in rec.ops)
    # 32x the components: the same ops, only larger tensors (no per-component Python loop)
    with _OpRecorder() as many:
        NPComponent(64, 96, rank=4, num_ranks=2048, mode="triple", seed=0)
    assert many.ops == rec.ops


def test_gradients_reach_every_np_parameter() -> None:
    for mode in MODES:
        comp = NPComponent(12, 20, rank=3, num_ranks=4, mode=mode, seed=0)
        a = torch.randn(2, 3, 12)
        z = comp.project(a)
        loss = sum(
            comp.modulation(a, torch.randn(2, 3, 20 if t == "down" else 12), t, z=z).square().sum()
            for t in comp.targets
        )
        loss.backward()
        for name, p in comp.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (mode, name)
        comp.zero_grad()
        comp.regularization(a).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in comp.parameters())


def test_regularization_and_stats_match_explicit_vectors() -> None:
    comp = NPComponent(16, 24, rank=3, num_ranks=5, mode="triple", init_scale=0.7, seed=3)
    a = torch.randn(2, 4, 16)
    u = torch.randn(2, 4, 16)
    fac = comp.factors(a)
    ref = sum(v.square().mean() for v in (fac.v_a, fac.v_b, fac.v_b2, fac.v_a3, fac.v_b3))
    torch.testing.assert_close(comp.regularization(a), ref, **TOL)
    single = NPComponent(16, 24, rank=3, num_ranks=5, seed=3)
    fs = single.factors(a)
    torch.testing.assert_close(
        single.regularization(a), fs.v_a.square().mean() + fs.v_b.square().mean(), **TOL
    )

    st = comp.stats(a, u)
    torch.testing.assert_close(st["v_a_norm"], fac.v_a.norm(dim=-1).mean(), **TOL)
    torch.testing.assert_close(st["v_b_norm"], fac.v_b.norm(dim=-1).mean(), **TOL)
    cos = torch.nn.functional.cosine_similarity(fac.v_a, a.unsqueeze(-2), dim=-1).mean()
    torch.testing.assert_close(st["cos_v_a_a"], cos, **TOL)
    torch.testing.assert_close(st["modulation_norm"], comp.modulation(a, u).norm(dim=-1).mean(), **TOL)
    assert not any(v.requires_grad for v in st.values())
    st_down = comp.stats(a, target="down")
    torch.testing.assert_close(st_down["v_b_norm"], fac.v_b3.norm(dim=-1).mean(), **TOL)
    assert "cos_v_a_a" not in st_down and "modulation_norm" not in st_down


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"rank": 0}, "0"),
        ({"num_ranks": -2}, "-2"),
        ({"d_model": 0}, "d_model"),
        ({"d_ffn": 0}, "d_ffn"),
        ({"mode": "quad"}, "'quad'"),
        ({"init_scale": 0.0}, "0.0"),
        ({"rank": 2.5}, "2.5"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, bad: str) -> None:
    args = {"d_model": 8, "d_ffn": 16, "rank": 2, "num_ranks": 2} | kwargs
    with pytest.raises(ValueError, match=bad) as err:
        NPComponent(**args)
    if "mode" in kwargs:
        assert "single" in str(err.value) and "triple" in str(err.value)


# ---------------------------------------------------------------------------------------- exact patch
def test_exact_rank1_patch_reproduces_w_z() -> None:
    g = torch.Generator().manual_seed(0)
    u, z = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    w = torch.randn(40, 16, generator=g) / 4
    v_a, v_b = exact_rank1_patch(u, z, w)
    assert v_a.shape == (2, 5, 16) and v_b.shape == (2, 5, 40)
    patched = torch.einsum("bsi,bsio->bso", u, w.t() + torch.einsum("bsi,bso->bsio", v_a, v_b))
    torch.testing.assert_close(patched, z @ w.t(), **TOL)
    torch.testing.assert_close(u @ w.t() + rank1_modulation(u, v_a, v_b), z @ w.t(), **TOL)
    assert patch_gap(v_a, v_b, v_a, v_b, u).item() < 1e-6


def _swiglu_block() -> tuple[torch.nn.Module, torch.nn.Module, str]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    cfg = LlamaConfig(
        hidden_size=16, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu"
    )
    return LlamaRMSNorm(16, eps=1e-6), LlamaMLP(cfg), "swiglu"


def _gelu_block() -> tuple[torch.nn.Module, torch.nn.Module, str]:
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    return torch.nn.LayerNorm(16), GPT2MLP(40, GPT2Config(n_embd=16, resid_pdrop=0.0)).eval(), "gelu"


@pytest.mark.parametrize("make_block", [_swiglu_block, _gelu_block])
def test_exact_patch_reproduces_pre_norm_block(make_block) -> None:
    norm2, mlp, kind = make_block()
    with torch.no_grad():
        for p in list(norm2.parameters()) + list(mlp.parameters()):
            p.add_(0.1 * torch.randn_like(p))  # non-trivial norm affine and biases
    h, a = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    u, z = norm2(h), norm2(h + a)
    original = h + a + mlp(z)  # residual keeps a; MLP sees norm2(h + a)
    if kind == "swiglu":
        w_in, b_in = mlp.gate_proj.weight, None
        extra_in = [(mlp.up_proj.weight, None)]
        w_out, b_out = mlp.down_proj.weight, None
    else:  # GPT-2 Conv1D stores (in, out): transpose into nn.Linear layout
        w_in, b_in = mlp.c_fc.weight.t(), mlp.c_fc.bias
        extra_in = []
        w_out, b_out = mlp.c_proj.weight.t(), mlp.c_proj.bias
    with torch.no_grad():
        va, vb = exact_rank1_patch(u, z, w_in)
        pre = torch.nn.functional.linear(u, w_in, b_in) + rank1_modulation(u, va, vb)
        torch.testing.assert_close(pre, torch.nn.functional.linear(z, w_in, b_in), **TOL)
        if kind == "swiglu":
            w_up, _ = extra_in[0]
            va2, vb2 = exact_rank1_patch(u, z, w_up)
            up = u @ w_up.t() + rank1_modulation(u, va2, vb2)
            s = mlp.act_fn(pre) * up
            torch.testing.assert_close(s, mlp.act_fn(z @ w_in.t()) * (z @ w_up.t()), **TOL)
        else:
            s = mlp.act(pre)
        # the MLP output of the patched u equals the MLP output at z
        torch.testing.assert_close(torch.nn.functional.linear(s, w_out, b_out), mlp(z), **TOL)
        # down-projection patch v_a = s/|s|², v_b = a re-adds the attention output dropped from the residual
        out = torch.nn.functional.linear(s, w_out, b_out) + rank1_modulation(s, *exact_down_patch(s, a))
        torch.testing.assert_close(h + out, original, **TOL)


def test_patch_gap_of_learned_component() -> None:
    norm2 = torch.nn.LayerNorm(16)
    w = torch.randn(40, 16) / 4
    h, a = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    u, z = norm2(h), norm2(h + a)
    va_x, vb_x = exact_rank1_patch(u, z, w)
    comp = NPComponent(16, 40, rank=2, num_ranks=3, init_scale=1.0, seed=0)
    fac = comp.factors(a)
    gap = patch_gap(fac.v_a, fac.v_b, va_x, vb_x, u)
    torch.testing.assert_close(gap, modulation_gap(comp.modulation(a, u), vb_x), **TOL)
    assert gap.item() > 0.1  # a random component is far from the exact patch
    # the exact patch stacked as k = 1 has no gap; a zero modulation has gap 1
    assert patch_gap(va_x.unsqueeze(-2), vb_x.unsqueeze(-2), va_x, vb_x, u).item() < 1e-5
    torch.testing.assert_close(modulation_gap(torch.zeros_like(vb_x), vb_x), torch.tensor(1.0))
