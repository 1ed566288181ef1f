"""Image-level labels for classifier training: uncertainty and blank policies, and a rank-based AUROC.

CheXpert label cells are ``1.0`` (positive), ``0.0`` (negative), ``-1.0`` (uncertain) or blank (not mentioned;
``null``/``NaN`` in a manifest). The classifier is trained with a *masked* binary cross-entropy, so every policy is
a pair ``(target, loss_mask)`` per cell:

========================  =======  =========
cell                      target   loss_mask
========================  =======  =========
1.0                       1        1
0.0                       0        1
-1.0, uncertain=ones      1        1         (U-Ones)
-1.0, uncertain=zeros     0        1         (U-Zeros)
-1.0, uncertain=ignore    0        0         (U-Ignore: out of the loss)
blank, blank=negative     0        1
blank, blank=ignore       0        0
========================  =======  =========

Masked-out cells carry target 0 so that every target is a valid BCE target; the mask alone decides whether they
count. Policies are data (:data:`UNCERTAIN_POLICIES`, :data:`BLANK_POLICIES`), chosen by name from the config.

Nothing here imports torch or Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from chexseg_dist.pathologies import OBSERVATIONS, TASK_OBSERVATION_INDEX, TASKS

#: uncertain (-1) policy name -> (target, loss_mask)
UNCERTAIN_POLICIES: dict[str, tuple[float, float]] = {"ones": (1.0, 1.0), "zeros": (0.0, 1.0), "ignore": (0.0, 0.0)}
#: blank (not mentioned) policy name -> (target, loss_mask)
BLANK_POLICIES: dict[str, tuple[float, float]] = {"negative": (0.0, 1.0), "ignore": (0.0, 0.0)}


def _policy(table: dict[str, tuple[float, float]], kind: str, name: str) -> tuple[float, float]:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} label policy {name!r}; choose one of {sorted(table)}") from None


def label_column(rows: Any, name: str) -> np.ndarray:
    """One label column of a manifest as float64 ``[N]`` with blanks as NaN.

    Args:
        rows: a ``pyarrow.Table``, a ``pandas.DataFrame`` or a mapping of column name -> sequence/array
            (e.g. a Ray Data numpy batch); blank cells may be ``None``/``null`` or NaN.
        name: the column (a CheXpert observation name).

    Raises:
        KeyError: the column is missing (naming it and the columns present).
    """
    columns = _column_names(rows)
    if name not in columns:
        raise KeyError(f"manifest has no label column {name!r}; columns are {sorted(columns)}")
    col = rows[name]
    if hasattr(col, "to_numpy") and hasattr(col, "null_count"):  # pyarrow (Chunked)Array
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    if hasattr(col, "to_numpy"):  # pandas Series
        return np.asarray(col.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
    arr = np.asarray(col)
    if arr.dtype == object:
        arr = np.array([np.nan if v is None else v for v in arr.tolist()], dtype=np.float64)
    return arr.astype(np.float64, copy=False)


def _column_names(rows: Any) -> list[str]:
    if hasattr(rows, "column_names"):  # pyarrow.Table
        return list(rows.column_names)
    if hasattr(rows, "columns"):  # pandas.DataFrame
        return [str(c) for c in rows.columns]
    if isinstance(rows, Mapping):
        return [str(k) for k in rows]
    raise TypeError(f"manifest rows must be a pyarrow Table, pandas DataFrame or mapping, got {type(rows).__name__}")


def labels_and_mask(
    manifest_rows: Any,
    uncertain_policy: str = "ones",
    blank_policy: str = "negative",
    observations: Sequence[str] = OBSERVATIONS,
) -> tuple[np.ndarray, np.ndarray]:
    """Training targets and loss mask for manifest rows under the given policies (see the module table).

    Args:
        manifest_rows: ``N`` manifest rows with one float column per observation (values 1.0, 0.0, -1.0 or
            blank), as a pyarrow Table, pandas DataFrame or mapping of columns (a Ray Data numpy batch).
        uncertain_policy: ``ones`` (U-Ones), ``zeros`` (U-Zeros) or ``ignore`` (U-Ignore) for -1.0 cells.
        blank_policy: ``negative`` or ``ignore`` for blank cells.
        observations: the label columns, in output order (CheXpert's 14 by default).

    Returns:
        ``(targets, loss_mask)``, both float32 ``[N, len(observations)]`` with values in {0, 1}; masked-out cells
        have target 0.

    Raises:
        ValueError: an unknown policy, or a cell that is not 1, 0, -1 or blank (naming the column and the row,
            by the ``row`` column when present).
        KeyError: a missing observation column.
    """
    u_target, u_mask = _policy(UNCERTAIN_POLICIES, "uncertain", uncertain_policy)
    b_target, b_mask = _policy(BLANK_POLICIES, "blank", blank_policy)
    cols = [label_column(manifest_rows, name) for name in observations]
    n = len(cols[0]) if cols else 0
    values = np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.float64)
    blank = np.isnan(values)
    positive, negative, uncertain = values == 1.0, values == 0.0, values == -1.0
    bad = ~(blank | positive | negative | uncertain)
    if bad.any():
        i, k = (int(v) for v in np.argwhere(bad)[0])
        where = f"row {i}"
        if "row" in _column_names(manifest_rows):
            where = f"row {label_column(manifest_rows, 'row')[i]:.0f}"
        raise ValueError(
            f"manifest label {observations[k]!r} at {where} is {float(values[i, k])!r}; CheXpert labels must be "
            "1.0, 0.0, -1.0 (uncertain) or blank"
        )
    targets = positive + uncertain * u_target + blank * b_target
    mask = (positive | negative) + uncertain * u_mask + blank * b_mask
    return targets.astype(np.float32), mask.astype(np.float32)


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
        per_observation: the 14 observations' AUROCs in :data:`~chexseg_dist.pathologies.OBSERVATIONS` order.
    """
    values = np.array(list(task_aurocs(per_observation).values()), dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
