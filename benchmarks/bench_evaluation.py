"""Benchmark ``chexseg evaluate``: 668 images x 10 pathologies at CheXpert's original size (~2300 x 2800).

Ground truth: each pathology positive with probability ``--prevalence`` (a union of ellipses, like an expert
outline). Predictions: every pair non-empty (as Otsu's masks are), overlapping the expert mask when there is one.
Masks are drawn from a pool of pre-encoded blobs per image size, so building the inputs takes seconds; the evaluation
itself does not know that masks repeat (every RLE is parsed, checked, merged and measured as usual).

Times: reading and checking both JSON files, IoU on RLEs, 1000 bootstrap resamples; then the whole command
(``chexseg evaluate``, including summary.json, per_image.csv, the chart and report.md); then the command with
``--maps`` (hit rate from a map store of 10 x 10 grids). The benchmark's own script takes ~21 ms per pair,
i.e. ~140 s for 6680 pairs.

    python benchmarks/bench_evaluation.py [--n-images 668] [--prevalence 0.3] [--workdir /tmp/chexseg_bench_eval]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from chexseg_dist.cli.main import main
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import OBSERVATIONS, TASKS
from chexseg_dist.data.chexlocalize import encode_mask, write_segmentations
from chexseg_dist.evaluation.run import evaluate_files
from chexseg_dist.store.mapstore import MapStore

SIZES = [(2320, 2828), (2544, 3056), (2048, 2500), (2828, 2320)]


def ellipse_union(rng: np.random.Generator, h: int, w: int, centre: tuple[float, float] | None = None) -> np.ndarray:
    """A union of 1-3 ellipses (row-interval fill: no full-image coordinate grids)."""
    mask = np.zeros((h, w), dtype=bool)
    cy0, cx0 = centre if centre is not None else (rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = cy0 + rng.normal(0, 0.05 * h), cx0 + rng.normal(0, 0.05 * w)
        ry, rx = rng.uniform(0.05, 0.2) * h, rng.uniform(0.05, 0.2) * w
        r0, r1 = max(0, int(cy - ry)), min(h, int(cy + ry) + 1)
        rows = np.arange(r0, r1)
        half = rx * np.sqrt(np.clip(1 - ((rows - cy) / ry) ** 2, 0, None))
        for r, hw in zip(rows, half):
            mask[r, max(0, int(cx - hw)) : min(w, int(cx + hw) + 1)] = True
    return mask


def build_inputs(workdir: str, n_images: int, prevalence: float, seed: int = 0) -> tuple[str, str, str]:
    rng = np.random.default_rng(seed)
    pools: dict[tuple[int, int], list[tuple[dict, dict]]] = {}
    empty: dict[tuple[int, int], dict] = {}
    for h, w in SIZES:
        pairs = []
        for _ in range(24):
            centre = (rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w)
            gt = ellipse_union(rng, h, w, centre)
            pred = ellipse_union(rng, h, w, (centre[0] + rng.normal(0, 0.05 * h), centre[1] + rng.normal(0, 0.05 * w)))
            pairs.append((encode_mask(gt), encode_mask(pred)))
        pools[(h, w)] = pairs
        empty[(h, w)] = encode_mask(np.zeros((h, w), dtype=bool))
    gt_json: dict[str, dict] = {}
    pred_json: dict[str, dict] = {}
    ids, sizes = [], []
    for i in range(n_images):
        size = SIZES[int(rng.integers(len(SIZES)))]
        image_id = f"patient{64541 + i}_study1_view1_frontal"
        ids.append(image_id)
        sizes.append(size)
        gt_json[image_id], pred_json[image_id] = {}, {}
        for task in TASKS:
            g, p = pools[size][int(rng.integers(24))]
            gt_json[image_id][task] = g if rng.random() < prevalence else empty[size]
            pred_json[image_id][task] = p
    gt_path, pred_path = os.path.join(workdir, "gt.json"), os.path.join(workdir, "pred.json")
    write_segmentations(gt_path, gt_json)
    write_segmentations(pred_path, pred_json)
    store = os.path.join(workdir, "maps.zarr")
    ms = MapStore.create(store, ids, np.arange(n_images), (10, 10), images_per_chunk=256, overwrite=True)
    boxes = [Letterbox(h, w, 320) for h, w in sizes]
    ms.write_rows(
        np.arange(n_images),
        rng.random((n_images, len(OBSERVATIONS))).astype(np.float32),
        rng.random((n_images, len(TASKS), 10, 10)).astype(np.float32),
        np.asarray(sizes),
        np.asarray([b.params() for b in boxes]),
    )
    return gt_path, pred_path, store


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=668)
    parser.add_argument("--prevalence", type=float, default=0.3, help="share of (image, pathology) gt-positive")
    parser.add_argument("--workdir", default="/tmp/chexseg_bench_eval")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)

    t0 = time.perf_counter()
    gt, pred, store = build_inputs(args.workdir, args.n_images, args.prevalence)
    t_build = time.perf_counter() - t0
    mb = (os.path.getsize(gt) + os.path.getsize(pred)) / 1e6

    t0 = time.perf_counter()
    result = evaluate_files(gt, pred, "tp_only", n_bootstrap=1000, seed=0)
    t_eval = time.perf_counter() - t0
    pairs = args.n_images * len(TASKS)

    out = os.path.join(args.workdir, "eval")
    t0 = time.perf_counter()
    assert main(["evaluate", "--gt", gt, "--pred", pred, "--out", out]) == 0
    t_cli = time.perf_counter() - t0

    t0 = time.perf_counter()
    assert main(["evaluate", "--gt", gt, "--pred", pred, "--out", out + "_maps", "--maps", store]) == 0
    t_maps = time.perf_counter() - t0

    figures = {
        "n_images": args.n_images,
        "pairs": pairs,
        "prevalence": args.prevalence,
        "json_mb": round(mb, 1),
        "build_inputs_s": round(t_build, 2),
        "evaluate_files_s (read+check+IoU+1000 bootstrap)": round(t_eval, 2),
        "ms_per_pair": round(1e3 * t_eval / pairs, 3),
        "cli_evaluate_s (incl. report, chart, csv)": round(t_cli, 2),
        "cli_evaluate_with_maps_s (plus hit rate)": round(t_maps, 2),
        "mean_miou": round(result.miou.mean, 4),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main_bench()
