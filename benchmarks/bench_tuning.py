"""Benchmark ``chexseg tune-thresholds``: 234 images x 10 pathologies x 101 thresholds at original size.

A synthetic map store of 10 x 10 Grad-CAM grids (a bump near the expert mask plus noise) and expert masks at
CheXpert's original sizes (~2300 x 2800), positive with probability ``--prevalence`` per (image, pathology). The
CheXlocalize validation set has 234 images with roughly 0.27 of its pairs positive; ``--prevalence 1`` is the worst
case (every pair needs the per-pixel pass). The benchmark's own tuning script evaluates each threshold separately
(about an hour for 7 thresholds).

Times the whole command (reading the gt JSON and the store, the one pass with ``--workers`` processes, the choice of
thresholds and cutoffs, writing the thresholds file).

    python benchmarks/bench_tuning.py [--n-images 234] [--prevalence 0.27] [--workers 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from bench_evaluation import SIZES, ellipse_union

from chexseg_dist.cli.main import main
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import OBSERVATIONS, TASKS
from chexseg_dist.data.chexlocalize import encode_mask, write_segmentations
from chexseg_dist.masks.thresholds import TunedThresholds
from chexseg_dist.store.mapstore import MapStore


def build_inputs(workdir: str, n_images: int, prevalence: float, seed: int = 0) -> tuple[str, str, int]:
    rng = np.random.default_rng(seed)
    pools: dict[tuple[int, int], list[tuple[dict, tuple[float, float]]]] = {}
    empty = {}
    for h, w in SIZES:
        pool = []
        for _ in range(20):
            centre = (rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w)
            pool.append((encode_mask(ellipse_union(rng, h, w, centre)), (centre[0] / h, centre[1] / w)))
        pools[(h, w)] = pool
        empty[(h, w)] = encode_mask(np.zeros((h, w), dtype=bool))
    ids, sizes = [], []
    gt: dict[str, dict] = {}
    cams = np.zeros((n_images, len(TASKS), 10, 10), dtype=np.float32)
    yy, xx = (np.mgrid[:10, :10] + 0.5) / 10
    positives = 0
    for i in range(n_images):
        size = SIZES[int(rng.integers(len(SIZES)))]
        image_id = f"patient{64541 + i}_study1_view1_frontal"
        ids.append(image_id)
        sizes.append(size)
        gt[image_id] = {}
        for k, task in enumerate(TASKS):
            rle, (cy, cx) = pools[size][int(rng.integers(20))]
            positive = rng.random() < prevalence
            positives += positive
            gt[image_id][task] = rle if positive else empty[size]
            if not positive:
                cy, cx = rng.uniform(0.2, 0.8, 2)
            cams[i, k] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02) + 0.3 * rng.random((10, 10))
    gt_path = os.path.join(workdir, "gt_valid.json")
    write_segmentations(gt_path, gt)
    store = os.path.join(workdir, "valid.zarr")
    ms = MapStore.create(store, ids, np.arange(n_images), (10, 10), images_per_chunk=256, overwrite=True)
    ms.write_rows(
        np.arange(n_images),
        rng.random((n_images, len(OBSERVATIONS))).astype(np.float32),
        cams,
        np.asarray(sizes),
        np.asarray([Letterbox(h, w, 320).params() for h, w in sizes]),
    )
    return gt_path, store, positives


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=234)
    parser.add_argument("--prevalence", type=float, default=0.27)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/chexseg_bench_tune")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)

    t0 = time.perf_counter()
    gt, store, positives = build_inputs(args.workdir, args.n_images, args.prevalence)
    t_build = time.perf_counter() - t0

    out = os.path.join(args.workdir, "thresholds.json")
    argv = ["tune-thresholds", "--store", store, "--gt", gt, "--out", out, "--workers", str(args.workers)]
    t0 = time.perf_counter()
    cpu0 = os.times()
    assert main(argv) == 0
    cpu1 = os.times()
    t_tune = time.perf_counter() - t0
    tuned = TunedThresholds.load(out)
    pixels = sum(h * w for h, w in SIZES) / len(SIZES)
    figures = {
        "n_images": args.n_images,
        "pathologies": len(TASKS),
        "thresholds": len(tuned.meta["curves"]["thresholds"]),
        "positive_pairs": int(positives),
        "mean_pixels_per_image": int(pixels),
        "workers": args.workers,
        "build_inputs_s": round(t_build, 2),
        "tune_thresholds_s": round(t_tune, 2),
        "cpu_s (parent + children)": round(
            (cpu1.user + cpu1.system + cpu1.children_user + cpu1.children_system)
            - (cpu0.user + cpu0.system + cpu0.children_user + cpu0.children_system),
            2,
        ),
        "ms_per_positive_pair (wall x workers)": round(1e3 * t_tune * args.workers / max(1, positives), 1),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main_bench()
