"""The stochastic terms' delta term taken from the target module's own output (ObjectiveConfig
.delta_from_target_output: r (y - b - x V U)) against Delta = W - (V U)^T formed each step: the same
losses and gradients on every target family, and Delta not formed when no term needs its values."""

from unittest import mock

import pytest
import torch

from lightning_modules.spd.component_model import ComponentModel, _CallState
from tests.helpers.spd_targets import (
    KINDS,
    assert_same_terms_and_grads,
    objective_terms_and_grads,
    tiny_component_model,
    tiny_target_and_batch,
)

COEFFS = {
    "importance_minimality": 1e-3,
    "stochastic_recon": 1.0,
    "stochastic_recon_layerwise": 1.0,
    "stochastic_recon_subset": 1.0,
}


def _terms_and_grads(
    target: torch.nn.Module, patterns: dict, x: torch.Tensor, loss_type: str, coeffs: dict, **objective_kwargs
) -> tuple[dict, list]:
    cm = tiny_component_model(target, patterns)
    return objective_terms_and_grads(cm, x, loss_type, coeffs, **objective_kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layerwise_batch", [1, 64])
def test_delta_from_target_output_gives_equal_losses_and_gradients(kind, layerwise_batch):
    target, x, patterns, loss_type = tiny_target_and_batch(kind)
    target = target.double()
    x = x.double() if x.is_floating_point() else x
    runs = [
        _terms_and_grads(
            target,
            patterns,
            x,
            loss_type,
            COEFFS,
            layerwise_batch=layerwise_batch,
            delta_from_target_output=f,
        )
        for f in (False, True)
    ]
    # the KL runs in float32 (its sums of per-token terms at ~1e-7); the MSE toys stay in float64
    assert_same_terms_and_grads(*runs, rel=1e-5 if loss_type == "kl" else 1e-10)


def test_delta_is_formed_only_where_a_term_needs_its_values():
    target, x, patterns, loss_type = tiny_target_and_batch("resid_mlp")
    target, x = target.double(), x.double()
    with mock.patch.object(ComponentModel, "weight_deltas", side_effect=AssertionError("Delta formed")):
        _terms_and_grads(target, patterns, x, loss_type, COEFFS, delta_from_target_output=True)
        with pytest.raises(AssertionError, match="Delta formed"):  # the reference's way forms it
            _terms_and_grads(target, patterns, x, loss_type, COEFFS)
    # a term that needs Delta's values (PGD, faithfulness) still gets them, the sampled ones still match
    coeffs = COEFFS | {"pgd_recon": 1.0, "faithfulness": 1.0}
    runs = [
        _terms_and_grads(target, patterns, x, loss_type, coeffs, delta_from_target_output=f)
        for f in (False, True)
    ]
    assert_same_terms_and_grads(*runs, rel=1e-10)


def test_a_delta_from_the_output_needs_the_output():
    target, x, patterns, _ = tiny_target_and_batch("resid_mlp")
    cm = tiny_component_model(target, patterns)
    name = cm.module_names[0]
    ones = torch.ones(cm.module_to_c[name], dtype=torch.float64)
    cm._state = _CallState({name: ones}, {name: (None, None)}, {}, None)  # as inside a forward
    try:
        with pytest.raises(RuntimeError, match="no output at hand"):
            cm._masked_output(cm.target_model.get_submodule(name), name, x.double(), torch.float64)
    finally:
        cm._state = None
