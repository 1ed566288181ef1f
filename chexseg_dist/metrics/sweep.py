"""One threshold sweep: the areas of a mask made at every threshold ``t = k / K`` at once, per (image, pathology).

Choosing a threshold per pathology needs, for each candidate ``t``, ``|pred_t ∩ gt|`` and ``|pred_t|`` of every pair;
thresholding ``K + 1`` times would cost ``K + 1`` passes. A pixel of value ``v`` is predicted at ``t`` when
``v > t``, i.e. for every ``k < ceil(K * v)``: one histogram of ``ceil(K * v)`` inside and outside the mask and its
suffix sums give every threshold's areas in one pass (the tuned binariser's rule, computed in float64).

:class:`ThresholdSweep` has the shape of detectron2's evaluators (and of
:class:`~chexseg_dist.metrics.segmentation.SegmentationEvaluator`): ``reset`` / ``process`` / ``evaluate``, with
``state`` / ``merge`` to sum workers' statistics instead of gathering their predictions. It serves both threshold
choices of the pipeline: the map thresholds of ``chexseg tune-thresholds`` (whose counts are made at original
resolution per image and added with :meth:`ThresholdSweep.process_counts`) and the student's output thresholds on
expert-select, chosen every epoch inside the training loop (:meth:`ThresholdSweep.process` on its sigmoid outputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from chexseg_dist.core.pathologies import N_TASKS


def threshold_grid(steps: int) -> np.ndarray:
    """``[steps + 1]`` float64 thresholds ``k / steps`` (correctly rounded, as a JSON round trip keeps them)."""
    return np.array([k / steps for k in range(steps + 1)], dtype=np.float64)


@dataclass
class SweepCounts:
    """What a sweep accumulated, rows sorted by image id.

    Attributes:
        image_ids: ``N`` ids.
        gt_area: ``[N, C]`` mask areas.
        inter, pred: ``[N, C, K + 1]`` ``|pred_t ∩ gt|`` and ``|pred_t|`` at ``t = grid[k]``.
        grid: ``[K + 1]`` thresholds.
    """

    image_ids: list[str]
    gt_area: np.ndarray
    inter: np.ndarray
    pred: np.ndarray
    grid: np.ndarray


class ThresholdSweep:
    """Summable per-(image, pathology, threshold) areas (see the module docstring).

    Args:
        steps: ``K``: thresholds ``k / K`` for ``k = 0..K``.
        n_classes: channels per image (the 10 localised pathologies).
    """

    def __init__(self, steps: int, n_classes: int = N_TASKS) -> None:
        if steps < 1:
            raise ValueError(f"ThresholdSweep: steps must be >= 1, got {steps}")
        self.steps, self.n_classes = int(steps), int(n_classes)
        self.reset()

    @property
    def grid(self) -> np.ndarray:
        return threshold_grid(self.steps)

    def reset(self) -> None:
        """Forget everything processed so far."""
        self._rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def process(
        self, image_ids: Sequence[str], scores: np.ndarray, masks: np.ndarray, valid: np.ndarray | None = None
    ) -> None:
        """Add a batch of dense score maps and their masks.

        Args:
            image_ids: ``n`` ids, none seen before.
            scores: ``[n, C, H, W]`` values in ``[0, 1]`` (e.g. sigmoid outputs); a pixel is predicted at ``t`` when
                its value is above ``t``.
            masks: ``[n, C, H, W]`` reference masks in the same frame (nonzero = foreground).
            valid: ``[n, H, W]`` bool: pixels outside it (a letterbox's padding) are never predicted; None = all.
        """
        steps, nb = self.steps, self.steps + 2
        c = scores.shape[1]
        for i, image_id in enumerate(image_ids):
            g = masks[i] != 0
            bins = np.ceil(scores[i].astype(np.float64) * steps).astype(np.int64).clip(0, steps)
            if valid is not None:
                bins = np.where(valid[i][None], bins, 0)
            key = (np.arange(c)[:, None, None] * 2 + g) * nb + bins
            hist = np.bincount(key.ravel(), minlength=c * 2 * nb).reshape(c, 2, nb)
            above = np.cumsum(hist[:, :, ::-1], axis=2)[:, :, ::-1]  # above[c, g, b]: pixels with bin >= b
            self._add(str(image_id), g.sum(axis=(1, 2)), above[:, 1, 1:], above[:, 0, 1:] + above[:, 1, 1:])

    def process_counts(
        self, image_ids: Sequence[str], gt_area: np.ndarray, inter: np.ndarray, pred: np.ndarray
    ) -> None:
        """Add counts made elsewhere: ``gt_area [n, C]``, ``inter`` and ``pred [n, C, K + 1]`` (e.g. the map
        thresholds' counts at each image's original resolution, :func:`chexseg_dist.masks.tuning.threshold_counts`)."""
        for i, image_id in enumerate(image_ids):
            self._add(str(image_id), gt_area[i], inter[i], pred[i])

    def _add(self, image_id: str, gt_area: np.ndarray, inter: np.ndarray, pred: np.ndarray) -> None:
        if image_id in self._rows:
            raise ValueError(f"ThresholdSweep: image {image_id!r} was processed twice")
        shape = (self.n_classes, self.steps + 1)
        if np.shape(inter) != shape or np.shape(pred) != shape:
            raise ValueError(f"ThresholdSweep: counts of {image_id!r} are {np.shape(inter)}, expected {shape}")
        self._rows[image_id] = (
            np.asarray(gt_area, dtype=np.int64),
            np.asarray(inter, dtype=np.int64),
            np.asarray(pred, dtype=np.int64),
        )

    def state(self) -> dict[str, np.ndarray]:
        """The statistics as arrays (to send to another worker and :meth:`merge` there)."""
        counts = self.evaluate()
        return {
            "image_ids": np.asarray(counts.image_ids, dtype=str),
            "gt_area": counts.gt_area,
            "inter": counts.inter,
            "pred": counts.pred,
        }

    def merge(self, state: Mapping[str, np.ndarray]) -> None:
        """Add another sweep's :meth:`state` (images must not overlap)."""
        self.process_counts([str(i) for i in state["image_ids"]], state["gt_area"], state["inter"], state["pred"])

    def evaluate(self) -> SweepCounts:
        """Everything processed, rows sorted by image id."""
        ids = sorted(self._rows)
        k = self.steps + 1
        if not ids:
            empty = np.zeros((0, self.n_classes, k), dtype=np.int64)
            return SweepCounts([], np.zeros((0, self.n_classes), dtype=np.int64), empty, empty.copy(), self.grid)
        rows = [self._rows[i] for i in ids]
        return SweepCounts(
            image_ids=ids,
            gt_area=np.stack([r[0] for r in rows]),
            inter=np.stack([r[1] for r in rows]),
            pred=np.stack([r[2] for r in rows]),
            grid=self.grid,
        )
