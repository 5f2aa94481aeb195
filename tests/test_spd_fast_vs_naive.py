"""Our SPD step (persistent hooks, cached target weights, ScalarMLPFunction, fused KL) against the naive
implementation in tests/helpers/spd_naive.py: same losses and same gradients for every trained parameter."""

import pytest
import torch
from torch import nn

from lightning_modules.common.targets import decoder_layers
from lightning_modules.spd.component_model import ComponentModel
from lightning_modules.spd.objective import SPDObjective
from tests.helpers.spd_naive import COEFFS, NaiveSPD, build
from tests.helpers.spd_targets import objective_terms_and_grads, tiny_component_model, tiny_target_and_batch

# the launch-bound settings (docs/spd.md): every layerwise forward in one, the delta from the target's output
LAUNCH = {"layerwise_batch": 64, "delta_from_target_output": True}


@pytest.mark.parametrize("settings", [{}, LAUNCH], ids=["default", "launch"])
@pytest.mark.parametrize("config", ["tms_5-2", "tiny_lm"])
def test_fast_path_matches_naive_losses_and_gradients(config, settings):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cm, x, loss_type = build(config, "cpu")
        naive = NaiveSPD(cm)
        objective = SPDObjective(dict(COEFFS), output_loss_type=loss_type, **settings)
        torch.manual_seed(123)
        ours = objective(cm, x, 0.0)
        torch.manual_seed(123)
        theirs = naive.losses(x, loss_type, objective.p(0.0))
    finally:
        torch.set_num_threads(threads)
    naive_total = sum(COEFFS[k] * v for k, v in theirs.items())
    assert ours.total.item() == pytest.approx(naive_total.item(), rel=1e-5)
    ours.total.backward()
    naive_total.backward()
    for name in cm.module_names:
        key = name.replace(".", "-")
        pairs = [(cm.component(name).V, naive.V[key]), (cm.component(name).U, naive.U[key])]
        pairs += list(zip(cm.ci_fn(name).parameters(), naive.ci_fns[key].parameters()))
        for a, b in pairs:
            scale = b.grad.abs().max().item() + 1e-12
            assert (a.grad - b.grad).abs().max().item() / scale < 1e-4, name


# ----------------------------------------------------------------------------- clean-prefix reuse
# Masked forwards start from the clean forward's recorded activations (ComponentModel.reuse_clean_prefix)
# and masked modules skip the target's own matmul: in float64, losses and gradients must equal those of
# the same model computing every module (record_clean_prefix=False), bit for bit up to summation order.
RECON_COEFFS = {
    "importance_minimality": 1e-3,
    "stochastic_recon": 1.0,
    "stochastic_recon_layerwise": 1.0,
    "stochastic_recon_subset": 1.0,
}


@pytest.mark.parametrize("kind", ["gpt", "tms", "resid_mlp", "hf_gpt2", "hf_llama"])
def test_clean_prefix_reuse_gives_equal_losses_and_gradients(kind):
    target, x, patterns, loss_type = tiny_target_and_batch(kind)
    target = target.double()
    x = x.double() if x.is_floating_point() else x
    models = [tiny_component_model(target, patterns, record_clean_prefix=record) for record in (True, False)]
    fast, full = (objective_terms_and_grads(cm, x, loss_type, RECON_COEFFS) for cm in models)
    assert fast[0].keys() == full[0].keys()
    for k in fast[0]:
        assert fast[0][k] == pytest.approx(full[0][k], rel=1e-12, abs=1e-15), k
    for a, b in zip(fast[1], full[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # the reuse did skip work: the last module's forward starts after the earlier decoder layers / modules
    cm = models[0]
    skipped = [m for m, _, _ in cm._clean_prefix.skips[cm.module_names[-1]]]
    if kind in ("gpt", "hf_gpt2", "hf_llama"):
        layers = decoder_layers(cm.target_model)
        assert layers[0] in skipped and layers[1] in skipped
    else:  # the first decomposed module runs inside a skipped call
        first = cm.target_model.get_submodule(cm.module_names[0])
        assert any(first in list(m.modules()) for m in skipped)
    assert not any("forward" in m.__dict__ for m in cm.target_model.modules())  # all restored


class _InPlaceAndShared(nn.Module):
    """A target that modifies a module's output in place after the call and calls one module twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.mul_(2.0)  # the recorded output of `a` changes after its call: never reused
        h = self.act(self.b(self.act(h)))  # `act` runs twice: never reused
        return self.c(h)


def test_clean_prefix_never_reuses_what_it_cannot_trust():
    torch.manual_seed(0)
    cm = ComponentModel(_InPlaceAndShared(), {"b": 2, "c": 2}, "mlp", [3])
    x = torch.randn(5, 4)
    with torch.no_grad():
        clean, _ = cm(x, cache_acts=True)
    skipped = [m for m, _, _ in cm._clean_prefix.skips["c"]]
    assert cm.target_model.a not in skipped and cm.target_model.act not in skipped
    assert skipped == [cm.target_model.b]
    ones = {"c": torch.ones(2)}
    deltas = {"c": (cm.weight_deltas()["c"], None)}
    with torch.no_grad():  # mask 1 + delta = the target: the reused prefix must reproduce the clean output
        torch.testing.assert_close(
            cm(x, masks=ones, weight_deltas_and_masks=deltas, reuse_clean_prefix=True), clean
        )
        other = x.clone()  # equal values, another tensor: nothing is reused
        assert cm._prefix_plan((other,), {}, ["c"]) is None
        x.add_(0.0)  # modified in place since the clean forward: nothing is reused
        assert cm._prefix_plan((x,), {}, ["c"]) is None
        cm(x, cache_acts=True)
        assert cm._prefix_plan((x,), {}, ["c"]) is not None
        cm.target_model.b.weight.add_(0.0)  # a target weight modified in place: nothing is reused
        assert cm._prefix_plan((x,), {}, ["c"]) is None
        cm(x, cache_acts=True)
        cm.target_model.b.weight = torch.nn.Parameter(cm.target_model.b.weight.clone(), requires_grad=False)
        assert cm._prefix_plan((x,), {}, ["c"]) is None  # a target weight replaced: nothing is reused
        with pytest.raises(ValueError, match="no mask"):  # not taken for a recording clean forward
            cm(x, cache_acts=True, weight_deltas_and_masks=deltas)


def test_fast_path_matches_naive_in_float64():
    """The same comparison in float64, random draws included, on TMS (MSE output loss), so the clean-prefix
    reuse and the delta term from the clean output are checked to near machine precision. (Both KLs run
    in float32, whose sums of per-token terms limit an LM comparison to ~1e-5: the float32 test above;
    test_clean_prefix_reuse_gives_equal_losses_and_gradients covers the LMs in float64.)"""
    config = "tms_5-2"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the naive form draws its randoms in the default dtype
    try:
        cm, x, loss_type = build(config, "cpu")
        cm.double()
        x = x.double() if x.is_floating_point() else x
        naive = NaiveSPD(cm)
        objective = SPDObjective(dict(COEFFS), output_loss_type=loss_type)
        torch.manual_seed(7)
        ours = objective(cm, x, 0.0)
        torch.manual_seed(7)
        theirs = naive.losses(x, loss_type, objective.p(0.0))
    finally:
        torch.set_default_dtype(default)
    rel = 1e-12
    for k, v in theirs.items():
        assert ours.terms[k].item() == pytest.approx(v.item(), rel=rel), k
    ours.total.backward()
    sum(COEFFS[k] * v for k, v in theirs.items()).backward()
    for name in cm.module_names:
        key = name.replace(".", "-")
        pairs = [(cm.component(name).V, naive.V[key]), (cm.component(name).U, naive.U[key])]
        pairs += list(zip(cm.ci_fn(name).parameters(), naive.ci_fns[key].parameters()))
        for a, b in pairs:
            scale = b.grad.abs().max().item() + 1e-30
            assert (a.grad - b.grad).abs().max().item() / scale < rel * 10, name
