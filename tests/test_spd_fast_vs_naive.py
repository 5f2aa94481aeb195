"""Our SPD step (persistent hooks, cached target weights, ScalarMLPFunction, fused KL) against the naive
implementation in tests/helpers/spd_naive.py: same losses and same gradients for every trained parameter."""

import pytest
import torch

from lightning_modules.spd.objective import SPDObjective
from tests.helpers.spd_naive import COEFFS, NaiveSPD, build


@pytest.mark.parametrize("config", ["tms_5-2", "tiny_lm"])
def test_fast_path_matches_naive_losses_and_gradients(config):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cm, x, loss_type = build(config, "cpu")
        naive = NaiveSPD(cm)
        objective = SPDObjective(dict(COEFFS), output_loss_type=loss_type)
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
