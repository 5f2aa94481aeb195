"""Callbacks in-process on CPU: atomic/async checkpoints, NaN skipping, throughput/MFU, profiling."""

import threading
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks import (
    AsyncAtomicCheckpointIO,
    AtomicCheckpointIO,
    CorruptCheckpointError,
    NonFiniteStepError,
    SkipNonFiniteSteps,
    StepWindowProfiler,
    TokenThroughputMonitor,
)
from callbacks.checkpoint_io import atomic_torch_save, load_checkpoint_file
from callbacks.throughput import peak_flops_for
from lightning_modules.gpt import GPTConfig, GPTLightningModule
from tests.helpers.trainers import quiet_trainer

TINY = dict(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)


def loader(n_batches=8, batch=4, seq=16, vocab=64):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (n_batches * batch, seq + 1), generator=g)
    return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=batch)


def module(**kwargs):
    return GPTLightningModule(
        GPTConfig(**TINY),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        warmup_steps=1,
        sample_tokens=0,
        **kwargs,
    )


def trainer(tmp_path, **kwargs):
    return quiet_trainer(tmp_path, **{"limit_val_batches": 0, **kwargs})


# --- atomic and asynchronous checkpoints -------------------------------------------------------


def test_atomic_save_never_exposes_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "model.ckpt"
    atomic_torch_save({"v": torch.ones(3)}, target)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        atomic_torch_save({"v": torch.zeros(3)}, target)
    assert torch.equal(torch.load(target)["v"], torch.ones(3))  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]  # no temporary left behind


def test_stale_temporaries_from_a_killed_writer_are_removed(tmp_path):
    (tmp_path / ".last.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"a": 1}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "broken.ckpt"
    atomic_torch_save({"w": torch.randn(100, 100)}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError, match="broken.ckpt"):
        load_checkpoint_file(path)
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CorruptCheckpointError, match="garbage.ckpt"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "garbage.ckpt")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint_file(tmp_path / "nope.ckpt")


def test_async_write_snapshots_state_and_orders_deletes_after_writes(tmp_path, monkeypatch):
    io = AsyncAtomicCheckpointIO()
    release = threading.Event()
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        release.wait(5)  # the writer thread blocks until the test lets it go
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    weights = torch.zeros(4)
    io.save_checkpoint({"w": weights}, tmp_path / "a.ckpt")
    # save returned while the writer is still blocked: a synchronous save would have waited out the 5 s
    # and written the file before returning
    assert not release.is_set() and not list(tmp_path.iterdir())
    io.remove_checkpoint(tmp_path / "a.ckpt")  # queued behind the write: must not race it
    weights += 1  # training keeps mutating the tensors; the checkpoint must hold the old values
    io.save_checkpoint({"w": weights}, tmp_path / "b.ckpt")
    release.set()
    io.teardown()  # flushes everything
    assert not (tmp_path / "a.ckpt").exists()
    assert torch.equal(torch.load(tmp_path / "b.ckpt")["w"], torch.ones(4))


def test_async_write_failure_is_reported_on_the_training_thread(tmp_path, monkeypatch):
    io = AsyncAtomicCheckpointIO()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    io.save_checkpoint({"a": 1}, tmp_path / "x.ckpt")
    with pytest.raises(RuntimeError, match="disk full"):
        io.wait()


def test_async_checkpointing_with_top_k_pruning_under_trainer(tmp_path):
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpts",
        every_n_train_steps=1,
        save_top_k=2,
        monitor="step",
        mode="max",
        save_last=True,
    )
    model = module()
    t = trainer(
        tmp_path,
        max_steps=8,
        enable_checkpointing=True,
        callbacks=[ckpt],
        plugins=[AsyncAtomicCheckpointIO()],
    )
    t.fit(model, loader())
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert "last.ckpt" in names and len([n for n in names if n != "last.ckpt"]) == 2, names
    assert not [n for n in names if n.endswith(".tmp")]
    state = load_checkpoint_file(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 8
    for name in names:  # every file on disk is complete and loads
        load_checkpoint_file(tmp_path / "ckpts" / name, weights_only=True)


# --- NaN / Inf skipping ----------------------------------------------------------------------------


class PoisonGradients(pl.Callback):
    """Test-only fault injection: make gradients NaN after backward at the chosen optimizer steps."""

    def __init__(self, steps, value=float("nan")):
        self.steps, self.value = set(steps), value

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(self.value)


class RecordWeights(pl.Callback):
    def __init__(self):
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_steps_are_skipped_and_weights_untouched(tmp_path, value):
    skip, record = SkipNonFiniteSteps(max_consecutive_skips=5), RecordWeights()
    model = module()
    t = trainer(tmp_path, max_steps=8, callbacks=[PoisonGradients({2, 5}, value), skip, record])
    t.fit(model, loader())
    assert skip.skipped_steps == 2 and t.global_step == 8
    for step in (2, 5):
        for before, after in zip(record.before[step], record.after[step]):
            assert torch.equal(before, after)  # the skipped step changed nothing
    assert not all(torch.equal(b, a) for b, a in zip(record.before[3], record.after[3]))  # others train
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt_state = t.optimizers[0].state
    assert all(s["step"].item() == 6 for s in opt_state.values())  # AdamW stepped 8 - 2 times


def test_nonfinite_loss_is_caught_before_backward(tmp_path):
    class NaNLoss(GPTLightningModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 1 else loss

    skip = SkipNonFiniteSteps()
    model = NaNLoss(GPTConfig(**TINY), warmup_steps=1, sample_tokens=0)
    trainer(tmp_path, max_steps=4, callbacks=[skip]).fit(model, loader())
    assert skip.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_consecutive_skips_stop_with_checkpoint_and_names(tmp_path):
    skip = SkipNonFiniteSteps(max_consecutive_skips=3)
    t = trainer(tmp_path, max_steps=8, callbacks=[PoisonGradients(range(2, 8)), skip])
    with pytest.raises(
        NonFiniteStepError, match=r"3 consecutive non-finite steps up to step 4.*grad of model\."
    ):
        t.fit(module(), loader())
    assert (tmp_path / "nonfinite_abort.ckpt").is_file()


def test_skipping_composes_with_accumulation_clipping_and_bf16(tmp_path):
    skip = SkipNonFiniteSteps()
    model = module()
    t = trainer(
        tmp_path,
        max_steps=4,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        precision="bf16-mixed",
        callbacks=[PoisonGradients({1}), skip],
    )
    t.fit(model, loader(n_batches=8))
    assert skip.skipped_steps == 1 and t.global_step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_count_is_logged(tmp_path):
    skip = SkipNonFiniteSteps()
    t = trainer(
        tmp_path,
        max_steps=6,
        callbacks=[PoisonGradients({1}), skip],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    t.fit(module(), loader())
    text = Path(t.logger.log_dir, "metrics.csv").read_text()
    assert "train/skipped_steps" in text
    assert t.callback_metrics["train/skipped_steps"].item() == 1


# --- throughput / MFU ---------------------------------------------------------------------------------


def test_throughput_logs_tokens_and_mfu_with_peak_override(tmp_path):
    monitor = TokenThroughputMonitor(peak_flops=1e12, window_size=2)
    model = module()
    t = trainer(
        tmp_path,
        max_steps=6,
        callbacks=[monitor],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        accumulate_grad_batches=2,
    )
    t.fit(model, loader(n_batches=12))
    header = Path(t.logger.log_dir, "metrics.csv").read_text().splitlines()[0]
    for key in ("train/device/items_per_sec", "train/device/samples_per_sec", "train/device/mfu"):
        assert key in header, header
    # counted once, for one micro-batch of (4, 16) tokens (accumulation does not multiply it)
    assert model.flops_per_batch == pytest.approx(sum(analytic_training_flops(model.config, 4, 16)), rel=0.1)


def analytic_training_flops(config: GPTConfig, batch: int, seq: int) -> tuple[int, int, int]:
    """Training FLOPs of one (batch, seq) batch as FlopCounterMode counts them: (matmuls, attention, head).

    A matmul of (m, k) by (k, n) is 2*m*k*n FLOPs, so a linear layer costs 2 * tokens * (its weights).
    Forward, per layer: c_attn n_embd*(n_head + 2*n_kv_head)*head_size, c_proj n_embd^2, the MLP
    2*n_embd*hidden (GELU) or 3*n_embd*hidden (SwiGLU); biases, norms, RoPE and activations are
    element-wise and not counted; the embedding lookup is indexing, 0 FLOPs. Attention per sequence and
    layer: q @ k^T and probs @ v, 2*n_head*seq^2*head_size each = 4*seq^2*n_embd; the causal mask is not
    discounted and GQA's keys/values count at n_head heads (broadcast). LM head: 2*tokens*n_embd*vocab
    (padded). Backward: each matmul Y = X @ W needs dX = dY @ W^T and dW = X^T @ dY, the same cost twice,
    so training = 3x forward. On the meta device SDPA runs the math decomposition (2 bmm forward, 4 back),
    which keeps the 3x; FlopCounterMode's formula for the fused kernels would add a score recompute.
    """
    tokens = batch * seq
    mlp_matrices = 3 if config.mlp == "swiglu" else 2
    per_layer = (
        config.n_embd * (config.n_head + 2 * config.n_kv_head) * config.head_size
        + config.n_embd * config.n_embd
        + mlp_matrices * config.n_embd * config.mlp_hidden
    )
    matmuls = 2 * tokens * config.n_layer * per_layer
    attention = batch * config.n_layer * 4 * seq * seq * config.n_embd
    head = 2 * tokens * config.n_embd * config.padded_vocab_size
    return 3 * matmuls, 3 * attention, 3 * head


FLOP_CONFIGS = {
    "gpt2": dict(block_size=64, vocab_size=100, n_layer=2, n_head=4, n_embd=32),
    "gqa_swiglu": dict(
        block_size=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=1, n_embd=64, mlp="swiglu", mlp_ratio=3.0,
        rope=True, norm="rmsnorm", qk_norm=True, bias=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("config", [GPTConfig(**c) for c in FLOP_CONFIGS.values()], ids=list(FLOP_CONFIGS))
def test_flops_per_batch_match_the_analytic_count(config):
    batch, seq = 3, 64
    x = torch.zeros(batch, seq, dtype=torch.long)
    counted = GPTLightningModule(config, sample_tokens=0).measure_flops_per_batch((x, x))
    matmuls, attention, head = analytic_training_flops(config, batch, seq)
    total = matmuls + attention + head
    assert min(attention, head) > 0.1 * total  # leaving out either term would break the 10% tolerance
    assert counted == pytest.approx(total, rel=0.1)


def test_peak_flops_table_knows_no_cpu():
    assert peak_flops_for(torch.device("cpu"), torch.float32) is None
    with pytest.raises(ValueError, match="peak_flops"):
        TokenThroughputMonitor(peak_flops=-1)


# --- profiler -----------------------------------------------------------------------------------------


def test_profiler_window_writes_trace_and_module_table(tmp_path):
    prof = StepWindowProfiler(skip_first=2, wait=1, warmup=1, active=2, output_dir=str(tmp_path / "prof"))
    model = module()
    trainer(tmp_path, max_steps=10, callbacks=[prof]).fit(model, loader(n_batches=10))
    out = tmp_path / "prof"
    assert list(out.glob("*.pt.trace.json")), list(out.iterdir())
    summary = prof.summary
    assert {"attention", "mlp", "norms", "embeddings", "optimizer"} <= set(summary["ms_per_step"])
    assert all(v >= 0 for v in summary["ms_per_step"].values())
    assert "| attention |" in (out / "summary.md").read_text()
    # nothing stays attached outside the window
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_profiler_rejects_bad_window():
    with pytest.raises(ValueError, match="active"):
        StepWindowProfiler(active=0)


def test_async_snapshot_keeps_tied_weights_one_tensor(tmp_path):
    from callbacks.checkpoint_io import AsyncAtomicCheckpointIO, AtomicCheckpointIO

    shared = torch.randn(64, 32)
    state = {"state_dict": {"wte.weight": shared, "lm_head.weight": shared, "other": torch.randn(3)}}
    io = AsyncAtomicCheckpointIO()
    io.save_checkpoint(state, tmp_path / "async.ckpt")
    io.teardown()
    AtomicCheckpointIO().save_checkpoint(state, tmp_path / "sync.ckpt")
    loaded = torch.load(tmp_path / "async.ckpt", weights_only=True)["state_dict"]
    assert loaded["wte.weight"].data_ptr() == loaded["lm_head.weight"].data_ptr()  # still one storage
    assert torch.equal(loaded["wte.weight"], shared)
    async_size, sync_size = (tmp_path / "async.ckpt").stat().st_size, (tmp_path / "sync.ckpt").stat().st_size
    assert abs(async_size - sync_size) < 1024  # not a second copy of the 8 KiB matrix
