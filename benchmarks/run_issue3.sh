#!/usr/bin/env bash
# All of the pseudo-labelling job's CPU benchmarks in one run, back to back on one machine (docs/benchmarks.md):
# plain forward vs all-class Grad-CAM vs per-class backward; Ray pipeline vs single-process loop (tiny_cnn at 3,000
# and 30,000 images, DenseNet121 at 320 px at 32 and 320 images); store bytes per image; peak memory at N and 10N.
# GPU figures: benchmarks/run_gpu.sh. Usage: bash benchmarks/run_issue3.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/bench}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -m); $(date -u +%FT%TZ)"
$py benchmarks/bench_saliency.py --threads 2 --case tiny_cnn:128:32 --case densenet121:224:4 \
    --case densenet121:320:2 --repeats 7 --slow-repeats 2 --out "$out/saliency.json"
# 3,000 phantoms, listed 10 times for the 30,000-image runs (every listed image is read and decoded).
$py benchmarks/bench_pipeline.py --sizes 3000,30000 --repeat 10 --work "$out/pipeline" --json "$out/pipeline.json"
# DenseNet121 on a CPU runs faster at batch 16 than at the tiny preset's 64 (loop and Ray alike).
$py benchmarks/bench_pipeline.py --sizes 32,320 --arch densenet121 --size 320 --no-paper --work "$out/pipeline_dn" \
    --set pseudolabel.batch_size=16 --json "$out/pipeline_densenet121.json"
