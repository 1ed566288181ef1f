"""Image-level labels for classifier training: uncertainty and blank policies.

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
count. Policies are data, chosen by name from the config through the registries
:data:`~chexseg_dist.core.registry.UNCERTAIN_POLICIES` and :data:`~chexseg_dist.core.registry.BLANK_POLICIES`.

Nothing here imports torch or Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from chexseg_dist.core.pathologies import OBSERVATIONS
from chexseg_dist.core.registry import BLANK_POLICIES, UNCERTAIN_POLICIES
from chexseg_dist.errors import ManifestError


def label_column(rows: Any, name: str) -> np.ndarray:
    """One label column of a manifest as float64 ``[N]`` with blanks as NaN.

    Args:
        rows: a ``pyarrow.Table``, a ``pandas.DataFrame`` or a mapping of column name -> sequence/array
            (e.g. a Ray Data numpy batch); blank cells may be ``None``/``null`` or NaN.
        name: the column (a CheXpert observation name).

    Raises:
        ManifestError: the column is missing (naming it and the columns present).
    """
    columns = _column_names(rows)
    if name not in columns:
        raise ManifestError(f"manifest has no label column {name!r}; columns are {sorted(columns)}")
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
        ConfigError: an unknown policy.
        ManifestError: a missing observation column, or a cell that is not 1, 0, -1 or blank (naming the column and
            the row, by the ``row`` column when present).
    """
    u_target, u_mask = UNCERTAIN_POLICIES.get(uncertain_policy, "train_classifier.uncertain_policy")
    b_target, b_mask = BLANK_POLICIES.get(blank_policy, "train_classifier.blank_policy")
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
        raise ManifestError(
            f"manifest label {observations[k]!r} at {where} is {float(values[i, k])!r}; CheXpert labels must be "
            "1.0, 0.0, -1.0 (uncertain) or blank"
        )
    targets = positive + uncertain * u_target + blank * b_target
    mask = (positive | negative) + uncertain * u_mask + blank * b_mask
    return targets.astype(np.float32), mask.astype(np.float32)
