#!/usr/bin/env bash
# Issue 24's targets in one device call, on the weights in toy_world/weights: the default run
# (200 steps, 48 samples) of the star on the CPU, one process per training seed (5 seeds, 2 threads
# each, as the 2-core CI machine); the moon and arrow presets on the GPU in fp32 (5 seeds each, one
# process per concept); the sweeps `-m optimizer.lr=1e-4,1e-3,1e-2` and `-m network.dim=1,4,16` with
# 3 seeds per setting on the GPU (fp32, 3 workers each); and how often the base model draws each
# shape (benchmarks/toy_base_shapes.py). Run from the repository root; results go to $OUT.
set -uo pipefail
set -m  # each background job in its own process group, so the deadline can stop a sweep and its children
OUT=${OUT:-/tmp/toy-measure-out}
rm -rf /tmp/measure && mkdir -p "$OUT" /tmp/measure
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
ROOT=$PWD
SECONDS=0
{ nvidia-smi -L; nproc; python3 -c "import torch; print(torch.__version__)"; } | tee "$OUT/device.txt"
python3 -m toy_world.shipped check || exit 1
python3 benchmarks/toy_base_shapes.py --per-prompt 4 --device cuda --out "$OUT/base-shapes.json" >/tmp/measure/shapes.log 2>&1 &
for seed in 42 43 44 45 46; do
    CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 \
        python3 benchmarks/toy_seeds.py run --data toy_star --seeds "$seed" --out "/tmp/measure/cpu-toy_star-$seed.jsonl" \
        >"/tmp/measure/cpu-toy_star-$seed.log" 2>&1 &
done
for data in toy_moon toy_arrow; do
    python3 benchmarks/toy_seeds.py run --data "$data" --seeds 42,43,44,45,46 --override precision.mixed=fp32 \
        --out "/tmp/measure/gpu-$data.jsonl" >"/tmp/measure/gpu-$data.log" 2>&1 &
done
sweep() {  # name, then the sweep's overrides
    local name=$1; shift
    mkdir -p "/tmp/measure/$name" && cd "/tmp/measure/$name" && \
        python3 -m sweeper -m "$@" hydra.sweeper.replicates=3 hydra.sweeper.n_workers=3 tracking=none \
        precision.mixed=fp32 >"/tmp/measure/$name.log" 2>&1
    cd "$ROOT"
}
sweep sweep-lr optimizer.lr=1e-4,1e-3,1e-2 &
sweep sweep-dim network.dim=1,4,16 &
deadline=${DEADLINE:-330}  # seconds: what is still running then is stopped, and the rest summarised
while [ -n "$(jobs -rp)" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 5; done
for job in $(jobs -rp); do kill -- -"$job" 2>/dev/null || kill "$job"; done
wait
echo "[runs stopped or done at ${SECONDS} s]"
cat /tmp/measure/cpu-*.jsonl >"$OUT/cpu-runs.jsonl"; cat /tmp/measure/gpu-*.jsonl >"$OUT/gpu-runs.jsonl"
python3 benchmarks/toy_seeds.py summary "$OUT/cpu-runs.jsonl" "$OUT/gpu-runs.jsonl" | tee "$OUT/summary.jsonl"
for name in sweep-lr sweep-dim; do
    tr '\r' '\n' <"/tmp/measure/$name.log" | grep -v "it/s\]\|images \[\|step/s" >"$OUT/$name.log"
    echo "== $name"; grep -a "COMPLETE\|FAIL\|Verdict\|best\|worse\|distinguishable\|seed SD" "$OUT/$name.log" | head -20
done
grep '^{' /tmp/measure/shapes.log
for f in /tmp/measure/*.log; do grep -H -a "Error\|Traceback" "$f" | head -3; done
