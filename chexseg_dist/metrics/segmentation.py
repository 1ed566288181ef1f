"""CheXlocalize-convention segmentation metrics: per-pair statistics, mIoU, dataset IoU, hit rate, bootstrap CIs.

One implementation serves ``chexseg evaluate`` (RLE files) and in-loop validation (dense masks from a model), in the
shape of detectron2's evaluators: :class:`SegmentationEvaluator` ``reset`` / ``process`` / ``evaluate`` accumulates
per (image, pathology) sufficient statistics (areas and intersections), which workers can merge
(:meth:`SegmentationEvaluator.state` / :meth:`SegmentationEvaluator.merge`) instead of gathering masks.

Conventions (the CheXlocalize benchmark's; see docs in the report each run writes):

- IoU per (image, pathology) at the original resolution, computed on the COCO RLEs directly (pycocotools
  ``merge(intersect=True)`` and ``area``): no mask is decoded. Dense masks give the same counts.
- ``tp_only`` mode (default): a pair is *kept* when both ground truth and prediction are non-empty. ``full`` mode:
  also pairs where exactly one is empty (IoU 0). Pairs where both are empty are never kept.
- Per-pathology mIoU = mean IoU over kept pairs; the overall mIoU is the plain mean over pathologies that have at
  least one kept pair (pathologies with none get ``None`` and are listed as excluded).
- Dataset-level IoU (labelled as such): sum of intersections / sum of unions over *all* images of the set, whatever
  the mode (a false positive on a negative image enlarges the union; both-empty pairs add nothing).
- Hit rate (pointing game, with a map store): the argmax of the upsampled raw map, at original resolution, lies
  inside the ground-truth mask (a boundary pixel of the mask counts), over images whose ground truth is non-empty.
  A constant map has no argmax and counts as a miss.
- 95% CIs: bootstrap over images (``n_bootstrap`` resamples with replacement, ``numpy.random.default_rng(seed)``),
  percentiles 2.5 / 97.5 of the resampled statistic; the reported value is the point estimate on the full set, not
  the bootstrap mean. A resample in which a pathology has no kept pair gives no value for it (ignored by the
  percentiles). Every statistic is a ratio of per-image sums, so the resamples are one matrix product of the
  ``[n_bootstrap, n_images]`` multiplicity matrix with per-image sufficient statistics.
- Prediction files must cover every image and pathology of the ground truth (an error listing missing ids), unless
  ``allow_missing`` treats missing entries as empty masks (with a warning naming how many).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from chexseg_dist.core.pathologies import N_TASKS, TASKS
from chexseg_dist.core.registry import EVAL_MODES
from chexseg_dist.errors import EvaluationError
from chexseg_dist.metrics.bootstrap import Metric, bootstrap_counts, ratio_metric

log = logging.getLogger(__name__)


#: Evaluation modes (names and meanings: :data:`~chexseg_dist.core.registry.EVAL_MODES`).
MODES: tuple[str, ...] = tuple(EVAL_MODES.names())

RLE = dict[str, Any]


class MissingPredictionsError(EvaluationError):
    """The prediction file does not cover every image and pathology of the ground truth."""


# ---------------------------------------------------------------------------------------------------- statistics
@dataclass
class PairStats:
    """Per (image, pathology) sufficient statistics, ``[N, 10]`` int64 arrays in TASKS order.

    Attributes:
        image_ids: ``N`` ground-truth image ids (sorted).
        gt_area, pred_area, inter: pixel counts.
    """

    image_ids: list[str]
    gt_area: np.ndarray
    pred_area: np.ndarray
    inter: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.gt_area + self.pred_area - self.inter

    def iou(self) -> np.ndarray:
        """``[N, 10]`` float64 IoU; NaN where both masks are empty."""
        return pair_iou(self.inter, self.gt_area, self.pred_area)

    def kept(self, mode: str) -> np.ndarray:
        """``[N, 10]`` bool: the pairs that count for mIoU in ``mode`` (``tp_only`` or ``full``)."""
        return kept_pairs(self.gt_area, self.pred_area, mode)


def pair_iou(inter: np.ndarray, gt_area: np.ndarray, pred_area: np.ndarray, empty: float = np.nan) -> np.ndarray:
    """IoU of (image, pathology) pairs from their areas (any broadcastable shapes); ``empty`` where both are empty."""
    union = gt_area + pred_area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), empty)


def kept_pairs(gt_area: np.ndarray, pred_area: np.ndarray, mode: str) -> np.ndarray:
    """Which pairs count towards mIoU (any broadcastable shapes): both masks non-empty in ``tp_only``, at least one
    in ``full``; both-empty pairs never count."""
    check_mode(mode)
    gt, pred = np.asarray(gt_area) > 0, np.asarray(pred_area) > 0
    return (gt & pred) if mode == "tp_only" else (gt | pred)


def check_mode(mode: str) -> None:
    """Raise ConfigError unless ``mode`` is ``tp_only`` or ``full``."""
    EVAL_MODES.check(mode, "evaluation mode")


def _as_coco(rle: Mapping[str, Any]) -> RLE:
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]}


def pair_stats(
    gt: Mapping[str, Mapping[str, RLE]],
    pred: Mapping[str, Mapping[str, RLE]],
    *,
    allow_missing: bool = False,
    gt_source: str = "ground truth",
    pred_source: str = "predictions",
) -> PairStats:
    """Areas and intersections of every (image, pathology) of the ground truth, on RLEs.

    Args:
        gt: ``{image_id: {pathology: rle}}`` (:func:`chexseg_dist.data.chexlocalize.read_segmentations`); every image
            must list all 10 pathologies.
        pred: the same for predictions, at the same sizes.
        allow_missing: treat images or pathologies missing from ``pred`` as empty masks (with a warning) instead
            of raising.
        gt_source, pred_source: file names for messages.

    Returns:
        :class:`PairStats` over the ground-truth images, sorted by id.

    Raises:
        MissingPredictionsError: predictions lack images or pathologies (listing up to 5 of each).
        EvaluationError: a ground-truth image lacks a pathology, or prediction and ground truth sizes differ (naming
            the image and pathology).
    """
    ids = sorted(gt)
    missing_gt = [(i, t) for i in ids for t in TASKS if t not in gt[i]]
    if missing_gt:
        raise EvaluationError(
            f"{gt_source}: ground truth must list all {N_TASKS} pathologies for every image (empty masks for "
            f"negatives); missing {len(missing_gt)}, e.g. {missing_gt[:5]}"
        )
    missing_images = [i for i in ids if i not in pred]
    missing_pairs = [(i, t) for i in ids if i in pred for t in TASKS if t not in pred[i]]
    if missing_images or missing_pairs:
        msg = (
            f"{pred_source} does not cover the ground truth ({gt_source}): {len(missing_images)} of {len(ids)} "
            f"images missing (e.g. {missing_images[:5]}), {len(missing_pairs)} (image, pathology) pairs missing "
            f"(e.g. {missing_pairs[:5]}); prediction files must cover every image and pathology at the original "
            "resolution"
        )
        if not allow_missing:
            raise MissingPredictionsError(msg + " (or pass --allow-missing to score missing entries as empty masks)")
        warnings.warn(msg + "; scoring the missing entries as EMPTY masks (--allow-missing)", stacklevel=2)
        log.warning(msg)

    n = len(ids)
    gt_list: list[RLE] = []
    pred_list: list[RLE] = []
    has_pred = np.zeros((n, N_TASKS), dtype=bool)
    for i, image_id in enumerate(ids):
        g_entry, p_entry = gt[image_id], pred.get(image_id, {})
        for k, task in enumerate(TASKS):
            g = _as_coco(g_entry[task])
            gt_list.append(g)
            p = p_entry.get(task)
            if p is None:
                pred_list.append(g)  # placeholder with the right size; its area is zeroed below
                continue
            has_pred[i, k] = True
            if list(p["size"]) != g["size"]:
                raise EvaluationError(
                    f"{pred_source}: image {image_id!r}, pathology {task!r}: prediction size {list(p['size'])} differs "
                    f"from the ground truth's {g['size']} ({gt_source}); predictions must be at the original resolution"
                )
            pred_list.append(_as_coco(p))
    gt_area = rle_areas(gt_list).reshape(n, N_TASKS)
    pred_area = rle_areas(pred_list).reshape(n, N_TASKS)
    pred_area = np.where(has_pred, pred_area, 0)
    inter = _zeros(n)
    both = np.flatnonzero(((gt_area > 0) & (pred_area > 0)).ravel())
    if both.size:
        merged = [coco_mask.merge([gt_list[j], pred_list[j]], intersect=True) for j in both]
        inter.ravel()[both] = rle_areas(merged)
    return PairStats(image_ids=ids, gt_area=gt_area, pred_area=pred_area, inter=inter)


def rle_areas(rles: Sequence[RLE]) -> np.ndarray:
    """Foreground pixel counts of COCO RLEs (``[n]`` int64), without decoding.

    pycocotools' ``area`` builds its result through a uint8 array of the list length and overflows for lists of more
    than 255 RLEs under numpy 2, so the list is passed in chunks.
    """
    out = np.zeros(len(rles), dtype=np.int64)
    for start in range(0, len(rles), _AREA_CHUNK):
        part = list(rles[start : start + _AREA_CHUNK])
        out[start : start + len(part)] = np.asarray(coco_mask.area(part), dtype=np.int64)
    return out


_AREA_CHUNK = 255


def _zeros(n: int) -> np.ndarray:
    return np.zeros((n, N_TASKS), dtype=np.int64)


# ---------------------------------------------------------------------------------------------------- hit rate
@dataclass
class HitStats:
    """Pointing game per (image, pathology): ``hit`` and ``valid`` (gt non-empty), ``[N, 10]`` bool."""

    hit: np.ndarray
    valid: np.ndarray


# ---------------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvaluationResult:
    """Everything ``chexseg evaluate`` reports."""

    mode: str
    stats: PairStats
    miou: Metric
    dataset_iou: Metric
    hits: HitStats | None = None
    hit_rate: Metric | None = None
    n_bootstrap: int = 0
    seed: int = 0
    extra_pred_images: int = 0

    @property
    def excluded(self) -> list[str]:
        """Pathologies with no kept pair (no mIoU; left out of the mean)."""
        return [t for t, v in zip(TASKS, self.miou.value) if not np.isfinite(v)]

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` payload (the required keys, then extras)."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "pathologies": {
                t: {"miou": _num(self.miou.value[k]), "ci": _pair(self.miou.ci[k]), "n": int(self.miou.n[k])}
                for k, t in enumerate(TASKS)
            },
            "mean_miou": _num(self.miou.mean),
            "mean_ci": _pair(self.miou.mean_ci),
            "excluded_pathologies": self.excluded,
            "dataset_iou": {
                "definition": "sum of intersections / sum of unions over all images of the set (any mode)",
                "pathologies": {
                    t: {"iou": _num(self.dataset_iou.value[k]), "ci": _pair(self.dataset_iou.ci[k])}
                    for k, t in enumerate(TASKS)
                },
                "mean": _num(self.dataset_iou.mean),
                "mean_ci": _pair(self.dataset_iou.mean_ci),
            },
            "n_images": len(self.stats.image_ids),
            "n_bootstrap": self.n_bootstrap,
            "seed": self.seed,
            "ci": "95% percentile bootstrap over images; point estimate on the full set",
        }
        if self.hit_rate is not None:
            out["hit_rate"] = {
                "definition": "argmax of the upsampled raw map inside the ground-truth mask, over gt-positive images",
                "pathologies": {
                    t: {
                        "hit_rate": _num(self.hit_rate.value[k]),
                        "ci": _pair(self.hit_rate.ci[k]),
                        "n": int(self.hit_rate.n[k]),
                    }
                    for k, t in enumerate(TASKS)
                },
                "mean": _num(self.hit_rate.mean),
                "mean_ci": _pair(self.hit_rate.mean_ci),
            }
        if self.extra_pred_images:
            out["ignored_prediction_images"] = self.extra_pred_images
        return out


def _num(x: float | np.floating) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _pair(ci: np.ndarray) -> list[float | None]:
    return [_num(ci[0]), _num(ci[1])]


def evaluate_stats(
    stats: PairStats,
    mode: str = "tp_only",
    n_bootstrap: int = 1000,
    seed: int = 0,
    hits: HitStats | None = None,
) -> EvaluationResult:
    """mIoU, dataset-level IoU and (optionally) hit rate with bootstrap CIs from per-pair statistics."""
    check_mode(mode)
    counts = bootstrap_counts(len(stats.image_ids), n_bootstrap, seed)
    kept = stats.kept(mode)
    iou = np.nan_to_num(stats.iou(), nan=0.0)
    miou = ratio_metric(np.where(kept, iou, 0.0), kept, counts)
    dataset = ratio_metric(stats.inter, stats.union, counts, n=(stats.union > 0).sum(axis=0))
    hit_rate = ratio_metric(hits.hit & hits.valid, hits.valid, counts) if hits is not None else None
    return EvaluationResult(
        mode=mode,
        stats=stats,
        miou=miou,
        dataset_iou=dataset,
        hits=hits,
        hit_rate=hit_rate,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------------- evaluator
def dense_pair_stats(gt: Any, pred: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Areas and intersections of dense masks: ``(gt_area, pred_area, inter)``, each ``[B, 10]`` int64.

    Args:
        gt, pred: ``[B, 10, H, W]`` masks (numpy or torch; bool, or numbers where nonzero is foreground), TASKS order,
            in the same frame (for CheXlocalize numbers: the original resolution).
    """
    g, p = _as_bool(gt), _as_bool(pred)
    if g.shape != p.shape or g.ndim != 4 or g.shape[1] != N_TASKS:
        raise ValueError(f"dense masks must both be [B, {N_TASKS}, H, W], got {tuple(g.shape)} and {tuple(p.shape)}")
    return (
        _count(g.sum(dim=(2, 3)) if hasattr(g, "dim") else g.sum(axis=(2, 3))),
        _count(p.sum(dim=(2, 3)) if hasattr(p, "dim") else p.sum(axis=(2, 3))),
        _count((g & p).sum(dim=(2, 3)) if hasattr(g, "dim") else (g & p).sum(axis=(2, 3))),
    )


def _as_bool(masks: Any) -> Any:
    if hasattr(masks, "dim"):  # torch: count on the tensor's device, move only the [B, 10] counts
        return masks if str(masks.dtype) == "torch.bool" else masks != 0
    arr = np.asarray(masks)
    return arr if arr.dtype == bool else arr != 0


def _count(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64)


class SegmentationEvaluator:
    """Accumulates per (image, pathology) statistics and scores them the CheXlocalize way (detectron2's shape).

    Usage::

        evaluator = SegmentationEvaluator(mode="full", n_bootstrap=0)
        evaluator.reset()
        for ids, gt, pred in batches:
            evaluator.process(ids, gt, pred)  # dense [B, 10, H, W] masks, or {task: rle} dicts per image
        result = evaluator.evaluate()  # an EvaluationResult: result.miou.value, result.miou.mean, ...

    Across data-parallel workers, gather every worker's :meth:`state` (small integer arrays and ids) and
    :meth:`merge` them into one evaluator before :meth:`evaluate`.

    Args:
        mode: ``tp_only`` or ``full``.
        n_bootstrap, seed: bootstrap resamples over images for the CIs (0 for point estimates only).
    """

    def __init__(self, mode: str = "tp_only", n_bootstrap: int = 1000, seed: int = 0) -> None:
        check_mode(mode)
        self.mode = mode
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Forget everything processed so far."""
        self._ids: list[str] = []
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def process(self, image_ids: Sequence[str], gt: Any, pred: Any) -> None:
        """Add a batch of images.

        Args:
            image_ids: ``B`` ids.
            gt, pred: dense ``[B, 10, H, W]`` masks (numpy or torch, same frame), or ``B`` mappings
                ``{pathology: rle}`` listing all 10 pathologies (CheXlocalize RLEs at the same size).
        """
        ids = [str(i) for i in image_ids]
        if isinstance(gt, Sequence) and not isinstance(gt, np.ndarray) and (not gt or isinstance(gt[0], Mapping)):
            stats = pair_stats(dict(zip(ids, gt)), dict(zip(ids, pred)))
            order = [stats.image_ids.index(i) for i in ids]
            part = (stats.gt_area[order], stats.pred_area[order], stats.inter[order])
        else:
            part = dense_pair_stats(gt, pred)
        if part[0].shape[0] != len(ids):
            raise ValueError(f"process: {len(ids)} image ids for {part[0].shape[0]} masks")
        self._ids += ids
        self._parts.append(part)

    def state(self) -> dict[str, Any]:
        """What this evaluator holds, for gathering across workers: ids and ``[N, 10]`` int64 arrays."""
        stats = self.stats(sort=False)
        return {
            "image_ids": stats.image_ids,
            "gt_area": stats.gt_area,
            "pred_area": stats.pred_area,
            "inter": stats.inter,
        }

    def merge(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Add the statistics of other evaluators (their :meth:`state`)."""
        for st in states:
            self._ids += [str(i) for i in st["image_ids"]]
            self._parts.append(
                tuple(np.asarray(st[k], dtype=np.int64).reshape(-1, N_TASKS) for k in ("gt_area", "pred_area", "inter"))  # type: ignore[arg-type]
            )

    def stats(self, sort: bool = True) -> PairStats:
        """The accumulated :class:`PairStats` (sorted by image id, like ``chexseg evaluate``, unless ``sort=False``).

        Raises:
            EvaluationError: an image was processed twice.
        """
        if self._parts:
            gt_area, pred_area, inter = (np.concatenate([p[k] for p in self._parts]) for k in range(3))
        else:
            gt_area = pred_area = inter = _zeros(0)
        ids = list(self._ids)
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise EvaluationError(f"images processed more than once: {dup}")
        if sort:
            order = np.argsort(np.asarray(ids, dtype=object), kind="stable") if ids else np.zeros(0, dtype=np.int64)
            ids = [ids[i] for i in order]
            gt_area, pred_area, inter = gt_area[order], pred_area[order], inter[order]
        return PairStats(image_ids=ids, gt_area=gt_area, pred_area=pred_area, inter=inter)

    def evaluate(self, hits: HitStats | None = None) -> EvaluationResult:
        """mIoU, dataset-level IoU (and hit rate with ``hits``) with bootstrap CIs, as ``chexseg evaluate`` reports."""
        return evaluate_stats(self.stats(), self.mode, self.n_bootstrap, self.seed, hits)
