#!/usr/bin/env bash
# Compile several compiled bench rows side by side, then time them one after another.
#
# Why: a whole-denoiser row spends ~150 s compiling on one process (SD1.5, 16 cores) and ~20 s timing.
# The side-by-side processes fill Inductor's on-disk caches (FX graph and AOTAutograd); the timed run then
# loads the compiled graphs instead of compiling, so a GPU call pays about one compile, not one per row.
# The warm-up processes run short (2 timed steps, 16 images) and are thrown away; only the timed run's
# results count, and it runs alone on the GPU.
#
#   benchmarks/prewarmed_rows.sh OUT "WARM ROWS" "TIMED ROWS" [bench_training.py args, e.g. --family sdxl --profile 3]
#
# SIDE_BY_SIDE (environment, optional): a shell command run alongside the warm-up (a GPU test, say), waited
# for before the timing starts.
# WARM ROWS are space-separated (one process each, all at once: mind the GPU memory, e.g. 4 SD1.5 batch-4
# rows or 2 batch-32 rows on 80 GB); TIMED ROWS comma-separated. Logs: OUT/warm-ROW.log, OUT/timed.log.
set -u
out=$1 warm=$2 timed=$3
shift 3
mkdir -p "$out"
here=$(dirname "$0")
began=$SECONDS
if [ -n "${SIDE_BY_SIDE:-}" ]; then bash -c "$SIDE_BY_SIDE" & fi
for row in $warm; do
    python3 "$here/bench_training.py" --out "/tmp/prewarm-$row" --no-split --rows "$row" --steps 2 --images 16 "$@" \
        >"$out/warm-$row.log" 2>&1 &
done
wait
echo "compiled rows $warm side by side in $((SECONDS - began)) s"
python3 "$here/bench_training.py" --out "$out" --no-split --rows "$timed" "$@" >"$out/timed.log" 2>&1
echo "timed rows $timed (rc $?) by $((SECONDS - began)) s"
