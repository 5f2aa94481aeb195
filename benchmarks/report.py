"""Regenerate the results tables in README.md and docs/*.md from the committed benchmarks/results/*.json.

A table lives between two marker lines; NAME is a results file's stem (benchmarks/results/NAME.json) whose
kind (the stem's longest known leading part: gpt_speed, spd_speed, npt_component, npt_component_sweep,
npt_layer, checkpoint_stall, main_job, tokenize_speed, generate_speed, muon_vs_adamw, npt_experiment,
spd_toy_suite, spd_alive_detail, spd_reference_speed) has a renderer here:

    <!-- results:begin gpt_speed_tiny_cpu -->
    (generated: the table and the line saying what it was measured on)
    <!-- results:end gpt_speed_tiny_cpu -->

    python -m benchmarks.report            # rewrite every marked table
    python -m benchmarks.report --check    # exit 1 naming each table that differs or has no JSON
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python benchmarks/report.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import REPO_ROOT, RESULTS_DIR  # noqa: E402

BEGIN = re.compile(r"^\s*<!-- results:begin (?P<name>\S+) -->\s*$")
END = re.compile(r"^\s*<!-- results:end (?P<name>\S+) -->\s*$")
REQUIRED_META = ("commit", "date", "cpu", "cores", "torch", "command", "load_before", "load_after")

Payload = dict[str, Any]


# ----------------------------------------------------------------------------------------------- formatting
def _num(x: float | None, spec: str = ".2f", missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _ratio(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else f"{x:{spec}}x"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s"


def _hours_or_minutes(seconds: float) -> str:
    """'6.5 h', or '2.2 min' under an hour."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _count(n: int) -> str:
    """1,352,448 -> '1.35M'; 87,552 -> '87.6k'."""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _table(header: list[str], align: list[str] | None, rows: Iterable[list[str]]) -> list[str]:
    """A markdown table; align None: the first column left, the rest right (figures)."""
    align = ["---"] + ["---:"] * (len(header) - 1) if align is None else align
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def provenance(meta: dict[str, Any]) -> str:
    """One line: commit, date, machine, versions, load average before/after and the exact command."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"the results' meta lacks {missing} (benchmarks.results.run_metadata writes them)")
    commit = (meta["commit"] or "unknown")[:7] + (" with uncommitted changes" if meta.get("dirty") else "")
    device = f"{meta['cpu']}, {meta['cores']} cores" + (f", {meta['gpu']}" if meta.get("gpu") else "")
    before, after = meta["load_before"], meta["load_after"]
    load = (
        f"load average {before[0]:.2f} before, {after[0]:.2f} after (1 min)"
        if before and after
        else "load average not available"
    )
    return (
        f"Measured at commit `{commit}` on {meta['date'][:10]}: {device}, torch {meta['torch']}; {load}; "
        f"`{meta['command']}`."
    )


# ----------------------------------------------------------------------------------------------- renderers
def render_main_job(payload: Payload) -> list[str]:
    """The README's main-job table: wall time, throughput, validation losses and the two baselines."""
    r = payload["results"]
    data, params, vals = r["data"], r["parameters"], r["validations"]
    steps = " / ".join(str(v["step"]) for v in vals) or "(none ran)"
    losses = [f"{v['val_loss']:.2f}" for v in vals]
    if losses:
        losses[-1] = f"**{losses[-1]}**"
    final = f" nats (ppl {vals[-1]['val_ppl']:.0f})" if vals else "-"
    first_run = (
        "first run: tokenizer training and tokenising included" if r.get("fresh_workdir") else "reused cache"
    )
    rows = [
        [f"wall time, command to exit ({first_run})", _duration(r["wall_s"])],
        [
            f"training throughput (median step {r['median_step_s']:.3f} s, {r['tokens_per_step']:,} tokens"
            + ("" if r.get("step_time_without_validation", True) else "; validations included")
            + ")",
            f"{r['tokens_per_s']:,.0f} tokens/s",
        ],
        [
            f"validation loss after steps {steps}",
            " / ".join(losses) + final,
        ],
        [
            "unigram entropy of the validation tokens (a model ignoring context)",
            f"{data['unigram_entropy_val']:.2f} nats (ppl {math.exp(data['unigram_entropy_val']):.0f})",
        ],
        [f"loss of a uniform guess, ln {data['vocab_size']}", f"{data['ln_vocab']:.2f} nats"],
        [
            "parameters (tied embedding counted once)",
            f"{params['total']:,} ({params['embedding']:,} of them the embedding)",
        ],
        [
            "data",
            f"{_count(data['train_tokens'])} training tokens, "
            f"{_count(data['val_tokens'])} validation tokens, "
            f"{r['max_steps']} steps of {r['tokens_per_step']:,} tokens",
        ],
    ]
    return _table(["", "value"], ["---", "---"], rows)


def render_gpt_speed(payload: Payload) -> list[str]:
    """Lightning vs plain loop, ours vs transformers, then every switch against the GPT-2 baseline."""
    r = payload["results"]
    setup, size, args = r["setup"], r["size"], r["args"]
    lp, hf = r["lightning_vs_plain"], r["ours_vs_hf"]

    def spread(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f} ({len(values)})"

    lines = [
        f"Model {args['size']} ({size['n_layer']} layers, {size['n_embd']} wide, vocab {size['vocab_size']}, "
        f"batch {size['batch']} x {size['block_size']}), {setup['precision']} on {setup['device_type']} "
        f"({setup['threads']} threads); medians of {args['rounds']} interleaved rounds of {args['steps']} "
        f"steps ({args['warmup']} warm-up steps left out); val loss after {args['quality_steps']} steps on "
        f"the embedded corpus, over {args['val_batches']} batches.",
        "",
    ]
    lines += _table(
        ["comparison", "tokens/s ratio", "rounds: range (n)", "notes"],
        ["---", "---:", "---:", "---"],
        [
            [
                "`GPTLightningModule` + Trainer vs plain PyTorch loop",
                f"{lp['tokens_per_s_ratio_median']:.3f}",
                spread(lp["ratios"]),
                f"first 5 losses equal to {lp['max_abs_loss_diff_first5']:.1e}",
            ],
            [
                "our GPT vs `transformers` GPT2LMHeadModel",
                f"{hf['tokens_per_s_ratio_median']:.3f}",
                spread(hf["ratios"]),
                "same weights and optimiser",
            ],
        ],
    )
    rows = r["switches"]
    show_mfu = any(row.get("mfu") for row in rows.values())
    mem = "train MiB" if setup["device_type"] == "cpu" else "peak MiB"
    header = ["variant", "switches", "tokens/s", "vs baseline", "model TFLOP/s"]
    header += (["MFU"] if show_mfu else []) + [mem, "memory vs baseline", "val loss", "claim (GPU)"]
    body = []
    for name, row in rows.items():
        switches = ", ".join(f"`{k}={v}`" for k, v in row.get("switches", {}).items())
        cells = [name, switches, f"{row['tokens_per_s']:.0f}", _ratio(row["speedup_vs_baseline"])]
        cells.append(f"{row['model_tflops_per_s']:.3f}")
        if show_mfu:
            cells.append("-" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%")
        cells += [
            _num(row["peak_memory_mb"], ".0f"),
            _num(row["memory_vs_baseline"]),
            _num(row["val_loss"], ".3f"),
            row.get("claim", ""),
        ]
        body.append(cells)
    lines += [""] + _table(header, ["---", "---"] + ["---:"] * (len(header) - 3) + ["---"], body)
    return lines


SPD_IMPLS = {
    "naive": "naive",
    "ours_no_prefix": "ours, no prefix reuse",
    "ours_unfused_head": "ours, head not fused into the KL",
    "ours": "ours",
    "ours_compile": "ours + compile",
}


def render_spd_speed(payload: Payload) -> list[str]:
    """Naive vs ours (vs ours without prefix reuse, ours compiled) SPD training step, per config."""
    r = payload["results"]
    configs = r["configs"]
    impls = [i for i in SPD_IMPLS if any(i in row for row in configs.values())]
    header = ["config"] + [f"{SPD_IMPLS[i]} ms" for i in impls]
    header += ["naive / ours, paired steps", "peak MiB " + " / ".join(SPD_IMPLS[i] for i in impls)]
    header += ["losses agree (max rel. diff)"]
    counted = all("gflop" in row[i] for row in configs.values() for i in ("naive", "ours"))
    if counted:  # results files from before the arithmetic was counted have no gflop
        header += ["GFLOP naive / ours (GFLOP/s)"]
    body = []
    for name, row in configs.items():
        naive = row["naive"]["step_ms"]
        cells = [name]
        for impl in impls:  # "-": not run for this config (the fused head needs a language model)
            ms = row[impl]["step_ms"] if impl in row else None
            cells.append(
                "-" if ms is None else f"{ms:.1f}" if impl == "naive" else f"{ms:.1f} ({naive / ms:.2f}x)"
            )
        q25, q50, q75 = row["paired_speedup_quartiles"]
        cells.append(f"{q50:.2f}x ({q25:.2f}-{q75:.2f})")
        cells.append(" / ".join(f"{row[i]['peak_mib']:.0f}" if i in row else "-" for i in impls))
        cells.append(f"{max(row['loss_rel_diff'].values()):.1e}")
        if counted:
            rates = [row[i]["gflop"] / row[i]["step_ms"] * 1e3 for i in ("naive", "ours")]
            cells.append(
                f"{row['naive']['gflop']:.3g} ({rates[0]:.3g}) / {row['ours']['gflop']:.3g} ({rates[1]:.3g})"
            )
        body.append(cells)
    head = (
        f"Training step (forward + backward + AdamW) on {r['device']}, {r['threads']} thread(s): median of "
        f"{r['steps']} steps per implementation, all implementations in one process alternating step by "
        "step; speed-up against naive in brackets. Paired: the median (25th-75th percentile) of the ratio "
        "of each naive step to the ours step next to it. Peak memory: each implementation alone in its own "
        "process."
        + (
            " GFLOP: one step's matmul and attention arithmetic (torch's FlopCounterMode; elementwise work "
            "not counted), with the rate it ran at."
            if counted
            else ""
        )
    )
    return [head, ""] + _table(header, None, body)


SPD_REFERENCE_IMPLS = {
    "reference": "the reference (goodfire-ai/spd)",
    "naive": "our naive form",
    "ours": "ours",
    "ours_compile": "ours + compile",
    "ours_launch": "ours, launch-bound settings",
    "ours_launch_compile": "ours, launch-bound settings + compile",
}


PRECISION_WORDS = {
    "32-true": "float32",
    "bf16-mixed": "each implementation's forward under bfloat16 autocast (the reference's default, "
    "`autocast_bf16: true`), the backward outside it",
}


def render_spd_reference_speed(payload: Payload) -> list[str]:
    """The tiny-LM SPD step of the reference implementation itself against ours, with the parity checks."""
    r = payload["results"]
    ref = r["reference"]
    device = r.get("device", "cpu")
    where = f"cpu, {r['threads']} thread(s)" if device == "cpu" else payload["meta"].get("gpu", device)
    tokens = f" at {r['batch']} x {r['seq']} tokens" if "batch" in r else ""  # recorded since 2026-12-04
    header = ["implementation", "step ms (25th-75th percentile)", "reference / it, paired steps",
              "GFLOP (matmul, attention)", "GFLOP/s"]  # fmt: skip
    counted = any(row.get("ops") for row in r["impls"].values())
    header += ["operator calls (syncs)"] if counted else []
    launched = any(row.get("launches") for row in r["impls"].values())  # recorded since 2026-12-05
    header += ["kernel launches"] if launched else []
    body = []
    for impl, label in SPD_REFERENCE_IMPLS.items():
        row = r["impls"].get(impl)
        if row is None:  # the launch-bound ones: timed since 2026-12-04
            continue
        q25, q50, q75 = row["paired_speedup_quartiles"]
        paired = "-" if impl == "reference" else f"{q50:.2f}x ({q25:.2f}-{q75:.2f})"
        times = f"{row['step_ms']:.0f} ({row['q25_ms']:.0f}-{row['q75_ms']:.0f})"
        body.append([label, times, paired, f"{row['gflop']:.1f}", f"{row['gflop_s']:.0f}"])
        if counted:
            ops = row.get("ops")
            body[-1].append(f"{ops['work']:,} ({ops['syncs']})" if ops else "-")
        if launched:
            launches = row.get("launches")
            body[-1].append(f"{launches['launches']:,}" if launches else "-")
    checks = r["checks"]
    imp = checks["importance_minimality"]
    terms = ", ".join(
        f"{k} {checks[k]['ours']:.4g} / {checks[k]['reference']:.4g}"
        for k in ("stochastic_recon", "stochastic_recon_layerwise")
    )
    head = (
        f"The tiny LM's SPD training step{tokens} (forward + backward + AdamW) on {where}, "
        f"{PRECISION_WORDS[r.get('precision', '32-true')]}: "
        f"median of {r['steps']} steps each, one step of each implementation in turn; the reference is "
        f"goodfire-ai/spd at `{ref['commit'][:8]}` (Python {ref.get('python') or '?'}) in its own process. "
        "Paired: the median (25th-75th percentile) of the ratio of each reference step to the step of the "
        "implementation next to it."
    )
    tail = (
        f"Checked before timing, on the same target, batch and weights: the target's logits "
        f"(relative difference {checks['target_out_rel_diff']:.1e}) and the importance-minimality term "
        f"(ours {imp['ours']:.6g}, the reference {imp['reference']:.6g}; relative difference "
        f"{imp['rel_diff']:.1e}); the stochastic terms draw different masks in the two codes (ours / the "
        f"reference): {terms}."
    )
    m = r["matmul"]
    tokens, width, vocab = m["head_shape"]
    tail += (
        f" GFLOP: one step's matmul and attention arithmetic (torch's FlopCounterMode; elementwise work "
        f"is not counted; ours + compile does ours'; the loss checks run in float32). A float32 matmul "
        f"alone, in the same run: "
        f"{m['head_gflop_s']:.0f} GFLOP/s at the output head's shape ({tokens} x {width} x {vocab}), "
        f"{m['square_1024_gflop_s']:.0f} GFLOP/s at 1024 x 1024 x 1024."
    )
    if counted:
        ours_ops, ref_ops = r["impls"]["ours"]["ops"], r["impls"]["reference"]["ops"]
        tail += (
            f" Operator calls: those of one step's forward and backward that do work, counted below "
            f"autograd (benchmarks/op_count.py; views and AdamW left out; compiled kernels are not seen, "
            f"so the compiled ones show none{'; the kernel launches count them' if launched else ''}), with the "
            f"`.item()`-like reads among them in brackets. On a GPU "
            f"each launches a kernel and each read waits for the queue, and a step of tensors this small "
            f"is bound by those launches rather than its arithmetic: the reference makes "
            f"{ref_ops['work'] / ours_ops['work']:.2f}x ours' calls."
        )
        gpu_head = r["impls"]["ours"].get("ops_gpu_head")
        if gpu_head:
            tail += (
                f" On a GPU ours runs its output head in one block of rows per KL term (here in blocks "
                f"sized for the core's cache): counted that way, {gpu_head['work']:,} calls, the "
                f"reference's {ref_ops['work'] / gpu_head['work']:.2f}x."
            )
        launch = r["impls"].get("ours_launch")
        # since 2026-12-05 the all-modules term joins that forward (recorded with the kernel launches)
        folded = ", and the all-modules term's," if launched else ""
        counted_as = launch and (launch.get("ops_gpu_head") or launch.get("ops"))
        if counted_as:
            tail += (
                f" Ours with the settings for a launch-bound device (`layerwise_batch` = all "
                f"{r.get('modules', 16)} modules: the layerwise term's forwards{folded} as one forward of the "
                f"batch repeated, from the embeddings, so more arithmetic and fewer calls; "
                f"`delta_from_target_output`: no W - V U formed) makes {counted_as['work']:,} calls (the GPU's "
                f"head blocks), the reference's {ref_ops['work'] / counted_as['work']:.2f}x."
            )
    if launched:
        tail += _spd_launches_sentence(r, device)
    floor = r.get("shared_floor")
    if floor:
        ms, counts, floors = floor["ms"], floor["counts"], floor["floor_ms"]
        ours, ref = counts["ours"], counts["reference"]
        step_ours, step_ref = r["impls"]["ours"]["step_ms"], r["impls"]["reference"]["step_ms"]
        tail += (
            f" The work both must run, timed alone in the same run (both run our GPT): a target block's "
            f"forward + backward {ms['block_fwd_bwd']:.1f} ms, its forward {ms['block_fwd']:.1f} ms, the "
            f"head's two matmuls of a KL term {ms['head_pair']:.1f} ms. Per step ours runs "
            f"{ours['block_fwd_bwd']} + {ours['block_fwd']} blocks and {ours['head_pair']} head pairs "
            f"({floors['ours']:.0f} ms), the reference {ref['block_fwd_bwd']} + {ref['block_fwd']} and "
            f"{ref['head_pair']} ({floors['reference']:.0f} ms). The reference's step over ours' floor, "
            f"{step_ref / floors['ours']:.2f}x, bounds what any SPD code on this target could reach here; "
            f"2x needs ours' own work (its step less its floor, {step_ours - floors['ours']:.0f} ms) at "
            f"{step_ref / 2 - floors['ours']:.0f} ms or less."
        )
    return [head, ""] + _table(header, None, body) + ["", tail]


def _spd_launches_sentence(r: dict[str, Any], device: str) -> str:
    """How the kernel launches were counted, and the reference's launches over each of ours'."""
    rows = r["impls"]
    ref = rows["reference"]["launches"]["launches"]
    ratios = "; ".join(
        f"{SPD_REFERENCE_IMPLS[impl]} {ref / row['launches']['launches']:.2f}x"
        + (f" ({row['launches']['compiled_kernels']} of them compiled kernels)" if "compile" in impl else "")
        for impl, row in rows.items()
        if impl != "reference" and row.get("launches")
    )
    if device == "cuda":
        how = "the kernels the profiler recorded on the GPU in one step's forward and backward"
    else:
        eager = [  # against the operator calls counted the same way (ours: the GPU's head blocks)
            abs(row["launches"]["launches"] / (row.get("ops_gpu_head") or row["ops"])["work"] - 1)
            for row in rows.values()
            if row.get("ops") and row.get("launches")
        ]
        how = (
            "estimated on this CPU for one step's forward and backward (benchmarks/op_count.py's "
            "count_launches): the outermost profiled calls of the operators that do work, plus each kernel "
            "Inductor generated for compiled code, with ours' output head in the GPU's row blocks"
        )
        if eager:
            how += f"; on the eager steps these agree with the operator calls within {100 * max(eager):.1f}%"
    return f" Kernel launches: {how}. The reference launches {ref:,}, over ours': {ratios}."


NPT_COMPONENT_LABELS = {
    "dense": "dense layer `u W^T`",
    "loop": "per-component loop (the reference's form)",
    "batched": "batched einsum (all v_a, v_b formed)",
    "factored": "**factored (ours)**",
    "materialised": "materialised ΔW",
}


def render_npt_component(payload: Payload) -> list[str]:
    """Forward and forward+backward of the modulated projection, four ways against the dense one."""
    r = payload["results"]
    fac = r["variants"]["factored"]
    cuda = r["device"].startswith("cuda")
    header = ["variant", "forward ms", "fwd+bwd ms", "fwd vs factored", "fwd+bwd vs factored"]
    header += (["peak fwd MiB", "peak fwd+bwd MiB"] if cuda else []) + ["rel. error vs factored"]
    body = []
    for name, row in r["variants"].items():
        bwd = row["fwd_bwd_ms"]
        cells = [NPT_COMPONENT_LABELS.get(name, name), f"{row['fwd_ms']:.2f}", _num(bwd)]
        cells += [
            _ratio(row["fwd_ms"] / fac["fwd_ms"]),
            _ratio(None if bwd is None else bwd / fac["fwd_bwd_ms"]),
        ]
        if cuda:
            cells += [_num(row["fwd_peak_mib"], ".0f"), _num(row["fwd_bwd_peak_mib"], ".0f")]
        cells.append("-" if name == "dense" else f"{row['rel_err_vs_factored']:.1e}")
        body.append(cells)
    for name, why in r.get("skipped", {}).items():
        body.append([NPT_COMPONENT_LABELS.get(name, name), f"skipped: {why}"] + [""] * (len(header) - 2))
    head = (
        f"Shape {r['shape']}: d {r['d']}, f {r['f']}, k {r['k']}, r {r['r']}, batch {r['batch']} x "
        f"{r['seq']}; {r['dtype']} on {r['device']}, {r['threads']} thread(s); medians of {r['repeats']} "
        f"interleaved rounds; NP parameters {r['np_param_mib']:.1f} MiB."
    )
    lines = [head, ""] + _table(header, None, body)
    init = [
        f"- building the k components at the {shape} shape: "
        f"{t['vectorised'] * 1e3:.0f} ms vectorised (ours), "
        f"~{t['per_component_orthogonal_est'] * 1e3:.0f} ms per-component orthogonal (QR, extrapolated)"
        for shape, t in r["init_s"].items()
    ]
    return lines + [""] + init


NPT_SWEEP_LABELS = {
    "loop": "loop",
    "batched": "batched",
    "factored": "**factored**",
    "materialised": "materialised ΔW",
}


def render_npt_component_sweep(payload: Payload) -> list[str]:
    """Forward+backward ms of each form per (k, r), sorted by k·r, with each form's ratio to factored."""
    r = payload["results"]
    forms = r["variants"]
    others = [n for n in forms if n != "factored"]
    header = ["k", "r", "k·r"] + [f"{NPT_SWEEP_LABELS.get(n, n)} ms" for n in forms]
    header += [f"{n} / factored" for n in others]
    body = []
    for p in sorted(r["points"], key=lambda p: (p["kr"], p["k"])):
        fac = p["factored_fwd_bwd_ms"]
        cells = [str(p["k"]), str(p["r"]), str(p["kr"])] + [_num(p[f"{n}_fwd_bwd_ms"]) for n in forms]
        body.append(cells + [_ratio(p[f"{n}_fwd_bwd_ms"] / fac) for n in others])
    head = (
        f"Forward+backward of u (W + ΔW), shape {r['shape']}: d {r['d']}, f {r['f']}, batch {r['batch']} x "
        f"{r['seq']}; {r['dtype']} on {r['device']}, {r['threads']} thread(s); medians of {r['repeats']} "
        f"interleaved rounds per (k, r)."
    )
    return [head, ""] + _table(header, None, body)


NPT_LAYER_LABELS = {
    "original": "original (forward)",
    "original_bwd_input": "original, backward to the input (frozen)",
    "original_finetune": "original, full fine-tune of the layer",
    "npt": "NPT (forward)",
    "npt_teacher_forced": "NPT fwd+bwd, teacher-forced",
    "npt_free_running": "NPT fwd+bwd, free-running",
}


def render_npt_layer(payload: Payload) -> list[str]:
    """A converted Llama decoder layer against the dense one, forward and backward."""
    r = payload["results"]
    base = r["variants"]["original"]["ms"]
    cuda = r["device"].startswith("cuda")
    header = ["variant", "ms", "vs original forward"] + (["peak MiB"] if cuda else [])
    body = []
    for name, row in r["variants"].items():
        cells = [NPT_LAYER_LABELS.get(name, name), f"{row['ms']:.2f}", _ratio(row["ms"] / base)]
        body.append(cells + ([_num(row["peak_mib"], ".0f")] if cuda else []))
    head = (
        f"Shape {r['shape']}: d {r['d']}, f {r['f']}, heads {r['heads']}/{r['kv_heads']}, k {r['k']}, "
        f"r {r['r']}, batch {r['batch']} x {r['seq']}; NP mode {r['np_mode']}; "
        f"{r['dtype']} on {r['device']}, "
        f"{r['threads']} thread(s); medians of {r['repeats']} interleaved rounds; NP parameters "
        f"{r['np_params'] / 1e6:.2f}M against the layer's {r['layer_params'] / 1e6:.2f}M."
    )
    return [head, ""] + _table(header, None, body)


def render_checkpoint_stall(payload: Payload) -> list[str]:
    """The training stall per save under a Trainer, then one write's cost per writer and filesystem."""
    r = payload["results"]
    args, stall = r["args"], r["stall"]
    ckpt_mb = next(iter(stall.values()))["ckpt_mb"]
    lines = [
        f"Stall per save: a GPT with {args['n_layer']} layers, {args['n_embd']} wide, vocab {args['vocab']} "
        f"({ckpt_mb:.0f} MiB checkpoints with AdamW state), a save every {args['every']} of {args['steps']} "
        f"steps, medians of {args['rounds']} interleaved rounds; checkpoints in {r['stall_dir']} "
        f"({r['stall_filesystem']['type']}).",
        "",
    ]
    lines += _table(
        [
            "checkpoint IO",
            "stall per save",
            "vs Lightning's sync",
            "step with a save",
            "plain step",
            "file MiB",
        ],
        ["---", "---:", "---:", "---:", "---:", "---:"],
        [
            [
                name,
                f"{row['stall_s'] * 1e3:.0f} ms",
                _ratio(row["stall_vs_lightning_sync"]),
                f"{row['save_step_s'] * 1e3:.0f} ms",
                f"{row['plain_step_s'] * 1e3:.0f} ms",
                f"{row['ckpt_mb']:.1f}",
            ]
            for name, row in stall.items()
        ],
    )
    for directory, w in r["writes"].items():
        tmp = "the same filesystem" if w["tmpdir_same_filesystem"] else "another filesystem"
        fs = w["filesystem"]
        fs_name = fs["type"] if fs["device"] == fs["type"] else f"{fs['type']} on {fs['device']}"
        lines += [
            "",
            f"One save of the same checkpoint ({w['ckpt_mb']:.0f} MiB) in {directory} ({fs_name}; $TMPDIR "
            f"{w['tmpdir']} is {tmp}), medians of {w['repeats']} interleaved saves; peak RSS growth is the "
            "resident memory the save adds:",
            "",
        ]
        lines += _table(
            ["writer", "ms per save", "peak RSS growth MiB"],
            None,
            [
                [name, f"{row['save_s'] * 1e3:.1f}", f"{row['peak_rss_growth_mib']:.0f}"]
                for name, row in w["writers"].items()
            ],
        )
        s = w["atomic_steps"]
        lines += [
            "",
            f"Ours step by step: serialise + write {s['write_s'] * 1e3:.1f} ms, fsync of the file "
            f"{s['fsync_s'] * 1e3:.1f} ms, rename {s['rename_s'] * 1e3:.2f} ms, fsync of the directory "
            f"{s['dir_fsync_s'] * 1e3:.2f} ms.",
        ]
    return lines


def render_tokenize_speed(payload: Payload) -> list[str]:
    """datamodules.prepare with N worker processes against a single-process tokenising loop."""
    r = payload["results"]
    corpus, first = r["corpus"], r["first_prepare"]
    head = (
        f"{corpus['chars']:,} characters ({corpus['files']} files of {corpus['source']}), a byte-level BPE of "
        f"{r['tokenizer']['vocab_size']} tokens, {r['cpu_count']} CPU cores; medians of {r['rounds']} interleaved "
        "rounds. CPU s: user + system time of every process of the variant."
    )
    first_procs = r["variants"][first]["processes"]
    header = [
        "variant",
        "tokens",
        "tokens/s",
        "vs loop",
        f"vs num_proc={first_procs}",
        "CPU s",
        "tokens per CPU s",
    ]
    body = []
    for name, row in r["variants"].items():
        label = "single-process loop" if name == "loop" else f"`prepare`, num_proc={row['processes']}"
        body.append(
            [
                label,
                f"{row['tokens']:,}",
                f"{row['tokens_per_s']:,.0f}",
                _ratio(row["vs_loop"]),
                _ratio(row["vs_first_prepare"]),
                f"{row['cpu_s']:.2f}",
                f"{row['tokens_per_cpu_s']:,.0f}",
            ]
        )
    return [head, ""] + _table(header, None, body)


def render_generate_speed(payload: Payload) -> list[str]:
    """GPT.generate's tokens/s with the KV cache against the cache-free path, per context setting."""
    r = payload["results"]
    args, model = r["args"], r["model"]
    threads = f", {r['threads']} thread(s)" if r.get("threads") else ""
    head = (
        f"{args['new_tokens']} new tokens after a {args['prompt_tokens']}-token prompt, greedy, batch 1; a "
        f"random {model['n_layer']}-layer, {model['n_head']}-head, {model['n_embd']}-wide GPT (vocabulary "
        f"{model['vocab_size']}, {_count(model['parameters'])} parameters), {r['dtype']} on {r['device']}"
        f"{threads}; medians of {args['rounds']} interleaved rounds."
    )
    body = []
    for name, row in r["settings"].items():
        ratios = row["speedup_rounds"]
        slides = row["slides_after_new_tokens"]
        context = f"`{name}`: block_size {row['block_size']}" + (
            f" (window slides after {slides} new tokens)" if slides < args["new_tokens"] else ""
        )
        body.append(
            [
                context,
                f"{row['cache_tokens_per_s']:,.0f}",
                f"{row['no_cache_tokens_per_s']:,.0f}",
                f"**{row['speedup_median']:.1f}x**",
                f"{min(ratios):.1f}-{max(ratios):.1f}x",
                "yes" if row["greedy_tokens_equal"] else "**no**",
            ]
        )
    header = ["context", "KV cache tokens/s", "cache-free tokens/s", "speed-up", "rounds", "same tokens"]
    return [head, ""] + _table(header, ["---", "---:", "---:", "---:", "---:", "---"], body)


def render_muon_vs_adamw(payload: Payload) -> list[str]:
    """AdamW against Muon arms on the main job: final loss, steps to AdamW's final loss, step-time ratio."""
    r = payload["results"]
    arms = r["arms"]
    adamw_steps = arms[0]["validations"][-1]["step"]
    head = (
        f"`{r['config']}`, {r['max_steps']} steps of {r['tokens_per_step']:,} tokens per arm, same seed and "
        f"data order; validation every {r['val_every']} steps on {r['val_windows']} windows. Target: AdamW's "
        f"final validation loss, {r['adamw_final_val_loss']:.3f} nats (steps to it linear between validations)."
    )
    header = ["arm", "final val loss", "steps to AdamW's final", "of AdamW's", "median step", "vs AdamW"]
    body = []
    for arm in arms:
        label = "AdamW (as shipped)" if arm["muon_lr"] is None else f"Muon lr {arm['muon_lr']:g} + AdamW"
        reach = arm["steps_to_adamw_final"]
        best = arm["name"] == r.get("best_muon")
        fraction = _num(arm["steps_fraction_of_adamw"], ".0%")
        body.append(
            [
                label,
                f"{arm['final_val_loss']:.3f}",
                "not reached" if reach is None else f"{reach:.0f} / {adamw_steps}",
                f"**{fraction}**" if best else fraction,
                f"{arm['median_step_s']:.3f} s",
                _ratio(arm["step_time_ratio"], ".3f"),
            ]
        )
    timing = r.get("interleaved_timing")
    if timing:
        rounds = timing["ratio_rounds"]
        body.append(
            [
                f"interleaved step timing, Muon lr {timing['muon_lr']:g} (plain loop, {timing['rounds']} rounds)",
                "",
                "",
                "",
                f"{timing['adamw_step_s']:.3f} / {timing['muon_step_s']:.3f} s",
                f"{_ratio(timing['ratio_median'], '.3f')} ({min(rounds):.2f}-{max(rounds):.2f})",
            ]
        )
    planned = [lr for lr in r.get("muon_lrs_planned", []) if lr not in {a["muon_lr"] for a in arms}]
    tail = ["", f"Planned but not run: Muon lr {', '.join(f'{lr:g}' for lr in planned)}."] if planned else []
    return [head, ""] + _table(header, None, body) + tail


def render_npt_experiment(payload: Payload) -> list[str]:
    """NPT on the trained tiny GPT: the four variants' final perplexities, equiv_rel and acceptance."""
    r = payload["results"]
    acc = r["acceptance"]
    head = (
        f"`{r['config']}` on the main job's checkpoint, {r['max_steps']} optimizer steps per run (sequential: "
        f"{r['max_steps'] // 2} per layer), seed_everything {r['seed']}, np_seed {r['np_seed']}, "
        f"{r['threads']} thread(s) per run, {r['parallel']} run(s) at a time. Final evaluation on the "
        f"validation split, free-running; accepted = NPT perplexity within {acc['max_ppl_increase']:.0%} of "
        f"the original and >= {acc['min_recovered']:.0%} of the dropped attention's cost recovered."
    )
    header = ["variant", "equiv_rel (per layer)", "ppl original", "ppl NPT", "ppl attention dropped"]
    header += ["ppl increase", "recovered", "accepted", "wall time"]
    body = []
    for v in r["variants"]:
        layers = ", ".join(f"L{i} {x:.3f}" for i, x in v["equiv_rel_per_layer"].items())
        body.append(
            [
                f"{v['schedule']}, {v['modulation']}",
                f"{v['equiv_rel']:.3f} ({layers})",
                f"{v['ppl_original']:.2f}",
                f"{v['ppl_npt']:.2f}",
                f"{v['ppl_attention_dropped']:.2f}",
                f"{v['ppl_increase']:+.1%}",
                f"{v['recovered']:.1%}",
                "yes" if v["accepted"] else "no",
                _duration(v["wall_s"]),
            ]
        )
    tags = ", ".join(f"`{t}`" for t in r["curves"])
    curves = f"Curves (TensorBoard): {tags}, `val/equiv_rel_layer{{i}}`."
    return [head, ""] + _table(header, None, body) + ["", curves]


SPD_TOY_SUITES = {
    "tms_5-2": "TMS 5-2",
    "tms_40-10": "TMS 40-10",
    "tms_40-10_anneal": "TMS 40-10, late p anneal",
    "tms_40-10_anneal_fwarm": "TMS 40-10, late p anneal + 1000-step faithfulness warm-up",
    "tms_40-10_anneal_fwarm_lrfloor": "TMS 40-10, late p anneal + warm-up + lr floor 0.1",
    "tms_40-10_anneal_fwarm_cwd": "TMS 40-10, late p anneal + warm-up + component weight decay 0.3",
    "resid_mlp1": "ResidMLP 1 layer",
    "resid_mlp2": "ResidMLP 2 layers",
    "resid_mlp3": "ResidMLP 3 layers",
    "resid_mlp2_compile": "ResidMLP 2 layers, compile variant",
    "resid_mlp3_compile": "ResidMLP 3 layers, compile variant",
}


def render_spd_toy_suite(payload: Payload) -> list[str]:
    """One row per (suite, decomposition seed): verdict, alive / MMCS / identity CI error, CI margins, wall;
    then the suites with no runs (with the measured step time where there is one)."""
    r = payload["results"]
    header = ["suite", "seed", "steps", "passes", "alive", "min MMCS", "identity CI error",
              "max off-diag CI", "min diag CI", "wall", "failed criteria"]  # fmt: skip
    body = []
    for run in r["runs"]:
        label = SPD_TOY_SUITES.get(run["suite"], run["suite"])
        if not run["ran"]:
            body.append([label, str(run["seed"]), str(run["steps"]), "**no**", *["-"] * 6, *run["failures"]])
            continue
        mods = run["modules"]
        checked = list(run["ci_margins"]) if run["suite"].startswith("tms") else [
            m for m in mods if m.endswith("mlp_in")
        ]  # fmt: skip
        margins = [run["ci_margins"][m] for m in checked if m in run["ci_margins"]]
        body.append(
            [
                label,
                str(run["seed"]),
                str(run["steps"]),
                "yes" if run["passed"] else "**no**",
                " / ".join(f"{mods[m]['alive_components']:g}" for m in checked),
                f"{min(mods[m]['mmcs'] for m in checked):.4f}",
                " / ".join(f"{mods[m]['identity_ci_error']:g}" for m in checked),
                f"{max(m['max_off_diag_ci'] for m in margins):.3f}" if margins else "-",
                f"{min(m['min_diag_ci'] for m in margins):.3f}" if margins else "-",
                _duration(run["wall_s"]),
                "; ".join(run["failures"]) or "-",
            ]
        )
    head = (
        "Each decomposition seed (`seed_everything`) of the shipped `configs/spd/<suite>.yaml` (a variant: its "
        "base suite's config with `configs/spd/variants/<variant>.yaml` over it) on the suite's target "
        "(trained once by `<suite>_target.yaml`, its seed as shipped), one CPU thread per run. Alive "
        "and identity CI error per checked module (TMS: `linear1` / `linear2`; ResidMLP: each `mlp_in`); "
        "CI margins: the largest off-diagonal and smallest diagonal single-feature CI after the best "
        "permutation (identity CI error counts entries above 0.1 or below 0.9)."
    )
    members = [run for run in r["runs"] if run.get("members")]
    if members:
        head += (
            " Rows of a member ensemble (`--members`): its seeds trained as one run, each member its seed's "
            "run; wall: the run's wall over its members."
        )
    tail = []
    ran = {run["suite"] for run in r["runs"]}
    for suite, label in SPD_TOY_SUITES.items():
        timing = r.get("timing", {}).get(suite)
        status = "seeds as above" if suite in ran else "not run"
        if timing is None:
            if suite not in ran and not members:  # a members file lists what it ran
                tail.append(f"- {label}: not run.")
            continue
        if timing["step_s"] is None:  # the two timing runs differed by less than their fixed costs' noise
            tail.append(f"- {label}: {status}; `--time-steps {timing['steps'][0]}` too few to time a step.")
            continue
        line = (
            f"- {label}: {status}; {timing['step_s']:.3f} s per step measured (`--time-steps "
            f"{timing['steps'][0]}`), so the shipped {timing['config_steps']:,} steps take about "
            f"{_hours_or_minutes(timing['estimated_run_s'])} per seed at that speed."
        )
        ensemble = timing.get("members")
        if ensemble and ensemble.get("step_s") and ensemble.get("runs_per_ensemble_time"):
            line += (
                f" As a member ensemble of {ensemble['members']} seeds (`--members`), {ensemble['step_s']:.3f} s "
                f"per step for all of them: the {ensemble['members']} runs' work in the time of "
                f"{ensemble['members'] / ensemble['runs_per_ensemble_time']:.2f} of their steps "
                f"({ensemble['runs_per_ensemble_time']:.2f}x the runs one after another)."
            )
        tail.append(line)
    return [head, ""] + _table(header, None, body) + ([""] + tail if tail else [])


def _weight_norms(module: dict[str, Any]) -> str:
    """'largest other / smallest own' component weight norm of an alive-detail module row, or '-'."""
    extra = module["extra"]
    if not extra or "own_min_weight_norm" not in module:
        return "-"
    return f"{max(e['weight_norm'] for e in extra):.4f} / {module['own_min_weight_norm']:.3f}"


def render_spd_alive_detail(payload: Payload) -> list[str]:
    """Per finished toy-suite run and module: alive, the features' own components, and how the other
    alive ones fire (benchmarks/spd_alive_detail.py)."""
    runs = payload["results"]["runs"]
    header = ["run", "step", "inputs", "module", "alive", "features' own", "others alive",
              "inputs they fire on", "their largest CI", "features on where they fire (mean)",
              "their largest weight norm / own smallest"]  # fmt: skip
    body = []
    for name, run in runs.items():
        for module, m in run["modules"].items():
            extra = m["extra"]
            fired = sum(e["inputs"] for e in extra)
            on = sum(e["mean_features_on"] * e["inputs"] for e in extra) / fired if fired else None
            body.append(
                [
                    name,
                    str(run["global_step"]),
                    f"{run['examples']:,}",
                    module,
                    str(m["alive"]),
                    str(m["features_own"]),
                    str(len(extra)),
                    str(fired) if extra else "-",
                    f"{max(e['max_ci'] for e in extra):.3f}" if extra else "-",
                    f"{on:.1f}" if on is not None else "-",
                    _weight_norms(m),
                ]
            )
    first = next(iter(runs.values()))
    head = (
        "Each finished run's last checkpoint on fresh inputs of its own data settings (`inputs` of them: "
        f"32,768 is 4x the toy suite's own 8,192; data seed {first['data_seed']}; "
        f"{first['mean_features_on']:.1f} features on per input on average): components with CI > "
        f"{first['threshold']} on some input, split into the features' own "
        "(the argmax component of each single-feature input 0.75 e_j) and the others, with the inputs the "
        "others fire on, their largest CI and how many features those inputs had on; the last column "
        "compares the weight the others hold with the features' own (|V[:, c]| |U[c, :]|, the Frobenius "
        "norm of component c's rank-one weight; '-' where there are no others or the row predates it)."
    )
    return [head, ""] + _table(header, None, body)


def render_spd_run_progress(payload: Payload) -> list[str]:
    """Runs stopped before their end (benchmarks/spd_run_progress.py): steps reached, step time, and each
    mlp_in's alive components at every 5000th step and the last validation."""
    runs = payload["results"]["runs"]
    modules = sorted({m for run in runs for m in run["alive_components"] if m.endswith("mlp_in")})
    header = ["run", "steps reached", "median step", *[f"`{m}` alive (step: count)" for m in modules]]
    body = []
    for run in runs:
        cells = [run["run"], f"{run['last_step']:,}", f"{run['median_step_ms']:.1f} ms"]
        for m in modules:
            points = run["alive_components"].get(m, [])
            shown = [p for i, p in enumerate(points) if p[0] % 5000 == 0 or i == len(points) - 1]
            cells.append(", ".join(f"{step // 1000}k: {count:g}" for step, count in shown) or "-")
        body.append(cells)
    note = payload["meta"].get("note")
    return [*_table(header, None, body), *(["", f"The runs: {note}."] if note else [])]


def render_spd_step_launches(payload: Payload) -> list[str]:
    """Kernel launches of one whole training step of each SPD recipe, one run and as a member ensemble
    (benchmarks/spd_step_launches.py): per step, per member's step, and device-to-host reads."""
    r = payload["results"]
    suites = r["suites"]
    header = [
        "recipe",
        "members",
        "launches per step",
        "per member's step",
        "one run's step over it",
        "syncs",
    ]
    memory = [row["memory"] for row in suites.values() if "memory" in row]
    if memory:
        header += ["GB allocated per step", f"writing it at {HBM_TB_S:g} TB/s", "x the recipe's steps"]
    body = []
    single = {key: row for key, row in suites.items() if row.get("members", 1) == 1}
    for key, row in suites.items():
        members = row.get("members", 1)
        base = single.get(key.split(" x")[0])
        per_member = row["launches"] / members
        ratio = f"{base['launches'] / per_member:.2f}x" if base is not None and members > 1 else "-"
        compiled = f" ({row['compiled_kernels']} compiled)" if row.get("compiled_kernels") else ""
        cells = [f"`{key.split(' x')[0]}`", str(members), f"{row['launches']:,}{compiled}",
                 f"{per_member:,.0f}", ratio, str(row["syncs"])]  # fmt: skip
        if memory:
            cells += _memory_cells(row.get("memory"))
        body.append(cells)
    tail = (
        f"Step {r['at_batch'] + 1} of each recipe through train.py (after compiling), batch {r['batch_size']} "
        "(the count does not depend on it), AdamW in its foreach form as on a GPU; a compiled recipe's "
        "launches are op_count's CPU estimate (the operators its eager twin runs, each Inductor kernel). "
        "Syncs: device-to-host reads a GPU would wait on (AdamW's host-side step counters left out)."
    )
    if memory:
        batches = sorted({int(b) for m in memory for b in m["bytes_by_batch"]})
        residual = max(m["fit_max_residual"] for m in memory)
        recipe_batches = ", ".join(map(str, sorted({m["recipe_batch"] for m in memory})))
        tail += (
            f" Allocated: the bytes of every tensor one step creates (the profiler's memory events; the eager "
            "graph a GPU runs, the `mlp` CI functions' included, and the kernels Inductor generates), measured "
            f"at batches {', '.join(map(str, batches))} and extrapolated along their least-squares line (largest "
            f"residual {residual:.1%}) to the recipe's batch ({recipe_batches}). A GPU writes at least "
            f"that much per step: at an H100's {HBM_TB_S:g} TB/s of memory bandwidth (reads, and the launches, "
            "not counted) it takes the time shown, and that times the recipe's steps for the whole run."
        )
    return [*_table(header, None, body), "", tail]


HBM_TB_S = 3.35  # an H100 SXM's memory bandwidth (the H200's: 4.8)


def _memory_cells(memory: dict[str, Any] | None) -> list[str]:
    """GB allocated per step at the recipe's batch, the time to write it at HBM_TB_S, and over the recipe."""
    if memory is None:
        return ["-", "-", "-"]
    gb = memory["bytes_at_recipe_batch"] / 1e9
    ms = gb / HBM_TB_S  # GB / (TB/s) = ms
    return [f"{gb:.2f}", f"{ms:.1f} ms", _hours_or_minutes(ms * memory["recipe_steps"] / 1e3)]


RENDERERS: dict[str, Callable[[Payload], list[str]]] = {
    "main_job": render_main_job,
    "gpt_speed": render_gpt_speed,
    "spd_speed": render_spd_speed,
    "spd_reference_speed": render_spd_reference_speed,
    "spd_toy_suite": render_spd_toy_suite,
    "spd_run_progress": render_spd_run_progress,
    "spd_alive_detail": render_spd_alive_detail,
    "spd_step_launches": render_spd_step_launches,
    "npt_component": render_npt_component,
    "npt_component_sweep": render_npt_component_sweep,
    "npt_layer": render_npt_layer,
    "checkpoint_stall": render_checkpoint_stall,
    "tokenize_speed": render_tokenize_speed,
    "generate_speed": render_generate_speed,
    "muon_vs_adamw": render_muon_vs_adamw,
    "npt_experiment": render_npt_experiment,
}


# ----------------------------------------------------------------------------------------------- markers
def _shown(path: Path) -> str:
    """A path as printed: relative to the repository when inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def kind_of(name: str) -> str | None:
    """The renderer kind of a table name: the longest known kind that is the name or its prefix + '_'."""
    kinds = [k for k in RENDERERS if name == k or name.startswith(k + "_")]
    return max(kinds, key=len) if kinds else None


def known_tables(results_dir: Path = RESULTS_DIR) -> list[str]:
    """The table names the committed results offer: stems of results files with a known kind."""
    return sorted(p.stem for p in results_dir.glob("*.json") if kind_of(p.stem))


def render(name: str, results_dir: Path = RESULTS_DIR) -> str:
    """The generated markdown for one table: the renderer's lines, then the provenance line."""
    kind = kind_of(name)
    path = results_dir / f"{name}.json"
    if kind is None:
        raise KeyError(f"table {name!r}: no renderer for it (kinds: {sorted(RENDERERS)})")
    if not path.is_file():
        raise FileNotFoundError(
            f"table {name!r} has no {_shown(path)} (tables with results: {known_tables(results_dir)})"
        )
    payload = json.loads(path.read_text())
    return "\n".join([*RENDERERS[kind](payload), "", provenance(payload["meta"])])


@dataclass
class Block:
    """One marked table: its name and the 0-based line indices of its begin and end markers."""

    name: str
    begin: int
    end: int


def find_blocks(lines: list[str], where: str) -> tuple[list[Block], list[str]]:
    """The marked tables of a file's lines, and the problems with its markers (unclosed, stray, nested)."""
    blocks, problems = [], []
    open_name, open_at = None, -1
    for i, line in enumerate(lines):
        if m := BEGIN.match(line):
            if open_name is not None:
                problems.append(f"{where}:{open_at + 1}: results:begin {open_name} has no results:end")
            open_name, open_at = m["name"], i
        elif m := END.match(line):
            if open_name != m["name"]:
                problems.append(f"{where}:{i + 1}: results:end {m['name']} without a matching results:begin")
            else:
                blocks.append(Block(open_name, open_at, i))
            open_name = None
    if open_name is not None:
        problems.append(f"{where}:{open_at + 1}: results:begin {open_name} has no results:end")
    return blocks, problems


def regenerate(text: str, where: str, results_dir: Path = RESULTS_DIR) -> tuple[str, list[str], list[str]]:
    """(text with every marked table regenerated, problems, names of the tables whose text changed)."""
    lines = text.split("\n")
    blocks, problems = find_blocks(lines, where)
    out, stale, last = [], [], 0
    for block in blocks:
        out += lines[last : block.begin + 1]
        current = lines[block.begin + 1 : block.end]
        try:
            generated = ["", *render(block.name, results_dir).split("\n"), ""]
        except (KeyError, FileNotFoundError, ValueError) as err:
            problems.append(f"{where}:{block.begin + 1}: {err.args[0] if err.args else err}")
            generated = current
        if generated != current:
            stale.append(block.name)
        out += generated
        last = block.end
    out += lines[last:]
    return "\n".join(out), problems, stale


def doc_files(root: Path = REPO_ROOT) -> list[Path]:
    """README.md and docs/*.md: the files whose marked tables the report owns."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def process(files: list[Path], check: bool, results_dir: Path = RESULTS_DIR) -> list[str]:
    """Check or rewrite `files`; returns the problems (in check mode, stale tables are problems too)."""
    problems = []
    for path in files:
        where = _shown(path)
        text = path.read_text()
        new, file_problems, stale = regenerate(text, where, results_dir)
        problems += file_problems
        if check:
            problems += [
                f"{where}: table {name!r} differs from what {_shown(results_dir / f'{name}.json')} generates "
                "(run python -m benchmarks.report)"
                for name in stale
            ]
        elif new != text:
            path.write_text(new)
            print(f"{where}: regenerated {', '.join(stale)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with --check, verify) the marked tables; 1 when a problem was found."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="change nothing; fail on stale or missing tables"
    )
    parser.add_argument("files", nargs="*", type=Path, help="default: README.md and docs/*.md")
    args = parser.parse_args(argv)
    files = [p.resolve() for p in args.files] or doc_files()
    problems = process(files, args.check)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print("tables up to date" if args.check else "done")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
