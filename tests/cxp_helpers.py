"""A tiny CheXpert-format dataset for training tests: noise images with a bright disk where Cardiomegaly is positive."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from chexseg_dist.core.pathologies import CSV_HEADER, OBSERVATIONS

CARDIO = OBSERVATIONS.index("Cardiomegaly")


def write_split(root: Path, split: str, n: int, seed: int, corrupt: int = 0, laterals: int = 0) -> Path:
    """A small CheXpert-format split: noise images, a bright disk where Cardiomegaly is positive; returns the CSV.

    The first ``corrupt`` frontal files are not images; ``laterals`` extra lateral views are added.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n + laterals):
        lateral = i >= n
        view = "view2_lateral" if lateral else "view1_frontal"
        rel = f"{split}/patient{seed * 1000 + i:05d}/study1/{view}.png"
        labels = list(rng.choice(["1.0", "0.0", "-1.0", ""], size=len(OBSERVATIONS), p=[0.3, 0.4, 0.1, 0.2]))
        labels[CARDIO] = "1.0" if i % 2 else "0.0"
        img = rng.normal(90, 20, (40, 48))
        if labels[CARDIO] == "1.0":
            yy, xx = np.mgrid[:40, :48]
            img[(yy - 20) ** 2 + (xx - 24) ** 2 < 100] += 100
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if i < corrupt:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        rows.append([f"CheXpert-v1.0-small/{rel}", "F", "50", "Lateral" if lateral else "Frontal", "AP", *labels])
    csv_path = root / f"{split}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)
    return csv_path


def make_manifest(csv_path: Path) -> str:
    from chexseg_dist.data import manifest_from_csv, write_manifest

    out = str(csv_path.with_suffix(".parquet"))
    write_manifest(manifest_from_csv(str(csv_path)), out)
    return out


def tiny_cxp(root: Path) -> dict[str, str]:
    """Train (40 frontal, the first 2 not images, plus 3 laterals) and valid (16) manifests under ``root``."""
    return {
        "train": make_manifest(write_split(root, "train", 40, 1, corrupt=2, laterals=3)),
        "valid": make_manifest(write_split(root, "valid", 16, 2)),
    }
