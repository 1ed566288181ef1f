"""AUROC by ranks (ties as one half), per class under a mask, and the 10 localisation tasks picked from 14."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chexseg_dist.core.pathologies import OBSERVATIONS, TASK_OBSERVATION_INDEX, TASKS


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by ranks (the Mann-Whitney U statistic), ties counted as one half.

    Args:
        scores: ``[N]`` finite real scores (probabilities or logits: only their order matters).
        labels: ``[N]`` binary labels (0/1 or bool).

    Returns:
        The AUROC in [0, 1], or NaN when ``labels`` holds only one value (or ``N == 0``): AUROC is undefined then.

    Raises:
        ValueError: shapes differ, labels are not binary or scores are not finite.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"auroc: scores {scores.shape} and labels {labels.shape} differ in length")
    if not np.isfinite(scores).all():
        raise ValueError("auroc: scores contain NaN or infinite values")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"auroc: labels must be 0/1, got values {np.unique(labels)[:10].tolist()}")
    pos = labels.astype(bool)
    n_pos = int(pos.sum())
    n_neg = int(pos.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average ranks (1-based): tied scores share the mean of the ranks they span.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def per_class_auroc(scores: np.ndarray, targets: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """AUROC of every class over the rows where its mask is set.

    Args:
        scores: ``[N, K]`` finite scores.
        targets: ``[N, K]`` binary targets.
        mask: ``[N, K]`` (nonzero = the cell counts) or ``None`` for all cells.

    Returns:
        float64 ``[K]``; NaN for a class whose counted cells hold a single label value.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"per_class_auroc: scores {scores.shape} and targets {targets.shape} must both be [N, K]")
    keep = np.ones(scores.shape, dtype=bool) if mask is None else np.asarray(mask) != 0
    if keep.shape != scores.shape:
        raise ValueError(f"per_class_auroc: mask {keep.shape} must match scores {scores.shape}")
    return np.array([auroc(scores[keep[:, k], k], targets[keep[:, k], k]) for k in range(scores.shape[1])])


def task_aurocs(per_observation: Sequence[float] | np.ndarray) -> dict[str, float]:
    """The 10 localisation tasks' AUROCs (CheXlocalize names) picked from the 14 observations' AUROCs."""
    if len(per_observation) != len(OBSERVATIONS):
        raise ValueError(f"task_aurocs: expected {len(OBSERVATIONS)} observation AUROCs, got {len(per_observation)}")
    return {task: float(per_observation[i]) for task, i in zip(TASKS, TASK_OBSERVATION_INDEX)}


def mean_task_auroc(per_observation: Sequence[float] | np.ndarray) -> float:
    """Mean AUROC over the 10 localisation tasks (NaN tasks skipped); NaN if every task is NaN.

    Args:
        per_observation: the 14 observations' AUROCs in :data:`~chexseg_dist.core.pathologies.OBSERVATIONS` order.
    """
    values = np.array(list(task_aurocs(per_observation).values()), dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
