"""GPTLightningModule: optimisation pieces, overfitting one batch, checkpoints and bad input."""

import math
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.common.optim import build_optimizer, decay_param_groups, warmup_cosine_lambda
from lightning_modules.gpt import GPTConfig, GPTLightningModule
from tests.helpers.trainers import quiet_trainer

TINY = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def one_batch_loader(batch=4, seq=32, vocab=64, repeats=1):
    torch.manual_seed(0)
    data = torch.randint(0, vocab, (batch, seq + 1))
    x, y = data[:, :-1], data[:, 1:]
    return DataLoader(TensorDataset(x.repeat(repeats, 1), y.repeat(repeats, 1)), batch_size=batch)


def test_weight_decay_only_on_matrices():
    module = GPTLightningModule(GPTConfig(**TINY))
    decay, no_decay = decay_param_groups(module.model.named_parameters())
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_params = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n_params == module.model.num_parameters()


def test_fused_requested_only_on_cuda():
    factory = partial(torch.optim.AdamW, lr=1e-3)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2, 2))]}]
    assert not build_optimizer(factory, groups, on_cuda=False).defaults.get("fused")
    seen = {}

    def spy(params, **kwargs):
        seen.update(kwargs)
        return torch.optim.AdamW(params)

    build_optimizer(partial(spy), groups, on_cuda=True)  # not a class: no keyword added
    assert "fused" not in seen


def test_warmup_then_cosine_to_floor():
    f = warmup_cosine_lambda(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_loss_clamp_caps_per_token_loss():
    module = GPTLightningModule(GPTConfig(**TINY), loss_clamp=0.5)
    logits = torch.zeros(1, 3, 64)
    targets = torch.zeros(1, 3, dtype=torch.long)
    assert module.loss(logits, targets).item() == pytest.approx(0.5)
    unclamped = GPTLightningModule(GPTConfig(**TINY))
    assert unclamped.loss(logits, targets).item() == pytest.approx(math.log(64))


def test_overfits_one_batch(tmp_path):
    module = GPTLightningModule(
        GPTConfig(**TINY), optimizer=partial(torch.optim.AdamW, lr=3e-3), warmup_steps=5, sample_tokens=0
    )
    loader = one_batch_loader(repeats=1)
    x, y = next(iter(loader))
    with torch.no_grad():
        start = module.loss(module(x), y).item()
    quiet_trainer(tmp_path, max_steps=150).fit(module, loader)
    module.eval()
    with torch.no_grad():
        end = module.loss(module(x), y).item()
    assert start > 4.0 and end < start / 10, (start, end)
    assert module.tokens_seen.item() == 150 * x.numel()


def test_lr_follows_schedule_under_trainer(tmp_path):
    module = GPTLightningModule(
        GPTConfig(**TINY), optimizer=partial(torch.optim.AdamW, lr=1e-2), warmup_steps=4, min_lr_ratio=0.1
    )
    trainer = quiet_trainer(tmp_path, max_steps=20)
    trainer.fit(module, one_batch_loader())
    final_lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert final_lr == pytest.approx(1e-3, rel=1e-6)  # the floor: 10% of peak at the last step


def test_validation_loss_is_token_weighted_over_unequal_batches_and_ppl_is_its_exp(tmp_path):
    module = GPTLightningModule(GPTConfig(**TINY), sample_tokens=0).eval()
    with torch.no_grad():
        module.model.transformer.ln_f.weight.mul_(30.0)  # sharp predictions: per-token losses spread widely
        x = torch.randint(0, 64, (5, 8))
        logits = module(x)
    # Batch 0 (1 x 8 tokens): targets the model rules out (high loss); batch 1 (4 x 8 tokens): targets it
    # predicts (low loss). A plain mean of the two batch losses weighs the 8 hard tokens like the 32 easy ones.
    y = torch.cat([logits[:1].argmin(-1), logits[1:].argmax(-1)])
    loader = DataLoader(TensorDataset(x, y), batch_sampler=[[0], [1, 2, 3, 4]])
    (metrics,) = quiet_trainer(tmp_path).validate(module, loader, verbose=False)
    with torch.no_grad():
        per_batch = [module.loss(module(x[i]), y[i]).item() for i in (slice(0, 1), slice(1, 5))]
        token_mean = torch.nn.functional.cross_entropy(module(x).flatten(0, 1), y.flatten()).item()
    plain_mean = sum(per_batch) / 2
    assert token_mean == pytest.approx((1 * per_batch[0] + 4 * per_batch[1]) / 5, rel=1e-5)
    assert abs(plain_mean - token_mean) > 1.0, (plain_mean, token_mean)  # the test can tell them apart
    assert metrics["val/loss"] == pytest.approx(token_mean, rel=1e-5)
    assert metrics["val/loss"] != pytest.approx(plain_mean, rel=1e-2)
    assert metrics["val/ppl"] == pytest.approx(math.exp(token_mean), rel=1e-5)


def test_checkpoint_with_other_architecture_is_rejected(tmp_path):
    module = GPTLightningModule(GPTConfig(**TINY), sample_tokens=0)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(module, one_batch_loader())
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    # Training-only switches load fine ...
    GPTLightningModule.load_from_checkpoint(path, config=GPTConfig(**TINY, attn_backend="math"))
    # ... architecture switches do not, and the error names them.
    with pytest.raises(ValueError, match="rope"):
        GPTLightningModule.load_from_checkpoint(path, config=GPTConfig(**TINY, rope=True), strict=False)


def test_init_from_checkpoint_and_vocab_check(tmp_path):
    module = GPTLightningModule(GPTConfig(**TINY), sample_tokens=0)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(module, one_batch_loader())
    path = tmp_path / "b.ckpt"
    trainer.save_checkpoint(path)
    loaded = GPTLightningModule(init_from=str(path))
    x = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(loaded(x), module(x))
    with pytest.raises(ValueError, match="1000 tokens"):
        GPTLightningModule(init_from=str(path), vocab_size=1000)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        GPTLightningModule(init_from=str(tmp_path / "missing.ckpt"))


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="warmup_steps"):
        GPTLightningModule(GPTConfig(**TINY), warmup_steps=-1)
    with pytest.raises(ValueError, match="loss_clamp"):
        GPTLightningModule(GPTConfig(**TINY), loss_clamp=0.0)


def test_vocab_size_argument_resizes_fresh_model():
    module = GPTLightningModule(GPTConfig(**TINY), vocab_size=300)
    assert module.config.vocab_size == 300 and module.config.padded_vocab_size == 320


def test_module_started_from_weights_reloads_from_its_own_checkpoint(tmp_path):
    first = GPTLightningModule(GPTConfig(**TINY), sample_tokens=0)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(first, one_batch_loader())
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    second = GPTLightningModule(init_from=str(tmp_path / "first.ckpt"), sample_tokens=0)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(second, one_batch_loader())
    trainer.save_checkpoint(tmp_path / "second.ckpt")
    (tmp_path / "first.ckpt").unlink()  # the second checkpoint must not need the first file
    reloaded = GPTLightningModule.load_from_checkpoint(tmp_path / "second.ckpt")
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(reloaded(x), second(x))


def test_batch_report_accounts_for_devices_and_accumulation():
    from types import SimpleNamespace

    from lightning_modules.common.batch import describe_batch

    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=4, block_size=32), world_size=2, accumulate_grad_batches=3
    )
    info = describe_batch(trainer)
    assert info["global_batch"] == 24 and info["tokens_per_step"] == 24 * 32
    assert describe_batch(SimpleNamespace(datamodule=None)) is None


@pytest.mark.slow
def test_compile_in_configure_model_keeps_checkpoints_loadable_uncompiled(tmp_path):
    module = GPTLightningModule(GPTConfig(**TINY), compile=True, sample_tokens=0)
    trainer = quiet_trainer(tmp_path, max_steps=3)
    trainer.fit(module, one_batch_loader())
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    state = torch.load(tmp_path / "compiled.ckpt", weights_only=True)
    assert not [k for k in state["state_dict"] if "_orig_mod" in k]
    plain = GPTLightningModule.load_from_checkpoint(tmp_path / "compiled.ckpt")
    x = torch.randint(0, 64, (2, 16))
    module.eval()
    torch.testing.assert_close(plain(x), module(x), atol=1e-4, rtol=1e-4)


def test_data_block_size_beyond_model_positions_fails_before_training(tmp_path):
    from datamodules import TextDataModule

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    data = TextDataModule(
        sources=str(corpus), tokenizer="bytes", block_size=64, batch_size=2, cache_dir=str(tmp_path / "cache")
    )
    module = GPTLightningModule(GPTConfig(**TINY), vocab_size=data.vocab_size)  # positions: 32
    with pytest.raises(ValueError, match=r"block_size=64 exceeds the model's positions \(32\)"):
        quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    assert module.tokens_seen.item() == 0  # nothing trained
