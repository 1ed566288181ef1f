#!/usr/bin/env bash
# Steady-state GPU throughput of the pseudo-labelling pipeline (docs/benchmarks.md): DenseNet121 at 320 px on one GPU,
# 60,000 images (2,000 phantoms of ~390 px listed 30 times), for model batch 64 and 128 and for two actors sharing
# the GPU. Each line: images/s over the whole stage (actor start-up included) and the classifier actors' busy share.
# Usage: bash benchmarks/run_gpu_steady.sh [OUT_DIR] (PYTHON=python3 where the dependencies live outside .venv;
# N and REPEAT size the run; GPUS=0 runs the same on CPUs (the two-actor run then needs 3 or more), GPUS=1, the
# default, on one GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/bench_gpu}"
py="${PYTHON:-.venv/bin/python}"
cpus=$(nproc)
work="${WORK:-$out/work}"
mkdir -p "$work" "$out"
echo "machine: $cpus cores; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader); $(date -u +%FT%TZ)"
n="${N:-60000}"
repeat="${REPEAT:-30}"
prep=$($py benchmarks/bench_pipeline.py --prepare-only --work "$work" --arch densenet121 --size 320 \
    --phantom-size 390 --sizes "$n" --repeat "$repeat" --gen-workers "$cpus" | tail -1)
manifest=$($py -c "import json,sys; print(json.loads(sys.argv[1])['manifests'][sys.argv[2]])" "$prep" "$n")
ckpt=$($py -c "import json,sys; print(json.loads(sys.argv[1])['checkpoints']['tiny'])" "$prep")
run() {  # NAME, then --set overrides
    local name="$1"; shift
    $py benchmarks/bench_pipeline.py _worker ray --manifest "$manifest" --checkpoint "$ckpt" --store "$work/s_$name.zarr" \
        --cpus "$cpus" --gpus "${GPUS:-1}" --preset paper --set pseudolabel.progress_interval_s=1000 \
        --set pseudolabel.gpus_per_actor="${GPUS:-1}" "$@" | tail -1 > "$out/steady_$name.json"
    $py -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], round(r['images']/r['stage_s']), \
'images/s over', round(r['stage_s'], 1), 's; actors busy', r['actor_utilisation'], r['busy_s'])" \
        "$out/steady_$name.json" "$name"
}
run batch64
run batch128 --set pseudolabel.batch_size=128
run 2actors --set pseudolabel.gpus_per_actor="$( [ "${GPUS:-1}" = 0 ] && echo 0 || echo 0.5 )" --set pseudolabel.num_actors=2
