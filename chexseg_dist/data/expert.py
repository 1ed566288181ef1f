"""The expert set: radiographs with expert masks, split into expert-train and expert-select.

An expert set is a manifest plus a CheXlocalize segmentation JSON (or polygon JSON) of the same images: every image
of the manifest (after the view rule) must list all 10 pathologies (empty masks for negatives), at the image's own
size. On the phantom data it is the valid split; the test split is only ever used for reported numbers.

The set is split by patient, seeded, into expert-train (the student's expert samples) and expert-select (model
selection and output thresholds): ``round(select_fraction * patients)`` patients go to select (the paper: 40 of 187
images). Rows carry their masks as one JSON string of RLEs, decoded in the Ray Data stage :func:`expert_targets`
after :func:`~chexseg_dist.data.frames.decode_frames`, where every mask goes to the student's frame through the one
:class:`~chexseg_dist.core.geometry.Letterbox`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_TASKS, TASKS
from chexseg_dist.data.chexlocalize import (
    IMG_SIZE_KEY,
    decode_mask,
    polygons_to_segmentations,
    read_polygons,
    read_segmentations,
)
from chexseg_dist.data.manifest import read_manifest, select_views
from chexseg_dist.errors import AnnotationError, InputError

RLE = dict[str, Any]


@dataclass
class ExpertSet:
    """An expert set split for training.

    Attributes:
        train, select: manifest rows (``row``, ``image_id``, ``path``, ``patient_id`` and the labels) of expert-train
            and expert-select, with a ``masks_json`` column (the image's 10 RLEs as JSON).
        source: the annotation file.
    """

    train: pa.Table
    select: pa.Table
    source: str

    @property
    def patients(self) -> set[str]:
        return set(self.train.column("patient_id").to_pylist()) | set(self.select.column("patient_id").to_pylist())


def read_annotations(path: str) -> dict[str, dict[str, RLE]]:
    """CheXlocalize segmentation JSON, or polygon JSON (entries with ``img_size``) turned into segmentations."""
    from chexseg_dist.core import fsio

    try:
        data = json.loads(fsio.read_input(path, "expert annotation file"))
    except ValueError:
        data = None  # read_segmentations names the file and the problem
    first = next(iter(data.values()), None) if isinstance(data, dict) else None
    if isinstance(first, dict) and IMG_SIZE_KEY in first:  # polygon JSON: every entry carries its image size
        return polygons_to_segmentations(read_polygons(path))
    return read_segmentations(path)


def load_expert_set(
    manifest: str,
    annotations: str,
    select_fraction: float,
    seed: int,
    frontal_only: bool = True,
    limit_train: int | None = None,
) -> ExpertSet:
    """Read an expert set and split it, patient-disjoint, into expert-train and expert-select.

    Args:
        manifest: the expert images' Parquet manifest.
        annotations: their expert masks (CheXlocalize segmentation or polygon JSON).
        select_fraction: share of the patients held out for selection.
        seed: the split's seed.
        frontal_only: the view rule (as every stage applies it).
        limit_train: keep only the first ``limit_train`` expert-train images (in the split's seeded order; the same
            selection split): the expert-size curve.

    Raises:
        AnnotationError: an image of the manifest missing from the annotations, or missing a pathology (naming the
            file and the id).
        InputError: no image left, or a split that leaves expert-train empty.
    """
    table = select_views(read_manifest(manifest), frontal_only).table
    masks = read_annotations(annotations)
    ids = table.column("image_id").to_pylist()
    missing = [i for i in ids if i not in masks]
    if missing:
        raise AnnotationError(
            f"{annotations}: no expert masks for {len(missing)} image(s) of {manifest}, e.g. {missing[:5]}; the expert "
            "set needs all 10 pathologies of every image (empty masks for negatives)"
        )
    for image_id in ids:
        lacking = [t for t in TASKS if t not in masks[image_id]]
        if lacking:
            raise AnnotationError(
                f"{annotations}, image {image_id!r}: missing pathology(ies) {lacking}; list all 10 (empty masks "
                "for negatives)"
            )
    if not ids:
        raise InputError(f"{manifest}: no expert images (after the view rule)")
    table = table.append_column(
        "masks_json", pa.array([json.dumps({t: masks[i][t] for t in TASKS}) for i in ids], pa.string())
    )
    patients = sorted(set(table.column("patient_id").to_pylist()))
    order = np.random.default_rng(seed).permutation(len(patients))
    n_select = round(select_fraction * len(patients))
    if select_fraction > 0 and len(patients) > 1:
        n_select = min(max(n_select, 1), len(patients) - 1)
    selected = {patients[i] for i in order[:n_select]}
    is_select = np.asarray([p in selected for p in table.column("patient_id").to_pylist()])
    rank = {p: r for r, p in enumerate(patients[i] for i in order)}
    train = table.filter(pa.array(~is_select))
    train = train.take(pa.array(np.argsort([rank[p] for p in train.column("patient_id").to_pylist()], kind="stable")))
    if limit_train is not None:
        train = train.slice(0, limit_train)
    if train.num_rows == 0:
        raise InputError(
            f"{manifest}: select_fraction={select_fraction} leaves no expert-train image ({len(patients)} patients)"
        )
    return ExpertSet(train=train, select=table.filter(pa.array(is_select)), source=annotations)


def check_mask_sizes(table: pa.Table, source: str) -> None:
    """Refuse expert masks whose size is not their image's (image headers only, no pixel decoded).

    Raises:
        AnnotationError: naming the file, the image and both sizes.
    """
    from PIL import Image

    from chexseg_dist.core import fsio

    for image_id, path, masks_json in zip(
        table.column("image_id").to_pylist(), table.column("path").to_pylist(), table.column("masks_json").to_pylist()
    ):
        with fsio.open_file(path, "rb") as f, Image.open(f) as img:
            width, height = img.size
        size = json.loads(masks_json)[TASKS[0]]["size"]
        if [int(size[0]), int(size[1])] != [height, width]:
            raise AnnotationError(
                f"{source}, image {image_id!r}: masks are {size[0]}x{size[1]} but the radiograph {path} is "
                f"{height}x{width}; expert masks must be at the image's original size"
            )


def expert_targets(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data stage after :func:`~chexseg_dist.data.frames.decode_frames`: the masks in the frame of each image.

    Args:
        batch: ``frame`` [n, S, S], ``letterbox`` [n, 7] and ``masks_json`` [n] (plus ``image_id``).

    Returns:
        ``image_id``, ``frame`` [n, S, S] uint8 and ``masks`` [n, 10, S, S] uint8 in {0, 1} (TASKS order).
    """
    frames = np.asarray(batch["frame"], dtype=np.uint8)
    n, size = frames.shape[0], frames.shape[-1]
    out = np.zeros((n, N_TASKS, size, size), dtype=np.uint8)
    for i in range(n):
        params = [int(v) for v in batch["letterbox"][i]]
        box = Letterbox(params[0], params[1], params[2])
        out[i] = box.mask_to_frame(decode_rles(json.loads(str(batch["masks_json"][i])), str(batch["image_id"][i])))
    return {"image_id": np.asarray(batch["image_id"], dtype=str), "frame": frames, "masks": out}


def decode_rles(entry: Mapping[str, RLE], image_id: str) -> np.ndarray:
    """``[10, h, w]`` bool masks of one image from its ``{pathology: rle}``."""
    return np.stack([decode_mask(entry[t], image_id=image_id, pathology=t) for t in TASKS])
