"""A miniature CheXseg world for the student's tests: phantom splits, manifests and a real map store of train.

The store holds random raw maps (the student only needs maps of the right shape and geometry; what the masks look
like is MaskMaker's business, tested on its own), written with the store's own API for the train manifest's rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from chexseg_dist.config import load_config
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_OBSERVATIONS, N_TASKS
from chexseg_dist.data import manifest_from_csv, write_manifest
from chexseg_dist.data.manifest import read_manifest
from chexseg_dist.store.mapstore import MapStore
from chexseg_dist.synth.writer import generate

#: A frame the tests' classifier would have used, and its map grid.
CLASSIFIER_FRAME, GRID = 128, (8, 8)
#: Student settings small enough for a 2-core machine: a few seconds per epoch.
SMALL_STUDENT = [
    "segmentation.image_size=64",
    "train_segmentation.batch_size=4",
    "train_segmentation.expert_ratio=0.5",
    "train_segmentation.steps_per_epoch=3",
    "train_segmentation.epochs=1",
    "train_segmentation.log_every_steps=0",
    "train_segmentation.torch_threads=1",
    "segment.batch_size=8",
]


def make_world(root: Path, n_train: int = 40, n_valid: int = 24, n_test: int = 8, seed: int = 3) -> dict[str, str]:
    """Synth data, the three manifests and a done map store of the train split under ``root``."""
    cfg = load_config(
        "tiny",
        overrides=[f"synth.seed={seed}", f"synth.n_train={n_train}", f"synth.n_valid={n_valid}",
                   f"synth.n_test={n_test}", "synth.size=96"],
    )  # fmt: skip
    data = root / "data"
    generate(str(data), cfg.synth)
    out = {"data": str(data)}
    for split in ("train", "valid", "test"):
        out[split] = str(root / f"{split}.parquet")
        write_manifest(manifest_from_csv(str(data / f"{split}.csv")), out[split])
    out["store"] = str(root / "train.zarr")
    write_random_store(out["store"], out["train"], seed)
    out["expert"] = str(data / "expert_segmentations_valid.json")
    out["exact"] = str(data / "gt_segmentations_valid.json")
    out["gt_test"] = str(data / "gt_segmentations_test.json")
    return out


def write_random_store(uri: str, manifest: str, seed: int, done: np.ndarray | None = None) -> MapStore:
    """A map store of every row of ``manifest`` with random raw maps and probabilities (``done`` rows written)."""
    table = read_manifest(manifest)
    ids = table.column("image_id").to_pylist()
    rows = np.asarray(table.column("row"), dtype=np.int64)
    store = MapStore.create(uri, ids, rows, GRID, images_per_chunk=8)
    sizes = []
    for path in table.column("path").to_pylist():
        with Image.open(path) as img:
            sizes.append((img.size[1], img.size[0]))
    n = len(ids)
    ok = np.ones(n, dtype=bool) if done is None else np.asarray(done, dtype=bool)
    slots = np.flatnonzero(ok)
    rng = np.random.default_rng(seed)
    store.write_rows(
        slots,
        rng.uniform(size=(len(slots), N_OBSERVATIONS)).astype(np.float32),
        rng.uniform(size=(len(slots), N_TASKS, *GRID)).astype(np.float32),
        np.asarray([sizes[i] for i in slots]),
        np.asarray([Letterbox(*sizes[i], CLASSIFIER_FRAME).params() for i in slots]),
    )
    return MapStore.open(uri)
