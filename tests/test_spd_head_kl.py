"""The output head fused into the KL losses (losses.head_kl_loss, ComponentModel's output_head): the same
losses and gradients as the head's logits through kl_from_logits, for our GPT and transformers' GPT-2
and Llama, every KL training term included; set only where it is valid."""

import copy

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_modules.gpt.config import GPTConfig
from lightning_modules.gpt.model import GPT
from lightning_modules.spd import losses as L
from lightning_modules.spd.component_model import ComponentModel
from lightning_modules.spd.objective import SPDObjective
from lightning_modules.spd.targets import output_head_name
from lightning_modules.spd.toy_models import TMSModel

GPT_PATTERNS = {
    "transformer.h.*.attn.c_attn": 6,
    "transformer.h.*.mlp.c_fc": 5,
    "transformer.h.*.mlp.c_proj": 4,
}
# every term that runs a masked forward against the output, PGD ones included
TERMS = {
    "importance_minimality": 1e-3,
    "stochastic_recon": 1.0,
    "stochastic_recon_layerwise": 1.0,
    "stochastic_recon_subset": 1.0,
    "ci_masked_recon": 1.0,
    "ci_masked_recon_layerwise": 1.0,
    "ci_masked_recon_subset": 1.0,
    "unmasked_recon": 1.0,
    "pgd_recon": 1.0,
    "pgd_recon_layerwise": 1.0,
    "pgd_recon_subset": 1.0,
}


def tiny_gpt(vocab: int = 96) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16)).eval()


def tokens(vocab: int = 96, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def objective_and_grads(cm: ComponentModel, x: torch.Tensor) -> tuple[dict, dict]:
    objective = SPDObjective(dict(TERMS), output_loss_type="kl")
    torch.manual_seed(3)
    out = objective(cm, x, 0.5, torch.Generator().manual_seed(4))
    cm.zero_grad()
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in cm.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.terms.items()}, grads


def assert_fused_equals_unfused(target: torch.nn.Module, patterns: dict[str, int], x: torch.Tensor) -> None:
    plain = ComponentModel(copy.deepcopy(target), patterns, "shared_mlp", [6])
    fused = copy.deepcopy(plain)
    fused.output_head = "lm_head"
    calls = []
    original = L._HeadKL.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    terms_plain, grads_plain = objective_and_grads(plain, x)
    L._HeadKL.apply = counting
    try:
        terms_fused, grads_fused = objective_and_grads(fused, x)
    finally:
        L._HeadKL.apply = original
    assert len(calls) > len(TERMS)  # the layerwise terms run one fused KL per module
    assert terms_plain.keys() == terms_fused.keys() == TERMS.keys()
    for k in TERMS:
        torch.testing.assert_close(terms_fused[k], terms_plain[k], rtol=1e-5, atol=1e-7, msg=k)
    assert grads_plain.keys() == grads_fused.keys() and grads_plain
    for n in grads_plain:
        torch.testing.assert_close(grads_fused[n], grads_plain[n], rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------- the fused function
@pytest.mark.parametrize(("rows", "vocab", "bias"), [(20, 2**15, True), (7, 50, False), (64, 4096, False)])
def test_head_kl_equals_kl_of_the_logits_value_and_gradient(rows, vocab, bias):
    # 2**15 vocab: blocks of 8 rows, the last one partial; 50: one block
    g = torch.Generator().manual_seed(0)
    d = 12
    weight = torch.randn(vocab, d, generator=g)
    b = torch.randn(vocab, generator=g) if bias else None
    target = L.KLTarget.from_logits(torch.randn(rows, vocab, generator=g) * 3)
    h0 = torch.randn(rows, d, generator=g)
    h_ref, h = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    ref = L.kl_from_logits(F.linear(h_ref, weight, b), target)
    ours = L.head_kl_loss(h, weight, b, target)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    (2.5 * ref).backward()
    (2.5 * ours).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # the value alone, without forming the gradient
        torch.testing.assert_close(L.head_kl_loss(h0, weight, b, target), ref.detach(), rtol=1e-5, atol=1e-6)


def test_compiled_kl_block_gives_the_eager_values_and_gradients():
    # the torch.compile'd block (ComponentModel.compiled_kl) against the eager one, fused head and unfused
    # KL alike; 40 rows of a 2000 vocabulary are one block of one shape for both (one compilation)
    g = torch.Generator().manual_seed(3)
    weight, b = torch.randn(2000, 16, generator=g), torch.randn(2000, generator=g)
    target = L.KLTarget.from_logits(torch.randn(40, 2000, generator=g) * 3)
    h0 = torch.randn(40, 16, generator=g)
    compiled = L.compiled_kl_block()
    assert L.compiled_kl_block() is compiled  # compiled once
    for loss in (
        lambda h, block: L.head_kl_loss(h, weight, b, target, block),
        lambda h, block: L.kl_from_logits(F.linear(h, weight, b), target, block),
    ):
        h_eager, h_compiled = h0.clone().requires_grad_(), h0.clone().requires_grad_()
        eager, fused = loss(h_eager, L.kl_block), loss(h_compiled, compiled)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
        eager.backward()
        fused.backward()
        torch.testing.assert_close(h_compiled.grad, h_eager.grad, rtol=1e-5, atol=1e-7)


def test_kl_from_logits_leaves_the_logits_as_they_were():
    logits = torch.randn(30, 500) * 2
    before = logits.clone()
    L.kl_from_logits(logits, L.KLTarget.from_logits(torch.randn(30, 500)))
    assert torch.equal(logits, before)


def test_head_kl_gradient_keeps_its_precision_when_the_kl_is_small():
    # a target close to the head's own softmax (KL ~1e-6): the float32 path forms the gradient as
    # (exp(z - m) W) / s - pW, whose subtraction cancels; it must stay as close to the unfused gradient
    # (softmax(z) - p) W, relative to its size, as that one is to a float64 reference
    g = torch.Generator().manual_seed(1)
    weight, h0 = torch.randn(2000, 32, generator=g), torch.randn(40, 32, generator=g)
    target = L.KLTarget.from_logits(h0 @ weight.T + 1e-3 * torch.randn(40, 2000, generator=g))
    h_ref, h = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    ref = L.kl_from_logits(F.linear(h_ref, weight), target)
    ours = L.head_kl_loss(h, weight, None, target)
    ref.backward()
    ours.backward()
    h64 = h0.double().requires_grad_()
    log_p = torch.log(target.probs.double())
    exact = (log_p.exp() * (log_p - torch.log_softmax(h64 @ weight.double().T, -1))).sum(-1).mean()
    exact.backward()
    scale = h64.grad.abs().max().item()
    assert 0 < exact.item() < 1e-4
    err_ours = (h.grad.double() - h64.grad).abs().max().item() / scale
    err_ref = (h_ref.grad.double() - h64.grad).abs().max().item() / scale
    assert err_ours < max(4 * err_ref, 1e-4), (err_ours, err_ref)
    assert abs(ours.item() - exact.item()) < 5e-7  # the value's p . z from the rounded logits


def test_head_projection_is_formed_once_per_head():
    target = L.KLTarget.from_logits(torch.randn(6, 30))
    w1, w2 = torch.randn(30, 4), torch.randn(30, 4)
    pw = target.head_projection(w1)
    assert target.head_projection(w1) is pw  # cached
    torch.testing.assert_close(pw, target.probs @ w1)
    torch.testing.assert_close(target.head_projection(w2), target.probs @ w2)


def test_head_kl_keeps_leading_dims_and_refuses_a_trainable_head():
    weight = torch.randn(30, 8)
    target = L.KLTarget.from_logits(torch.randn(2, 5, 30))
    h = torch.randn(2, 5, 8)
    torch.testing.assert_close(
        L.head_kl_loss(h, weight, None, target), L.kl_from_logits(h @ weight.T, target), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="frozen head"):
        L.head_kl_loss(h, weight.requires_grad_(), None, target)


def test_head_kl_under_bf16_autocast_is_close_to_the_unfused_form():
    g = torch.Generator().manual_seed(0)
    weight, h0 = torch.randn(300, 16, generator=g), torch.randn(24, 16, generator=g)
    target = L.KLTarget.from_logits(torch.randn(24, 300, generator=g))
    h_ref, h = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = L.kl_from_logits(F.linear(h_ref, weight), target)
        ours = L.head_kl_loss(h, weight, None, target)
    ref.backward()
    ours.backward()
    assert h.grad.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=5e-2, atol=2e-3)


def test_head_kl_terms_of_one_batch_share_its_cpu_block_buffers_and_match_the_unfused_form():
    g = torch.Generator().manual_seed(1)
    vocab, width, rows = 4096, 16, 300  # blocks of 128, 128 and 44 rows
    weight, bias = torch.randn(vocab, width, generator=g) / 4, torch.randn(vocab, generator=g)
    target = L.KLTarget.from_logits(torch.randn(rows, vocab, generator=g))
    losses = []
    for scale in (1.0, 0.5):  # two terms of the batch, through the same buffers
        h = (scale * torch.randn(rows, width, generator=g)).requires_grad_()
        h_ref = h.detach().clone().requires_grad_()
        fused, unfused = (
            L.head_kl_loss(h, weight, bias, target),
            L.kl_from_logits(F.linear(h_ref, weight, bias), target),
        )
        fused.backward()
        unfused.backward()
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-7)
        losses.append(fused)
    assert list(target._buffers) == [(128, vocab)]  # one pair, made for the first term, reused by the second
    assert not torch.equal(losses[0], losses[1])


class _WeightCasts(TorchDispatchMode):
    """Counts the dtype conversions (aten._to_copy) of tensors of one shape."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_head_kl_under_autocast_casts_the_head_once_per_batch_and_equals_autocasts_linear():
    g = torch.Generator().manual_seed(0)
    vocab, width, rows = 4096, 16, 300  # CPU blocks of 2**19 // vocab = 128 rows: three blocks per term
    weight, bias = torch.randn(vocab, width, generator=g) / 4, torch.randn(vocab, generator=g)
    target = L.KLTarget.from_logits(torch.randn(rows, vocab, generator=g))
    h0 = torch.randn(rows, width, generator=g)
    hs = [h0.clone().requires_grad_() for _ in range(3)]
    casts = _WeightCasts(tuple(weight.shape))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with casts:
            fused = [L.head_kl_loss(h, weight, bias, target) for h in hs[:2]]  # two terms, one batch
        unfused = L.kl_from_logits(F.linear(hs[2], weight, bias), target)  # autocast's own Linear
    assert casts.count == 1
    for loss in (*fused, unfused):
        loss.backward()
    # the value from the same bfloat16 logits as autocast's Linear gives
    torch.testing.assert_close(fused[0], unfused, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[1], fused[0], rtol=0, atol=0)
    # the gradient: softmax(z) - p formed in float32, then one bfloat16 matmul with the bfloat16 head
    bf16 = torch.bfloat16
    z = F.linear(h0.to(bf16), weight.to(bf16), bias.to(bf16)).float()
    expected = (torch.softmax(z, -1) - target.probs).to(bf16) @ weight.to(bf16)
    torch.testing.assert_close(hs[0].grad, expected.float() / rows, rtol=1e-5, atol=1e-8)
    # autocast's Linear backward rounds (softmax - p) / rows to bfloat16 instead: equal to that rounding
    torch.testing.assert_close(hs[0].grad, hs[2].grad, rtol=2e-2, atol=2e-2 * hs[2].grad.abs().max().item())


# ----------------------------------------------------------------------------- ComponentModel
def test_head_input_forward_returns_the_final_hidden_states():
    cm = ComponentModel(tiny_gpt(), GPT_PATTERNS, "shared_mlp", [6], output_head="lm_head")
    x = tokens()
    ci = {
        name: torch.rand(*x.shape, C, generator=torch.Generator().manual_seed(2))
        for name, C in cm.module_to_c.items()
    }
    with torch.no_grad():
        logits = cm(x, masks=ci)
        hidden = cm(x, masks=ci, head_input=True)
        assert hidden.shape == (*x.shape, 16)
        torch.testing.assert_close(cm.target_model.lm_head(hidden), logits, rtol=0, atol=0)
        assert cm(x).shape == logits.shape  # forwards without head_input are unchanged
    assert not [k for k in cm.state_dict() if k.startswith("_head")]  # the head is not registered twice


def test_output_head_must_be_an_undecomposed_linear():
    with pytest.raises(ValueError, match="'lm_head' must name a Linear.*not decomposed"):
        ComponentModel(tiny_gpt(), {"lm_head": 4}, "shared_mlp", [6], output_head="lm_head")
    with pytest.raises(ValueError, match="'nope' must name a Linear"):
        ComponentModel(tiny_gpt(), GPT_PATTERNS, "shared_mlp", [6], output_head="nope")
    cm = ComponentModel(tiny_gpt(), GPT_PATTERNS, "shared_mlp", [6])
    with pytest.raises(ValueError, match="head_input needs output_head"):
        cm(tokens(), masks={}, head_input=True)


def test_output_head_name_only_for_language_models():
    assert output_head_name(tiny_gpt()) == "lm_head"
    assert output_head_name(TMSModel(5, 2)) is None


# ----------------------------------------------------------------------------- whole objective
def test_objective_fused_equals_unfused_on_our_gpt():
    assert_fused_equals_unfused(tiny_gpt(), GPT_PATTERNS, tokens())


def test_objective_fused_equals_unfused_on_transformers_gpt2_and_llama():
    transformers = pytest.importorskip("transformers")
    from lightning_modules.spd.targets import HFCausalLM

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    )
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32,
        )
    )  # fmt: skip
    for model, patterns in (
        (gpt2, {"transformer.h.*.attn.c_attn": 6, "transformer.h.*.mlp.c_proj": 4}),
        (llama, {"model.layers.*.self_attn.q_proj": 4, "model.layers.*.mlp.down_proj": 5}),
    ):
        target = HFCausalLM(model.eval())
        assert output_head_name(target) == "lm_head"
        assert_fused_equals_unfused(target, patterns, tokens())


def test_a_head_not_whole_here_falls_back_to_the_logits():
    # ZeRO-3 / FSDP leave a partitioned (e.g. empty) weight outside forwards: the head then runs as usual
    cm = ComponentModel(tiny_gpt(), GPT_PATTERNS, "shared_mlp", [6], output_head="lm_head")
    weight, bias = cm.fusable_head()
    assert weight is cm.target_model.lm_head.weight and bias is None
    cm.target_model.lm_head.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    assert cm.fusable_head() is None
    cm.target_model.lm_head.weight = torch.nn.Parameter(weight.detach().clone())  # trainable: not frozen
    assert cm.fusable_head() is None
    target = L.KLTarget.from_logits(torch.randn_like(cm(tokens())))  # the padded vocabulary
    ci = {name: torch.rand(2, 12, C) for name, C in cm.module_to_c.items()}
    loss = L.masked_recon_loss(cm, tokens(), target, "kl", masks=ci)
    torch.testing.assert_close(loss, L.kl_from_logits(cm(tokens(), masks=ci), target))
    assert ComponentModel(tiny_gpt(), GPT_PATTERNS, "shared_mlp", [6]).fusable_head() is None
