"""The layerwise term batched (ObjectiveConfig.layerwise_batch > 1: several modules' one-module-masked
forwards as one forward of the batch repeated, ComponentModel's row_slices) against one forward per module
(from the clean prefix): the same losses and gradients, on every target family."""

import pytest
import torch

from benchmarks.op_count import count_ops
from lightning_modules.spd.losses import KLTarget
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [2, 64])  # 2: chunks of two modules and a remainder; 64: all at once
def test_batched_layerwise_gives_equal_losses_and_gradients(kind, batch):
    target, x, patterns, loss_type = tiny_target_and_batch(kind)
    target = target.double()
    x = x.double() if x.is_floating_point() else x
    one, batched = (
        objective_terms_and_grads(
            tiny_component_model(target, patterns), x, loss_type, COEFFS, layerwise_batch=b
        )
        for b in (1, batch)
    )
    # the KL runs in float32 (its sums of per-token terms at ~1e-7); the MSE toys stay in float64
    assert_same_terms_and_grads(one, batched, rel=1e-5 if loss_type == "kl" else 1e-12)


def test_batched_layerwise_makes_fewer_operator_calls():
    """The point of batching: one forward and backward instead of one per module (the calls of the
    layerwise term and its masks: those of an objective with it, less those of one with the clean forward
    and the CIs alone)."""
    target, x, patterns, loss_type = tiny_target_and_batch("gpt")
    cm = tiny_component_model(target, patterns).float()

    def calls(terms: dict[str, float], batch: int = 1) -> int:
        objective = SPDObjective(terms, output_loss_type=loss_type, layerwise_batch=batch)
        return count_ops(lambda: objective(cm, x, 0.0).total.backward())["work"]

    base = calls({"importance_minimality": 1.0})
    one, batched = (calls({"stochastic_recon_layerwise": 1.0}, b) - base for b in (1, len(cm.module_names)))
    assert batched < one / 2, (one, batched)


def test_row_slices_mask_only_their_rows():
    """Rows outside a module's slice run the target; rows inside equal a forward masked on that batch alone."""
    target, x, patterns, _ = tiny_target_and_batch("resid_mlp")
    cm = tiny_component_model(target, patterns)
    x = x.double()
    name = cm.module_names[1]
    rows = x.shape[0]
    mask = torch.rand(rows, cm.module_to_c[name], dtype=torch.float64)
    with torch.no_grad():
        clean = cm(x)
        alone = cm(x, masks={name: mask})
        both = cm(torch.cat([x, x, x]), masks={name: mask}, row_slices={name: (rows, 2 * rows)})
    torch.testing.assert_close(both[:rows], clean)
    torch.testing.assert_close(both[rows : 2 * rows], alone)
    torch.testing.assert_close(both[2 * rows :], clean)


def test_row_slices_are_checked():
    target, x, patterns, _ = tiny_target_and_batch("resid_mlp")
    cm = tiny_component_model(target, patterns)
    a, b = cm.module_names[:2]
    masks = {a: torch.ones(cm.module_to_c[a]), b: torch.ones(cm.module_to_c[b])}
    xx = torch.cat([x, x]).double()
    with pytest.raises(ValueError, match="overlapping spans"):  # (two modules' spans may overlap)
        cm(xx, masks=masks, row_slices={a: [(0, 40), (32, 64)], b: (0, 8)})
    with pytest.raises(ValueError, match="start < stop"):
        cm(xx, masks=masks, row_slices={a: (4, 4)})
    with pytest.raises(ValueError, match="no mask"):
        cm(xx, masks={a: masks[a]}, row_slices={b: (0, 32)})
    with pytest.raises(ValueError, match="both a routing mask and a row slice"):
        cm(xx, masks=masks, routing_masks={a: torch.ones(64, dtype=torch.bool)}, row_slices={a: (0, 32)})
    with pytest.raises(ValueError, match="layerwise_batch must be >= 1"):
        SPDObjective(dict(COEFFS), layerwise_batch=0)


def test_kl_target_repeat_shares_the_head_projection():
    probs = torch.softmax(torch.randn(3, 4, 7), -1)
    target = KLTarget.from_logits(probs.log())
    weight = torch.randn(7, 5)
    twice = target.repeat(2)
    assert twice is target.repeat(2) and target.repeat(1) is target
    torch.testing.assert_close(twice.probs, torch.cat([target.probs, target.probs]))
    torch.testing.assert_close(twice.neg_entropy, torch.cat([target.neg_entropy, target.neg_entropy]))
    expected = twice.probs.reshape(-1, 7) @ weight
    torch.testing.assert_close(twice.head_projection(weight), expected)


def test_batched_layerwise_under_bf16_autocast():
    """Under autocast every masked module runs through the hook (none is replaced): the row slices too."""
    target, x, patterns, loss_type = tiny_target_and_batch("gpt")
    results = []
    for batch in (1, 64):
        cm = tiny_component_model(target, patterns).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(objective_terms_and_grads(cm, x, loss_type, COEFFS, layerwise_batch=batch))
    (terms, grads), (terms_batched, grads_batched) = results
    for k in terms:
        assert terms_batched[k] == pytest.approx(terms[k], rel=1e-3), k
    for a, b in zip(grads, grads_batched):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * (b.abs().max().item() + 1e-12))
