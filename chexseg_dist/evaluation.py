"""CheXlocalize-convention evaluation: IoU per (image, pathology) on RLEs, mIoU, hit rate, bootstrap CIs.

Conventions (the CheXlocalize benchmark's; see docs in the report each run writes):

- IoU per (image, pathology) at the original resolution, computed on the COCO RLEs directly (pycocotools
  ``merge(intersect=True)`` and ``area``): no mask is decoded.
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

import csv
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from chexseg_dist.pathologies import TASKS

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("tp_only", "full")
N_TASKS = len(TASKS)
CI_PERCENTILES = (2.5, 97.5)

RLE = dict[str, Any]


class MissingPredictionsError(ValueError):
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
        union = self.union
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, self.inter / np.maximum(union, 1), np.nan)

    def kept(self, mode: str) -> np.ndarray:
        """``[N, 10]`` bool: the pairs that count for mIoU in ``mode`` (``tp_only`` or ``full``)."""
        check_mode(mode)
        gt, pred = self.gt_area > 0, self.pred_area > 0
        return (gt & pred) if mode == "tp_only" else (gt | pred)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"evaluation mode must be one of {list(MODES)}, got {mode!r}")


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
        gt: ``{image_id: {pathology: rle}}`` (:func:`chexseg_dist.annotations.read_segmentations`); every image
            must list all 10 pathologies.
        pred: the same for predictions, at the same sizes.
        allow_missing: treat images or pathologies missing from ``pred`` as empty masks (with a warning) instead
            of raising.
        gt_source, pred_source: file names for messages.

    Returns:
        :class:`PairStats` over the ground-truth images, sorted by id.

    Raises:
        MissingPredictionsError: predictions lack images or pathologies (listing up to 5 of each).
        ValueError: a ground-truth image lacks a pathology, or prediction and ground truth sizes differ (naming
            the image and pathology).
    """
    ids = sorted(gt)
    missing_gt = [(i, t) for i in ids for t in TASKS if t not in gt[i]]
    if missing_gt:
        raise ValueError(
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
                raise ValueError(
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


def point_in_rle(rle: RLE, row: int, col: int) -> bool:
    """True if pixel ``(row, col)`` is foreground in a COCO RLE (without decoding the mask)."""
    h, w = int(rle["size"][0]), int(rle["size"][1])
    idx = int(col) * h + int(row)  # COCO RLE runs over the column-major (Fortran) pixel order
    point = coco_mask.frPyObjects({"size": [h, w], "counts": [idx, 1, h * w - idx - 1]}, h, w)
    return bool(coco_mask.area(coco_mask.merge([_as_coco(rle), point], intersect=True)) > 0)


def hit_stats(store_uri: str, gt: Mapping[str, Mapping[str, RLE]], image_ids: Sequence[str]) -> HitStats:
    """Pointing game of the stored maps against the ground truth.

    Args:
        store_uri: a map store (``chexseg pseudolabel``) holding every image of ``image_ids``.
        gt: ground-truth RLEs.
        image_ids: the images, in the order of the result rows.

    Raises:
        KeyError: images missing from the store; ValueError: rows not done or sizes that differ from the gt.
    """
    from chexseg_dist.masks import map_argmax
    from chexseg_dist.store import MapStore

    store = MapStore.open(store_uri)
    slots = store.index_of(list(image_ids))
    n = len(image_ids)
    hit = np.zeros((n, N_TASKS), dtype=bool)
    valid = np.zeros((n, N_TASKS), dtype=bool)
    step = 256
    for start in range(0, n, step):
        batch = store.read(slots[start : start + step])
        not_done = [str(i) for i, d in zip(batch.image_id, batch.done) if not d]
        if not_done:
            raise ValueError(f"map store {store_uri}: {len(not_done)} image(s) have no maps yet, e.g. {not_done[:5]}")
        for j in range(len(batch)):
            i = start + j
            image_id = str(batch.image_id[j])
            box = batch.letterboxes[j]
            assert box is not None
            entry = gt[image_id]
            size = tuple(entry[TASKS[0]]["size"])
            if (box.height, box.width) != size:
                raise ValueError(
                    f"image {image_id!r}: map store {store_uri} has size {box.height}x{box.width}, the ground truth "
                    f"{size[0]}x{size[1]}"
                )
            rows, cols, constant = map_argmax(batch.cams[j], box)
            for k, task in enumerate(TASKS):
                rle = entry[task]
                if coco_mask.area(_as_coco(rle)) == 0:
                    continue
                valid[i, k] = True
                hit[i, k] = (not constant[k]) and point_in_rle(rle, int(rows[k]), int(cols[k]))
    return HitStats(hit=hit, valid=valid)


# ---------------------------------------------------------------------------------------------------- bootstrap
def bootstrap_counts(n_images: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """Multiplicity of each image in each bootstrap resample: ``[n_bootstrap, n_images]`` float64.

    Resample ``b`` draws ``n_images`` images with replacement (``default_rng(seed).integers``), so the same seed
    gives the same resamples.
    """
    if n_bootstrap == 0 or n_images == 0:
        return np.zeros((n_bootstrap, n_images))
    idx = np.random.default_rng(seed).integers(0, n_images, size=(n_bootstrap, n_images))
    flat = (idx + n_images * np.arange(n_bootstrap)[:, None]).ravel()
    return np.bincount(flat, minlength=n_bootstrap * n_images).reshape(n_bootstrap, n_images).astype(np.float64)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den == 0``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def percentile_ci(samples: np.ndarray) -> np.ndarray:
    """``[..., 2]`` 2.5 / 97.5 percentiles over axis 0, ignoring NaN (NaN where no resample has a value)."""
    samples = np.asarray(samples, dtype=np.float64)
    out = np.full((*samples.shape[1:], 2), np.nan)
    ok = np.isfinite(samples).any(axis=0)
    if ok.any():
        out[ok] = np.nanpercentile(samples[:, ok], CI_PERCENTILES, axis=0).T
    return out


@dataclass
class Metric:
    """A per-pathology ratio statistic with bootstrap CIs.

    Attributes:
        value: ``[10]`` point estimates (NaN where undefined).
        ci: ``[10, 2]`` 95% CI.
        n: ``[10]`` pairs (or images) behind each value.
        mean: plain mean of ``value`` over pathologies where it is defined.
        mean_ci: CI of that mean (over the same pathologies).
    """

    value: np.ndarray
    ci: np.ndarray
    n: np.ndarray
    mean: float
    mean_ci: np.ndarray
    samples: np.ndarray | None = field(default=None, repr=False)


def ratio_metric(num: np.ndarray, den: np.ndarray, counts: np.ndarray, n: np.ndarray | None = None) -> Metric:
    """Per-pathology ``sum(num) / sum(den)`` over images, with bootstrap CIs from ``counts``.

    Args:
        num, den: ``[N, 10]`` per-image sufficient statistics.
        counts: ``[B, N]`` resample multiplicities (:func:`bootstrap_counts`).
        n: ``[10]`` sizes to report (default: ``den`` summed, e.g. the number of kept pairs).
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    value = ratio(num.sum(axis=0), den.sum(axis=0))
    samples = ratio(counts @ num, counts @ den) if counts.shape[0] else np.zeros((0, num.shape[1]))
    defined = np.isfinite(value)
    mean = float(value[defined].mean()) if defined.any() else float("nan")
    if defined.any() and samples.shape[0]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample may lack every defined pathology
            mean_samples = np.nanmean(samples[:, defined], axis=1)
        mean_ci = percentile_ci(mean_samples[:, None])[0]
    else:
        mean_ci = np.full(2, np.nan)
    return Metric(
        value=value,
        ci=percentile_ci(samples),
        n=np.asarray(den.sum(axis=0) if n is None else n, dtype=np.int64),
        mean=mean,
        mean_ci=mean_ci,
        samples=samples,
    )


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


def evaluate_files(
    gt_path: str,
    pred_path: str,
    mode: str = "tp_only",
    n_bootstrap: int = 1000,
    seed: int = 0,
    maps: str | None = None,
    allow_missing: bool = False,
) -> EvaluationResult:
    """Evaluate a CheXlocalize prediction JSON against a ground-truth JSON (see the module conventions).

    Args:
        gt_path, pred_path: segmentation JSON files (local or URI).
        mode: ``tp_only`` or ``full``.
        n_bootstrap, seed: bootstrap resamples over images and their seed.
        maps: optional map store for the hit rate.
        allow_missing: score images/pathologies missing from the predictions as empty masks (warns).
    """
    from chexseg_dist.annotations import read_segmentations

    check_mode(mode)
    gt = read_segmentations(gt_path)
    pred = read_segmentations(pred_path)
    stats = pair_stats(gt, pred, allow_missing=allow_missing, gt_source=gt_path, pred_source=pred_path)
    hits = hit_stats(maps, gt, stats.image_ids) if maps else None
    result = evaluate_stats(stats, mode, n_bootstrap, seed, hits)
    result.extra_pred_images = len(set(pred) - set(gt))
    return result


def write_per_image_csv(path: str, result: EvaluationResult) -> None:
    """``per_image.csv``: image_id, pathology, gt_area, pred_area, intersection, union, iou, kept (+ hit).

    ``iou`` is empty for both-empty pairs; ``hit`` (with a map store) is empty where the ground truth is empty.
    """
    from chexseg_dist.fsio import open_file

    s = result.stats
    iou, kept, union = s.iou(), s.kept(result.mode), s.union
    header = ["image_id", "pathology", "gt_area", "pred_area", "intersection", "union", "iou", "kept"]
    if result.hits is not None:
        header.append("hit")
    with open_file(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, image_id in enumerate(s.image_ids):
            for k, task in enumerate(TASKS):
                row: list[Any] = [
                    image_id,
                    task,
                    int(s.gt_area[i, k]),
                    int(s.pred_area[i, k]),
                    int(s.inter[i, k]),
                    int(union[i, k]),
                    "" if not np.isfinite(iou[i, k]) else f"{iou[i, k]:.6f}",
                    int(kept[i, k]),
                ]
                if result.hits is not None:
                    row.append(int(result.hits.hit[i, k]) if result.hits.valid[i, k] else "")
                writer.writerow(row)
