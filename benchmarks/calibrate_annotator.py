"""Calibrate the phantom's expert annotator to CheXlocalize's human benchmark (run once; prints the constants).

For each pathology, bisect the annotator's disagreement strength ``s`` until its true-positive-only mIoU against the
exact masks (pairs where both masks are non-empty, IoU at original resolution, the benchmark's default mode) matches
the second radiologist group's value (:data:`chexseg_dist.synth.annotator.HUMAN_MIOU`). The calibration set is a
phantom valid split of its own seed (:data:`CALIBRATION_SEED`, never an experiment seed) at the synth default size;
each (image, pathology) keeps one random generator across strengths (common random numbers), so the mIoU falls
smoothly as ``s`` grows.

Usage::

    python benchmarks/calibrate_annotator.py [--n 300] [--seed 7919] [--check]

Prints the achieved table and a ``STRENGTH = {...}`` block to paste into chexseg_dist/synth/annotator.py. With
``--check`` it measures the strengths in the package instead of searching (the table in docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chexseg_dist.config import load_config  # noqa: E402
from chexseg_dist.core.pathologies import TASKS  # noqa: E402
from chexseg_dist.data.chexlocalize import decode_mask, polygons_to_mask  # noqa: E402
from chexseg_dist.synth import annotator  # noqa: E402
from chexseg_dist.synth.writer import generate  # noqa: E402

CALIBRATION_SEED = 7919


def exact_masks(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """The exact masks of a phantom valid split of ``n`` images (all 10 pathologies per image)."""
    cfg = load_config(
        "tiny", overrides=[f"synth.seed={seed}", "synth.n_train=0", f"synth.n_valid={n}", "synth.n_test=0"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, cfg.synth)
        with open(f"{tmp}/gt_segmentations_valid.json") as f:
            gt = json.load(f)
    return [{t: decode_mask(entry[t]).astype(bool) for t in TASKS} for entry in gt.values()]


def tp_miou(masks: list[np.ndarray], task_index: int, strength: float, seed: int) -> tuple[float, int, float]:
    """(tp-only mIoU, kept pairs, share of positives missed) of the annotator at ``strength`` on one pathology."""
    ious, missed = [], 0
    for i, mask in enumerate(masks):
        rng = np.random.default_rng([seed, i, task_index])
        polys = annotator.annotate_mask(rng, mask, strength)
        drawn = polygons_to_mask(polys, *mask.shape).astype(bool)
        if not drawn.any():
            missed += 1
            continue
        inter = np.logical_and(drawn, mask).sum()
        union = np.logical_or(drawn, mask).sum()
        ious.append(inter / union)
    return (float(np.mean(ious)) if ious else float("nan")), len(ious), missed / max(1, len(masks))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="calibration images (phantom valid split)")
    parser.add_argument("--seed", type=int, default=CALIBRATION_SEED)
    parser.add_argument("--iterations", type=int, default=14, help="bisection steps per pathology")
    parser.add_argument("--check", action="store_true", help="measure the package's strengths, no search")
    args = parser.parse_args()
    t0 = time.perf_counter()
    images = exact_masks(args.n, args.seed)
    print(f"calibration set: {len(images)} phantom valid images, seed {args.seed} ({time.perf_counter() - t0:.0f} s)")
    found: dict[str, float] = {}
    rows = []
    for k, task in enumerate(TASKS):
        masks = [img[task] for img in images if img[task].any()]
        target = annotator.HUMAN_MIOU[task]
        if args.check:
            s = annotator.STRENGTH[task]
        else:
            lo, hi = 0.0, 8.0
            for _ in range(args.iterations):
                mid = 0.5 * (lo + hi)
                miou, _, _ = tp_miou(masks, k, mid, args.seed)
                lo, hi = (mid, hi) if miou > target else (lo, mid)
            s = round(0.5 * (lo + hi), 3)
        miou, n, missed = tp_miou(masks, k, s, args.seed)
        found[task] = s
        rows.append((task, target, miou, n, missed, s))
    print(f"\n{'pathology':28s} {'human':>6s} {'annotator':>9s} {'pairs':>6s} {'missed':>7s} {'strength':>8s}")
    for task, target, miou, n, missed, s in rows:
        print(f"{task:28s} {target:6.3f} {miou:9.3f} {n:6d} {missed:7.1%} {s:8.3f}")
    means = [np.mean([r[1] for r in rows]), np.mean([r[2] for r in rows])]
    print(f"{'mean':28s} {means[0]:6.3f} {means[1]:9.3f}")
    if not args.check:
        print("\nSTRENGTH: dict[str, float] = {")
        for task in TASKS:
            print(f'    "{task}": {found[task]},')
        print("}")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
