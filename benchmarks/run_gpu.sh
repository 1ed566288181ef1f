#!/usr/bin/env bash
# GPU figures of the pseudo-labelling job (docs/benchmarks.md) on one machine with one GPU: the Ray pipeline vs a
# single-process loop for DenseNet121 at 320 px, each stage's ceiling (decoding on the CPUs; classifier + all-class
# Grad-CAM on the GPU) and decoding at full CheXpert resolution. Usage: bash benchmarks/run_gpu.sh [OUT_DIR]
# (PYTHON=python3 where the package's dependencies are installed outside .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/bench_gpu}"
py="${PYTHON:-.venv/bin/python}"
cpus=$(nproc)
work="${WORK:-$out/work}"
mkdir -p "$work"
echo "machine: $cpus cores, $(free -g | awk '/Mem:/ {print $2}') GiB;" \
    "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); $(date -u +%FT%TZ)"
$py -c "import torch, ray, zarr; print('torch', torch.__version__, 'ray', ray.__version__, 'zarr', zarr.__version__)"

# 1. Ray pipeline vs loop: phantoms the size of CheXpert-v1.0-small (~390 px), 2000 generated, listed 10 times.
$py benchmarks/bench_pipeline.py --work "$work" --arch densenet121 --size 320 --preset paper --phantom-size 390 \
    --sizes 2000,20000 --repeat 10 --gen-workers "$cpus" --cpus "$cpus" --gpus 1 --device cuda --loop-threads 1 \
    --set pseudolabel.gpus_per_actor=1 --no-paper --json "$out/pipeline.json"
# The 20,000-image manifest and the checkpoint just used, as bench_pipeline.py names them (cached: no new work).
prep=$($py benchmarks/bench_pipeline.py --prepare-only --work "$work" --arch densenet121 --size 320 \
    --phantom-size 390 --sizes 2000,20000 --repeat 10 | tail -1)
manifest=$($py -c "import json,sys; print(json.loads(sys.argv[1])['manifests']['20000'])" "$prep")
ckpt=$($py -c "import json,sys; print(json.loads(sys.argv[1])['checkpoints']['tiny'])" "$prep")

# 2. Two actors sharing the GPU (host work of one overlaps the other's GPU work).
$py benchmarks/bench_pipeline.py _worker ray --manifest "$manifest" --checkpoint "$ckpt" --store "$work/store_2act.zarr" \
    --cpus "$cpus" --gpus 1 --preset paper --set pseudolabel.progress_interval_s=1000 \
    --set pseudolabel.gpus_per_actor=0.5 --set pseudolabel.num_actors=2 | tail -1 | tee "$out/ray_2actors.json"

# 3. Stage ceilings on the same images and checkpoint.
$py benchmarks/bench_stages.py --manifest "$manifest" --checkpoint "$ckpt" --device cuda --batches 32,64,128,256 \
    --seconds 4 --decode-images 1024 --decode-procs $((cpus - 1)) --json "$out/stages.json"

# 4. Decoding at full CheXpert resolution (~2500 px JPEGs).
$py -m chexseg_dist.cli synth --out "$work/full" --n-train 45 --n-valid 0 --n-test 0 --size 2500 --workers "$cpus"
$py -m chexseg_dist.cli manifest --csv "$work/full/train.csv" --out "$work/full.parquet"
$py benchmarks/bench_stages.py --manifest "$work/full.parquet" --checkpoint "$ckpt" --no-model --decode-images 45 \
    --decode-block 3 --decode-procs $((cpus - 1)) --json "$out/stages_full.json"
