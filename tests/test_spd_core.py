"""SPD core (pure PyTorch): sigmoids, components, CI functions, ComponentModel hooks, losses, toys, metrics.

Masked forwards are checked against a naive path that, for every (example, position), loads the
target's state into a fresh hook-free copy, overwrites each decomposed weight with its explicit
effective weight (V diag(m) U)^T + r Delta (routing: the target weight where not routed), and runs
that single token.
"""

import copy
import math
from itertools import permutations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from datamodules.sparse_features import sparse_feature_batch
from lightning_modules.spd import losses as L
from lightning_modules.spd.ci_functions import MLPCiFn, SharedMLPCiFn, VectorMLPCiFn, make_ci_fn
from lightning_modules.spd.component_model import (
    ComponentModel,
    stochastic_masks,
    uniform_k_subset_routing_masks,
    weight_delta_masks,
)
from lightning_modules.spd.components import EmbeddingComponents, LinearComponents, target_weight
from lightning_modules.spd.metrics import (
    AliveComponentsTracker,
    ci_l0,
    identity_ci_error,
    identity_ci_errors,
    linear_sum_assignment_max,
    mmcs_ml2r,
)
from lightning_modules.spd.sigmoids import SIGMOIDS, get_sigmoid
from lightning_modules.spd.toy_models import ResidMLP, TMSModel, check_tms_target, train_toy_model

# ----------------------------------------------------------------------------- fixtures


class TinyLM(nn.Module):
    """Embedding -> Linear -> ReLU -> Conv1D -> Linear head; positions never mix (for the naive path)."""

    def __init__(self, vocab: int = 11, d: int = 6, d_mlp: int = 8, d_out: int = 5) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d_mlp)
        self.proj = Conv1D(d_out, d_mlp)  # HF layout: weight (d_in, d_out)
        nn.init.normal_(self.proj.weight, std=0.3)
        nn.init.normal_(self.proj.bias, std=0.3)
        self.head = nn.Linear(d_out, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(F.relu(self.fc(self.wte(ids)))))


PATTERNS = {"wte": 4, "fc": 5, "proj": 3, "head": 6}


def make_cm(**kw) -> ComponentModel:
    return ComponentModel(TinyLM(), PATTERNS, **kw)


def naive_forward(cm, ids, masks, deltas=None, routing=None, capture_inputs=False):
    """Loop over (b, t): explicit per-token effective weights in a fresh, hook-free copy of the target."""
    B, T = ids.shape
    outs = torch.zeros(B, T, cm(ids).shape[-1])
    inputs = {name: [[None] * T for _ in range(B)] for name in cm.module_names}
    for b in range(B):
        for t in range(T):
            net = TinyLM()
            net.load_state_dict(cm.target_model.state_dict())
            for name in masks:
                if routing is not None and name in routing and not routing[name][b, t]:
                    continue
                comp = cm.component(name)
                w = comp.V @ torch.diag(masks[name][b, t]) @ comp.U  # (d_in, d_out) / (vocab, d)
                if isinstance(comp, LinearComponents):
                    w = w.T  # (d_out, d_in)
                if deltas is not None:
                    delta, r = deltas[name]
                    w = w + r[b, t] * delta
                mod = net.get_submodule(name)
                mod.weight.data = w.T.clone() if isinstance(mod, Conv1D) else w.clone()
            handles = []
            for name in cm.module_names:

                def grab(_m, args, _o, name=name, b=b, t=t):
                    inputs[name][b][t] = args[0][0, 0]

                handles.append(net.get_submodule(name).register_forward_hook(grab))
            with torch.no_grad():
                outs[b, t] = net(ids[b : b + 1, t : t + 1])[0, 0]
            for h in handles:
                h.remove()
    if capture_inputs:
        return outs, {n: torch.stack([torch.stack(row) for row in v]) for n, v in inputs.items()}
    return outs


def random_ci(cm, B, T, gen=None):
    return {n: torch.rand(B, T, C, generator=gen) for n, C in cm.module_to_c.items()}


# ----------------------------------------------------------------------------- sigmoids


def test_lower_leaky_forward_and_backward():
    f = get_sigmoid("lower_leaky_hard")
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, -0.5, 0.3], requires_grad=True)
    y = f(x)
    assert torch.equal(y, x.detach().clamp(0, 1))
    g = torch.tensor([-1.0, 2.0, -3.0, 4.0, -5.0, 6.0, 7.0, -8.0])
    (y * g).sum().backward()
    # x<=0: 0.01 g only when g<0; 0<x<=1: g; x>1: 0
    expected = torch.tensor([-0.01, 0.0, -0.03, 4.0, -5.0, 0.0, 0.0, -8.0])
    assert torch.allclose(x.grad, expected)


def test_upper_leaky_and_other_sigmoids():
    x = torch.tensor([-2.0, 0.0, 0.5, 1.0, 3.0], requires_grad=True)
    y = get_sigmoid("upper_leaky_hard")(x)
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.02]))
    y.sum().backward()
    assert torch.allclose(x.grad[[0, 2, 4]], torch.tensor([0.0, 1.0, 0.01]))  # (kinks: clamp's convention)
    assert torch.allclose(get_sigmoid("hard")(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(get_sigmoid("leaky_hard")(x), torch.tensor([-0.02, 0.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(get_sigmoid("sigmoid")(x), torch.sigmoid(x))
    sw = get_sigmoid("swish_hard")(torch.tensor([-5.0, 0.5, 5.0]))
    assert torch.allclose(sw, torch.tensor([0.0, 0.5, 1.0]), atol=1e-4)
    with pytest.raises(ValueError, match="lower_leaky_hard"):
        get_sigmoid("nope")
    assert set(SIGMOIDS) >= {"lower_leaky_hard", "upper_leaky_hard", "hard", "leaky_hard", "sigmoid"}


# ----------------------------------------------------------------------------- components


def test_linear_components_reproduce_linear():
    lin = nn.Linear(4, 3)
    comp = LinearComponents(4, 3, C=4, bias=lin.bias)
    with torch.no_grad():
        comp.V.copy_(torch.eye(4))  # V U = W^T
        comp.U.copy_(lin.weight.T)
    x = torch.randn(2, 5, 4)
    assert torch.allclose(comp.weight, lin.weight)
    assert torch.allclose(comp(x), lin(x), atol=1e-6)
    assert torch.allclose(comp.component_acts(x), x)
    mask = torch.rand(2, 5, 4)
    assert torch.allclose(comp(x, mask=mask), (x * mask) @ lin.weight.T + lin.bias, atol=1e-6)
    delta, dm = torch.randn(3, 4), torch.rand(2, 5)
    expect = (x * mask) @ lin.weight.T + dm[..., None] * (x @ delta.T) + lin.bias
    assert torch.allclose(comp(x, mask, delta, dm), expect, atol=1e-6)


def test_embedding_components_and_target_weight_layouts():
    emb = EmbeddingComponents(7, 3, C=2)
    ids = torch.tensor([[0, 6, 2]])
    assert torch.equal(emb.component_acts(ids), emb.V[ids])
    assert torch.allclose(emb(ids), emb.weight[ids], atol=1e-6)
    conv = Conv1D(5, 4)  # nf=5 (out), nx=4 (in): weight (4, 5)
    assert target_weight(conv).shape == (5, 4)
    assert torch.equal(target_weight(conv), conv.weight.T)
    assert target_weight(nn.Linear(4, 5)).shape == (5, 4)
    with pytest.raises(ValueError):
        target_weight(nn.ReLU())


def test_component_init_scales():
    comp = LinearComponents(400, 300, C=200)
    assert abs(comp.V.std().item() - 1 / math.sqrt(400)) < 0.005
    assert abs(comp.U.std().item() - 1 / math.sqrt(200)) < 0.005


# ----------------------------------------------------------------------------- CI functions


def test_ci_functions_match_per_component_loops():
    C, d_in = 3, 4
    g, x = torch.randn(2, 5, C), torch.randn(2, 5, d_in)
    mlp = MLPCiFn(C, [6, 7])
    out = mlp(g)
    assert out.shape == (2, 5, C)
    for c in range(C):
        h = g[..., c : c + 1] @ mlp.weights[0][c] + mlp.biases[0][c]
        h = F.gelu(h) @ mlp.weights[1][c] + mlp.biases[1][c]
        h = F.gelu(h) @ mlp.weights[2][c] + mlp.biases[2][c]
        assert torch.allclose(out[..., c], h[..., 0], atol=1e-5)
    vec = VectorMLPCiFn(C, d_in, [6])
    out = vec(x)
    for c in range(C):
        h = F.gelu(x @ vec.weights[0][c] + vec.biases[0][c]) @ vec.weights[1][c] + vec.biases[1][c]
        assert torch.allclose(out[..., c], h[..., 0], atol=1e-5)
    shared = make_ci_fn("shared_mlp", C, d_in, [6])
    assert isinstance(shared, SharedMLPCiFn) and shared(x).shape == (2, 5, C)
    assert make_ci_fn("mlp", C, d_in, [])(g).shape == (2, 5, C)
    with pytest.raises(ValueError, match="vector_mlp"):
        make_ci_fn("gru", C, d_in, [4])


# ----------------------------------------------------------------------------- ComponentModel


def test_pattern_errors_name_the_pattern():
    with pytest.raises(ValueError, match="'nomatch\\*'.*candidates.*'fc'"):
        ComponentModel(TinyLM(), {"nomatch*": 2})
    with pytest.raises(ValueError, match="'f\\*'.*'fc'|'fc'.*'f\\*'"):
        ComponentModel(TinyLM(), {"fc": 2, "f*": 3})
    with pytest.raises(ValueError, match="'fc'"):
        ComponentModel(TinyLM(), {"fc": 0})
    with pytest.raises(ValueError, match="Embedding"):
        ComponentModel(TinyLM(), {"wte": 2}, ci_fn_type="vector_mlp")
    cm = ComponentModel(TinyLM(), {"*": 2})  # non-decomposable matches (the root "") are skipped
    assert cm.module_names == ["wte", "fc", "proj", "head"]
    assert not any(p.requires_grad for p in cm.target_model.parameters())


def test_delta_with_unit_mask_reproduces_target_exactly():
    cm = make_cm()
    ids = torch.randint(0, 11, (3, 4))
    target = cm(ids)
    ones = {n: torch.ones(C) for n, C in cm.module_to_c.items()}
    deltas = {n: (d, None) for n, d in cm.weight_deltas().items()}
    out = cm(ids, masks=ones, weight_deltas_and_masks=deltas)
    assert torch.allclose(out, target, atol=1e-5)
    # components alone (no delta) differ: they are random
    assert not torch.allclose(cm(ids, masks=ones), target, atol=1e-3)


def test_persistent_hooks_do_not_grow_and_plain_forward_untouched():
    cm = make_cm()
    mods = [cm.target_model.get_submodule(n) for n in cm.module_names]
    counts = [len(m._forward_hooks) for m in mods]
    assert counts == [1, 1, 1, 1]
    ids = torch.randint(0, 11, (2, 3))
    ci = random_ci(cm, 2, 3)
    for _ in range(3):
        cm(ids, masks=stochastic_masks(ci), cache_acts=True)
        cm(ids)
    assert [len(m._forward_hooks) for m in mods] == counts
    net = TinyLM()
    net.load_state_dict(cm.target_model.state_dict())
    assert torch.equal(cm(ids), net(ids))
    out = cm(ids, cache_acts=True)
    assert torch.equal(out.output, net(ids)) and set(out.cache) == set(cm.module_names)
    assert torch.equal(out.cache["wte"], ids)


@pytest.mark.parametrize("with_delta", [False, True])
def test_masked_forward_matches_naive(with_delta):
    torch.manual_seed(1)
    cm = make_cm()
    B, T = 2, 3
    ids = torch.randint(0, 11, (B, T))
    ci = random_ci(cm, B, T)
    masks = stochastic_masks(ci)
    deltas = weight_delta_masks(ci, cm.weight_deltas()) if with_delta else None
    out = cm(ids, masks=masks, weight_deltas_and_masks=deltas)
    with torch.no_grad():
        ref = naive_forward(cm, ids, masks, deltas)
    assert torch.allclose(out, ref, atol=1e-5)
    # a subset of modules masked, the rest the target
    sub = {k: masks[k] for k in ("fc", "head")}
    sub_d = {k: deltas[k] for k in sub} if deltas else None
    with torch.no_grad():
        assert torch.allclose(
            cm(ids, masks=sub, weight_deltas_and_masks=sub_d), naive_forward(cm, ids, sub, sub_d), atol=1e-5
        )
    # per-position routing
    routing = uniform_k_subset_routing_masks(cm.module_names, (B, T))
    with torch.no_grad():
        out = cm(ids, masks=masks, weight_deltas_and_masks=deltas, routing_masks=routing)
        assert torch.allclose(out, naive_forward(cm, ids, masks, deltas, routing), atol=1e-5)


def test_routing_masks_statistics():
    names = ["a", "b", "c"]
    r = uniform_k_subset_routing_masks(names, (4000,), generator=torch.Generator().manual_seed(0))
    k = torch.stack([r[n] for n in names]).sum(0)
    assert k.min() >= 1 and k.max() <= 3
    assert all(abs((k == i).float().mean().item() - 1 / 3) < 0.04 for i in (1, 2, 3))


def test_stochastic_masks_ranges():
    ci = {"a": torch.rand(50, 7)}
    m = stochastic_masks(ci)["a"]
    assert (m >= ci["a"]).all() and (m <= 1).all()
    mb = stochastic_masks(ci, "binomial")["a"]
    assert torch.all(torch.isclose(mb, ci["a"]) | torch.isclose(mb, torch.ones_like(mb)))
    with pytest.raises(ValueError):
        stochastic_masks(ci, "gaussian")


def test_causal_importances_and_weight_cache():
    cm = make_cm(ci_fn_type="mlp", ci_fn_hidden_dims=[4])
    ids = torch.randint(0, 11, (2, 3))
    acts = cm(ids, cache_acts=True).cache
    lower, upper = cm.calc_causal_importances(acts)
    for n, C in cm.module_to_c.items():
        assert lower[n].shape == (2, 3, C) == upper[n].shape
        assert (lower[n] >= 0).all() and (lower[n] <= 1).all() and (upper[n] >= 0).all()
    sum(v.sum() for v in lower.values()).backward()
    assert cm.ci_fn("fc").weights[0].grad is not None
    cmv = ComponentModel(TinyLM(), {"fc": 3, "proj": 2}, ci_fn_type="vector_mlp", ci_fn_hidden_dims=[4])
    lo, _ = cmv.calc_causal_importances(cmv(ids, cache_acts=True).cache)
    assert lo["proj"].shape == (2, 3, 2)
    # weight deltas carry gradient and follow dtype changes of the target
    d = cm.weight_deltas()
    assert d["proj"].shape == (5, 8) and d["wte"].shape == (11, 6) and d["proj"].requires_grad
    cm.double()
    d = cm.weight_deltas()
    assert d["proj"].dtype == torch.float64
    assert torch.allclose(d["proj"], cm.target_model.proj.weight.T - cm.component("proj").weight)


def test_target_stays_in_eval_and_keyword_inputs():
    class KwNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.fc(input=x))

    cm = ComponentModel(KwNet(), {"fc": 2})
    cm.train()
    assert cm.training and cm.ci_fns.training and not cm.target_model.training
    x = torch.randn(5, 4)
    assert torch.equal(cm(x), cm.target_model.fc(x))  # no dropout
    out = cm(x, masks={"fc": torch.ones(2)}, cache_acts=True)
    assert torch.equal(out.cache["fc"], x)
    assert torch.allclose(out.output, cm.component("fc")(x) + cm.target_model.fc.bias, atol=1e-6)
    assert torch.allclose(cm.component_acts(out.cache)["fc"], x @ cm.component("fc").V)


def test_deepcopy_rebinds_hooks():
    cm = make_cm()
    cm2 = copy.deepcopy(cm)
    ids = torch.randint(0, 11, (2, 3))
    ones = {n: torch.ones(C) for n, C in cm.module_to_c.items()}
    with torch.no_grad():
        cm2.component("fc").U.mul_(2.0)
    assert not torch.allclose(cm(ids, masks=ones), cm2(ids, masks=ones))
    assert torch.equal(cm(ids), cm2(ids))


# ----------------------------------------------------------------------------- losses


def naive_mse(a, b):
    return sum(float((x - y) ** 2) for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()


def naive_kl(pred, target):
    total, n = 0.0, 0
    for p_logits, q_logits in zip(target.reshape(-1, target.shape[-1]), pred.reshape(-1, pred.shape[-1])):
        p, q = torch.softmax(p_logits.double(), -1), torch.softmax(q_logits.double(), -1)
        total += sum(float(pi * math.log(pi / qi)) for pi, qi in zip(p, q))
        n += 1
    return total / n


def naive_loss(pred, target, kind):
    return naive_mse(pred, target) if kind == "mse" else naive_kl(pred, target)


def test_importance_minimality_sanity_values():
    ci = {"l1": torch.tensor([[1.0, 2.0, 3.0]]), "l2": torch.tensor([[0.5, 1.5]])}
    assert torch.isclose(L.importance_minimality_loss(ci, p=1.0, eps=0.0), torch.tensor(8.0))
    assert torch.isclose(
        L.importance_minimality_loss({"l": torch.tensor([[2.0, 3.0]])}, p=2.0, eps=0.0), torch.tensor(13.0)
    )
    assert L.annealed_p(0.25, 2.0, 1.0, start_frac=0.0, end_frac=0.5) == 1.5
    assert L.annealed_p(0.1, 2.0, 1.0, 0.2, 0.5) == 2.0 and L.annealed_p(0.9, 2.0, 1.0, 0.2, 0.5) == 1.0
    assert L.annealed_p(0.9, 2.0, None) == 2.0
    # mean over batch/positions, sum over components and layers, eps inside the power
    ci = {"a": torch.rand(3, 4, 5), "b": torch.rand(3, 4, 2)}
    ref = sum(
        sum(
            sum((float(v) + 1e-12) ** 1.5 for v in ci[k][..., c].flatten()) / 12
            for c in range(ci[k].shape[-1])
        )
        for k in ci
    )
    assert abs(L.importance_minimality_loss(ci, p=1.5).item() - ref) < 1e-4


def test_faithfulness_loss():
    d = {"a": torch.randn(3, 4), "b": torch.randn(5, 2)}
    ref = (sum(float(v) ** 2 for v in d["a"].flatten()) + sum(float(v) ** 2 for v in d["b"].flatten())) / 22
    assert abs(L.faithfulness_loss(d).item() - ref) < 1e-5


def test_output_recon_loss_mse_and_kl():
    a, b = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    assert abs(L.output_recon_loss(a, b, "mse").item() - naive_mse(a, b)) < 1e-5
    assert abs(L.output_recon_loss(a, b, "kl").item() - naive_kl(a, b)) < 1e-5
    assert L.output_recon_loss(a, a, "kl").abs().item() < 1e-6
    with pytest.raises(ValueError):
        L.output_recon_loss(a, b, "l1")


@pytest.fixture
def loss_setup():
    torch.manual_seed(3)
    cm = make_cm()
    ids = torch.randint(0, 11, (2, 3))
    target_out = cm(ids)
    ci = random_ci(cm, 2, 3)
    return cm, ids, target_out, ci


def sampler(ci, deltas, seed, n_mask_samples=1):
    """A MaskSampler drawing from a fresh generator seeded with `seed`."""
    return L.MaskSampler(
        ci, deltas, n_mask_samples=n_mask_samples, generator=torch.Generator().manual_seed(seed)
    )


def naive_draws(ci, deltas, g):
    """One sample's draws in MaskSampler's order: masks for every module (ci order), then delta masks."""
    masks = {n: c + (1 - c) * torch.rand(c.shape, generator=g) for n, c in ci.items()}
    dm = (
        None
        if deltas is None
        else {n: (deltas[n], torch.rand(c.shape[:-1], generator=g)) for n, c in ci.items()}
    )
    return masks, dm


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_stochastic_and_layerwise_losses_vs_naive(loss_setup, kind):
    cm, ids, target_out, ci = loss_setup
    deltas = {k: v.detach() for k, v in cm.weight_deltas().items()}
    with torch.no_grad():
        for routing, seed in (("all", 7), ("layerwise", 8)):
            got = L.stochastic_recon_loss(cm, ids, target_out, sampler(ci, deltas, seed, 2), kind, routing)
            g = torch.Generator().manual_seed(seed)
            ref, n = 0.0, 0
            for _ in range(2):
                masks, dm = naive_draws(ci, deltas, g)
                # all: every module masked at once; layerwise: one module at a time, averaged over modules
                for names in [list(ci)] if routing == "all" else [[name] for name in ci]:
                    out = naive_forward(cm, ids, {k: masks[k] for k in names}, {k: dm[k] for k in names})
                    ref += naive_loss(out, target_out, kind)
                    n += 1
            assert abs(got.item() - ref / n) < 1e-4, routing
    with pytest.raises(ValueError, match="routing"):
        L.stochastic_recon_loss(cm, ids, target_out, sampler(ci, deltas, 0), kind, "pairwise")


def test_subset_ci_masked_unmasked_losses_vs_naive(loss_setup):
    cm, ids, target_out, ci = loss_setup
    with torch.no_grad():
        got = L.stochastic_recon_loss(cm, ids, target_out, sampler(ci, None, 9), "kl", "subset")
        g = torch.Generator().manual_seed(9)
        masks, _ = naive_draws(ci, None, g)
        routing = uniform_k_subset_routing_masks(list(ci), (2, 3), generator=g)
        ref = naive_kl(naive_forward(cm, ids, masks, None, routing), target_out)
        assert abs(got.item() - ref) < 1e-4
        got = L.ci_masked_recon_loss(cm, ids, target_out, ci, "mse")
        assert abs(got.item() - naive_mse(naive_forward(cm, ids, ci), target_out)) < 1e-5
        ones = {n: torch.ones(2, 3, C) for n, C in cm.module_to_c.items()}
        got = L.unmasked_recon_loss(cm, ids, target_out, "mse")
        assert abs(got.item() - naive_mse(naive_forward(cm, ids, ones), target_out)) < 1e-5


def test_hidden_acts_loss_vs_naive(loss_setup):
    cm, ids, _, ci = loss_setup
    clean = cm(ids, cache_acts=True).cache
    deltas = {k: v.detach() for k, v in cm.weight_deltas().items()}
    with torch.no_grad():
        got = L.stochastic_hidden_acts_recon_loss(cm, ids, clean, sampler(ci, deltas, 4))
        masks, dm = naive_draws(ci, deltas, torch.Generator().manual_seed(4))
        _, inputs = naive_forward(cm, ids, masks, dm, capture_inputs=True)
    sq, n = 0.0, 0
    for name in ("fc", "proj", "head"):  # wte's input is token ids: skipped
        sq += sum(float(v) ** 2 for v in (inputs[name] - clean[name]).flatten())
        n += clean[name].numel()
    assert abs(got.item() - sq / n) < 1e-4


def test_losses_backprop_to_components_and_ci():
    cm = make_cm()
    ids = torch.randint(0, 11, (2, 3))
    target_out = cm(ids)
    acts = cm(ids, cache_acts=True).cache
    lower, upper = cm.calc_causal_importances(acts)
    total = (
        L.stochastic_recon_loss(cm, ids, target_out, L.MaskSampler(lower, cm.weight_deltas()), "kl")
        + L.importance_minimality_loss(upper, p=1.0)
        + L.faithfulness_loss(cm.weight_deltas())
    )
    total.backward()
    for n in cm.module_names:
        assert cm.component(n).V.grad is not None and cm.component(n).U.grad is not None
    assert cm.ci_fn("head").weights[0].grad is not None


def test_pgd_sources_in_range_and_loss_increases(loss_setup):
    cm, ids, target_out, ci = loss_setup
    deltas = cm.weight_deltas()
    seen = []
    orig_forward = cm.forward

    def spy(*args, **kw):
        if kw.get("masks"):
            seen.append((kw["masks"], kw["weight_deltas_and_masks"]))
        return orig_forward(*args, **kw)

    cm.forward = spy
    start = L.pgd_recon_loss(
        cm, ids, target_out, ci, deltas, n_steps=0, generator=torch.Generator().manual_seed(5)
    )
    attacked = L.pgd_recon_loss(
        cm, ids, target_out, ci, deltas, n_steps=5, step_size=0.2, generator=torch.Generator().manual_seed(5)
    )
    for masks, dm in seen:
        for n, m in masks.items():
            assert (m >= ci[n] - 1e-6).all() and (m <= 1 + 1e-6).all()
            assert (dm[n][1] >= 0).all() and (dm[n][1] <= 1).all()
    del cm.forward
    with torch.no_grad():
        stoch = L.stochastic_recon_loss(cm, ids, target_out, L.MaskSampler(ci, deltas, n_mask_samples=20))
    assert attacked.item() >= start.item() and attacked.item() > stoch.item()
    attacked.backward()  # gradient reaches the components through the final pass
    assert cm.component("fc").V.grad is not None
    shared = L.pgd_recon_loss(
        cm, ids, target_out, ci, None, n_steps=2, mask_scope="shared_across_batch", init="zeros"
    )
    assert torch.isfinite(shared)


# ----------------------------------------------------------------------------- toy models


def test_tms_tie_shapes_and_component_model():
    tms = TMSModel(5, 2)
    assert torch.equal(tms.linear2.weight, tms.linear1.weight.T)
    assert set(tms.state_dict()) == {"linear1.weight", "linear2.bias"}
    x = torch.rand(7, 5)
    assert tms(x).shape == (7, 5)
    opt = torch.optim.AdamW(tms.parameters(), lr=0.1)
    F.mse_loss(tms(x), x).backward()
    opt.step()
    assert torch.equal(tms.linear2.weight, tms.linear1.weight.T)
    expected = F.relu(x @ tms.linear1.weight.T @ tms.linear1.weight + tms.linear2.bias)
    assert torch.allclose(tms(x), expected, atol=1e-6)
    tms_id = TMSModel(5, 2, n_hidden_layers=1, identity_insert=True)
    assert torch.equal(tms_id.identity.weight, torch.eye(2)) and not tms_id.identity.weight.requires_grad
    cm = ComponentModel(tms_id, {"linear1": 4, "linear2": 4, "identity": 2, "hidden_layers.*": 2})
    assert cm.module_names == ["linear1", "hidden_layers.0", "identity", "linear2"]
    ones = {n: torch.ones(C) for n, C in cm.module_to_c.items()}
    deltas = {n: (d, None) for n, d in cm.weight_deltas().items()}
    assert torch.allclose(cm(x, masks=ones, weight_deltas_and_masks=deltas), tms_id(x), atol=1e-6)


def test_resid_mlp_shapes_and_labels():
    model = ResidMLP(n_features=10, d_embed=16, d_mlp=6, n_layers=2)
    assert torch.allclose(model.W_E.norm(dim=-1), torch.ones(10))
    x = sparse_feature_batch(8, 10, 0.3, value_range=model.value_range)
    assert model(x).shape == (8, 10)
    assert torch.allclose(model.labels(x), x + F.relu(x))
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == [
        "layers.0.mlp_in",
        "layers.0.mlp_out",
        "layers.1.mlp_in",
        "layers.1.mlp_out",
    ]
    losses = train_toy_model(model, steps=5, batch=16, lr=1e-3, wd=0.0, feature_prob=0.3)
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)


def test_sparse_feature_batch_statistics():
    gen = torch.Generator().manual_seed(0)
    x = sparse_feature_batch(20000, 10, 0.05, generator=gen)
    assert abs((x != 0).float().mean().item() - 0.05) < 0.003
    assert x.min() >= 0 and x.max() <= 1
    nz = x[x != 0]
    assert abs(nz.mean().item() - 0.5) < 0.02
    y = sparse_feature_batch(2000, 10, 0.5, generator=gen, value_range=(-1.0, 1.0))
    assert y.min() < -0.9 and y.max() > 0.9


def test_tms_target_training_and_checks():
    """5-2 TMS is finicky: with this init/data seed all 5 features are learned (seed 0 loses some)."""
    torch.manual_seed(2)
    tms = TMSModel(5, 2)
    losses = train_toy_model(tms, steps=2000, batch=1024, lr=5e-3, wd=0.01, feature_prob=0.05, seed=2)
    assert sum(losses[-100:]) < sum(losses[:100])
    checks = check_tms_target(tms)
    assert checks["passed"], checks
    assert checks["mse"] < 0.003 and all(n > 0.9 for n in checks["feature_norms"])
    torch.manual_seed(0)
    untrained = check_tms_target(TMSModel(5, 2))
    assert not untrained["passed"] and not untrained["norms_ok"]


# ----------------------------------------------------------------------------- metrics


def test_mmcs_ml2r():
    W = torch.randn(3, 5)  # (d_out, d_in): 5 feature columns
    V, U = torch.zeros(5, 8), torch.randn(8, 3) * 0.01
    V[:5, :5] = torch.eye(5)
    U[:5] = W.T  # component j's column j is W[:, j]
    mmcs, ml2r = mmcs_ml2r(W, V, U)
    assert abs(mmcs - 1) < 1e-5 and abs(ml2r - 1) < 1e-5
    V[:5, :5] = -0.5 * torch.eye(5)  # sign flips the direction, halves the norm
    mmcs, ml2r = mmcs_ml2r(W, V, -U, select="cosine")
    assert abs(mmcs - 1) < 1e-5 and abs(ml2r - 0.5) < 1e-5


def test_hungarian_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for n, m in [(3, 3), (4, 6), (5, 5)]:
        for _ in range(10):
            s = torch.rand(n, m, generator=gen).numpy()
            cols = linear_sum_assignment_max(s)
            best = max(sum(s[i, p[i]] for i in range(n)) for p in permutations(range(m), n))
            assert abs(sum(s[i, cols[i]] for i in range(n)) - best) < 1e-9


def test_identity_ci_error():
    perm = torch.randperm(6)[:4]
    ci = torch.zeros(4, 6)
    ci[torch.arange(4), perm] = 1.0
    ci += 0.05 * torch.rand(4, 6)
    assert identity_ci_error(ci) == 0
    bad = ci.clone()
    bad[1, perm[0]] = 1.0  # feature 1 also uses feature 0's component
    assert identity_ci_error(bad) == 1
    merged = torch.zeros(4, 6)
    merged[:, 0] = 1.0  # all features share one component
    assert identity_ci_error(merged) == 3 + 3  # 3 off-diagonal ones, 3 empty diagonal entries
    with pytest.raises(ValueError):
        identity_ci_error(torch.zeros(4, 3))


def test_l0_alive_and_single_feature_cis():
    ci = {"a": torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.0, 0.0]])}
    assert ci_l0(ci, 0.1) == {"a": 1.5}
    tracker = AliveComponentsTracker({"a": 3}, threshold=0.1)
    tracker.update({"a": torch.tensor([[0.0, 0.5, 0.0]])})
    tracker.update({"a": torch.tensor([[[0.0, 0.0, 0.05]], [[0.3, 0.0, 0.0]]])})
    assert tracker.n_alive() == {"a": 2}
    cm = ComponentModel(TMSModel(5, 2), {"linear1": 6, "linear2": 6})
    errs = identity_ci_errors(cm, 5)
    assert set(errs) == {"linear1", "linear2"} and all(isinstance(v, int) for v in errs.values())


@pytest.mark.parametrize("shape", [(7, 3), (2, 5, 3), (3000, 3)])  # 3000 rows: several cache blocks
def test_scalar_mlp_fast_path_matches_autograd(shape, monkeypatch):
    import lightning_modules.spd.ci_functions as cf

    monkeypatch.setattr(cf, "_BLOCK_ELEMENTS", 1000)  # blocks of 1000 // (3 x 4) = 83 rows
    torch.manual_seed(0)
    fn = MLPCiFn(shape[-1], [4])
    with torch.no_grad():
        for b in fn.biases:
            b.normal_()
    g = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    fn = fn.double()
    out = fn(g)  # the ScalarMLPFunction path
    w1, b1, w2, b2 = fn.weights[0][:, 0, :], fn.biases[0], fn.weights[1][..., 0], fn.biases[1][:, 0]
    naive = (F.gelu(g.unsqueeze(-1) * w1 + b1) * w2).sum(-1) + b2
    assert torch.allclose(out, naive, atol=1e-12)
    upstream = torch.randn(shape, dtype=torch.float64)
    params = [g, *fn.parameters()]
    fast = torch.autograd.grad(out, params, upstream)
    ref = torch.autograd.grad(naive, params, upstream)
    for a, b in zip(fast, ref):
        assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()
    assert torch.autograd.gradcheck(
        lambda g_, *p: cf.ScalarMLPFunction.apply(g_, *p), (g[:5].detach().requires_grad_(), w1, b1, w2, b2)
    )


def test_kl_fast_path_matches_log_softmax_autograd():
    torch.manual_seed(0)
    pred = (3 * torch.randn(2, 5, 11, dtype=torch.float64)).requires_grad_()
    target = 3 * torch.randn(2, 5, 11, dtype=torch.float64)
    fast = L.output_recon_loss(pred, target, "kl")
    log_p, log_q = torch.log_softmax(target, -1), torch.log_softmax(pred, -1)
    naive = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    assert abs(fast.item() - naive.item()) < 1e-6  # the fast path computes in float32
    g_fast, g_naive = torch.autograd.grad(fast, pred)[0], torch.autograd.grad(naive, pred)[0]
    assert torch.allclose(g_fast, g_naive, atol=1e-7)
    big = torch.randn(4, 7) + 1e4  # large logits: the max shift keeps it finite
    assert torch.isfinite(L.output_recon_loss(big, big + torch.randn(4, 7), "kl"))
    # offset logits (as LMs have), tiny KL: the float32 result stays accurate in absolute terms
    pred = torch.randn(64, 300, dtype=torch.float64) + 30.0
    target = pred + 0.01 * torch.randn(64, 300, dtype=torch.float64)
    log_p, log_q = torch.log_softmax(target, -1), torch.log_softmax(pred, -1)
    exact = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert abs(L.output_recon_loss(pred, target, "kl").item() - exact) < 2e-6
