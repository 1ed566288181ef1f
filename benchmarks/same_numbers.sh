#!/usr/bin/env bash
# The chain at fixed seeds, to check that a change moved code and not numbers: prints the SHA-256 of every
# summary.json it writes (the Otsu and tuned Grad-CAM masks, a full-mode student's predictions) and of the
# thresholds. Run it in two checkouts with the same OUT_DIR (the files record their inputs' paths) and compare:
#
#   benchmarks/same_numbers.sh /tmp/same && cp /tmp/same/digests.txt before.txt   # in the old checkout
#   benchmarks/same_numbers.sh /tmp/same && diff before.txt /tmp/same/digests.txt  # in the new one
#
# Settings: phantom seed 7 (40 train, 24 valid, 12 test at 96 px), the tiny classifier at 64 px for 2 epochs with
# train_classifier.preserve_order=true (bit-reproducible), and a full-mode student (one worker, 12 steps at 64 px).
# Its only randomness is seeded; its Ray Data row order is not pinned, so its digest can differ between two runs of
# the same checkout: the script trains it twice and says whether those two agree.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/same_numbers.sh OUT_DIR}
BIN=${BIN:-.venv/bin}
rm -rf "$OUT" && mkdir -p "$OUT"
SETS=(--set classifier.image_size=64 --set train_classifier.epochs=2 --set train_classifier.batch_size=8
      --set train_classifier.preserve_order=true --set train_classifier.log_every_steps=0
      --set segmentation.image_size=64 --set train_segmentation.steps_per_epoch=6 --set train_segmentation.epochs=2
      --set train_segmentation.batch_size=4 --set train_segmentation.log_every_steps=0
      --set train_segmentation.torch_threads=1)
run() { echo "\$ chexseg $*" >&2; "$BIN/chexseg" "$@" >>"$OUT/console.log" 2>&1; }
run synth --out "$OUT/data" --seed 7 --n-train 40 --n-valid 24 --n-test 12 --size 96
for split in train valid test; do
  run manifest --csv "$OUT/data/$split.csv" --out "$OUT/$split.parquet"
done
run train-classifier --train "$OUT/train.parquet" --valid "$OUT/valid.parquet" --out "$OUT/classifier" "${SETS[@]}"
for split in valid test; do
  run pseudolabel --manifest "$OUT/$split.parquet" --checkpoint "$OUT/classifier" --store "$OUT/$split.zarr" "${SETS[@]}"
done
run tune-thresholds --store "$OUT/valid.zarr" --gt "$OUT/data/expert_segmentations_valid.json" \
  --out "$OUT/thresholds.json" "${SETS[@]}"
for strategy in otsu tuned; do
  extra=(); [ "$strategy" = tuned ] && extra=(--thresholds "$OUT/thresholds.json")
  run export-masks --store "$OUT/test.zarr" --strategy "$strategy" "${extra[@]}" --out "$OUT/$strategy.json" "${SETS[@]}"
  run evaluate --gt "$OUT/data/gt_segmentations_test.json" --pred "$OUT/$strategy.json" --out "$OUT/eval_$strategy"
done
for k in 1 2; do
  run train-segmentation --mode full --expert-manifest "$OUT/valid.parquet" \
    --expert-annotations "$OUT/data/expert_segmentations_valid.json" --test "$OUT/test.parquet" \
    --out "$OUT/student$k" "${SETS[@]}"
  run segment --model "$OUT/student$k" --manifest "$OUT/test.parquet" --out "$OUT/student$k.json" "${SETS[@]}"
  run evaluate --gt "$OUT/data/gt_segmentations_test.json" --pred "$OUT/student$k.json" --out "$OUT/eval_student$k"
done
cd "$OUT"
sha256sum thresholds.json eval_otsu/summary.json eval_tuned/summary.json eval_student1/summary.json \
  eval_student2/summary.json | tee digests.txt
if cmp -s eval_student1/summary.json eval_student2/summary.json; then
  echo "the student's two runs agree: its digest compares checkouts"
else
  echo "the student's two runs differ (Ray Data row order): compare its digest only as a trend"
fi
