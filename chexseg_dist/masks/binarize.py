"""Binarisation strategies (normalised maps -> masks), chosen by name through the registry; Otsu and holes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from scipy import ndimage

from chexseg_dist.core.pathologies import N_TASKS
from chexseg_dist.core.registry import BINARIZERS
from chexseg_dist.errors import ConfigError
from chexseg_dist.masks.maps import OTSU_LEVELS, quantise_maps

#: 4-connected background per 2-D slice of a ``[P, h, w]`` stack (no connectivity across pathologies): the
#: structure scipy.ndimage.binary_fill_holes uses in 2-D.
_FILL_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)


_FILL_STRUCTURE[1] = ndimage.generate_binary_structure(2, 1)


# ---------------------------------------------------------------------------------------------------- Otsu
def otsu_levels(hist: np.ndarray) -> np.ndarray:
    """Otsu's threshold level per histogram, exactly as ``skimage.filters.threshold_otsu`` computes it.

    Args:
        hist: ``[P, L]`` integer counts of levels ``0..L-1``.

    Returns:
        ``[P]`` int64 levels; foreground is ``q > level``. A histogram with one occupied level returns that level
        (empty foreground), as skimage does for a constant image.
    """
    counts = np.asarray(hist, dtype=np.int64)
    n_levels = counts.shape[-1]
    centers = np.arange(n_levels, dtype=np.int64)
    # skimage works on the occupied range [min, max]; the extra empty bins below and above add exact zeros to
    # every cumulative sum, so the values (hence the argmax) are bit-identical once the empty ends are masked.
    weight1 = np.cumsum(counts, axis=-1)
    weight2 = np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean1 = np.cumsum(counts * centers, axis=-1) / weight1
        mean2 = (np.cumsum((counts * centers)[..., ::-1], axis=-1) / weight2[..., ::-1])[..., ::-1]
        variance12 = weight1[..., :-1] * weight2[..., 1:] * (mean1[..., :-1] - mean2[..., 1:]) ** 2
    occupied = counts > 0
    first = np.argmax(occupied, axis=-1)
    last = n_levels - 1 - np.argmax(occupied[..., ::-1], axis=-1)
    idx = np.arange(n_levels - 1)
    valid = (idx >= first[..., None]) & (idx < last[..., None])
    variance12 = np.where(valid, variance12, -np.inf)
    level = np.argmax(variance12, axis=-1)
    return np.where(first == last, first, level).astype(np.int64)


def fill_holes(masks: np.ndarray) -> np.ndarray:
    """Fill the holes of each 2-D mask of a stack: the result of ``scipy.ndimage.binary_fill_holes`` per slice.

    A hole is a background region not 4-connected to the border of its slice. Labelling the background once and
    filling only the (few, small) holes is several times faster than ``binary_fill_holes``' iterated dilation at
    radiograph sizes; ``tests/test_masks.py`` checks the two agree.

    Args:
        masks: ``[P, h, w]`` bool.

    Returns:
        ``[P, h, w]`` bool (a new array).
    """
    out = np.array(masks, dtype=bool)
    if out.size == 0:
        return out
    labels, n = ndimage.label(~out, structure=_FILL_STRUCTURE)
    if n == 0:
        return out
    border = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[edge] = True
    holes = np.flatnonzero(~border[1:]) + 1
    if holes.size:
        objects = ndimage.find_objects(labels)
        for lab in holes:
            sl = objects[lab - 1]
            if sl is not None:
                out[sl] |= labels[sl] == lab
    return out


# ---------------------------------------------------------------------------------------------------- strategies
class Binarizer(ABC):
    """A binarisation strategy: normalised maps -> masks (registered by name in ``core.registry.BINARIZERS``)."""

    name: ClassVar[str]

    @abstractmethod
    def binarise(self, norm: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        """Binarise normalised maps.

        Args:
            norm: ``[P, h, w]`` float32 in ``[0, 1]`` (constant maps all zero), cropped to the content window.
            tasks: ``[P]`` int indices into TASKS of each map (for per-pathology parameters).

        Returns:
            ``[P, h, w]`` bool masks (empty for constant maps).
        """


class OtsuBinarizer(Binarizer):
    """Otsu's threshold on the 0..255-quantised normalised map, holes filled (the benchmark's default)."""

    name = "otsu"

    def __init__(self, fill: bool = True) -> None:
        self.fill = fill

    def binarise(self, norm: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        q = quantise_maps(norm)
        p = q.shape[0]
        hist = np.stack([np.bincount(q[i].ravel(), minlength=OTSU_LEVELS) for i in range(p)]) if p else None
        if hist is None:
            return np.zeros(q.shape, dtype=bool)
        levels = otsu_levels(hist)
        masks = q > levels.astype(np.uint8)[:, None, None]
        return fill_holes(masks) if self.fill else masks


class ThresholdBinarizer(Binarizer):
    """``map > t`` with a tuned per-pathology threshold ``t`` in ``[0, 1]`` (exact float64 comparison)."""

    name = "tuned"

    def __init__(self, thresholds: Sequence[float] | np.ndarray) -> None:
        t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if t.shape != (N_TASKS,):
            raise ValueError(f"tuned strategy: expected {N_TASKS} thresholds (one per pathology), got {t.shape[0]}")
        if not np.all((t >= 0) & (t <= 1)):
            raise ValueError(f"tuned strategy: thresholds must be in [0, 1], got {t.tolist()}")
        self.thresholds = t

    def binarise(self, norm: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        out = np.empty(norm.shape, dtype=bool)
        for i, k in enumerate(np.asarray(tasks, dtype=np.int64)):
            # float32 vs float64 scalar: numpy compares in float64, i.e. exactly (see tuning's one-pass binning).
            np.greater(norm[i], np.float64(self.thresholds[k]), out=out[i])
        return out


def create_binarizer(name: str, thresholds: Sequence[float] | np.ndarray | None = None) -> Binarizer:
    """Build a binarisation strategy by name from :data:`~chexseg_dist.core.registry.BINARIZERS`.

    Raises:
        ConfigError: an unknown name, or ``tuned`` without the 10 thresholds.
    """
    cls = BINARIZERS.get(name, "masks.strategy")
    if cls is ThresholdBinarizer:
        if thresholds is None:
            raise ConfigError(
                "mask strategy 'tuned' needs thresholds: pass --thresholds T.json (chexseg tune-thresholds)"
            )
        return ThresholdBinarizer(thresholds)
    binarizer: Binarizer = cls()
    return binarizer
