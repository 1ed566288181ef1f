"""Pseudo-masks for segmentation training: derive them on the fly from the stored grids, or materialise them?

Measures, for the tiny (128 px frame, 8x8 grid) and paper (320 px, 10x10 grid) geometries:
- the CPU time to derive the 10 model-frame masks of one image from its stored grid (``MaskMaker.masks(frame="model")``,
  Otsu and tuned thresholds), which is what an on-the-fly training input pipeline pays per sample;
- the bytes per image a materialised mask array would add to the store (10 x S x S bits, zstd-compressed as Zarr
  would store them), against the ~1 KB per image of the grids themselves.

Usage:
    python benchmarks/bench_pseudomasks.py [--store S.zarr] [--n 200]

With ``--store`` the maps of an existing store (e.g. ``outputs/demo/maps/train.zarr``) are used at their own
geometry; otherwise smooth random grids (Gaussian blobs) are generated for both geometries.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from numcodecs import Zstd

from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.masks.binarize import create_binarizer
from chexseg_dist.masks.maker import MaskMaker


def _blob_grids(rng: np.random.Generator, n: int, g: int) -> np.ndarray:
    yy, xx = np.mgrid[0:g, 0:g] / (g - 1)
    cy, cx = rng.random((2, n, 10, 1, 1))
    s = 0.1 + 0.3 * rng.random((n, 10, 1, 1))
    return (np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2)) * (1 + rng.random((n, 10, 1, 1)))).astype(
        np.float32
    )


def measure(grids: np.ndarray, boxes: list[Letterbox]) -> dict[str, float]:
    size = boxes[0].size
    out: dict[str, float] = {"frame": size, "grid": grids.shape[-1], "images": len(grids)}
    masks = []
    for name, maker in (
        ("otsu", MaskMaker(create_binarizer("otsu"))),
        ("tuned", MaskMaker(create_binarizer("tuned", np.full(10, 0.5)))),
    ):
        t0 = time.perf_counter()
        for g, box in zip(grids, boxes):
            m = maker.masks(g, box, frame="model")
            if name == "otsu":
                masks.append(m)
        out[f"on_the_fly_{name}_ms_per_image"] = 1000 * (time.perf_counter() - t0) / len(grids)
    packed = np.packbits(np.stack(masks), axis=-1)  # [n, 10, S, S/8]
    chunk = packed[: min(256, len(packed))]
    out["materialised_bytes_per_image"] = len(Zstd(level=3).encode(chunk.tobytes())) / len(chunk)
    out["grid_float16_bytes_per_image_uncompressed"] = 10 * grids.shape[-1] * grids.shape[-2] * 2 + 40
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="an existing map store to take grids and letterboxes from")
    ap.add_argument("--n", type=int, default=200, help="images to measure")
    args = ap.parse_args()
    results = []
    if args.store:
        from chexseg_dist.store.mapstore import MapStore

        batch = MapStore.open(args.store).read(slice(0, args.n))
        done = [(i, box) for i, box in enumerate(batch.letterboxes) if box is not None]  # failed rows have none
        results.append(measure(batch.cams[[i for i, _ in done]], [box for _, box in done]))
    else:
        rng = np.random.default_rng(0)
        for size, g in ((128, 8), (320, 10)):
            hw = rng.integers(200, 400, (args.n, 2))
            boxes = [Letterbox(int(h), int(w), size) for h, w in hw]
            results.append(measure(_blob_grids(rng, args.n, g), boxes))
    for r in results:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
