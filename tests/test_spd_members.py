"""Member ensembles (lightning_modules/spd/members.py): k decompositions stacked in one ComponentModel give
each member exactly its own run's losses and gradients (float64), with every loss family of the toy
recipes, when each member draws its random numbers from its own generator; and what members refuse."""

import copy
import json
from pathlib import Path

import pytest
import torch

from lightning_modules.spd.component_model import ComponentModel
from lightning_modules.spd.members import MemberGenerators, integers, load_members, member_model, uniform
from lightning_modules.spd.objective import SPDObjective
from lightning_modules.spd.targets import save_toy_target
from tests.helpers.spd_targets import tiny_target_and_batch

SEEDS = (3, 4, 5)
PGD = {"n_steps": 2, "step_size": 0.3, "init": "random"}
RECIPES = {
    # the ResidMLP 3-layer recipe's terms
    "stochastic": {"importance_minimality": 1e-3, "stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0},
    # the ResidMLP 2-layer recipe's: subset routing and PGD with masks shared across each member's batch
    "subset_pgd": {"importance_minimality": 1e-3, "stochastic_recon_subset": 2.0, "pgd_recon": 2.0},
    "the_rest": {
        "faithfulness": 0.5,
        "ci_masked_recon": 1.0,
        "ci_masked_recon_layerwise": 1.0,
        "unmasked_recon": 0.5,
        "pgd_recon_layerwise": 1.0,
        "pgd_recon_subset": 1.0,
        "stochastic_hidden_acts_recon": 1.0,
        "ci_masked_recon_subset": 1.0,
    },  # fmt: skip
}


def _singles(kind: str, ci_fn_type: str) -> tuple[list[ComponentModel], torch.Tensor]:
    target, x, patterns, _ = tiny_target_and_batch(kind)
    target = target.double()
    singles = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        singles.append(ComponentModel(copy.deepcopy(target), patterns, ci_fn_type, [6]).double())
    return singles, x.double()


def _ensemble(singles: list[ComponentModel], ci_fn_type: str) -> ComponentModel:
    one = singles[0]
    patterns = dict(one.module_to_c)
    ensemble = ComponentModel(
        copy.deepcopy(one.target_model), patterns, ci_fn_type, [6], members=len(singles)
    ).double()
    load_members(ensemble, singles)
    return ensemble


def _generators(step: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 * seed + step) for seed in SEEDS]


def _run(objective: SPDObjective, cm: ComponentModel, x: torch.Tensor, generator, frac: float = 0.4):
    out = objective(cm, x, frac, generator=generator)
    out.total.backward()
    return out


def _grads(cm: ComponentModel) -> list[torch.Tensor]:
    return [p.grad.clone() for p in (*cm.components.parameters(), *cm.ci_fns.parameters())]


def _member_grads(ensemble: ComponentModel, i: int) -> list[torch.Tensor]:
    comp = [p.grad[i] for p in ensemble.components.parameters()]
    ci = [p.grad[i] for name in ensemble.module_names for p in ensemble.ci_fn(name).stacked]
    return comp + ci


@pytest.mark.parametrize("kind", ["resid_mlp", "tms"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("ci_fn_type", ["shared_mlp", "mlp", "vector_mlp"])
def test_members_give_each_member_its_own_runs_losses_and_gradients(kind, recipe, ci_fn_type):
    singles, x = _singles(kind, ci_fn_type)
    ensemble = _ensemble(singles, ci_fn_type)
    scope = "shared_across_batch" if recipe == "subset_pgd" else "unique_per_datapoint"
    objective = SPDObjective(
        dict(RECIPES[recipe]), output_loss_type="mse", n_mask_samples=2, pgd=PGD | {"mask_scope": scope}
    )
    runs = [_run(objective, cm, x, g) for cm, g in zip(singles, _generators(7))]
    together = _run(objective, ensemble, x, MemberGenerators(_generators(7)))
    assert together.total.item() == pytest.approx(sum(r.total.item() for r in runs), rel=1e-12)
    for term, value in together.terms.items():
        mean = sum(r.terms[term].item() for r in runs) / len(runs)
        assert value.item() == pytest.approx(mean, rel=1e-12), term
    for name in ensemble.module_names:
        for i, run in enumerate(runs):
            torch.testing.assert_close(together.ci[name][i], run.ci[name], rtol=1e-12, atol=1e-14)
    for i, single in enumerate(singles):
        for got, want in zip(_member_grads(ensemble, i), _grads(single), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_importance_beta_counts_each_members_batch_apart():
    from lightning_modules.spd.losses import importance_minimality_loss

    ci = {"a": torch.rand(3, 8, 4, dtype=torch.float64)}
    together = importance_minimality_loss(ci, 1.5, beta=0.7, members=3)
    apart = [importance_minimality_loss({"a": ci["a"][i]}, 1.5, beta=0.7) for i in range(3)]
    assert together.item() == pytest.approx(sum(a.item() for a in apart) / 3, rel=1e-12)
    # read without members, the three batches would be one: beta's log term sees their sum
    assert importance_minimality_loss(ci, 1.5, beta=0.7).item() != pytest.approx(together.item(), rel=1e-6)


def test_adamw_steps_keep_members_equal_to_their_runs():
    """Three steps of AdamW on the stacked parameters move each member as its own run's optimizer moves it."""
    singles, x = _singles("resid_mlp", "shared_mlp")
    ensemble = _ensemble(singles, "shared_mlp")
    objective = SPDObjective(dict(RECIPES["subset_pgd"]), output_loss_type="mse", pgd=PGD)

    def params(cm: ComponentModel) -> list[torch.Tensor]:
        return [*cm.components.parameters(), *cm.ci_fns.parameters()]

    optimizers = [torch.optim.AdamW(params(cm), lr=1e-2, weight_decay=0.1) for cm in [*singles, ensemble]]
    for step in range(3):
        for cm, opt, g in zip(
            [*singles, ensemble], optimizers, [*_generators(step), MemberGenerators(_generators(step))]
        ):
            opt.zero_grad()
            _run(objective, cm, x, g, frac=step / 3)
            opt.step()
    for i, single in enumerate(singles):
        view = member_model(ensemble, i, copy.deepcopy(single))
        for got, want in zip(params(view), params(single), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_member_draws_are_each_members_own():
    gens = _generators(0)
    drawn = uniform((3, 4, 2), MemberGenerators(_generators(0)))
    for i, g in enumerate(gens):
        torch.testing.assert_close(drawn[i], torch.rand((4, 2), generator=g))
    ints = integers(0, 5, (3, 6), MemberGenerators(_generators(1)))
    for i, g in enumerate(_generators(1)):
        torch.testing.assert_close(ints[i], torch.randint(0, 5, (6,), generator=g))
    with pytest.raises(ValueError, match="leading dim of 3"):
        uniform((2, 4), MemberGenerators(_generators(0)))


def test_what_members_refuse():
    singles, x = _singles("resid_mlp", "shared_mlp")
    ensemble = _ensemble(singles, "shared_mlp")
    with pytest.raises(ValueError, match="output_loss_type must be 'mse'"):
        SPDObjective({"stochastic_recon": 1.0}, output_loss_type="kl")(ensemble, x, 0.0)
    with pytest.raises(ValueError, match="layerwise_batch must be 1"):
        SPDObjective({"stochastic_recon_layerwise": 1.0}, output_loss_type="mse", layerwise_batch=4)(
            ensemble, x, 0.0
        )
    target, ids, patterns, _ = tiny_target_and_batch("gpt")
    with pytest.raises(ValueError, match="Embedding|output head"):
        ComponentModel(target, {"transformer.wte": 4}, "mlp", [4], members=2)
    with pytest.raises(ValueError, match="members must be >= 1"):
        ComponentModel(target, patterns, "mlp", [4], members=0)


# ----------------------------------------------------------------------------- through the LightningModule
def test_member_seeds_fit_gives_each_member_its_own_runs_parameters_and_results(tmp_path):
    """An SPDLightningModule with member_seeds [3, 4] (TMS, tied components, faithfulness warm-up, stochastic
    and PGD terms, validation) ends where the two runs seeded 3 and 4 end, and writes each member's results."""
    import lightning.pytorch as pl

    from lightning_modules.spd.toy_models import TMSModel
    from tests.test_spd_module import fit, spd_module, toy_data

    torch.manual_seed(2)
    target = save_toy_target(tmp_path / "tms.pt", TMSModel(5, 2), "tms", {"n_features": 5, "n_hidden": 2})
    coeffs = {"stochastic_recon": 1.0, "stochastic_recon_layerwise": 0.5, "pgd_recon": 0.5,
              "importance_minimality": 3e-3}  # fmt: skip
    overrides = {
        "objective": {"loss_coeffs": coeffs, "pgd": {"mask_scope": "shared_across_batch"}},
        "evaluation": {"figures": "off"},  # re-rendered below, per member
    }
    singles = []
    for seed in (3, 4):
        pl.seed_everything(seed)
        module = spd_module(target, **overrides)
        fit(module, toy_data(), tmp_path / f"single{seed}", steps=5)
        singles.append(module)
    pl.seed_everything(0)  # the members' own seeds decide, not the run's
    together = spd_module(target, member_seeds=[3, 4], **overrides)
    trainer = fit(together, toy_data(), tmp_path / "members", steps=5)
    for i, single in enumerate(singles):
        for name in single.cm.module_names:
            for attr in ("V", "U"):
                got = getattr(together.cm.component(name), attr)[i]
                torch.testing.assert_close(
                    got, getattr(single.cm.component(name), attr), rtol=1e-4, atol=1e-6
                )
    out = Path(trainer.log_dir)
    summary = json.loads((out / "spd_results.json").read_text())
    assert summary["member_seeds"] == [3, 4] and set(summary["members"]) == {"3", "4"}
    for seed, single in zip((3, 4), singles):
        mine = json.loads((out / "members" / f"seed_{seed}" / "spd_results.json").read_text())
        theirs = json.loads((Path(single.trainer.log_dir) / "spd_results.json").read_text())
        assert mine["seed"] == seed
        for name, row in theirs["modules"].items():
            assert mine["modules"][name]["alive_components"] == row["alive_components"]
            assert mine["modules"][name]["mmcs"] == pytest.approx(row["mmcs"], rel=1e-4)
    from lightning_modules.spd.figures import rerender

    trainer.save_checkpoint(out / "checkpoints" / "last.ckpt")
    paths = rerender(out, tmp_path / "again")  # each member's figures where its run keeps them
    assert {p.relative_to(tmp_path / "again").parts[:2] for p in paths} == {
        ("members", "seed_3"),
        ("members", "seed_4"),
    }


def test_member_seeds_must_be_distinct_ints(tmp_path):
    from tests.test_spd_module import spd_module

    for bad, message in (([], "non-empty"), ([3, 3], "repeats"), ([3, "a"], "must be ints")):
        with pytest.raises(ValueError, match=message):
            spd_module(tmp_path / "t.pt", member_seeds=bad)


def test_mlp_members_through_autograd_as_on_a_gpu(monkeypatch):
    """The `mlp` CI functions' members side by side through autograd's graph (a GPU's path; a CPU's eager
    calls take ScalarMLPFunction): the same losses and gradients as the runs."""
    from lightning_modules.spd import ci_functions

    monkeypatch.setattr(ci_functions, "BLOCKED_CPU_PATH", False)
    test_members_give_each_member_its_own_runs_losses_and_gradients("resid_mlp", "stochastic", "mlp")


def test_a_resumed_member_run_is_its_resumed_runs(tmp_path):
    """Stopped at step 2 and resumed from its checkpoint to step 4, a member run ends where its two runs,
    stopped and resumed alike, end: the stacked parameters load back, the members' generators reseed."""
    import lightning.pytorch as pl

    from lightning_modules.spd.module import SPDLightningModule
    from lightning_modules.spd.toy_models import TMSModel
    from tests.test_spd_module import fit, spd_module, toy_data

    torch.manual_seed(2)
    target = save_toy_target(tmp_path / "tms.pt", TMSModel(5, 2), "tms", {"n_features": 5, "n_hidden": 2})

    def stopped_and_resumed(seed: int, **kwargs) -> SPDLightningModule:
        kwargs["evaluation"] = {"figures": "off"}
        pl.seed_everything(seed)
        trainer = fit(spd_module(target, **kwargs), toy_data(), tmp_path / f"first{seed}", steps=2)
        trainer.save_checkpoint(tmp_path / f"{seed}.ckpt")
        pl.seed_everything(seed)
        resumed = spd_module(target, **kwargs)
        fit(resumed, toy_data(), tmp_path / f"resumed{seed}", steps=4, ckpt_path=tmp_path / f"{seed}.ckpt")
        assert resumed.global_step == 4
        return resumed

    together = stopped_and_resumed(0, member_seeds=[3, 4])
    loaded = SPDLightningModule.load_from_checkpoint(tmp_path / "0.ckpt", weights_only=True)
    assert loaded.cm.members == 2 and loaded.hparams.member_seeds == [3, 4]
    for i, seed in enumerate((3, 4)):
        single = stopped_and_resumed(seed)
        for name in single.cm.module_names:
            got, want = together.cm.component(name).V[i], single.cm.component(name).V
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
