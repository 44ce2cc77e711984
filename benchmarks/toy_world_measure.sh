#!/usr/bin/env bash
# Issue 24's targets in one device call: the default run (200 steps, 48 samples) on the CPU, one
# process per (concept, training seed) with one thread each (5 seeds x 3 bundled concepts), while
# the GPU (fp32, as the CPU computes) runs the sweeps `-m optimizer.lr=1e-4,1e-3,1e-2` and
# `-m network.dim=1,4,16` with 3 seeds per setting. Run from the repository root; results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/toy-measure-out}
mkdir -p "$OUT" /tmp/measure
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
ROOT=$PWD
SECONDS=0
{ nvidia-smi -L; nproc; python3 -c "import torch; print(torch.__version__)"; } | tee "$OUT/device.txt"
for data in toy_star toy_moon toy_arrow; do
    for seed in 42 43 44 45 46; do
        CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
            python3 benchmarks/toy_seeds.py run --data "$data" --seeds "$seed" --out "/tmp/measure/$data-$seed.jsonl" \
            >"/tmp/measure/$data-$seed.log" 2>&1 &
    done
done
sweep() {  # name, then the sweep's overrides
    local name=$1; shift
    mkdir -p "/tmp/measure/$name" && cd "/tmp/measure/$name" && \
        python3 -m sweeper -m "$@" hydra.sweeper.replicates=3 tracking=none precision.mixed=fp32 \
        >"/tmp/measure/$name.log" 2>&1
    cd "$ROOT"
}
sweep sweep-lr optimizer.lr=1e-4,1e-3,1e-2 &
sweep sweep-dim network.dim=1,4,16 &
sweep sweep-dim-concept network.dim=1,4,16 hydra.sweeper.objective=concept_acc &
wait
echo "[all runs done at ${SECONDS} s]"
cat /tmp/measure/*.jsonl >"$OUT/cpu-runs.jsonl"
python3 benchmarks/toy_seeds.py summary "$OUT/cpu-runs.jsonl" | tee "$OUT/cpu-summary.jsonl"
for name in sweep-lr sweep-dim sweep-dim-concept; do
    tr '\r' '\n' <"/tmp/measure/$name.log" | grep -v "it/s\]\|images \[\|step/s" >"$OUT/$name.log"
    echo "== $name"; sed -n '/^Study/,$p' "$OUT/$name.log" | head -30
done
for f in /tmp/measure/toy_*.log; do grep -H -a "Error\|Traceback" "$f" | head -3; done
