"""Benchmark pseudo-mask refinement: the dense CRF and the random walk per (image, pathology) on one core, the refine
job through Ray Data on this machine's CPUs, and what refined masks add to the store.

1. **Per (image, pathology), one core** (``torch.set_num_threads(1)``): the first ``--images`` images of the store at
   a ``--frame`` px model frame (default 320, the paper preset's), masks made exactly as the student makes them
   (tuned-free Otsu binarisation, label gating by the manifest's labels, then the CRF), for the CRF's grid stride 4
   (the default) and 8 (the paper preset's); ms per image and per refined (image, pathology). Also all 10
   pathologies of each image refined (no gating: the worst case). The random walk (IRNet's propagation: radius 3,
   beta 5, 2^3 steps on the stride-4 grid) over a random boundary map: its cost does not depend on the values; and
   the boundary network's forward pass (once per image, shared by its pathologies).
2. **The refine job** (``chexseg refine`` on a copy of the store, a local Ray with every CPU): images/s end to end
   (Ray start-up excluded), at the tiny preset's 128 px frame and at 320 px with stride 8, and the bytes its
   ``refined/<key>`` arrays add to the store per image.

Usage (after ``make demo``, whose test split is pseudo-labelled)::

    python benchmarks/bench_refine.py --store outputs/demo/maps/test.zarr --manifest outputs/demo/manifests/test.parquet

Prints the figures (and writes JSON with --json). Nothing here is used by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def per_pair(store: str, manifest: str, n_images: int, frame: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from chexseg_dist.core.geometry import Letterbox
    from chexseg_dist.data.images import load_frame
    from chexseg_dist.masks.binarize import OtsuBinarizer
    from chexseg_dist.masks.export import image_paths
    from chexseg_dist.masks.gating import manifest_labels
    from chexseg_dist.masks.maker import MaskMaker
    from chexseg_dist.masks.refine import CrfParams, CrfRefiner, propagate_masks
    from chexseg_dist.store import MapStore

    torch.set_num_threads(1)
    ms = MapStore.open(store)
    slots = np.flatnonzero(ms.done())[:n_images]
    batch = ms.read(slots)
    ids = [str(i) for i in batch.image_id]
    paths = image_paths(manifest, batch.image_id)
    labels = manifest_labels(manifest, ids)
    frames = [load_frame(p, frame)[0] for p in paths]
    boxes = [Letterbox(b.height, b.width, frame) for b in batch.letterboxes if b is not None]
    out: dict[str, Any] = {"images": len(slots), "frame": frame}
    for stride in (4, 8):
        for gated in (True, False):
            maker = MaskMaker(OtsuBinarizer(), label_gating=gated, refiner=CrfRefiner(CrfParams(stride=stride)))
            plain = MaskMaker(OtsuBinarizer(), label_gating=gated)
            pairs = sum(int(maker.keep(None, labels[i] if gated else None).sum()) for i in range(len(slots)))
            t0 = time.perf_counter()
            for i in range(len(slots)):
                plain.masks(batch.cams[i], boxes[i], None, labels[i], "model")
            base = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(len(slots)):
                maker.masks(batch.cams[i], boxes[i], None, labels[i], "model", frames[i])
            total = time.perf_counter() - t0
            key = f"crf_stride{stride}_{'gated' if gated else 'all10'}"
            out[key] = {
                "pairs": pairs,
                "ms_per_image": 1000 * total / len(slots),
                "ms_per_pair": 1000 * (total - base) / max(pairs, 1),
                "ms_per_image_unrefined": 1000 * base / len(slots),
            }
    rng = np.random.default_rng(0)
    h = w = frame
    grid = -(-frame // 4)
    maps = rng.random((10, h, w)).astype(np.float32)
    boundary = rng.random((grid, grid)).astype(np.float32) ** 4
    propagate_masks(maps[:1], boundary, (h, w), 4, 3, 5.0, 3, 0.6)
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        propagate_masks(maps, boundary, (h, w), 4, 3, 5.0, 3, 0.6)
    out["random_walk_ms_per_pair"] = 1000 * (time.perf_counter() - t0) / (reps * 10)
    from chexseg_dist.models.affinity import BoundaryNet

    net = BoundaryNet().eval()  # the forward pass costs the same whatever the weights
    x = torch.rand(1, 1, frame, frame)
    with torch.no_grad():
        net(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            net(x)
    out["boundary_net_ms_per_image"] = 1000 * (time.perf_counter() - t0) / reps
    return out


def job(store: str, manifest: str, sets: list[str]) -> dict[str, Any]:
    import ray

    from chexseg_dist.config import load_config
    from chexseg_dist.masks.refine_job import run_refine

    work = tempfile.mkdtemp(prefix="bench_refine_")
    try:
        copy = os.path.join(work, "maps.zarr")
        shutil.copytree(store, copy)
        before = dir_bytes(copy)
        cfg = load_config("tiny", None, ["masks.refiner=crf", *sets])
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            summary = run_refine(cfg, copy, manifest)
        finally:
            ray.shutdown()
        grown = dir_bytes(copy) - before
        n = summary.refined + summary.failed
        return {
            "sets": sets,
            "images": n,
            "failed": summary.failed,
            "seconds": summary.seconds,
            "images_per_s": n / max(summary.seconds, 1e-9),
            "store_bytes_per_image": grown / max(n, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="a pseudo-labelled map store")
    parser.add_argument("--manifest", required=True, help="its manifest")
    parser.add_argument("--images", type=int, default=40, help="images for the per-pair timings")
    parser.add_argument("--frame", type=int, default=320, help="model frame of the per-pair timings")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    results: dict[str, Any] = {"cpus": os.cpu_count()}
    results["per_pair"] = pp = per_pair(args.store, args.manifest, args.images, args.frame)
    print(f"per (image, pathology), one core, {pp['frame']} px frame, {pp['images']} images:")
    for key, v in pp.items():
        if isinstance(v, dict):
            print(
                f"  {key:24s} {v['ms_per_pair']:7.1f} ms/pair ({v['pairs']} pairs), {v['ms_per_image']:7.1f} ms/image "
                f"(unrefined {v['ms_per_image_unrefined']:.1f})"
            )
    print(f"  random walk (stride 4, radius 3, 8 steps): {pp['random_walk_ms_per_pair']:.1f} ms/pair")
    print(f"  boundary network forward: {pp['boundary_net_ms_per_image']:.1f} ms/image (once per image)")
    results["job"] = []
    for sets in (["segmentation.image_size=128"], ["segmentation.image_size=320", "masks.crf_stride=8"]):
        r = job(args.store, args.manifest, sets)
        results["job"].append(r)
        print(
            f"refine job {' '.join(sets)}: {r['images']} images in {r['seconds']:.1f} s, {r['images_per_s']:.1f} "
            f"images/s on {os.cpu_count()} CPUs; store +{r['store_bytes_per_image']:.0f} bytes/image"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
