"""What a pseudo-labelling run works on: the selected images (slot order), and the fingerprints of its inputs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from chexseg_dist.data.manifest import ViewSelection, select_views
from chexseg_dist.errors import InputError, ManifestError


def select_images(manifest: pa.Table, frontal_only: bool, source: str = "manifest") -> tuple[pa.Table, ViewSelection]:
    """The images to pseudo-label, in slot order: ``(row, image_id, path)`` sorted by manifest row.

    Args:
        manifest: a manifest table (columns ``row``, ``image_id``, ``path``, ``frontal``).
        frontal_only: keep frontal views only, under the one view rule (:func:`~chexseg_dist.data.select_views`:
            unknown views count as frontal).
        source: named in error messages.

    Returns:
        ``(images, views)``: the table, and what the view rule kept and dropped.

    Raises:
        ManifestError: missing columns, null ids or paths (naming rows), duplicate ids or rows.
        InputError: nothing left to pseudo-label.
    """
    needed = ["row", "image_id", "path", "frontal"]
    missing = [c for c in needed if c not in manifest.column_names]
    if missing:
        raise ManifestError(f"{source}: missing manifest column(s) {missing}; build it with 'chexseg manifest'")
    views = select_views(manifest.select(needed), frontal_only)
    table = views.table
    for col in ("row", "image_id", "path"):
        nulls = np.flatnonzero(np.asarray(table.column(col).is_null().to_pylist(), dtype=bool))
        if nulls.size:
            rows = table.column("row").to_pylist()
            raise ManifestError(f"{source}: column {col!r} is empty in row(s) {[rows[i] for i in nulls[:5]]}")
    table = table.select(["row", "image_id", "path"]).sort_by("row")
    if table.num_rows == 0:
        raise InputError(
            f"{source}: no images to pseudo-label"
            + (" (all rows are lateral; set pseudolabel.frontal_only=false to keep them)" if frontal_only else "")
        )
    ids = np.asarray(table.column("image_id").to_pylist(), dtype=str)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        raise ManifestError(f"{source}: duplicate image_id(s) {uniq[counts > 1][:5].tolist()}; ids must be unique")
    rows = np.asarray(table.column("row"))
    if np.unique(rows).size != rows.size:
        raise ManifestError(f"{source}: duplicate values in column 'row'")
    return table, views


def manifest_fingerprint(images: pa.Table) -> str:
    """SHA-256 over the selected ``(row, image_id, path)`` triples in slot order: what the store's slots mean."""
    digest = hashlib.sha256()
    for row, image_id, path in zip(
        images.column("row").to_pylist(), images.column("image_id").to_pylist(), images.column("path").to_pylist()
    ):
        digest.update(f"{row}\t{image_id}\t{path}\n".encode())
    return digest.hexdigest()


def checkpoint_identity(checkpoints: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Fingerprint and metadata of a checkpoint or ensemble from ``checkpoint.json`` alone (no weights loaded).

    The fingerprint equals ``load_classifier(checkpoints).fingerprint`` (which verifies it against the weights).
    """
    from chexseg_dist.models.checkpoint import ensemble_fingerprint, read_meta

    metas = [read_meta(p) for p in checkpoints]
    if len(metas) == 1:
        fingerprint = str(metas[0]["fingerprint"])
    else:
        fingerprint = ensemble_fingerprint(str(m["fingerprint"]) for m in metas)
    sizes = {int(m["image_size"]) for m in metas}
    if len(sizes) != 1:
        raise InputError(f"checkpoints {list(checkpoints)} were trained at different image sizes {sorted(sizes)}")
    info = {
        "arch": [m["arch"] for m in metas] if len(metas) > 1 else metas[0]["arch"],
        "target_layer": [m["target_layer"] for m in metas] if len(metas) > 1 else metas[0]["target_layer"],
        "image_size": sizes.pop(),
        "checkpoints": list(checkpoints),
    }
    return fingerprint, info


def probe_grid_shape(checkpoints: Sequence[str]) -> tuple[int, int]:
    """``(gh, gw)`` of the classifier's maps, from one forward pass on a blank frame (driver, CPU)."""
    import torch

    from chexseg_dist.saliency.classifier import load_classifier, predict_with_cams

    loaded = load_classifier(list(checkpoints), "cpu")
    size = loaded.image_size
    _, cams = predict_with_cams(loaded, torch.zeros(1, 1, size, size))
    return int(cams.shape[-2]), int(cams.shape[-1])
