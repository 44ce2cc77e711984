#!/usr/bin/env bash
# The toy world's weights in one GPU call (issue 24): the toy CLIP, then the base model (VAE + UNet,
# capped at $BASE_SECONDS, default 200 s, of training), both seeded, installed with their manifest; then, until $UNTIL
# seconds into the call, the default run of each bundled concept on the GPU in fp32 (training seeds
# 42-46, one process per concept) and how often the base model draws each shape. Run from the
# repository root with python3 and the project's dependencies importable; logs, weights and results
# go to $OUT, and a copy of the weights to /tmp/toy-weights for a next call on the same machine.
set -uo pipefail
OUT=${OUT:-/tmp/toy-world-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
SECONDS=0
{ nvidia-smi -L; python3 -c "import torch, transformers, diffusers; print(torch.__version__, transformers.__version__, diffusers.__version__)"; } | tee "$OUT/device.txt"
rm -rf /tmp/toy && mkdir -p /tmp/toy
python3 -m toy_world.pretrain_clip --out /tmp/toy/clip --seed 0 --device cuda --steps "${CLIP_STEPS:-3000}" --pool-size 24000 \
    >"$OUT/pretrain-clip.log" 2>&1 || { tail -c 3000 "$OUT/pretrain-clip.log"; exit 1; }
tail -n 1 "$OUT/pretrain-clip.log"; echo "[clip done at ${SECONDS} s]"
python3 -m toy_world.pretrain_base --clip /tmp/toy/clip --out /tmp/toy/base --seed 0 --device cuda \
    --max-train-seconds "${BASE_SECONDS:-200}" >"$OUT/pretrain-base.log" 2>&1 || { tail -c 3000 "$OUT/pretrain-base.log"; exit 1; }
grep -a "it/s ->\|^\[" "$OUT/pretrain-base.log"; echo "[base done at ${SECONDS} s]"
python3 -m toy_world.shipped install --clip /tmp/toy/clip --base /tmp/toy/base || exit 1
tar -C toy_world -cf "$OUT/weights-clip.tar" weights/clip weights/manifest.json
tar -C toy_world -cf "$OUT/weights-base.tar" weights/base
rm -rf /tmp/toy-weights && cp -r toy_world/weights /tmp/toy-weights
cp /tmp/toy/base/samples.png "$OUT/base-samples.png"
python3 -c "import json; m=json.load(open('/tmp/toy/base/metrics.json')); print(json.dumps({k: m[k] for k in ('prompt_alignment', 'reference_alignment_real_renders', 'conditioning_loss', 'stage_seconds')}))"
echo "[weights done at ${SECONDS} s]"
[ "${UNTIL:-565}" -gt "$((SECONDS + 60))" ] || exit 0  # too little time left to measure anything
set -m  # each background job in its own process group, so the deadline can stop it
rm -rf /tmp/measure && mkdir -p /tmp/measure
python3 benchmarks/toy_base_shapes.py --per-prompt 4 --device cuda --out "$OUT/base-shapes.json" >/tmp/measure/shapes.log 2>&1 &
for data in toy_star toy_moon toy_arrow; do
    python3 benchmarks/toy_seeds.py run --data "$data" --seeds 42,43,44,45,46 --override precision.mixed=fp32 \
        --out "/tmp/measure/gpu-$data.jsonl" >"/tmp/measure/gpu-$data.log" 2>&1 &
done
until=${UNTIL:-565}
while [ -n "$(jobs -rp)" ] && [ "$SECONDS" -lt "$until" ]; do sleep 3; done
for job in $(jobs -rp); do kill -- -"$job" 2>/dev/null || kill "$job"; done
wait
cat /tmp/measure/gpu-*.jsonl >"$OUT/gpu-runs.jsonl"
grep -h '^{' /tmp/measure/shapes.log
python3 benchmarks/toy_seeds.py summary "$OUT/gpu-runs.jsonl"
for f in /tmp/measure/*.log; do grep -H -a "Error\|Traceback" "$f" | head -3; done
echo "[all done at ${SECONDS} s]"
