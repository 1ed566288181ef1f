"""Gates: which pathologies keep a mask (probability cutoffs, image-level labels), and labels from manifests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from chexseg_dist.core.pathologies import N_TASKS, OBSERVATIONS, TASK_OBSERVATION_INDEX, TASKS, observation_for_task
from chexseg_dist.errors import InputError


# ---------------------------------------------------------------------------------------------------- gating
def task_values(obs_values: np.ndarray) -> np.ndarray:
    """Columns of the 10 TASKS from ``[..., 14]`` values in OBSERVATIONS order (probabilities or labels)."""
    arr = np.asarray(obs_values)
    if arr.shape[-1] != len(OBSERVATIONS):
        raise ValueError(f"expected [..., 14] values in OBSERVATIONS order, got shape {arr.shape}")
    return arr[..., list(TASK_OBSERVATION_INDEX)]


def task_labels(manifest_rows: Any) -> np.ndarray:
    """Image-level labels of the 10 TASKS from manifest rows: ``[N, 10]`` float64 (1, 0, -1, NaN for blank).

    Each task's label is the manifest column of :func:`observation_for_task` (``Lung Opacity`` for
    ``Airspace Opacity``).
    """
    from chexseg_dist.data.labels import label_column

    return np.stack([label_column(manifest_rows, observation_for_task(t)) for t in TASKS], axis=1)


def gate(
    task_probs: np.ndarray | None = None,
    cutoffs: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    label_gating: bool = False,
) -> np.ndarray:
    """Which masks survive the gates (True = keep).

    Args:
        task_probs: ``[..., 10]`` probabilities (TASKS order); needed when ``cutoffs`` is given.
        cutoffs: ``[10]`` probability cutoffs; a mask is kept when ``prob >= cutoff`` (NaN probabilities: gated).
        labels: ``[..., 10]`` image-level labels; needed when ``label_gating``.
        label_gating: keep a mask only where its label is positive (``1.0``).

    Returns:
        ``[..., 10]`` bool.
    """
    shape: tuple[int, ...] = (N_TASKS,)
    if task_probs is not None:
        shape = np.shape(task_probs)
    elif labels is not None:
        shape = np.shape(labels)
    keep = np.ones(shape, dtype=bool)
    if cutoffs is not None:
        if task_probs is None:
            raise ValueError("probability cutoffs need the classifier probabilities")
        with np.errstate(invalid="ignore"):
            keep &= np.asarray(task_probs, dtype=np.float64) >= np.asarray(cutoffs, dtype=np.float64)
    if label_gating:
        if labels is None:
            raise InputError("label gating needs the image-level labels: pass --manifest with the label columns")
        keep &= np.asarray(labels, dtype=np.float64) == 1.0
    return keep


def manifest_labels(manifest: str, image_ids: Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
    """Image-level labels ``[N, 14]`` (OBSERVATIONS order, NaN = blank) of the given images from a manifest.

    Args:
        manifest: Parquet manifest (``chexseg manifest``).
        image_ids: the images, matched by ``image_id``.
        rows: their manifest rows, if known (the map store records them): used and checked against the ids.

    Raises:
        InputError: naming the manifest and up to five ids it lacks.
    """
    from chexseg_dist.data.labels import label_column
    from chexseg_dist.data.manifest import read_manifest

    table = read_manifest(manifest, columns=["row", "image_id", *OBSERVATIONS])
    ids = [str(v) for v in table.column("image_id").to_pylist()]
    index = {v: i for i, v in enumerate(ids)}
    missing = [i for i in image_ids if str(i) not in index]
    if missing:
        raise InputError(
            f"{manifest}: {len(missing)} image(s) of the map store are not in the manifest, e.g. {missing[:5]}; "
            "pass the manifest the store was built from"
        )
    order = np.asarray([index[str(i)] for i in image_ids], dtype=np.int64)
    values = np.stack([label_column(table, name) for name in OBSERVATIONS], axis=1)
    return values[order]
