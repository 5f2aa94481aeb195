"""The reference's (goodfire-ai/spd) loss and metric variants against naive forms written its way
(tests/helpers/spd_naive.py): CI-masked subset / layerwise reconstruction, the static-probability router,
PGD subset / layerwise and multi-batch PGD; the two L0s, MMCS as the paper defines it, swish_hard, and
the GPT-2 recipe. Tiny targets built in code, CPU, float32."""

from pathlib import Path

import pytest
import torch
import yaml

from datamodules.sparse_features import sparse_feature_batch
from lightning_modules.gpt.config import GPTConfig
from lightning_modules.gpt.model import GPT
from lightning_modules.spd import losses as L
from lightning_modules.spd.component_model import ComponentModel
from lightning_modules.spd.config import ObjectiveConfig, PGDSettings
from lightning_modules.spd.metrics import mmcs_ml2r
from lightning_modules.spd.objective import SPDObjective, eval_batch, write_results
from lightning_modules.spd.pgd import pgd_multibatch_recon_loss
from lightning_modules.spd.routing import StaticProbabilityRouter, make_subset_router, uniform_k_subset_router
from lightning_modules.spd.sigmoids import get_sigmoid
from lightning_modules.spd.toy_models import TMSModel
from tests.helpers import spd_naive as N

ROOT = Path(__file__).resolve().parents[1]
GPT_PATTERNS = {
    "transformer.h.*.attn.c_attn": 6,
    "transformer.h.*.mlp.c_fc": 5,
    "transformer.h.*.mlp.c_proj": 4,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest (and does not fight the other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup_case(kind: str, seed: int = 0) -> tuple[ComponentModel, N.NaiveSPD, torch.Tensor]:
    """(ours, the naive copy, a batch): a random TMS 5-2 (mse) or a 2-layer tiny GPT (kl)."""
    torch.manual_seed(seed)
    if kind == "mse":
        cm = ComponentModel(TMSModel(5, 2), {"linear1": 4, "linear2": 4}, "mlp", [4])
        x = sparse_feature_batch(16, 5, 0.3, torch.Generator().manual_seed(seed))
    else:
        target = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16))
        cm = ComponentModel(target, GPT_PATTERNS, "mlp", [4])
        x = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(seed))
    return cm, N.NaiveSPD(cm), x


def ci_and_target(cm: ComponentModel, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    with torch.no_grad():
        target_out, acts = cm(x, cache_acts=True)
    ci, _ = cm.calc_causal_importances(acts)
    return (
        target_out,
        {k: v.detach() for k, v in ci.items()},
        {k: v.detach() for k, v in cm.weight_deltas().items()},
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- routers


def test_static_probability_router_statistics_and_settings():
    names = ["a", "b", "c"]
    masks = StaticProbabilityRouter(0.3)(names, (200, 50), "cpu", gen(0))
    assert set(masks) == set(names) and all(
        m.dtype == torch.bool and m.shape == (200, 50) for m in masks.values()
    )
    assert all(abs(m.float().mean().item() - 0.3) < 0.02 for m in masks.values())
    assert not any(m.any() for m in StaticProbabilityRouter(0.0)(names, (5,), "cpu", gen(0)).values())
    assert all(m.all() for m in StaticProbabilityRouter(1.0)(names, (5,), "cpu", gen(0)).values())
    # uniform k-subset: every position routes at least one module
    uk = uniform_k_subset_router(names, (400,), "cpu", gen(1))
    assert torch.stack(list(uk.values())).any(0).all()
    with pytest.raises(ValueError, match="subset_routing_p"):
        ObjectiveConfig(subset_routing="static_probability")
    with pytest.raises(ValueError, match="uniform_k_subset"):
        ObjectiveConfig(subset_routing="every_other")
    with pytest.raises(ValueError, match="p in"):
        make_subset_router("static_probability", 1.5)
    with pytest.raises(ValueError, match="multibatch_routings"):
        PGDSettings(multibatch_routings=["layerwise"])
    assert isinstance(
        ObjectiveConfig(subset_routing="static_probability", subset_routing_p=0.5), ObjectiveConfig
    )


# ----------------------------------------------------------------------------- CI-masked variants


@pytest.mark.parametrize("kind", ["mse", "kl"])
@pytest.mark.parametrize("routing", ["uniform_k_subset", "static_probability"])
def test_ci_masked_subset_and_layerwise_vs_naive(kind, routing):
    cm, naive, x = setup_case(kind)
    target_out, ci, _ = ci_and_target(cm, x)
    lead = tuple(next(iter(ci.values())).shape[:-1])
    with torch.no_grad():
        got = L.ci_masked_recon_subset_loss(
            cm, x, target_out, ci, make_subset_router(routing, 0.4), kind, gen(5)
        )
        g = gen(5)
        route = (
            N.naive_uniform_k_routing(naive.names, lead, g)
            if routing == "uniform_k_subset"
            else N.naive_static_routing(naive.names, lead, 0.4, g)
        )
        ref = N.naive_ci_masked_subset(naive, x, target_out, ci, route, kind)
        assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
        got = L.ci_masked_recon_layerwise_loss(cm, x, target_out, ci, kind)
        ref = N.naive_ci_masked_layerwise(naive, x, target_out, ci, kind)
        assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
        # the subset loss lies between none routed (0) and ci_masked_recon (all routed) only in expectation;
        # with every module routed it is ci_masked_recon exactly
        all_routed = L.ci_masked_recon_subset_loss(
            cm, x, target_out, ci, make_subset_router(routing, 1.0), kind
        )
        if routing == "static_probability":
            assert all_routed.item() == pytest.approx(
                L.ci_masked_recon_loss(cm, x, target_out, ci, kind).item()
            )


# ----------------------------------------------------------------------------- PGD


@pytest.mark.parametrize("kind", ["mse", "kl"])
@pytest.mark.parametrize("scope", ["unique_per_datapoint", "shared_across_batch"])
def test_pgd_all_and_subset_vs_naive(kind, scope):
    cm, naive, x = setup_case(kind, seed=1)
    target_out, ci, deltas = ci_and_target(cm, x)
    lead = tuple(next(iter(ci.values())).shape[:-1])
    src_lead = lead if scope == "unique_per_datapoint" else (1,) * len(lead)

    def draw_sources(g: torch.Generator) -> dict[str, torch.Tensor]:
        return {n: torch.rand((*src_lead, c.shape[-1] + 1), generator=g) for n, c in ci.items()}

    got = L.pgd_recon_loss(cm, x, target_out, ci, deltas, 3, 0.2, "random", scope, kind, gen(7))
    ref = N.naive_pgd(naive, x, target_out, ci, deltas, draw_sources(gen(7)), 3, 0.2, kind)
    assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)

    router = make_subset_router("static_probability", 0.5)
    got = L.pgd_recon_subset_loss(
        cm, x, target_out, ci, router, deltas, 3, 0.2, "random", scope, kind, gen(8)
    )
    g = gen(8)
    route = N.naive_static_routing(naive.names, lead, 0.5, g)  # drawn before the sources
    ref = N.naive_pgd(naive, x, target_out, ci, deltas, draw_sources(g), 3, 0.2, kind, route)
    assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    start = L.pgd_recon_subset_loss(
        cm, x, target_out, ci, router, deltas, 0, 0.2, "random", scope, kind, gen(8)
    )
    assert got.item() >= start.item()  # ascent from the same start and routing


# ("ones", with the delta) would start at the target's own output, a minimum of the KL: gradients there are
# float noise and their signs are arbitrary, so that start is compared without the delta
@pytest.mark.parametrize("init, with_delta", [("zeros", True), ("ones", False)])
def test_pgd_layerwise_matches_the_reference_layer_router(init, with_delta):
    """Ours masks one module per PGD run; the reference keeps sources for every module and routes one:
    the others' sources get no gradient, so both give the same value."""
    cm, naive, x = setup_case("kl", seed=2)
    target_out, ci, deltas = ci_and_target(cm, x)
    deltas = deltas if with_delta else None
    lead = tuple(next(iter(ci.values())).shape[:-1])
    got = L.pgd_recon_layerwise_loss(
        cm, x, target_out, ci, deltas, 2, 0.3, init, "unique_per_datapoint", "kl"
    )
    fill = 1.0 if init == "ones" else 0.0
    extra = 1 if with_delta else 0
    total = 0.0
    for layer in naive.names:
        sources = {n: torch.full((*lead, c.shape[-1] + extra), fill) for n, c in ci.items()}
        route = N.naive_layer_routing(naive.names, lead, layer)
        total += N.naive_pgd(naive, x, target_out, ci, deltas, sources, 2, 0.3, "kl", route).item()
    assert got.item() == pytest.approx(total / len(naive.names), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_pgd_multibatch_vs_naive_and_one_batch_equals_shared_pgd(kind):
    cm, naive, _ = setup_case(kind, seed=3)
    batches = [setup_case(kind, seed=s)[2] for s in (10, 11, 12)]
    n_lead = 1 if kind == "mse" else 2

    def draw_sources(g: torch.Generator) -> dict[str, torch.Tensor]:
        return {n: torch.rand((*(1,) * n_lead, C + 1), generator=g) for n, C in cm.module_to_c.items()}

    got = pgd_multibatch_recon_loss(cm, lambda: batches, 3, 0.2, "random", kind, True, generator=gen(4))
    ref = N.naive_pgd_multibatch(naive, batches, draw_sources(gen(4)), 3, 0.2, kind, True)
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    router = make_subset_router("static_probability", 0.5)
    got = pgd_multibatch_recon_loss(
        cm, lambda: batches, 2, 0.2, "random", kind, True, router=router, generator=gen(6)
    )
    g = gen(6)
    sources = draw_sources(g)
    ref = N.naive_pgd_multibatch(
        naive,
        batches,
        sources,
        2,
        0.2,
        kind,
        True,
        route=lambda names, lead: N.naive_static_routing(names, lead, 0.5, g),
    )
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # one batch: the per-batch PGD with one source shared across the batch
    target_out, ci, deltas = ci_and_target(cm, batches[0])
    one = pgd_multibatch_recon_loss(cm, lambda: batches[:1], 3, 0.2, "random", kind, True, generator=gen(9))
    shared = L.pgd_recon_loss(
        cm, batches[0], target_out, ci, deltas, 3, 0.2, "random", "shared_across_batch", kind, gen(9)
    )
    assert one == pytest.approx(shared.item(), rel=1e-5)


# ----------------------------------------------------------------------------- the objective end to end


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_objective_new_terms_match_naive_losses_and_gradients(kind):
    cm, naive, x = setup_case(kind, seed=4)
    coeffs = {
        "stochastic_recon_subset": 1.0,
        "ci_masked_recon_subset": 0.5,
        "ci_masked_recon_layerwise": 0.7,
        "pgd_recon_subset": 0.3,
        "pgd_recon_layerwise": 0.2,
    }
    pgd = {"n_steps": 2, "step_size": 0.2}
    objective = SPDObjective(
        dict(coeffs), output_loss_type=kind, n_mask_samples=2, subset_routing="static_probability",
        subset_routing_p=0.6, pgd=pgd,
    )  # fmt: skip
    ours = objective(cm, x, 0.0, generator=gen(11))

    g = gen(11)
    with torch.no_grad():
        target_out, acts = naive.run(x, cache=True)
    ci, _ = naive.ci(acts)
    deltas = {n: naive.target_weight(n) - (naive.vu(n)[0] @ naive.vu(n)[1]).t() for n in naive.names}
    lead = tuple(next(iter(ci.values())).shape[:-1])
    theirs: dict[str, torch.Tensor] = {}
    total = 0.0  # stochastic_recon_subset: per sample masks, delta masks, then routing
    for _ in range(2):
        masks = {n: ci[n] + (1 - ci[n]) * torch.rand(ci[n].shape, generator=g) for n in naive.names}
        dm = {n: (deltas[n], torch.rand(lead, generator=g)) for n in naive.names}
        route = N.naive_static_routing(naive.names, lead, 0.6, g)
        total = total + N.naive_output_loss(
            naive.run(x, masks=masks, deltas=dm, routing=route), target_out, kind
        )
    theirs["stochastic_recon_subset"] = total / 2
    route = N.naive_static_routing(naive.names, lead, 0.6, g)
    theirs["ci_masked_recon_subset"] = N.naive_ci_masked_subset(naive, x, target_out, ci, route, kind)
    theirs["ci_masked_recon_layerwise"] = N.naive_ci_masked_layerwise(naive, x, target_out, ci, kind)
    route = N.naive_static_routing(naive.names, lead, 0.6, g)
    sources = {n: torch.rand((*lead, c.shape[-1] + 1), generator=g) for n, c in ci.items()}
    theirs["pgd_recon_subset"] = N.naive_pgd(naive, x, target_out, ci, deltas, sources, 2, 0.2, kind, route)
    layer_losses = []
    for n in naive.names:
        src = {n: torch.rand((*lead, ci[n].shape[-1] + 1), generator=g)}
        layer_losses.append(N.naive_pgd(naive, x, target_out, {n: ci[n]}, {n: deltas[n]}, src, 2, 0.2, kind))
    theirs["pgd_recon_layerwise"] = sum(layer_losses) / len(layer_losses)

    for name in coeffs:
        assert ours.terms[name].item() == pytest.approx(theirs[name].item(), rel=1e-4, abs=1e-5), name
    naive_total = sum(coeffs[k] * v for k, v in theirs.items())
    ours.total.backward()
    naive_total.backward()
    for name in cm.module_names:
        key = name.replace(".", "-")
        pairs = [(cm.component(name).V, naive.V[key]), (cm.component(name).U, naive.U[key])]
        pairs += list(zip(cm.ci_fn(name).parameters(), naive.ci_fns[key].parameters()))
        for a, b in pairs:
            scale = b.grad.abs().max().item() + 1e-12
            assert (a.grad - b.grad).abs().max().item() / scale < 1e-3, name


# ----------------------------------------------------------------------------- metrics


def test_two_l0s_never_mix():
    cm, _, x = setup_case("kl")
    metrics, ci = eval_batch(cm, x, "kl", True, l0_threshold=0.1)
    for name, c in ci.items():
        assert metrics[f"l0_ci_gt_0/{name}"].item() == pytest.approx((c > 0).float().sum(-1).mean().item())
        assert metrics[f"l0_ci_gt_0.1/{name}"].item() == pytest.approx(
            (c > 0.1).float().sum(-1).mean().item()
        )
    assert not any(k.startswith("l0/") for k in metrics)
    metrics0, _ = eval_batch(cm, x, "kl", True)
    assert {k.split("/")[0] for k in metrics0 if k.startswith("l0")} == {"l0_ci_gt_0"}


def test_write_results_rows_hold_both_l0s(tmp_path):
    metrics = {
        "l0_ci_gt_0/a": 3.0,
        "l0_ci_gt_0.1/a": 1.0,
        "mmcs/a": 0.9,
        "recon/stochastic": 0.1,
        "lm/ce_a": 2.0,
    }
    out = write_results(tmp_path / "r.json", {"a": 4}, metrics, {})
    assert out["modules"]["a"] == {"C": 4, "l0_ci_gt_0": 3.0, "l0_ci_gt_0.1": 1.0, "mmcs": 0.9}


def reference_tms_mmcs(
    W: torch.Tensor, V: torch.Tensor, U: torch.Tensor, eps: float = 1e-12
) -> tuple[float, float]:
    """The reference's TMS analysis: subnets (C, f, h) = V[f, c] U[c]; per feature the max over c of the
    cosine with the target row W^T[f]; L2 ratio of the subnet at that max."""
    subnets = torch.einsum("fc,ch->cfh", V, U)
    target = W.t()  # (f, h)
    cos = torch.einsum(
        "cfh,fh->cf",
        subnets / (subnets.norm(dim=-1, keepdim=True) + eps),
        target / (target.norm(dim=-1, keepdim=True) + eps),
    )
    best = cos.max(0)
    at_max = subnets[best.indices, torch.arange(W.shape[1])]
    return best.values.mean().item(), (at_max.norm(dim=-1) / target.norm(dim=-1)).mean().item()


def test_mmcs_is_the_papers_max_cosine():
    # feature 0: component 0 carries it (large, 0.8 cosine), component 1 is small but exactly aligned
    W = torch.tensor([[1.0], [0.0]])  # (d_out 2, d_in 1)
    V = torch.tensor([[2.0, 0.1]])  # (d_in 1, C 2)
    U = torch.tensor([[0.8, 0.6], [1.0, 0.0]])  # (C, d_out)
    mmcs, ml2r = mmcs_ml2r(W, V, U)  # the paper's: max over components of the cosine
    assert mmcs == pytest.approx(1.0) and ml2r == pytest.approx(0.1)
    by_norm = mmcs_ml2r(W, V, U, select="norm")
    assert by_norm[0] == pytest.approx(0.8) and by_norm[1] == pytest.approx(2.0)
    gen_ = gen(0)
    W, V, U = (
        torch.randn(2, 5, generator=gen_),
        torch.randn(5, 9, generator=gen_),
        torch.randn(9, 2, generator=gen_),
    )
    assert mmcs_ml2r(W, V, U) == pytest.approx(reference_tms_mmcs(W, V, U), rel=1e-5)


def test_swish_hard_is_the_reference_formula():
    def swish(u):  # beta 10
        return u * torch.sigmoid(10 * u)

    def upside_down_swish(u):
        return u * torch.sigmoid(-10 * u)

    x = torch.linspace(-2, 3, 101, dtype=torch.float64)
    z = x - 0.5  # the reference's defaults: xshift 0.5, scale 0.5, yshift 0.5
    ref = 0.5 + (upside_down_swish(z - 0.5) - swish(z)) + (swish(z + 0.5) - upside_down_swish(z))
    assert torch.allclose(get_sigmoid("swish_hard")(x), ref, atol=1e-12)
    y = get_sigmoid("swish_hard")(torch.tensor([-5.0, 0.0, 0.5, 1.0, 5.0], dtype=torch.float64))
    s10 = torch.sigmoid(torch.tensor(10.0, dtype=torch.float64)).item()  # at 0 and 1: 1 - s10 and s10 exactly
    assert torch.allclose(y, torch.tensor([0.0, 1 - s10, 0.5, s10, 1.0], dtype=torch.float64), atol=1e-10)


# ----------------------------------------------------------------------------- the GPT-2 recipe


def test_hf_gpt2_config_is_the_reference_recipe():
    text = (ROOT / "configs" / "spd" / "hf_gpt2.yaml").read_text()
    assert "3f0bb61ebb56c493f8de5c21618d866bbed60298" in text  # the reference commit it follows
    args = yaml.safe_load(text)["model"]["init_args"]
    assert args["target_module_patterns"] == {"transformer.h.1.attn.c_attn": 768}
    assert (args["components"]["ci_fn_type"], args["components"]["ci_fn_hidden_dims"]) == ("vector_mlp", [12])
    obj = args["objective"]
    assert obj["loss_coeffs"] == {"stochastic_recon_layerwise": 2.0, "importance_minimality": 0.0003}
    assert (
        obj["importance_p"],
        obj["importance_p_end"],
        obj["p_anneal_start_frac"],
        obj["p_anneal_end_frac"],
    ) == (
        2.0,
        0.3,
        0.0,
        1.0,
    )
