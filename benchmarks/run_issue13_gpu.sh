#!/usr/bin/env bash
# Issue 13's figures on one GPU machine, in one command (docs/benchmarks.md says what each measures):
#   1. model stage alone, DenseNet121 at 320 px, all-class Grad-CAM, the actor's own code: fp32 vs bf16;
#   2. pipeline steady state (Ray Data, one actor per GPU) on CheXpert-small-sized inputs, fp32 and bf16;
#   3. bf16 vs fp32 maps on a phantom test split: per-map correlation, and the mIoU (with bootstrap CIs) of the masks
#      exported with the same thresholds (tuned on valid's fp32 store), from a classifier trained here;
#   4. peak memory for 10x the images without and with pseudolabel.max_queued_frames;
#   5. the CPU pipeline figure of docs/benchmarks.md (tiny_cnn, 30,000 images) for the no-regression check.
# Usage: bash benchmarks/run_issue13_gpu.sh [OUT_DIR]. DRY=1 runs every step at miniature size on the CPU (checks
# the script, measures nothing). PYTHON=python3 where the dependencies are installed outside .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/issue13}"
py="${PYTHON:-.venv/bin/python}"
cpus=$(nproc)
work="$out/work"
mkdir -p "$work"
if [[ "${DRY:-0}" == 1 ]]; then
    device=cpu; gpus=0; arch=tiny_cnn; size=64; phantom=96; sizes=40,400; repeat=2; n_syn=(24 16 16); secs=1
    batches=16; big=3000; gpu_set=(--set pseudolabel.gpus_per_actor=0); extra=(--set classifier.image_size=64)
else
    device=cuda; gpus=1; arch=densenet121; size=320; phantom=390; sizes=2000,20000; repeat=10; n_syn=(2000 400 400)
    secs=5; batches=64,128,256; big=30000; gpu_set=(--set pseudolabel.gpus_per_actor=1); extra=(--preset paper)
    echo "machine: $cpus cores, $(free -g | awk '/Mem:/ {print $2}') GiB;" \
        "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); $(date -u +%FT%TZ)"
fi
$py -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__)"

# Inputs: phantoms of CheXpert-small size, a manifest of N and 10N rows (each image listed `repeat` times).
prep=$($py benchmarks/bench_pipeline.py --prepare-only --work "$work" --arch "$arch" --size "$size" \
    --phantom-size "$phantom" --sizes "$sizes" --repeat "$repeat" --gen-workers "$cpus" | tail -1)
big_n=${sizes#*,}
manifest=$($py -c "import json,sys; print(json.loads(sys.argv[1])['manifests'][sys.argv[2]])" "$prep" "$big_n")
ckpt=$($py -c "import json,sys; print(json.loads(sys.argv[1])['checkpoints']['tiny'])" "$prep")

echo "== 1. model stage alone: fp32 vs bf16"
$py benchmarks/bench_stages.py --manifest "$manifest" --checkpoint "$ckpt" --device "$device" --batches "$batches" \
    --precisions fp32,bf16 --seconds "$secs" --decode-images 256 --decode-procs $((cpus > 1 ? cpus - 1 : 1)) \
    --json "$out/stages.json"

echo "== 2. pipeline steady state, fp32 and bf16"
for precision in fp32 bf16; do
    $py benchmarks/bench_pipeline.py _worker ray --manifest "$manifest" --checkpoint "$ckpt" \
        --store "$work/store_$precision.zarr" --cpus "$cpus" --gpus "$gpus" "${extra[@]}" "${gpu_set[@]}" \
        --set pseudolabel.progress_interval_s=1000 --set "pseudolabel.precision=$precision" \
        | tail -1 | tee "$out/pipeline_$precision.json"
done

echo "== 3. bf16 vs fp32 maps and masks on a phantom test split"
data="$work/phantom"
[[ -f "$data/test.csv" ]] || $py -m chexseg_dist.cli synth --out "$data" --n-train "${n_syn[0]}" \
    --n-valid "${n_syn[1]}" --n-test "${n_syn[2]}" --size "$phantom" --workers "$cpus"
for split in train valid test; do
    $py -m chexseg_dist.cli manifest --csv "$data/$split.csv" --out "$work/m_$split.parquet"
done
$py -m chexseg_dist.cli train-classifier --train "$work/m_train.parquet" --valid "$work/m_valid.parquet" \
    --out "$work/classifier" "${extra[@]}" --set train_classifier.epochs=1 \
    --set "train_classifier.use_gpu=$([[ $gpus == 1 ]] && echo true || echo false)"
for precision in fp32 bf16; do
    for split in valid test; do
        $py -m chexseg_dist.cli pseudolabel --manifest "$work/m_$split.parquet" --checkpoint "$work/classifier" \
            --store "$work/maps_${split}_$precision.zarr" "${extra[@]}" "${gpu_set[@]}" \
            --set "pseudolabel.precision=$precision"
    done
done
$py -m chexseg_dist.cli tune-thresholds --store "$work/maps_valid_fp32.zarr" \
    --gt "$data/gt_segmentations_valid.json" --out "$work/thresholds.json" "${extra[@]}"
for precision in fp32 bf16; do
    $py -m chexseg_dist.cli export-masks --store "$work/maps_test_$precision.zarr" --strategy tuned \
        --thresholds "$work/thresholds.json" --out "$work/masks_$precision.json" "${extra[@]}"
    $py -m chexseg_dist.cli evaluate --gt "$data/gt_segmentations_test.json" --pred "$work/masks_$precision.json" \
        --out "$out/eval_$precision" "${extra[@]}"
done
$py - "$work/maps_test_fp32.zarr" "$work/maps_test_bf16.zarr" "$out" <<'EOF'
import json, sys
import numpy as np
from chexseg_dist.store import MapStore
a, b = MapStore.open(sys.argv[1]), MapStore.open(sys.argv[2])
ra = a.read(slice(None)); rb = b.read(b.index_of(ra.image_id))
corr = [float(np.corrcoef(ra.cams[i, t].ravel(), rb.cams[i, t].ravel())[0, 1]) for i in range(len(ra))
        for t in range(ra.cams.shape[1]) if ra.cams[i, t].std() > 0 and rb.cams[i, t].std() > 0]
ev = {p: json.load(open(f"{sys.argv[3]}/eval_{p}/summary.json")) for p in ("fp32", "bf16")}
result = {"maps": len(corr), "corr_median": float(np.median(corr)), "corr_p01": float(np.percentile(corr, 1)),
          "corr_min": float(np.min(corr)), "prob_max_abs_diff": float(np.nanmax(np.abs(ra.probs - rb.probs))),
          **{f"miou_{p}": ev[p]["mean_miou"] for p in ev}, **{f"miou_ci_{p}": ev[p]["mean_ci"] for p in ev}}
print(json.dumps(result))
json.dump(result, open(f"{sys.argv[3]}/precision.json", "w"), indent=2)
EOF

echo "== 4. peak memory for 10x the images, without and with the frame cap"
$py benchmarks/bench_pipeline.py --work "$work" --arch "$arch" --size "$size" "${extra[@]}" \
    --phantom-size "$phantom" --sizes "$sizes" --repeat "$repeat" --gen-workers "$cpus" --cpus "$cpus" \
    --gpus "$gpus" --device "$device" --loop-threads "" "${gpu_set[@]}" --no-paper --max-queued-frames 0,2048 \
    --json "$out/queued_frames.json"

echo "== 5. CPU figure (no regression): tiny_cnn, $big images"
$py benchmarks/bench_pipeline.py --work "$work/cpu" --sizes "$((big / 10)),$big" --no-paper --loop-threads "" \
    --json "$out/cpu_pipeline.json"
echo "done: $out"
