"""The all-modules stochastic term folded into the batched layerwise forward (layerwise_batch >= the
modules, the two terms next to each other: losses.folded_stochastic_recon_losses, ComponentModel's
row_slices with two spans per module) against the two terms run apart: the same losses and gradients on
every target family, fewer operator calls, and the fold only where each term draws the masks it would alone."""

import pytest
import torch

from benchmarks.op_count import count_ops
from lightning_modules.spd import losses as L
from lightning_modules.spd.objective import SPDObjective
from tests.helpers.spd_targets import (
    KINDS,
    STOCHASTIC_COEFFS,
    assert_same_terms_and_grads,
    objective_terms_and_grads,
    tiny_component_model,
    tiny_target_and_batch,
)

COEFFS = STOCHASTIC_COEFFS


def _double(kind: str):
    target, x, patterns, loss_type = tiny_target_and_batch(kind)
    return target.double(), (x.double() if x.is_floating_point() else x), patterns, loss_type


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("delta_from_output", [False, True])
def test_folded_terms_give_equal_losses_and_gradients(kind, delta_from_output):
    target, x, patterns, loss_type = _double(kind)
    modules = len(tiny_component_model(target, patterns).module_names)
    kwargs = {"delta_from_target_output": delta_from_output}
    apart = objective_terms_and_grads(
        tiny_component_model(target, patterns), x, loss_type, COEFFS, layerwise_batch=modules - 1, **kwargs
    )  # batched, but in two forwards: not folded
    folded = objective_terms_and_grads(
        tiny_component_model(target, patterns), x, loss_type, COEFFS, layerwise_batch=modules, **kwargs
    )
    # the KL runs in float32 (its sums of per-token terms at ~1e-7); the MSE toys stay in float64
    assert_same_terms_and_grads(apart, folded, rel=1e-5 if loss_type == "kl" else 1e-12)


def test_folded_terms_in_either_order():
    """With the layerwise term first in loss_coeffs, its masks are drawn first, as apart."""
    target, x, patterns, loss_type = _double("resid_mlp")
    coeffs = {"stochastic_recon_layerwise": 1.0, "stochastic_recon": 0.5, "importance_minimality": 1e-3}
    apart, folded = (
        objective_terms_and_grads(
            tiny_component_model(target, patterns), x, loss_type, coeffs, layerwise_batch=b
        )
        for b in (1, 64)
    )
    assert_same_terms_and_grads(apart, folded, rel=1e-12)


def test_fold_only_where_each_term_draws_its_own_masks(monkeypatch):
    """Folded when layerwise_batch covers every module and the two terms are adjacent in loss_coeffs; not
    when a term between them draws masks, nor when the layerwise forwards take more than one batch."""
    target, x, patterns, loss_type = _double("resid_mlp")
    cm = tiny_component_model(target, patterns)
    modules = len(cm.module_names)
    calls = []
    real = L.folded_stochastic_recon_losses
    monkeypatch.setattr(L, "folded_stochastic_recon_losses", lambda *a, **k: calls.append(1) or real(*a, **k))

    def folds(coeffs: dict[str, float], batch: int) -> bool:
        calls.clear()
        SPDObjective(coeffs, output_loss_type=loss_type, layerwise_batch=batch)(cm, x, 0.0)
        return bool(calls)

    assert folds(COEFFS, modules)
    assert not folds(COEFFS, modules - 1)
    between = {"stochastic_recon": 1.0, "stochastic_recon_subset": 1.0, "stochastic_recon_layerwise": 1.0}
    assert not folds(between, modules)
    assert not folds({"stochastic_recon_layerwise": 1.0, "importance_minimality": 1.0}, modules)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not folds(COEFFS, modules)  # Delta formed: its rounding kept
        calls.clear()
        SPDObjective(
            COEFFS, output_loss_type=loss_type, layerwise_batch=modules, delta_from_target_output=True
        )(cm, x, 0.0)
        assert calls


def test_folding_saves_a_forward_and_backward():
    target, x, patterns, loss_type = tiny_target_and_batch("gpt")
    cm = tiny_component_model(target, patterns).float()
    modules = len(cm.module_names)

    def calls(batch: int) -> int:
        objective = SPDObjective(dict(COEFFS), output_loss_type=loss_type, layerwise_batch=batch)
        return count_ops(lambda: objective(cm, x, 0.0).total.backward())["work"]

    apart, folded = calls(modules - 1), calls(modules)
    # apart: the layerwise term in two batched forwards (modules - 1, then 1) plus the all-modules one;
    # folded: one forward for all of it
    assert folded < apart, (apart, folded)


def test_row_slices_with_two_spans_mask_both():
    """A module with two spans runs its components on both, each with its own rows of the mask; a span
    shared by two modules masks both there."""
    target, x, patterns, _ = _double("resid_mlp")
    cm = tiny_component_model(target, patterns)
    a, b = cm.module_names[:2]
    rows = x.shape[0]
    mask_a = torch.rand(2 * rows, cm.module_to_c[a], dtype=torch.float64)
    mask_b = torch.rand(rows, cm.module_to_c[b], dtype=torch.float64)
    with torch.no_grad():
        both_alone = cm(x, masks={a: mask_a[:rows], b: mask_b})
        a_alone = cm(x, masks={a: mask_a[rows:]})
        clean = cm(x)
        out = cm(
            torch.cat([x, x, x]), masks={a: mask_a, b: mask_b},
            row_slices={a: [(0, rows), (2 * rows, 3 * rows)], b: (0, rows)},
        )  # fmt: skip
    torch.testing.assert_close(out[:rows], both_alone)
    torch.testing.assert_close(out[rows : 2 * rows], clean)
    torch.testing.assert_close(out[2 * rows :], a_alone)


def test_folded_terms_under_bf16_autocast():
    """Under autocast the fold runs with the delta from the target's output (with Delta formed it would
    round the all-modules term's delta otherwise, so it does not fold): the same terms, and gradients within
    a few bfloat16 roundings (2^-8) of the largest, where the wider forward's backward rounds otherwise."""
    target, x, patterns, loss_type = tiny_target_and_batch("gpt")
    modules = len(tiny_component_model(target, patterns).module_names)
    results = []
    for batch in (modules - 1, modules):
        cm = tiny_component_model(target, patterns).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(
                objective_terms_and_grads(
                    cm, x, loss_type, COEFFS, layerwise_batch=batch, delta_from_target_output=True
                )
            )
    (terms, grads), (terms_folded, grads_folded) = results
    for k in terms:
        assert terms_folded[k] == pytest.approx(terms[k], rel=1e-3), k
    for a, b in zip(grads, grads_folded):
        torch.testing.assert_close(b, a, rtol=0, atol=4 * 2**-8 * a.abs().max().item())
