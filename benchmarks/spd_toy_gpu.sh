#!/usr/bin/env bash
# SPD's ResidMLP suites on one CUDA GPU inside a fixed time budget (a short device lease), from the repo root:
#
#   OUT=/tmp/spd_gpu BUDGET=540 bash benchmarks/spd_toy_gpu.sh
#
# 1. Offline installs what the GPU image lacks for train.py (jsonargparse and its two dependencies) from the
#    wheels benchmarks/prepare_gpu_wheels.py puts in data_cache/gpu_wheels.
# 2. Runs one 20-step two-member decomposition through the whole pipeline (exit 5 when it fails, before the
#    lease is spent).
# 3. Runs each suite of SUITES (default: the 2-layer, then the 3-layer ResidMLP at the reference's sizes, the
#    3-layer as its compile variant: eager, its `mlp` CI functions write ~150 GB per five-member step, at least
#    45 ms of an H100's bandwidth a step, 38 min for the 50k steps; compiled, 8 GB, docs/benchmarks.md) on
#    the seeds SEEDS as one member ensemble (spd_toy_suite.py --members: one process whose member i is the
#    run of seed i, lightning_modules/spd/members.py), float32 matmuls on TF32 tensor cores unless TF32=0;
#    targets are reused from $WORK/targets when there (trained on a CPU beforehand, carried).
# 4. Writes to $OUT the suites' results JSON, the smoke run's, machine.txt (nvidia-smi's view, cores), and the
#    logs and metrics (no checkpoints) in two archives: six files (a device call returns at most eight).
#
# Every suite stops at BUDGET seconds from the start; a suite stopped early writes no JSON, but its logs come
# back, and a second call on the same (still warm) machine continues it: --resume continues the stopped
# ensemble from its last checkpoint (every 1000 steps); SMOKE=0 skips the pipeline check on that call.
set -u
OUT=${OUT:-/tmp/spd_gpu}
BUDGET=${BUDGET:-540}
WORK=${WORK:-lightning_logs/spd_gpu}
SEEDS=${SEEDS:-10-14}
ACCEL=${ACCEL:-gpu}           # cpu: a local smoke run of this script
SMOKE=${SMOKE:-1}             # 0: no 20-step pipeline check (a second call, say)
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-150}  # seconds (a CPU run of this script needs ~600)
EXTRA=${EXTRA:-}              # more spd_toy_suite.py options for every suite (smoke: --max-steps 5)
SUITES=${SUITES:-resid_mlp2 resid_mlp3_compile}
TF32=${TF32:-1}
start=$(date +%s)
LOGS="$WORK/call_logs"  # this call's logs: archived into $OUT at the end
mkdir -p "$OUT" "$WORK" "$LOGS"
tf32=""
[ "$TF32" = 1 ] && tf32="--tf32"

if ! python3 -c "import jsonargparse" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        data_cache/gpu_wheels/jsonargparse-*.whl data_cache/gpu_wheels/docstring_parser-*.whl \
        data_cache/gpu_wheels/typeshed_client-*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import jsonargparse, train, lightning_modules.spd" || exit 4
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; echo "cores: $(nproc)"; } \
    >"$OUT/machine.txt" 2>&1

left() { echo $((BUDGET - ($(date +%s) - start))); }

# a 20-step two-member run through the whole pipeline first (final evaluation, results, margins): a fault
# that shows only at a run's end costs seconds here instead of the lease
first=${SUITES%% *}
python3 benchmarks/spd_toy_suite.py --suite "$first" --target-only --accelerator "$ACCEL" --work "$WORK" \
    >"$LOGS/target.log" 2>&1 || { tail -n 30 "$LOGS/target.log"; exit 5; }
if [ "$SMOKE" = 1 ]; then
    mkdir -p "$WORK/smoke/targets" && cp "$WORK/targets/${first%_compile}".* "$WORK/smoke/targets/"
    timeout "$SMOKE_TIMEOUT" python3 benchmarks/spd_toy_suite.py --suite "$first" --seeds 98,99 --members --max-steps 20 \
        --figures end --accelerator "$ACCEL" $tf32 --work "$WORK/smoke" --out "$OUT/smoke.json" >"$LOGS/smoke.log" 2>&1
    if ! grep -q '"ran": true' "$OUT/smoke.json" 2>/dev/null; then
        echo "smoke run failed:"; tail -n 30 "$LOGS/smoke.log" "$WORK"/smoke/*.log; exit 5
    fi
fi

for suite in $SUITES; do
    [ "$(left)" -gt 30 ] || { echo "$suite: no time left"; break; }
    timeout "$(left)" python3 benchmarks/spd_toy_suite.py --suite "$suite" --seeds "$SEEDS" --members --figures end \
        --resume --accelerator "$ACCEL" $tf32 --work "$WORK" --out "$OUT/spd_toy_suite_gpu_$suite.json" $EXTRA \
        >"$LOGS/suite_$suite.log" 2>&1
    echo "$suite suite rc $? at $(( $(date +%s) - start )) s"
    tail -n 12 "$LOGS/suite_$suite.log"
done
for log in "$WORK"/*_members*.log; do echo "== $log"; tail -n 6 "$log"; done

tar czf "$OUT/spd_gpu_logs.tgz" --exclude='*.ckpt' --exclude='*.pt' --exclude='*.png' --exclude='events.out.*' "$WORK"
find "$WORK/runs" -name 'events.out.*' -path "*_members*" -print0 | tar czf "$OUT/spd_gpu_events.tgz" --null -T -
echo "done at $(( $(date +%s) - start )) s"
