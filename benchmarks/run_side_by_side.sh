#!/usr/bin/env bash
# Two checkouts of this repository measured back to back, alternating, on one machine: the pseudo-labelling pipeline
# (tiny_cnn, 30,000 images: Ray vs the single-process loop, peak memory) and all-class Grad-CAM vs a forward pass.
# For "no performance regression" checks across a change. Usage:
#   git worktree add /tmp/before <commit>; bash benchmarks/run_side_by_side.sh /tmp/before [OUT_DIR] [ROUNDS]
# Both checkouts run with this repository's .venv; the images are generated once and shared.
set -euo pipefail
cd "$(dirname "$0")/.."
before="$(cd "$1" && pwd)"
after="$(pwd)"
out="${2:-outputs/side_by_side}"
rounds="${3:-2}"
py="${PYTHON:-$after/.venv/bin/python}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -m); $(date -u +%FT%TZ)"
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    root="$before"; [ "$side" = after ] && root="$after"
    echo "=== $side ($root), round $round"
    (cd "$root" && PYTHONPATH="$root" "$py" benchmarks/bench_pipeline.py --sizes 30000 --repeat 10 --loop-threads 2 \
        --no-paper --work "$out/work" --json "$out/pipeline_${side}_$round.json") | grep -E "images/s|Ray / best"
    (cd "$root" && PYTHONPATH="$root" "$py" benchmarks/bench_saliency.py --threads 2 --case tiny_cnn:128:32 \
        --case densenet121:320:2 --repeats 7 --slow-repeats 2 --out "$out/saliency_${side}_$round.json") | tail -3
  done
done
