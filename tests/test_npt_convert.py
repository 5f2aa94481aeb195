"""NPT conversion: parity in original mode, exact modulated-weight MLPs, residual, passes, loading, bad input."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.gpt import GPT, GPTConfig
from lightning_modules.npt.convert import NPTModel, convert, load_target, parse_layers
from lightning_modules.npt.exact_patch import exact_rank1_patch, rank1_modulation

TOL = {"rtol": 1e-5, "atol": 1e-5}
VOCAB = 61


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second BLAS thread only adds contention (conftest restores the count)."""
    torch.set_num_threads(1)
    yield


def _perturb(model: nn.Module) -> nn.Module:
    """Non-trivial biases, norm gains and weights, so layouts and biases matter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def gpt_gelu() -> nn.Module:
    return _perturb(GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=4, n_head=2, n_embd=16)))


def gpt_swiglu() -> nn.Module:
    cfg = GPTConfig(
        block_size=32, vocab_size=VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=16, mlp="swiglu", rope=True
    )
    return _perturb(GPT(cfg))


def hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=4, n_head=2, n_embd=16, n_positions=32, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    )
    return _perturb(GPT2LMHeadModel(cfg))


def hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=32,
        vocab_size=VOCAB,
    )
    return _perturb(LlamaForCausalLM(cfg))


TARGETS: dict[str, Callable[[], nn.Module]] = {
    "gpt_gelu": gpt_gelu,
    "gpt_swiglu": gpt_swiglu,
    "hf_gpt2": hf_gpt2,
    "hf_llama": hf_llama,
}
GATED = {"gpt_gelu": False, "gpt_swiglu": True, "hf_gpt2": False, "hf_llama": True}


def _logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return model(idx) if isinstance(model, GPT) else model(input_ids=idx, use_cache=False).logits


def _idx(b: int = 2, s: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(3))


def _converted(
    name: str, layers="all", mode: str = "single", k: int = 3, r: int = 2
) -> tuple[nn.Module, NPTModel]:
    model = TARGETS[name]()
    ref = copy.deepcopy(model)
    return ref, convert(model, layers, rank=r, num_ranks=k, mode=mode, init_scale=1.0, seed=0)


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(TARGETS))
def test_original_mode_matches_unconverted_logits(name: str) -> None:
    ref, npt = _converted(name, mode="triple" if GATED[name] else "single")
    idx = _idx()
    with torch.no_grad():
        want = _logits(ref, idx)
        with npt.original():
            got = npt(idx)
        npt_logits = npt(idx)  # NPT mode differs (attention dropped from the residual)
        with npt.mode("exact"):  # Dherin et al.'s exact rank-1 patches reproduce the original
            exact = npt(idx)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(exact, want, rtol=1e-4, atol=1e-4)
    assert (npt_logits - want).abs().max() > 1e-3
    assert all(layer.mode == "npt" for layer in npt.npt_layers)  # the context manager restores the mode


@pytest.mark.parametrize("name", list(TARGETS))
def test_shared_attention_target_equals_block_output(name: str) -> None:
    """The free-running target h + a + MLP(norm2(h + a)) equals the wrapped block's own output."""
    _, npt = _converted(name, layers=[2])
    npt.teacher_forward(_idx())
    layer = npt.npt_layers[0]
    h, want = layer.io["teacher_input"], layer.io["teacher_output"]
    logits, outputs, targets = npt.student_forward(_idx(), teacher_forced=False)
    torch.testing.assert_close(targets[0], want, **TOL)
    torch.testing.assert_close(layer.original_from_attention(h, layer.io["a"]), want, **TOL)


# ---------------------------------------------------------------------------------------------- exactness
def _set_known_rank1(layer: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """k = r = 1: z = a·w, ΔW_target = z² α βᵀ per token; returns w and each target's (α, β)."""
    np_ = layer.np
    d = np_.d_model
    known = {"w": 30 * torch.randn(d, generator=gen) / d**0.5}  # GPT-style inits give small a
    with torch.no_grad():
        np_.W_down.copy_(known["w"].view(1, d, 1))
        for target, (name_a, name_b) in {
            "in": ("W_a_up", "W_b_up"),
            "up": ("W_a_up", "W_b2_up"),
            "down": ("W_a3_up", "W_b3_up"),
        }.items():
            if target not in np_.targets:
                continue
            a_param, b_param = getattr(np_, name_a), getattr(np_, name_b)
            if target != "up":  # "up" shares v_a with "in"
                a_param.copy_(torch.randn(a_param.shape, generator=gen))
            b_param.copy_(torch.randn(b_param.shape, generator=gen) * 0.3)
            known[target] = (a_param[0, 0].clone(), b_param[0, 0].clone())
    return known


def _dense_in_out(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W in (in, out) layout, bias): Conv1D stores (in, out) already; nn.Linear stores (out, in)."""
    if type(module).__name__ == "Conv1D":
        return module.weight, module.bias
    return module.weight.t(), module.bias


def _per_token(
    x: torch.Tensor, w_io: torch.Tensor, delta: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (b, s, i) through the per-token dense weight W + ΔW (b, s, i, o) -> (b, s, o)."""
    w = w_io.expand(*x.shape[:2], *w_io.shape) if delta is None else w_io + delta
    y = torch.einsum("bsi,bsio->bso", x, w)
    return y if bias is None else y + bias


@pytest.mark.parametrize("name", list(TARGETS))
def test_npt_layer_equals_dense_mlp_with_modulated_weight(name: str) -> None:
    mode = "triple" if GATED[name] else "single"
    _, npt = _converted(name, layers=[1], mode=mode, k=1, r=1)
    layer = npt.npt_layers[0]
    known = _set_known_rank1(layer, torch.Generator().manual_seed(5))
    npt.teacher_forward(_idx())
    with torch.no_grad():
        npt.student_forward(_idx(), teacher_forced=True)
    h, a, u, out = (layer.io[k] for k in ("input", "a", "u", "output"))
    z = a @ known["w"]  # (b, s)

    def delta(target: str) -> torch.Tensor:  # (b, s, n_in, n_out): the known per-token rank-1 update
        alpha, beta = known[target]
        return (z**2)[..., None, None] * torch.outer(alpha, beta)

    in_proj, up_proj, down_proj = layer.mlp_modules()
    w_in, b_in = _dense_in_out(in_proj)
    s = layer.act(_per_token(u, w_in, delta("in"), b_in))
    if up_proj is not None:
        w_up, b_up = _dense_in_out(up_proj)
        s = s * _per_token(u, w_up, delta("up"), b_up)
    w_down, b_down = _dense_in_out(down_proj)
    y = _per_token(s, w_down, delta("down") if mode == "triple" else None, b_down)
    torch.testing.assert_close(out, h + y, **TOL)
    # and the update is not negligible: the unmodulated MLP differs
    assert (out - (h + layer.original_mlp(u))).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(TARGETS))
def test_attention_output_is_not_added_to_the_residual(name: str) -> None:
    """With ΔW = 0 an NPT layer is h + MLP(norm2(h)) whatever the attention output is."""
    _, npt = _converted(name, layers=[2])
    layer = npt.npt_layers[0]
    with torch.no_grad():
        layer.np.W_b_up.zero_()  # v_b = 0 -> ΔW = 0
    npt.teacher_forward(_idx())
    h = layer.io["teacher_input"]
    with torch.no_grad():
        _, outputs, _ = npt.student_forward(_idx(), teacher_forced=True)
        torch.testing.assert_close(outputs[0], h + layer.original_mlp(layer.norm2(h)), **TOL)
        attn = layer.block.attn if hasattr(layer.block, "attn") else layer.block.self_attn
        out_proj = attn.c_proj if hasattr(attn, "c_proj") else attn.o_proj
        out_proj.weight.mul_(1000.0)  # a huge attention output changes nothing
        _, outputs2, _ = npt.student_forward(_idx(), teacher_forced=True)
    torch.testing.assert_close(outputs2[0], outputs[0], **TOL)
    assert layer.io["a"].abs().max() > 1.0


# ---------------------------------------------------------------------------------------------- passes
def test_teacher_forced_and_free_running_passes() -> None:
    _, npt = _converted("gpt_gelu", layers=[1, 3])
    calls: list[int] = []
    for i, block in enumerate(npt.layers):
        inner = block.block if hasattr(block, "block") else block
        inner.register_forward_pre_hook(lambda m, args, i=i: calls.append(i))
    idx = _idx()
    teacher = npt.teacher_forward(idx)
    assert calls == [0, 1, 2, 3]
    t_in = [layer.io["teacher_input"] for layer in npt.npt_layers]
    t_out = [layer.io["teacher_output"] for layer in npt.npt_layers]

    calls.clear()
    tf_logits, tf_out, tf_tgt = npt.student_forward(idx, teacher_forced=True)
    assert calls == []  # layers 0 and 2 skipped; converted blocks run their parts, never block.forward
    for layer, h in zip(npt.npt_layers, t_in):
        assert torch.equal(layer.io["input"], h)  # each NPT layer read the teacher's hidden state
    assert all(torch.equal(a, b) for a, b in zip(tf_tgt, t_out))

    calls.clear()
    fr_logits, fr_out, fr_tgt = npt.student_forward(idx, teacher_forced=False)
    assert calls == [2]  # layer 0 skipped, layer 2 (unconverted) runs on the NPT output of layer 1
    first, last = npt.npt_layers
    assert torch.equal(first.io["input"], t_in[0])  # the first converted layer's input is the teacher's
    assert not torch.allclose(last.io["input"], t_in[1])  # later ones see the NPT model's own states
    with torch.no_grad():
        torch.testing.assert_close(fr_tgt[1], last.block(last.io["input"]), **TOL)  # target on the same input
    torch.testing.assert_close(fr_out[0], tf_out[0], **TOL)  # same input -> same first-layer loss
    rel = [((o - t).square().mean() / t.square().mean()).item() for o, t in zip(fr_out, fr_tgt)]
    rel_tf = [((o - t).square().mean() / t.square().mean()).item() for o, t in zip(tf_out, tf_tgt)]
    assert rel[0] == pytest.approx(rel_tf[0], rel=1e-5) and rel[1] != pytest.approx(rel_tf[1], rel=1e-3)
    assert not torch.allclose(tf_logits, fr_logits) and not torch.allclose(fr_logits, teacher)
    assert all(isinstance(b, nn.Module) and type(b).__name__ != "SkipLayer" for b in npt.layers)  # restored
    with pytest.raises(RuntimeError, match="teacher_forward"):
        npt.clear()
        npt.student_forward(idx, teacher_forced=True)


@pytest.mark.parametrize("name", ["gpt_swiglu", "hf_gpt2"])
def test_modulation_gap_zero_for_exact_patch_and_finite_for_learned(name: str, monkeypatch) -> None:
    _, npt = _converted(name, layers=[2])
    layer = npt.npt_layers[0]
    npt.teacher_forward(_idx())
    with torch.no_grad():
        npt.student_forward(_idx(), teacher_forced=True)
    stats = layer.np_stats()
    assert set(stats) >= {"v_a_norm", "v_b_norm", "cos_v_a_a", "modulation_norm", "modulation_gap"}
    assert all(torch.isfinite(v) for v in stats.values()) and stats["modulation_gap"] > 0
    h, a, u = layer.io["input"], layer.io["a"], layer.io["u"]
    in_w = layer.linear_weight(layer.mlp_modules()[0])
    exact = rank1_modulation(u, *exact_rank1_patch(u, layer.norm2(h + a), in_w))
    monkeypatch.setattr(layer.np, "modulation", lambda a, u, target="in", z=None: exact)
    assert layer.np_stats()["modulation_gap"].item() == pytest.approx(0.0, abs=1e-6)


def test_only_np_parameters_train_and_base_is_frozen() -> None:
    _, npt = _converted("hf_llama", layers="2:4", mode="dual")
    trainable = {n for n, p in npt.named_parameters() if p.requires_grad}
    assert trainable and all(".np." in n for n in trainable)
    assert {id(p) for p in npt.np_parameters()} == {id(p) for p in npt.parameters() if p.requires_grad}
    npt.train()
    assert not any(m.training for m in npt.model.modules())  # frozen target runs in eval (no dropout)


# ---------------------------------------------------------------------------------------------- loading
def test_load_targets_from_checkpoint_and_transformers_dirs(tmp_path) -> None:
    idx = _idx()
    gpt = gpt_gelu()
    ckpt = tmp_path / "tiny.ckpt"
    torch.save(
        {
            "gpt_architecture": gpt.config.architecture(),
            "state_dict": {f"model.{k}": v for k, v in gpt.state_dict().items()},
        },
        ckpt,
    )
    loaded, family = load_target(str(ckpt))
    assert family == "gpt"
    torch.testing.assert_close(_logits(loaded, idx), _logits(gpt, idx), **TOL)
    with pytest.raises(ValueError, match="n_layer"):
        load_target(str(ckpt), config={"n_layer": 6})  # a checkpoint that does not match the config
    for make, fam in ((hf_gpt2, "gpt2"), (hf_llama, "llama")):
        model = make()
        model.save_pretrained(tmp_path / fam)
        loaded, family = load_target(str(tmp_path / fam))
        assert family == fam
        torch.testing.assert_close(_logits(loaded, idx), _logits(model, idx), **TOL)
    ours, family = load_target(str(tmp_path / "gpt2"), family="gpt")  # a GPT-2 dir read into our GPT
    assert family == "gpt" and isinstance(ours, GPT)
    with pytest.raises(ValueError, match="target_family"):
        load_target(str(tmp_path / "llama"), family="gpt2")
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_target(str(tmp_path / "llama"), config={"num_hidden_layers": 9})
    fresh, family = load_target(None, "llama", {"hidden_size": 32, "num_hidden_layers": 2})
    assert family == "llama" and fresh.config.num_key_value_heads == 2


# ---------------------------------------------------------------------------------------------- bad input
def test_parse_layers() -> None:
    assert parse_layers(None, 6) == [3, 4, 5] and parse_layers("upper", 1) == [0]
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("1:3", 6) == [1, 2]
    assert parse_layers("4:", 6) == [4, 5] and parse_layers(":2", 6) == [0, 1]
    assert (
        parse_layers([3, 1, 3], 6) == [1, 3]
        and parse_layers("0,5", 6) == [0, 5]
        and parse_layers(2, 6) == [2]
    )


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (4, "out of range"),
        ([0, -1], "out of range"),
        ("3:2", "bad layer spec"),
        ("1:9", "bad layer spec"),
        ("x", "bad layer spec"),
        ([], "selects no layer"),
        ([1.5], "out of range"),
    ],
)
def test_bad_layer_specs_raise(spec, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        convert(gpt_gelu(), spec)
    assert "valid" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"rank": 0}, "rank"), ({"num_ranks": 0}, "num_ranks"), ({"mode": "quad"}, "mode")]
)
def test_bad_np_settings_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        convert(gpt_gelu(), **kwargs)


def test_unsupported_targets_raise(tmp_path) -> None:
    with pytest.raises(ValueError, match="unsupported target"):
        convert(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="non-gated MLP"):
        convert(hf_gpt2(), mode="dual")  # GPT-2 has no up projection to modulate
    model = gpt_gelu()
    model.transformer.h[3].mlp.c_fc = None
    with pytest.raises(ValueError, match="no supported MLP"):
        convert(model, [3])
    npt = convert(gpt_gelu())
    with pytest.raises(ValueError, match="already converted"):
        convert(npt.model)
    from transformers import BertConfig

    BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'bert'.*\['gpt2', 'llama'\]"):
        load_target(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_target(str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="unknown target family"):
        load_target(None, "mistral")
    with pytest.raises(ValueError, match="load_in_8bit"):
        load_target(None, "llama", load_in_8bit=True)
    with pytest.raises(ValueError, match="unknown layer mode"), npt.mode("teacher"):
        pass


def test_parity_holds_with_f_linear_modules() -> None:
    """Sanity: the helper layouts above agree with the modules (Conv1D x W + b, Linear x Wᵀ + b)."""
    model = hf_gpt2()
    conv = model.transformer.h[0].mlp.c_fc
    x = torch.randn(2, 3, 16)
    w, b = _dense_in_out(conv)
    torch.testing.assert_close(conv(x), x @ w + b, **TOL)
    lin = gpt_gelu().transformer.h[0].mlp.c_fc
    w, b = _dense_in_out(lin)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), **TOL)
