"""MuonWithAdamW: which tensors Muon takes, q/k/v blocks, schedule and state, resume, DDP, strategy errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_modules.common.optim import (
    MuonWithAdamW,
    check_optimizer_strategy,
    fused_qkv_splits,
    warmup_cosine_lambda,
)
from lightning_modules.gpt import GPT, GPTConfig
from tests.helpers.cli import FAST, ROOT, run_train
from tests.helpers.fault_injection import read_params, read_record, record_yaml

TINY_MUON = ROOT / "configs" / "gpt2" / "tiny_muon.yaml"
DDP_CPU = ROOT / "configs" / "trainer" / "ddp_cpu.yaml"
MUON = "lightning_modules.common.optim.MuonWithAdamW"


def tiny_gpt(**overrides) -> GPT:
    """A 2-layer GPT small enough for a few optimizer steps in milliseconds."""
    torch.manual_seed(0)
    args = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, bias=True, tie_embeddings=True)
    return GPT(GPTConfig(**{**args, **overrides}))


class WithConfig(nn.Module):
    """A GPT and its config, the two things configure_optimizer reads from a LightningModule."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model, self.config = model, model.config


def muon_for(model: GPT, **kwargs) -> MuonWithAdamW:
    """MuonWithAdamW over the model, fused QKV split into q, k, v as configure_optimizer does."""
    named = list(model.named_parameters())
    splits = fused_qkv_splits(WithConfig(model), (n for n, _ in named))
    return MuonWithAdamW(named, row_splits=splits, **kwargs)


def batch(model: GPT, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (4, model.config.block_size + 1), generator=gen)


def loss_of(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    logits = logits[0] if isinstance(logits, tuple) else logits
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def train(model: GPT, opt: torch.optim.Optimizer, steps: range, clip: float | None = None) -> list[float]:
    losses = []
    for step in steps:
        opt.zero_grad()
        loss = loss_of(model, batch(model, step))
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        opt.step()
        losses.append(loss.item())
    return losses


def test_hidden_matrices_go_to_muon_and_the_rest_to_adamw():
    model = tiny_gpt()
    opt = muon_for(model)
    muon = set(opt.hidden_names)
    for i in range(2):
        h = f"transformer.h.{i}"
        assert {f"{h}.attn.c_attn.weight", f"{h}.attn.c_proj.weight", f"{h}.mlp.c_fc.weight"} <= muon
        assert f"{h}.mlp.c_proj.weight" in muon
    assert len(muon) == 8  # four projections per block, nothing else
    adamw = set(opt.adamw_names)
    assert not muon & adamw
    assert {n for n, _ in model.named_parameters()} == muon | adamw
    shapes = dict(model.named_parameters())
    assert any("wte" in n for n in adamw)  # the (tied) embedding
    assert all(shapes[n].dim() == 1 or "wte" in n or "wpe" in n for n in adamw)  # else norms and biases
    # one object: its groups are the inner optimizers' own dicts, Muon's first
    assert opt.param_groups == [*opt.muon.param_groups, *opt.adamw.param_groups]
    assert all(a is b for a, b in zip(opt.param_groups, [*opt.muon.param_groups, *opt.adamw.param_groups]))
    # AdamW: decay on the embedding (2-D), none on norms and biases
    by_decay = {g["weight_decay"]: g["params"] for g in opt.adamw.param_groups}
    assert all(p.dim() >= 2 for p in by_decay[0.1]) and all(p.dim() == 1 for p in by_decay[0.0])


def test_untied_lm_head_and_swiglu_gate_are_sorted_by_name_and_shape():
    model = tiny_gpt(tie_embeddings=False, mlp="swiglu")
    opt = muon_for(model)
    assert "lm_head.weight" in opt.adamw_names
    assert "transformer.h.0.mlp.c_up.weight" in opt.hidden_names


def test_fused_qkv_is_orthogonalised_as_three_matrices():
    """One step on the fused matrix equals torch.optim.Muon on q, k and v as separate parameters."""
    torch.manual_seed(0)
    fused = nn.Parameter(torch.randn(3 * 8, 8))
    parts = [nn.Parameter(block.clone()) for block in fused.detach().split(8)]
    opt = MuonWithAdamW([("attn.c_attn.weight", fused)], lr=0.05, row_splits={"attn.c_attn.weight": [8] * 3})
    reference = torch.optim.Muon(parts, lr=0.05, weight_decay=0.0)
    for _ in range(3):
        grad = torch.randn(24, 8)
        fused.grad = grad.clone()
        for p, g in zip(parts, grad.split(8)):
            p.grad = g.clone()
        opt.step(), reference.step()
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in parts]), rtol=0, atol=0)
    # and it is not what Muon does to the fused matrix as one
    whole = nn.Parameter(torch.cat([p.detach() for p in parts]).clone())
    whole.grad = torch.randn(24, 8)
    before = whole.detach().clone()
    torch.optim.Muon([whole], lr=0.05).step()
    fused.grad = whole.grad.clone()
    fused.data.copy_(before)
    opt.step()
    assert not torch.allclose(fused.detach(), whole.detach())


def test_gqa_splits_follow_the_head_counts():
    model = tiny_gpt(n_kv_head=2)
    splits = fused_qkv_splits(WithConfig(model), [n for n, _ in model.named_parameters()])
    assert splits["transformer.h.0.attn.c_attn.weight"] == [32, 16, 16]
    with pytest.raises(ValueError, match="sum to"):
        MuonWithAdamW(list(model.named_parameters()), row_splits={"transformer.h.0.attn.c_attn.weight": [8]})


def test_the_schedule_scales_both_peaks_and_clipping_sees_every_parameter():
    model = tiny_gpt()
    opt = muon_for(model, lr=0.02, adamw_lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_lambda(2, 10, 0.1))
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.01)  # warmup step 1 of 2
    assert all(g["lr"] == pytest.approx(5e-4) for g in opt.adamw.param_groups)
    train(model, opt, range(1), clip=1e-3)
    schedule.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02)
    clipped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert clipped == {id(p) for p in model.parameters()}


def test_state_dict_holds_both_states_and_resumes_exactly():
    model = tiny_gpt()
    opt = muon_for(model)
    train(model, opt, range(3), clip=1.0)
    state = copy.deepcopy(opt.state_dict())
    assert set(state) == {"muon", "adamw"}
    assert all("momentum_buffer" in s for s in state["muon"]["state"].values())
    assert all("exp_avg_sq" in s for s in state["adamw"]["state"].values())
    saved = copy.deepcopy(model.state_dict())
    uninterrupted = train(model, opt, range(3, 6), clip=1.0)

    resumed_model = tiny_gpt()
    resumed_model.load_state_dict(saved)
    resumed_opt = muon_for(resumed_model)
    resumed_opt.load_state_dict(state)
    assert train(resumed_model, resumed_opt, range(3, 6), clip=1.0) == uninterrupted
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert len(resumed_opt.state) == len(list(model.parameters()))  # the merged view sees both states


def test_a_short_fit_lowers_the_loss():
    model = tiny_gpt()
    opt = muon_for(model, lr=0.02, adamw_lr=3e-3)
    fixed = batch(model, 0)
    first = loss_of(model, fixed).item()
    for _ in range(30):
        opt.zero_grad()
        loss_of(model, fixed).backward()
        opt.step()
    assert loss_of(model, fixed).item() < first - 1.0  # memorising one batch: well below ln(64) = 4.16


def test_named_pairs_are_required():
    with pytest.raises(ValueError, match="name, parameter"):
        MuonWithAdamW(list(tiny_gpt().parameters()))


@pytest.mark.parametrize(
    "strategy", ["deepspeed", "deepspeed_stage_2", "fsdp", "lightning.pytorch.strategies.FSDPStrategy"]
)
def test_sharding_strategies_are_refused_before_training(strategy):
    with pytest.raises(ValueError, match="MuonWithAdamW does not support.*use DDP"):
        check_optimizer_strategy({"class_path": MUON}, strategy)
    check_optimizer_strategy({"class_path": "torch.optim.AdamW"}, strategy)  # AdamW: no objection
    check_optimizer_strategy({"class_path": MUON}, "ddp")


def test_train_py_refuses_muon_under_fsdp_with_a_short_message(tmp_path):
    result = run_train(
        tmp_path, "fit", "--config", str(TINY_MUON), *FAST, "--trainer.strategy=fsdp", check=False
    )
    assert result.returncode == 2
    assert "MuonWithAdamW does not support trainer.strategy='fsdp'" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "lightning_logs").exists()  # refused before anything was built


def test_train_py_resume_equals_an_uninterrupted_run(tmp_path):
    common = [
        "--config", str(TINY_MUON), *FAST, "--trainer.max_steps=8", "--trainer.val_check_interval=4",
        "--checkpoint.every_n_train_steps=4", "--checkpoint.save_top_k=-1", "--checkpoint.monitor=null",
        "--checkpoint.filename=ckpt-{step}", "--model.init_args.lr_decay_steps=8",
    ]  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir(), part.mkdir()
    run_train(full, "fit", *common, "--config", str(record_yaml(full)))
    run_train(part, "fit", *common, "--config", str(record_yaml(part)), "--trainer.max_steps=4")
    ckpt = part / "lightning_logs" / "version_0" / "checkpoints" / "ckpt-4.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["optimizer_states"][0]
    assert set(saved) == {"muon", "adamw"}
    run_train(part, "fit", *common, "--config", str(record_yaml(part)), f"--ckpt_path={ckpt}")
    uninterrupted, resumed = read_record(full / "record"), read_record(part / "record")
    for step in range(5, 9):
        assert resumed["losses"][step] == uninterrupted["losses"][step], step
    want, got = read_params(full / "record"), read_params(part / "record")
    assert sorted(want) == sorted(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_ddp_two_processes_keep_identical_replicas(tmp_path):
    run_train(
        tmp_path, "fit", "--config", str(TINY_MUON), "--config", str(DDP_CPU),
        "--config", str(record_yaml(tmp_path)), *FAST, "--trainer.max_steps=4", timeout=900,
    )  # fmt: skip
    rank0, rank1 = read_params(tmp_path / "record", 0), read_params(tmp_path / "record", 1)
    start = read_params(tmp_path / "record", 0, "start")
    for name, value in rank0.items():
        torch.testing.assert_close(rank1[name], value, rtol=0, atol=0, msg=name)
    moved = [n for n in rank0 if not torch.equal(rank0[n], start[n])]
    assert any("c_attn" in n for n in moved) and any("wte" in n for n in moved)  # both optimizers stepped
