"""Kernel launches of the SPD tiny-LM step's forward and backward, compiled code included, per implementation
of ours (benchmarks/op_count.py's count_launches): on a GPU the kernels it runs; on a CPU an estimate of
them, with the output head in the row blocks a GPU uses (one per KL term at this size).

Run by spd_reference_speed.py in a process of its own, because Inductor generates kernels that record
profiler events only when told so before compiling, which the timed steps should not pay.

    python benchmarks/spd_launch_count.py --batch 1 --seq 4 --impls ours ours_compile
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.op_count import count_launches, enable_compiled_kernel_events  # noqa: E402
from benchmarks.spd_speed import make_step  # noqa: E402
from lightning_modules.spd import losses as spd_losses  # noqa: E402
from tests.helpers.spd_naive import CONFIGS  # noqa: E402

NAME = "tiny_lm"


@contextmanager
def gpu_head_blocks() -> Iterator[None]:
    """Ours' KL terms apply the output head in the row blocks they use on a GPU (one per term at this
    size) instead of the CPU's cache-sized ones; the only CPU-only path of ours in this step besides the
    head's reused block buffers, which make as many calls."""
    gpu_rows = partial(spd_losses.head_block_rows, "cuda")
    with mock.patch.object(spd_losses, "head_block_rows", lambda device_type, vocab: gpu_rows(vocab)):
        yield


def launches(impl: str, device: str, autocast_bf16: bool = False, warmup: int = 2) -> dict[str, Any]:
    """count_launches of one forward and backward of `impl` after `warmup` (compiling) ones; a compiled
    impl's working operators named by its eager twin (ours_compile: ours), never run under a dispatch mode."""
    step = make_step(NAME, impl, device, autocast_bf16)
    for _ in range(warmup):
        step.forward_backward()
    twin = make_step(NAME, impl.replace("_compile", ""), device, autocast_bf16)
    return count_launches(step.forward_backward, device, eager=twin.forward_backward)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impls", nargs="+", required=True, help="e.g. ours ours_compile ours_launch")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--batch", type=int, default=CONFIGS[NAME]["batch"])
    parser.add_argument("--seq", type=int, default=CONFIGS[NAME]["seq"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    CONFIGS[NAME].update(batch=args.batch, seq=args.seq)
    enable_compiled_kernel_events()
    bf16 = args.precision == "bf16-mixed"
    head_blocks = gpu_head_blocks if args.device == "cpu" else nullcontext  # on cuda they are the GPU's
    counts = {}
    for impl in args.impls:
        with head_blocks():
            counts[impl] = launches(impl, args.device, bf16)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
