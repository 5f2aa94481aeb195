#!/usr/bin/env bash
# SPD's language-model step, ours against the reference implementation itself, on one CUDA GPU, offline, in
# one short device call (about 5 minutes after the machine starts), from the repo root:
#
#   OUT=/tmp/spd_ref_gpu bash benchmarks/spd_reference_gpu.sh
#
# Needs, beside the repo (carry both: they are git-ignored):
#   data_cache/spd_ref      the reference's `spd` package and a COMMIT file naming its commit, e.g.
#                           git -C ../spd archive 3f0bb61e spd | tar -x -C data_cache/spd_ref
#                           git -C ../spd rev-parse 3f0bb61e > data_cache/spd_ref/COMMIT
#   data_cache/gpu_wheels   benchmarks/prepare_gpu_wheels.py's wheels: pydantic, which the GPU image lacks
# The reference's other imports are in the GPU image, or (wandb, python-dotenv: logging only) served as empty
# modules by the worker (benchmarks/spd_reference_worker.py).
#
# Runs benchmarks/spd_reference_speed.py on cuda twice, under bfloat16 autocast (the reference's default) and
# in float32, and writes benchmarks/results/spd_reference_speed_cuda{_bf16,}.json's contents to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/spd_ref_gpu}
REF=${REF:-data_cache/spd_ref}
WHEELS=${WHEELS:-data_cache/gpu_wheels}
STEPS=${STEPS:-30}
DEVICE=${DEVICE:-cuda}    # cpu: a local smoke run of this script (STEPS=2)
PYTHON=${PYTHON:-python3} # runs ours and the reference's worker
mkdir -p "$OUT"

[ -d "$REF/spd" ] && [ -f "$REF/COMMIT" ] || { echo "no $REF/spd or $REF/COMMIT (see the header)"; exit 2; }
if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-compile --no-cache-dir --target /tmp/refsite \
        --find-links "$WHEELS" pydantic || exit 3
    export PYTHONPATH=/tmp/refsite${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv ; } >"$OUT/nvidia_smi.csv" 2>&1

status=0
for precision in bf16-mixed 32-true; do
    name=spd_reference_speed_$DEVICE$([ "$precision" = bf16-mixed ] && echo _bf16)
    "$PYTHON" benchmarks/spd_reference_speed.py --device "$DEVICE" --precision "$precision" \
        --reference-path "$REF" --reference-python "$PYTHON" --reference-commit "$(cat "$REF/COMMIT")" \
        --steps "$STEPS" --warmup 5 --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" || status=1
done
exit $status
