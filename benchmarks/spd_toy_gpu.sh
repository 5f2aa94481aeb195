#!/usr/bin/env bash
# SPD's ResidMLP suites on one CUDA GPU inside a fixed time budget (a short device lease), from the repo root:
#
#   OUT=/tmp/spd_gpu BUDGET=540 bash benchmarks/spd_toy_gpu.sh
#
# 1. Offline installs what the GPU image lacks for train.py (jsonargparse and its two dependencies) from the
#    wheels benchmarks/prepare_gpu_wheels.py puts in data_cache/gpu_wheels.
# 2. Runs one 20-step decomposition through the whole pipeline (exit 5 when it fails, before the lease is spent).
# 3. Runs the 2-layer ResidMLP at the reference's sizes on seeds 10-14, five at once on the one GPU (the
#    target is reused from $WORK/targets when it is there, e.g. trained on a CPU beforehand; SUITE2=
#    resid_mlp2_compile runs the recipe with its compile variant, configs/spd/variants/), and beside it
#    times the 3-layer recipe's step on the same GPU, as shipped and with its compile variant (TIME3;
#    --time-steps, on $WORK/targets/resid_mlp3.pt or a new one).
# 4. Writes the suites' results JSON, nvidia-smi's view and the runs' logs and metrics (no checkpoints) to $OUT.
#
# Both suites stop at BUDGET seconds; a suite stopped early writes no JSON, but its logs still come back, and
# a second call on the same (still warm) machine continues its runs: --resume keeps the finished ones and
# continues the others from their last checkpoint (every 1000 steps).
set -u
OUT=${OUT:-/tmp/spd_gpu}
BUDGET=${BUDGET:-540}
WORK=${WORK:-lightning_logs/spd_gpu}
SEEDS=${SEEDS:-10-14}
ACCEL=${ACCEL:-gpu}           # cpu: a local smoke run of this script
TIME_STEPS=${TIME_STEPS:-200} # 0: no 3-layer timing (a second call, say)
SMOKE=${SMOKE:-1}             # 0: no 20-step pipeline check (a second call, say)
EXTRA=${EXTRA:-}              # more spd_toy_suite.py options for the 2-layer suite (smoke: --max-steps 5)
SUITE2=${SUITE2:-resid_mlp2}  # the 2-layer suite: resid_mlp2, or resid_mlp2_compile (compile variant)
TIME3=${TIME3:-resid_mlp3 resid_mlp3_compile}  # the 3-layer suites whose step is timed
start=$(date +%s)
mkdir -p "$OUT" "$WORK"

if ! python3 -c "import jsonargparse" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        data_cache/gpu_wheels/jsonargparse-*.whl data_cache/gpu_wheels/docstring_parser-*.whl \
        data_cache/gpu_wheels/typeshed_client-*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import jsonargparse, train, lightning_modules.spd" || exit 4
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv ; } >"$OUT/nvidia_smi.csv" 2>&1
nproc >"$OUT/nproc.txt"

left() { echo $((BUDGET - ($(date +%s) - start))); }

# a 20-step run through the whole pipeline first (final evaluation, results, margins): a fault that shows
# only at a run's end costs seconds here instead of the lease
python3 benchmarks/spd_toy_suite.py --suite resid_mlp2 --target-only --accelerator "$ACCEL" --work "$WORK" \
    >"$OUT/target.log" 2>&1 || { tail -n 30 "$OUT/target.log"; exit 5; }
if [ "$SMOKE" = 1 ]; then
    mkdir -p "$WORK/smoke/targets" && cp "$WORK/targets/"resid_mlp2.* "$WORK/smoke/targets/"
    timeout 150 python3 benchmarks/spd_toy_suite.py --suite "$SUITE2" --seeds 99 --max-steps 20 --figures end \
        --accelerator "$ACCEL" --work "$WORK/smoke" --out "$OUT/smoke.json" >"$OUT/smoke.log" 2>&1
    if ! grep -q '"ran": true' "$OUT/smoke.json" 2>/dev/null; then
        echo "smoke run failed:"; tail -n 30 "$OUT/smoke.log" "$WORK"/smoke/*.log; exit 5
    fi
fi

timeout "$(left)" python3 benchmarks/spd_toy_suite.py --suite "$SUITE2" --seeds "$SEEDS" --jobs 5 --figures end --resume \
    --accelerator "$ACCEL" --work "$WORK" --out "$OUT/spd_toy_suite_gpu.json" $EXTRA >"$OUT/suite_resid_mlp2.log" 2>&1 &
two=$!
if [ "$TIME_STEPS" -gt 0 ]; then
    for suite in $TIME3; do
        timeout "$(left)" python3 benchmarks/spd_toy_suite.py --suite "$suite" --time-steps "$TIME_STEPS" \
            --accelerator "$ACCEL" --work "$WORK" --out "$OUT/spd_toy_suite_gpu_timing_$suite.json" \
            >"$OUT/suite_$suite.log" 2>&1
        echo "$suite timing rc $? at $(( $(date +%s) - start )) s"
    done
fi
wait $two
echo "resid_mlp2 suite rc $? at $(( $(date +%s) - start )) s"
tail -n 20 "$OUT/suite_resid_mlp2.log"
for log in "$WORK"/resid_mlp*.log; do echo "== $log"; tail -n 6 "$log"; done

tar czf "$OUT/spd_gpu_logs.tgz" --exclude='*.ckpt' --exclude='*.pt' --exclude='*.png' --exclude='events.out.*' "$WORK"
find "$WORK/runs" -name 'events.out.*' -path "*${SUITE2}_seed*" -print0 | tar czf "$OUT/spd_gpu_events.tgz" --null -T -
echo "done at $(( $(date +%s) - start )) s"
