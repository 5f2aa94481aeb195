"""Converted NPT layer vs the dense original layer: forward and forward+backward time (and CUDA peak memory)
of one `transformers` LlamaDecoderLayer (RoPE, GQA, SwiGLU), driven by a one-layer LlamaModel fed
``inputs_embeds`` so RoPE and the causal mask come from the HF model. Medians over interleaved rounds.

    python benchmarks/npt_layer.py --device cpu --shape small             # CPU-scaled, ~1 min on 2 cores
    python benchmarks/npt_layer.py --device cuda --shape llama8b          # Llama-3.1-8B layer, k 128, r 64, bf16

Variants:
  original            the dense layer, forward only (no grad)
  original_bwd_input  dense, frozen weights, backward to the input only (a frozen layer inside a trained stack)
  original_finetune   dense, all layer weights trainable (full fine-tuning of the layer)
  npt                 converted layer (attention modulates the gate, factored path), forward only
  npt_teacher_forced  converted, backward to the NP params only (input is the teacher's hidden state)
  npt_free_running    converted, backward to the NP params and the input
Prints a markdown table and writes benchmarks/results/npt_layer_<shape>_<mode>_<device>.json (or --json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/npt_layer.py

import torch  # noqa: E402

from benchmarks.npt_component import _measure  # noqa: E402
from benchmarks.results import cpu_model, run_metadata, write_results  # noqa: E402
from lightning_modules.npt.components import NPComponent  # noqa: E402
from lightning_modules.npt.layers import LlamaNPTLayer  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "llama8b": dict(d=4096, f=14336, heads=32, kv_heads=8, k=128, r=64, batch=2, seq=128),
    "small": dict(d=512, f=1792, heads=8, kv_heads=2, k=16, r=8, batch=2, seq=64),
}


def build(
    shape: dict[str, int], mode: str, device: torch.device, dtype: torch.dtype
) -> tuple[Any, LlamaNPTLayer]:
    """A one-layer LlamaModel (tiny vocab) whose layer is wrapped by an LlamaNPTLayer."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=shape["d"],
        intermediate_size=shape["f"],
        num_hidden_layers=1,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=32,
        max_position_embeddings=max(shape["seq"], 128),
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = LlamaModel(cfg).to(dtype).eval()
        comp = NPComponent(
            shape["d"], shape["f"], shape["r"], shape["k"], mode, init_scale=1.0, seed=0, dtype=dtype
        )
    model.requires_grad_(False)
    layer = LlamaNPTLayer(model.layers[0], comp, 0)
    model.layers[0] = layer
    return model, layer


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every variant and return a JSON-able dict."""
    device, dtype, shape = torch.device(args.device), getattr(torch, args.dtype), SHAPES[args.shape]
    model, layer = build(shape, args.mode, device, dtype)
    block, comp = layer.block, layer.np
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape["batch"], shape["seq"], shape["d"], generator=gen, device=device, dtype=dtype)
    grad_out = torch.randn_like(x)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=inp, use_cache=False).last_hidden_state  # (b, s, d)

    def setup(mode: str, np_grad: bool, block_grad: bool) -> None:
        layer.mode = mode
        comp.requires_grad_(np_grad)
        block.requires_grad_(block_grad)
        for p in list(comp.parameters()) + list(block.parameters()):
            p.grad = None

    def make(
        mode: str, backward: bool, np_grad: bool = False, block_grad: bool = False, x_grad: bool = False
    ):
        def call() -> None:
            setup(mode, np_grad, block_grad)
            if not backward:
                with torch.no_grad():
                    forward(x)
                return
            inp = x.detach().requires_grad_(x_grad)
            (forward(inp) * grad_out).sum().backward()

        return call

    variants: dict[str, Callable[[], None]] = {
        "original": make("original", False),
        "original_bwd_input": make("original", True, x_grad=True),
        "original_finetune": make("original", True, block_grad=True),
        "npt": make("npt", False),
        "npt_teacher_forced": make("npt", True, np_grad=True),
        "npt_free_running": make("npt", True, np_grad=True, x_grad=True),
    }
    times: dict[str, list[float]] = {n: [] for n in variants}
    peaks: dict[str, float] = dict.fromkeys(variants, 0.0)
    for rnd in range(args.warmup + args.repeats):  # interleaved: every variant once per round
        for name, fn in variants.items():
            dt, peak = _measure(fn, device)
            if rnd >= args.warmup:
                times[name].append(dt)
                if peak is not None:
                    peaks[name] = max(peaks[name], peak)
    n_np = sum(p.numel() for p in comp.parameters())
    n_block = sum(p.numel() for p in block.parameters())
    results = {
        name: {
            "ms": statistics.median(t) * 1e3,
            "peak_mib": peaks[name] / 2**20 if device.type == "cuda" else None,
        }
        for name, t in times.items()
    }
    return {
        "shape": args.shape,
        **shape,
        "np_mode": args.mode,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "np_params": n_np,
        "layer_params": n_block,
        "np_param_mib": n_np * comp.W_down.element_size() / 2**20,
        "variants": results,
    }


def to_markdown(res: dict[str, Any]) -> str:
    """Markdown table of one run."""
    head = (
        f"Llama decoder layer, shape {res['shape']} (d {res['d']}, f {res['f']}, heads {res['heads']}/"
        f"{res['kv_heads']}, k {res['k']}, r {res['r']}, batch {res['batch']}, seq {res['seq']}), np mode "
        f"{res['np_mode']}, {res['dtype']} on {res['device']} ({res['device_name']}, {res['threads']} threads), "
        f"median of {res['repeats']}; NP params {res['np_params'] / 1e6:.1f}M ({res['np_param_mib']:.0f} MiB) vs "
        f"layer {res['layer_params'] / 1e6:.1f}M\n\n"
    )
    base = res["variants"]["original"]["ms"]
    lines = ["| variant | ms | vs original fwd | peak MiB |", "|---|---:|---:|---:|"]
    for name, row in res["variants"].items():
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        lines.append(f"| {name} | {row['ms']:.2f} | {row['ms'] / base:.2f}x | {peak} |")
    return head + "\n".join(lines)


def main() -> None:
    """Parse arguments, run, print the table and write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="default: llama8b on cuda, small on cpu"
    )
    p.add_argument("--mode", default="single", choices=["single", "dual", "triple"], help="NP mode")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bf16 on cuda"
    )
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("llama8b" if cuda else "small")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = run_metadata()
    res = run(args)
    print(to_markdown(res))
    write_results(f"npt_layer_{args.shape}_{args.mode}_{args.device.split(':')[0]}", meta, res, out=args.json)


if __name__ == "__main__":
    main()
