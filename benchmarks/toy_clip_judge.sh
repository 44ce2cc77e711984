#!/usr/bin/env bash
# Is the toy CLIP part of what caps concept_acc? One GPU call: train issue 24's CLIP (12 shapes, half
# of each batch blurred and noised; seeded), then classify the same samples of the shipped base model
# (24 a shape, benchmarks/toy_base_shapes.py) with the shipped CLIP and with the new one, both over
# the shipped CLIP's eight shapes. Arguments: the shipped weights folder (default toy_world/weights).
set -uo pipefail
OUT=${OUT:-/tmp/toy-judge-out}
WEIGHTS=${1:-toy_world/weights}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
SECONDS=0
nvidia-smi -L | tee "$OUT/device.txt"
python3 -m toy_world.pretrain_clip --out /tmp/judge-clip --seed 0 --device cuda --steps 3000 --pool-size 24000 \
    >"$OUT/pretrain-clip.log" 2>&1 || { tail -c 3000 "$OUT/pretrain-clip.log"; exit 1; }
tail -n 1 "$OUT/pretrain-clip.log"; echo "[clip done at ${SECONDS} s]"
python3 -c "import json; m=json.load(open('/tmp/judge-clip/metrics.json')); print(json.dumps({k: m[k] for k in ('shape_accuracy', 'per_shape_accuracy', 'wall_seconds')}))"
for judge in shipped new; do
    clip="$WEIGHTS/clip"; [ "$judge" = new ] && clip=/tmp/judge-clip
    echo "== judge: $judge CLIP"
    python3 benchmarks/toy_base_shapes.py --base "$WEIGHTS/base" --clip "$clip" --manifest "$WEIGHTS/manifest.json" \
        --per-prompt 4 --device cuda --out "$OUT/shapes-$judge-clip.json" 2>&1 | grep '^{'
done
echo "[all done at ${SECONDS} s]"
