"""Small builders shared by the mask / evaluation / tuning / overlay tests: real map stores, manifests, gt JSON."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import OBSERVATIONS
from chexseg_dist.data.manifest import manifest_schema, write_manifest
from chexseg_dist.store.mapstore import MapStore


def image_ids(n: int) -> list[str]:
    return [f"patient{64541 + i}_study1_view1_frontal" for i in range(n)]


def make_store(
    uri: str,
    cams: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    frame: int,
    probs: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    done: Sequence[bool] | None = None,
) -> MapStore:
    """A real map store with ``len(sizes)`` images: raw ``cams [n, 10, gh, gw]``, letterboxes into ``frame``."""
    n = len(sizes)
    ids = list(ids) if ids is not None else image_ids(n)
    if probs is None:
        probs = np.full((n, len(OBSERVATIONS)), 0.5, dtype=np.float32)
    store = MapStore.create(uri, ids, np.arange(n), cams.shape[-2:], images_per_chunk=4)
    ok = np.ones(n, dtype=bool) if done is None else np.asarray(done, dtype=bool)
    slots = np.flatnonzero(ok)
    boxes = [Letterbox(h, w, frame) for h, w in sizes]
    store.write_rows(
        slots,
        probs[slots],
        cams[slots],
        np.asarray([sizes[i] for i in slots]),
        np.asarray([boxes[i].params() for i in slots]),
    )
    return MapStore.open(uri)


def stored_cams(uri: str) -> np.ndarray:
    """The raw maps as the store gives them back (float16 storage rounds them)."""
    return MapStore.open(uri).read(slice(None)).cams


def make_manifest(
    path: str, ids: Sequence[str], labels: np.ndarray | None = None, image_paths: Sequence[str] | None = None
) -> None:
    """A real Parquet manifest (manifest schema) with the given labels ``[n, 14]`` (NaN = blank)."""
    n = len(ids)
    labels = np.full((n, len(OBSERVATIONS)), np.nan) if labels is None else np.asarray(labels, dtype=np.float64)
    cols: dict[str, list[object]] = {
        "row": list(range(n)),
        "image_id": list(ids),
        "path": list(image_paths) if image_paths is not None else [f"/nonexistent/{i}.jpg" for i in ids],
        "patient_id": [i.split("_")[0] for i in ids],
        "study": ["study1"] * n,
        "view": ["view1_frontal"] * n,
        "frontal": [True] * n,
        "ap_pa": ["AP"] * n,
        "sex": [None] * n,
        "age": [None] * n,
        "split": ["valid"] * n,
    }
    for k, name in enumerate(OBSERVATIONS):
        cols[name] = [None if np.isnan(v) else float(v) for v in labels[:, k]]
    table = pa.Table.from_pydict(cols, schema=manifest_schema())
    write_manifest(table, path)


def write_png(path: str, image: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8)).save(path)
    return path


def blob_mask(rng: np.random.Generator, h: int, w: int, n_blobs: int = 2) -> np.ndarray:
    """A union of random ellipses: a plausible expert mask."""
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.05, 0.25) * h, rng.uniform(0.05, 0.25) * w
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return mask


def assert_stores_identical(a: str, b: str) -> None:
    """Two map stores hold the same images with the same bits, image by image (rows aligned by ``image_id``):
    probabilities, maps, original sizes, letterboxes, done and failed flags."""
    sa, sb = MapStore.open(a), MapStore.open(b)
    assert sorted(sa.image_ids.tolist()) == sorted(sb.image_ids.tolist())
    ba = sa.read(slice(None))
    bb = sb.read(sb.index_of(ba.image_id))
    for name in ("image_id", "row", "done", "failed", "probs", "cams", "orig_size"):
        np.testing.assert_array_equal(getattr(ba, name), getattr(bb, name), err_msg=name)
    assert ba.letterboxes == bb.letterboxes
