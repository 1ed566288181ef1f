#!/usr/bin/env bash
# All of the pseudo-labelling job's benchmarks in one run, back to back on one machine (docs/benchmarks.md):
# plain forward vs all-class Grad-CAM vs per-class backward; Ray pipeline vs single-process loop; store bytes per
# image; peak memory at N and 10N images. Usage: bash benchmarks/run_issue3.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/bench}"
mkdir -p "$out"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -m); $(date -u +%FT%TZ)"
.venv/bin/python benchmarks/bench_saliency.py --threads 2 --case tiny_cnn:128:32 --case densenet121:224:4 \
    --case densenet121:320:2 --repeats 7 --slow-repeats 2 --out "$out/saliency.json"
.venv/bin/python benchmarks/bench_pipeline.py --sizes 300,3000 --work "$out/pipeline" --json "$out/pipeline.json"
