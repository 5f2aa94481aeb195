"""Generation: the KV cache against the cache-free path on every switch, the streaming command, and
`train.py predict` writing text."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from callbacks.prediction_writer import TextPredictionWriter
from datamodules.tokenizer import ByteTokenizer
from lightning_modules.common.targets import load_target_model
from lightning_modules.gpt import GPT, GPTConfig
from lightning_modules.gpt.generate import StreamingDecoder, generate_text
from lightning_modules.gpt.generate import main as generate_main
from lightning_modules.gpt.model import KVCache
from tests.helpers.cli import FAST, TINY, env, run_train

BLOCK = 16
BASE = dict(block_size=BLOCK, vocab_size=61, n_layer=3, n_head=4, n_embd=32, tie_embeddings=False)
WINDOWS = {"full": {}, "window3": dict(sliding_window=3), "hybrid": dict(sliding_window=3, global_every=2)}
COMBOS = [
    dict(n_kv_head=kv, rope=rope, qk_norm=qk, attn_backend=backend, **WINDOWS[window])
    for kv, rope, window, qk, backend in itertools.product(
        [4, 2, 1], [False, True], WINDOWS, [False, True], ["sdpa", "math"]
    )
]
MODERN = dict(norm="rmsnorm", mlp="swiglu", bias=False)  # switches outside attention, once
COMBOS.append(dict(n_kv_head=2, rope=True, qk_norm=True, attn_backend="sdpa", **MODERN))


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (conftest restores the count): the models are tiny, and on a busy machine a second
    thread only adds waiting."""
    torch.set_num_threads(1)


def combo_id(switches: dict) -> str:
    parts = [f"kv{switches['n_kv_head']}", "rope" if switches["rope"] else "wpe"]
    parts += (
        [f"w{switches['sliding_window']}g{switches.get('global_every', 0)}"]
        if "sliding_window" in switches
        else []
    )
    parts += ["qknorm"] if switches["qk_norm"] else []
    return "-".join(
        parts + (["rmsnorm-swiglu-nobias"] if "norm" in switches else []) + [switches["attn_backend"]]
    )


def sharp_model(seed: int = 0, **switches) -> GPT:
    """A random tiny GPT whose attention is peaked (so positions and masks change the output a lot) and whose
    next-token logits are far apart (so float rounding between the two paths never changes an argmax); the
    untied output layer keeps greedy decoding from repeating the last token."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**BASE, **switches})).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(6.0)
        model.transformer.ln_f.weight.mul_(30.0)
    return model


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


# ------------------------------------------------------------------------------------------- the KV cache
@pytest.mark.parametrize("switches", COMBOS, ids=combo_id)
def test_cached_forward_equals_full_forward(switches):
    """Prefill, a chunk and single tokens through the cache give the logits of one full forward."""
    model = sharp_model(**switches)
    idx = prompts(2, BLOCK)
    full = model(idx)
    cache = model.new_cache()
    steps = [model(idx[:, :6], cache), model(idx[:, 6:9], cache)]
    steps += [model(idx[:, t : t + 1], cache) for t in range(9, BLOCK)]
    assert cache.length == BLOCK
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("switches", COMBOS, ids=combo_id)
def test_greedy_with_cache_equals_cache_free(switches):
    """Batch 2; one prompt shorter than block_size that generation carries past it, one longer than it."""
    model = sharp_model(**switches)
    for prompt in (prompts(2, 5), prompts(2, BLOCK + 7)):
        reference = model.generate(prompt, 2 * BLOCK, temperature=0, use_cache=False)
        cached = model.generate(prompt, 2 * BLOCK, temperature=0)
        assert torch.equal(cached, reference)
        assert len(set(reference[0, prompt.size(1) :].tolist())) > 3  # a real continuation, not one token


@pytest.mark.parametrize("switches", [COMBOS[0], COMBOS[-1], dict(n_kv_head=2, rope=True, sliding_window=4)])
def test_seeded_sampling_with_cache_equals_cache_free(switches):
    model = sharp_model(**switches)
    with torch.no_grad():
        model.transformer.ln_f.weight.div_(10.0)  # flatter logits: sampling has real choices
    prompt = prompts(3, 4)
    for temperature, top_k in ((1.0, None), (0.7, 5)):
        outs = [
            model.generate(
                prompt,
                40,
                temperature,
                top_k,
                generator=torch.Generator().manual_seed(7),
                use_cache=use_cache,
            )
            for use_cache in (False, True)
        ]
        assert torch.equal(outs[0], outs[1])
        other_seed = model.generate(
            prompt, 40, temperature, top_k, generator=torch.Generator().manual_seed(8)
        )
        assert not torch.equal(other_seed, outs[1])  # the generator does drive the draws


def test_learned_positions_follow_the_cache_offset():
    """A token at position 5 through the cache is not the same token at position 0: offsets are applied."""
    model = sharp_model()
    idx = prompts(1, 6)
    cache = model.new_cache()
    model(idx[:, :5], cache)
    torch.testing.assert_close(model(idx[:, 5:], cache), model(idx)[:, 5:], atol=2e-4, rtol=1e-5)
    assert not torch.allclose(model(idx[:, 5:]), model(idx)[:, 5:], atol=1e-2)


def test_flash_attn_backend_decodes_through_sdpa():
    """With attn_backend flash_attn (no flash-attn package here), the cached path never calls it."""
    model = sharp_model(n_kv_head=2, rope=True)
    reference = model.generate(prompts(2, 5), 20, temperature=0, use_cache=False)
    model.config.attn_backend = "flash_attn"  # the shared config object every attention layer reads
    assert torch.equal(model.generate(prompts(2, 5), 20, temperature=0), reference)


def test_cache_overflow_and_foreign_layers_are_errors():
    model = sharp_model()
    cache = model.new_cache()
    model(prompts(1, BLOCK - 1), cache)
    with pytest.raises(ValueError, match="15 cached \\+ 2 new tokens exceeds block_size=16"):
        model(prompts(1, 2), cache)
    with pytest.raises(ValueError, match="capacity"):
        KVCache(2, 0)


class Wrapped(nn.Module):
    """A layer that is not the model's own Block (as NPT's converted layers are)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_converted_layers_fall_back_to_the_cache_free_path():
    model = sharp_model()
    reference = model.generate(prompts(1, 5), 12, temperature=0)
    model.transformer.h[1] = Wrapped(model.transformer.h[1])
    assert not model.supports_kv_cache
    assert torch.equal(model.generate(prompts(1, 5), 12, temperature=0), reference)
    with pytest.raises(ValueError, match="Wrapped"):
        model(prompts(1, 5), model.new_cache())


def test_generate_arguments_are_checked_early():
    model = sharp_model()
    for kwargs, match in (
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ):
        call = {"prompt_ids": prompts(1, 3), "max_new_tokens": 4, **kwargs}
        with pytest.raises(ValueError, match=match):
            model.generate_tokens(**call)  # raised when called, before the first token is asked for
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 4)


def test_training_forward_and_state_dict_unchanged_by_the_cache_code():
    model = sharp_model(n_kv_head=2, rope=True, sliding_window=4)
    keys = set(model.state_dict())
    assert not any("cache" in k for k in keys)
    idx = prompts(2, BLOCK)
    torch.testing.assert_close(model(idx), model(idx, None))
    model.train()
    model(idx).sum().backward()  # gradients flow as before
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


# ------------------------------------------------------------------------------------ streaming the text
class Recorder(io.StringIO):
    """stdout stand-in that records what each flush made visible."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_streaming_decoder_holds_back_split_characters():
    tokenizer = ByteTokenizer()
    decoder = StreamingDecoder(tokenizer, tokenizer.encode("a"))
    assert decoder.start() == "a"
    first, second = "é".encode()  # two bytes: the first alone is an incomplete character
    assert decoder.push(first) == ""
    assert decoder.push(second) == "é"
    assert decoder.push(ord("b")) == "b"
    assert decoder.push(first) == "" and decoder.finish() == "\ufffd"


def write_checkpoint(path: Path, model: GPT, datamodule_args: dict) -> Path:
    """A checkpoint as train.py writes it, holding what generation reads: architecture, weights, data args."""
    torch.save(
        {
            "gpt_architecture": model.config.architecture(),
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "datamodule_hyper_parameters": datamodule_args,
        },
        path,
    )
    return path


def byte_model() -> GPT:
    torch.manual_seed(3)
    model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32, rope=True)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(30.0)
    return model


def test_generate_text_streams_the_greedy_continuation(tmp_path):
    model = byte_model()
    ckpt = write_checkpoint(tmp_path / "m.ckpt", model, {"tokenizer": "bytes", "block_size": 32})
    out = Recorder()
    text, count, _ = generate_text(str(ckpt), "def f(", 40, temperature=0, device="cpu", out=out)
    tokenizer = ByteTokenizer()
    expected = tokenizer.decode(model.generate(torch.tensor([tokenizer.encode("def f(")]), 40, 0)[0].tolist())
    assert count == 40 and text == expected and out.getvalue() == expected + "\n"
    assert out.flushed[0] == "def f(" and len(out.flushed) > 10  # the prompt first, then piece by piece
    assert all(b.startswith(a) for a, b in zip(out.flushed, out.flushed[1:]))


def test_generate_command_seed_and_errors(tmp_path, capsys):
    model = byte_model()
    ckpt = write_checkpoint(tmp_path / "m.ckpt", model, {"tokenizer": "bytes", "block_size": 32})
    args = ["--ckpt_path", str(ckpt), "--prompt", "x = ", "--max_new_tokens", "50", "--device", "cpu"]
    runs = []
    for extra in (["--seed", "1"], ["--seed", "1", "--no_cache"], ["--seed", "2"]):
        assert generate_main([*args, "--temperature", "1.0", "--top_k", "0", *extra]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] != runs[2] and runs[0].startswith("x = ")
    assert generate_main([*args, "--temperature", "-1"]) == 2
    assert "--temperature -1.0 must be >= 0" in capsys.readouterr().err
    assert generate_main(["--ckpt_path", str(tmp_path / "missing.ckpt"), "--prompt", "x"]) == 2
    assert "missing.ckpt" in capsys.readouterr().err


# ----------------------------------------------------------------------------- through train.py (subprocess)
BYTES_GREEDY = ["--data.init_args.tokenizer=bytes", "--model.init_args.sample_temperature=0"]


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory) -> Path:
    """A short tiny fit with the bytes tokenizer (nothing to train for the tokenizer) and greedy samples (the
    checkpoint's sampling settings are what `predict --ckpt_path` uses)."""
    cwd = tmp_path_factory.mktemp("generate_fit")
    run_train(cwd, "fit", "--config", str(TINY), *FAST, *BYTES_GREEDY)
    return cwd


def test_predict_writes_the_decoded_texts(byte_run):
    ckpt = byte_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    prompts_yaml = byte_run / "prompts.yaml"
    prompts_yaml.write_text("data:\n  init_args:\n    predict_prompts: ['def main(', 'x = 1', 'é']\n")
    run_train(
        byte_run, "predict", "--config", str(TINY), *FAST, *BYTES_GREEDY, "--config", str(prompts_yaml),
        f"--ckpt_path={ckpt}",
    )  # fmt: skip
    written = (byte_run / "lightning_logs" / "version_1" / "predictions.txt").read_text(encoding="utf-8")
    model, _ = load_target_model(ckpt, "gpt")
    tokenizer = ByteTokenizer()
    expected = []
    for i, prompt in enumerate(["def main(", "x = 1", "é"]):
        ids = model.generate(torch.tensor([tokenizer.encode(prompt)]), 8, temperature=0)  # FAST: 8 tokens
        expected.append(f"=== prediction {i} ===\n{tokenizer.decode(ids[0].tolist())}\n")
    assert written == "\n".join(expected)


def test_generate_command_in_a_subprocess(byte_run):
    ckpt = byte_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    command = [sys.executable, "-m", "lightning_modules.gpt.generate", "--ckpt_path", str(ckpt)]
    command += ["--prompt", "import ", "--max_new_tokens", "30", "--temperature", "0", "--device", "cpu"]
    done = subprocess.run(command, cwd=byte_run, capture_output=True, text=True, timeout=120, env=env())
    assert done.returncode == 0, done.stderr
    model, _ = load_target_model(ckpt, "gpt")
    tokenizer = ByteTokenizer()
    ids = model.generate(torch.tensor([tokenizer.encode("import ")]), 30, temperature=0)
    assert done.stdout == tokenizer.decode(ids[0].tolist()) + "\n"
    assert "30 tokens in" in done.stderr and "KV cache on" in done.stderr


def fake_trainer(log_dir: Path, dataloaders: int) -> SimpleNamespace:
    """What TextPredictionWriter reads of a Trainer, in one process."""
    return SimpleNamespace(
        predict_loop=SimpleNamespace(num_dataloaders=dataloaders),
        world_size=1,
        is_global_zero=True,
        logger=SimpleNamespace(log_dir=str(log_dir)),
        default_root_dir=str(log_dir),
    )


def test_prediction_writer_orders_by_dataset_index(tmp_path):
    writer = TextPredictionWriter()
    # one dataloader: batches of texts with the dataset indices Lightning recorded for them
    writer.write_on_epoch_end(fake_trainer(tmp_path, 1), None, [["c", "a"], "b"], [[[2, 0], [1]]])
    assert (tmp_path / "predictions.txt").read_text() == (
        "=== prediction 0 ===\na\n\n=== prediction 1 ===\nb\n\n=== prediction 2 ===\nc\n"
    )
    # two dataloaders, indices unknown (counted in order), a tensor output written as its token ids
    writer.write_on_epoch_end(fake_trainer(tmp_path, 2), None, [["x"], [torch.tensor([[1, 2]])]], [[], []])
    assert writer.path.read_text() == "=== prediction 0.0 ===\nx\n\n=== prediction 1.0 ===\n[1, 2]\n"
    with pytest.raises(ValueError, match="plain file name"):
        TextPredictionWriter("runs/out.txt")
