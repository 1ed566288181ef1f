"""Per-pathology map thresholds and probability cutoffs tuned on expert masks, all thresholds in one pass.

What is maximised (documented in the thresholds file as well):

1. **Map threshold** ``t`` per pathology, on the grid ``t = k / threshold_steps`` (default 0.00, 0.01, ..., 1.00):
   the mIoU of the masks ``normalised map > t`` in ``masks.tune_mode`` (default ``tp_only``, the benchmark's
   ``tune_heatmap_threshold.py`` convention) with no probability cutoff (label gating applies when configured, as
   it will when the masks are made). Ties go to the smallest threshold.
2. **Probability cutoff** ``c`` per pathology, on ``c = k / cutoff_steps``, given the chosen ``t``: the **full-mode**
   mIoU (pairs where exactly one mask is empty count with IoU 0), where a mask is emptied when ``prob < c``. This is
   the benchmark's ``tune_probability_threshold.py`` convention, and the only sensible one: in true-positives-only
   mode emptying a prediction merely drops the pair from the average, so maximising tp-only mIoU over ``c`` would
   reward gating away every pair but the few easiest ones. Ties go to the smallest cutoff (least gating).

A pathology with no positive expert mask in the tuning set keeps ``fallback_threshold`` and cutoff 0 (marked
``"tuned": false``).

The one pass: for each (image, pathology) with a non-empty expert mask, the raw map is upsampled once to the original
size with :meth:`Letterbox.grid_to_original` and normalised exactly as :mod:`chexseg_dist.masks` does; each pixel's
normalised value ``v`` (float32) falls in bin ``ceil(K * v)`` (computed in float64, where ``K * v`` is exact, so the
bin equals the number of grid thresholds ``k / K`` strictly below ``v``: the float64 comparison ``v > t`` the tuned
binariser makes). Histograms of the bins inside and outside the expert mask give, by suffix sums, ``|pred ∩ gt|`` and
``|pred|`` for every threshold at once. A pair whose expert mask is empty needs only whether its prediction is
non-empty, i.e. whether the map is non-constant (its normalised max is 1 > t for every t < 1); that comes from the
map's extrema without upsampling. Images are spread over a process pool.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.parallel import process_map
from chexseg_dist.core.pathologies import N_TASKS, TASKS
from chexseg_dist.data.chexlocalize import decode_mask
from chexseg_dist.errors import InputError
from chexseg_dist.masks.export import IN_PROCESS_PIXELS
from chexseg_dist.masks.gating import gate, task_values
from chexseg_dist.masks.maps import is_constant, map_extrema, map_range
from chexseg_dist.masks.thresholds import TunedThresholds
from chexseg_dist.metrics.segmentation import kept_pairs, pair_iou
from chexseg_dist.metrics.sweep import SweepCounts, ThresholdSweep, threshold_grid

log = logging.getLogger(__name__)


#: Rows per block in the binning loop: the block's buffers of a 2800-column radiograph stay in the CPU cache.
BLOCK_ROWS = 16


# ---------------------------------------------------------------------------------------------------- one pass
def threshold_counts(
    cams: np.ndarray, box: Letterbox, gt_masks: Sequence[np.ndarray | None], steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """``|pred ∩ gt|`` and ``|pred|`` for every threshold ``k / steps``, for the maps of one image.

    Args:
        cams: ``[P, gh, gw]`` raw grids.
        box: the image's letterbox.
        gt_masks: ``P`` expert masks ``[height, width]`` (any layout, nonzero = foreground), or None for an empty
            mask (then only whether the prediction is non-empty is computed: ``|pred|`` is 1 for non-empty).
        steps: ``K``; thresholds are ``k / K`` for ``k = 0..K``.

    Returns:
        ``(inter, pred)``, int64 ``[P, K + 1]``.
    """
    p = cams.shape[0]
    inter = np.zeros((p, steps + 1), dtype=np.int64)
    pred = np.zeros((p, steps + 1), dtype=np.int64)
    lo_all, hi_all = map_extrema(cams, box)
    const_all = is_constant(lo_all, hi_all)
    for i in range(p):
        gt = gt_masks[i]
        if gt is None:
            # Normalised max is exactly 1, so the mask is non-empty for every threshold below 1.
            if not const_all[i]:
                pred[i, :steps] = 1
            continue
        up = box.grid_to_original(cams[i])
        lo, span = map_range(up[None])
        if not np.isfinite(span[0]):  # constant: masks.normalise_maps gives zeros, empty for every t >= 0
            continue
        hist = binned_histogram(up, lo[0], span[0], gt, steps)
        # hist[g, b]: pixels with gt == g whose bin is b (b = number of thresholds strictly below the value).
        above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # above[g, b] = pixels with bin >= b
        inter[i] = above[1, 1:]
        pred[i] = above[0, 1:] + above[1, 1:]
    return inter, pred


def binned_histogram(up: np.ndarray, lo: np.float32, span: np.float32, gt: np.ndarray, steps: int) -> np.ndarray:
    """``[2, steps + 2]`` counts of bin ``ceil(steps * v)`` (v the normalised map) outside / inside ``gt``."""
    h, w = up.shape
    nb = steps + 2  # bins 0..steps, plus one spare so the suffix sums above have a zero tail
    # Row blocks of a C-ordered map need a C-ordered mask: mixing layouts in one ufunc walks memory with a stride
    # of a whole column per element. The offset nb * gt is added before the ceiling: ceil(x + n) = ceil(x) + n for
    # an integer n, and x + n is exact in float64 (x = steps * v has at most 31 significant bits).
    gt = np.ascontiguousarray(gt)
    if gt.dtype != np.uint8 or gt.max(initial=0) > 1:
        gt = (gt != 0).astype(np.uint8)
    rows = min(h, BLOCK_ROWS)
    norm = np.empty((rows, w), dtype=np.float32)
    scaled = np.empty((rows, w), dtype=np.float64)
    offset = np.empty((rows, w), dtype=np.uint16)
    index = np.empty((rows, w), dtype=np.intp)
    hist = np.zeros(2 * nb, dtype=np.int64)
    k = np.float64(steps)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        n = r1 - r0
        v, s, off, idx = norm[:n], scaled[:n], offset[:n], index[:n]
        # The same float32 operations as masks.normalise_maps, element for element.
        np.subtract(up[r0:r1], lo, out=v)
        np.divide(v, span, out=v)
        np.multiply(v, k, out=s)  # float32 * float64 -> float64: exact
        np.multiply(gt[r0:r1], nb, out=off, casting="unsafe")
        np.add(s, off, out=s)
        np.ceil(s, out=idx, casting="unsafe")
        hist += np.bincount(idx.ravel(), minlength=2 * nb)
    return hist.reshape(2, nb)


def _image_job(job: tuple[str, np.ndarray, tuple[int, int, int], list[dict[str, Any]], np.ndarray, int]) -> Any:
    """Worker: one image -> (image_id, gt_area [P], inter [P, K+1], pred [P, K+1]) for the pathologies kept."""
    image_id, cams, params, rles, keep, steps = job
    box = Letterbox(*params)
    gt_area = np.asarray(coco_mask.area(rles), dtype=np.int64)
    inter = np.zeros((N_TASKS, steps + 1), dtype=np.int64)
    pred = np.zeros((N_TASKS, steps + 1), dtype=np.int64)
    todo = np.flatnonzero(keep)
    if todo.size:
        masks = [decode_mask(rles[k], image_id=image_id, pathology=TASKS[k]) if gt_area[k] > 0 else None for k in todo]
        inter[todo], pred[todo] = threshold_counts(cams[todo], box, masks, steps)
    return image_id, gt_area, inter, pred


# ---------------------------------------------------------------------------------------------------- objective
@dataclass
class TuningTable:
    """Per (image, pathology, threshold) statistics of the tuning set.

    Attributes:
        image_ids: ``N`` ids.
        gt_area: ``[N, 10]`` expert-mask areas.
        inter, pred: ``[N, 10, K + 1]`` ``|pred ∩ gt|`` and ``|pred|`` (for expert-empty pairs, ``pred`` is only
            0/1: empty or not).
        probs: ``[N, 10]`` classifier probabilities (TASKS order).
        grid: ``[K + 1]`` thresholds.
    """

    image_ids: list[str]
    gt_area: np.ndarray
    inter: np.ndarray
    pred: np.ndarray
    probs: np.ndarray
    grid: np.ndarray

    @classmethod
    def from_sweep(cls, counts: SweepCounts, probs: np.ndarray) -> TuningTable:
        """The table of a :class:`~chexseg_dist.metrics.sweep.ThresholdSweep`'s counts (rows sorted by image id,
        ``probs [N, 10]`` in that order)."""
        return cls(counts.image_ids, counts.gt_area, counts.inter, counts.pred, probs, counts.grid)

    def iou(self) -> np.ndarray:
        """``[N, 10, K + 1]`` IoU (0 where the union is empty)."""
        return pair_iou(self.inter, self.gt_area[:, :, None], self.pred, empty=0.0)

    def miou_curve(self, mode: str, cutoff_keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """mIoU per pathology and threshold, ``([10, K + 1]`` mIoU (NaN where no pair is kept), ``[10, K + 1]`` n).

        Args:
            mode: ``tp_only`` or ``full``.
            cutoff_keep: optional ``[N, 10]`` bool: predictions emptied where False.
        """
        nonempty = self.pred > 0
        if cutoff_keep is not None:
            nonempty = nonempty & cutoff_keep[:, :, None]
        kept = kept_pairs(self.gt_area[:, :, None], nonempty, mode)
        iou = np.where(nonempty, self.iou(), 0.0)
        n = kept.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            miou = np.where(n > 0, (iou * kept).sum(axis=0) / np.maximum(n, 1), np.nan)
        return miou, n


def choose(
    table: TuningTable, mode: str, cutoff_steps: int, fallback: float
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Thresholds (max ``mode`` mIoU) then cutoffs (max full-mode mIoU at those thresholds); see the module doc.

    Returns:
        ``(thresholds [10], cutoffs [10], details)``; ``details`` holds per-pathology numbers and curves.
    """
    curve, n_curve = table.miou_curve(mode)
    cut_grid = threshold_grid(cutoff_steps)
    thresholds = np.full(N_TASKS, fallback)
    cutoffs = np.zeros(N_TASKS)
    details: dict[str, Any] = {}
    positives = (table.gt_area > 0).sum(axis=0)
    iou_all = table.iou()
    for k, task in enumerate(TASKS):
        info: dict[str, Any] = {"n_positive": int(positives[k]), "tuned": False}
        details[task] = info
        if positives[k] == 0 or not np.isfinite(curve[k]).any():
            continue
        j = int(np.nanargmax(curve[k]))  # first maximum: smallest threshold on ties
        thresholds[k] = table.grid[j]
        info.update(tuned=True, miou=float(curve[k, j]), n=int(n_curve[k, j]))
        # Cutoffs: full-mode mIoU at threshold j for every cutoff, vectorised over the cutoff grid.
        gt = table.gt_area[:, k] > 0
        nonempty = table.pred[:, k, j] > 0
        iou = np.where(nonempty, iou_all[:, k, j], 0.0)
        with np.errstate(invalid="ignore"):
            on = table.probs[:, k][None, :] >= cut_grid[:, None]  # [C, N]
        pred_on = on & nonempty[None, :]
        kept = gt[None, :] | pred_on
        n = kept.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            full = np.where(n > 0, (np.where(pred_on, iou[None, :], 0.0) * kept).sum(axis=1) / np.maximum(n, 1), np.nan)
        m = int(np.nanargmax(full))  # smallest cutoff on ties (gt-positive pairs keep n > 0 for every cutoff)
        cutoffs[k] = cut_grid[m]
        info.update(miou_full_no_cutoff=float(full[0]), miou_full=float(full[m]), n_full=int(n[m]))
    details["_curves"] = {"mode": mode, "miou": {t: curve[k] for k, t in enumerate(TASKS)}}
    return thresholds, cutoffs, details


# ---------------------------------------------------------------------------------------------------- driver
def _jobs(
    store: Any,
    gt: Mapping[str, Mapping[str, Any]],
    ids: Sequence[str],
    keep: np.ndarray,
    steps: int,
    probs_out: np.ndarray,
    digest: Any,
    gt_source: str,
) -> Iterator[tuple[str, np.ndarray, tuple[int, int, int], list[dict[str, Any]], np.ndarray, int]]:
    slots = store.index_of(list(ids), wanted_by=f"--gt {gt_source}")
    order = np.argsort(slots, kind="stable")  # read the store in slot order
    for start in range(0, len(ids), 256):
        sel = order[start : start + 256]
        batch = store.read(slots[sel])
        not_done = [str(i) for i, d in zip(batch.image_id, batch.done) if not d]
        if not_done:
            raise InputError(
                f"map store {store.uri}: {len(not_done)} image(s) of --gt {gt_source} have no maps yet, "
                f"e.g. {not_done[:5]}; run chexseg pseudolabel to finish the store"
            )
        digest.update(np.ascontiguousarray(batch.probs).tobytes())
        digest.update(np.ascontiguousarray(batch.cams).tobytes())
        for j, i in enumerate(sel):
            image_id = str(ids[i])
            box = batch.letterboxes[j]
            assert box is not None
            rles = [dict(gt[image_id][t]) for t in TASKS]
            size = tuple(rles[0]["size"])
            if size != (box.height, box.width):
                raise InputError(
                    f"image {image_id!r}: the map store has size {box.height}x{box.width}, the expert masks "
                    f"{size[0]}x{size[1]}; tune on the store of the same images"
                )
            probs_out[i] = task_values(batch.probs[j])
            yield image_id, batch.cams[j], (box.height, box.width, box.size), rles, keep[i], steps


def build_table(
    store_uri: str,
    gt: Mapping[str, Mapping[str, Any]],
    steps: int = 100,
    label_keep: np.ndarray | None = None,
    workers: int = 2,
    gt_source: str = "the expert masks",
) -> tuple[TuningTable, str]:
    """Run the one pass over every expert-annotated image.

    Args:
        store_uri: map store holding every image of ``gt``.
        gt: expert masks ``{image_id: {pathology: rle}}`` listing all 10 pathologies.
        steps: threshold grid ``k / steps``.
        label_keep: optional ``[N, 10]`` bool (sorted gt ids): label gating; False = prediction always empty.
        workers: processes (1 = in this process).
        gt_source: where ``gt`` came from (the ``--gt`` file), named in errors.

    Returns:
        ``(table, fingerprint)``; the fingerprint is a sha256 of the store's ids, probabilities and maps used.
    """
    from chexseg_dist.store.mapstore import MapStore

    ids = sorted(gt)
    missing = [(i, t) for i in ids for t in TASKS if t not in gt[i]]
    if missing:
        raise InputError(
            f"{gt_source}: expert masks must list all {N_TASKS} pathologies per image; missing e.g. {missing[:5]}"
        )
    store = MapStore.open(store_uri)
    n = len(ids)
    keep = np.ones((n, N_TASKS), dtype=bool) if label_keep is None else np.asarray(label_keep, dtype=bool)
    probs = np.full((n, N_TASKS), np.nan)
    digest = hashlib.sha256("\n".join(ids).encode())
    jobs = _jobs(store, gt, ids, keep, steps, probs, digest, gt_source)
    pixels = sum(int(gt[i][TASKS[0]]["size"][0]) * int(gt[i][TASKS[0]]["size"][1]) for i in ids)
    if pixels < IN_PROCESS_PIXELS:
        workers = 1  # starting processes would cost more than it saves
    sweep = ThresholdSweep(steps)
    for image_id, area, i_counts, p_counts in process_map(_image_job, jobs, workers):
        sweep.process_counts([image_id], area[None], i_counts[None], p_counts[None])
    return TuningTable.from_sweep(sweep.evaluate(), probs), digest.hexdigest()


def tune(
    store_uri: str,
    gt_path: str,
    manifest: str | None = None,
    steps: int = 100,
    cutoff_steps: int = 100,
    mode: str = "tp_only",
    fallback: float = 0.5,
    label_gating: bool = False,
    workers: int = 2,
) -> TunedThresholds:
    """Tune thresholds and cutoffs on an expert-annotated set (see the module doc for the objective).

    Args:
        store_uri: map store of the expert-annotated images.
        gt_path: their expert segmentation JSON.
        manifest: manifest with the images' labels (needed for ``label_gating``).
        steps, cutoff_steps: grids ``k / steps`` and ``k / cutoff_steps``.
        mode: evaluation mode the thresholds maximise (``tp_only`` or ``full``).
        fallback: threshold for pathologies without positive expert masks.
        label_gating: tune with the masks of non-positive labels emptied (as ``masks.label_gating`` will).
        workers: processes.
    """
    from chexseg_dist.core.fsio import read_bytes
    from chexseg_dist.data.chexlocalize import read_segmentations
    from chexseg_dist.metrics.segmentation import check_mode

    check_mode(mode)
    t0 = time.perf_counter()
    gt = read_segmentations(gt_path)
    label_keep = None
    if label_gating:
        if not manifest:
            raise InputError("label gating needs --manifest with the images' labels")
        label_keep = gated_keep(manifest, sorted(gt))
    table, fingerprint = build_table(store_uri, gt, steps, label_keep, workers, gt_source=gt_path)
    from chexseg_dist.store.mapstore import MapStore

    model_fingerprint = MapStore.open(store_uri).attrs.get("model_fingerprint")
    thresholds, cutoffs, details = choose(table, mode, cutoff_steps, fallback)
    curves = details.pop("_curves")
    meta = {
        "objective": {
            "thresholds": f"max mIoU ({mode}) over t = k/{steps}, no probability cutoff; ties -> smallest t",
            "cutoffs": f"max full-mode mIoU over c = k/{cutoff_steps} at the chosen t (mask kept when prob >= c); "
            "ties -> smallest c",
            "mode": mode,
            "label_gating": label_gating,
        },
        "grid": {"thresholds": {"start": 0.0, "stop": 1.0, "steps": steps}, "cutoffs": {"steps": cutoff_steps}},
        "pathologies": details,
        "curves": {"mode": curves["mode"], "thresholds": table.grid.tolist(), "miou": curves["miou"]},
        "n_images": len(table.image_ids),
        "store": {"uri": store_uri, "fingerprint": "sha256:" + fingerprint, "model_fingerprint": model_fingerprint},
        "gt": {"path": gt_path, "sha256": hashlib.sha256(read_bytes(gt_path)).hexdigest()},
        "manifest": manifest,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return TunedThresholds(thresholds=thresholds, cutoffs=cutoffs, meta=meta)


def gated_keep(manifest: str, ids: Sequence[str]) -> np.ndarray:
    """``[N, 10]`` bool: label gating of the tuning images (True where the image-level label is positive)."""
    from chexseg_dist.masks.gating import manifest_labels

    return gate(labels=task_values(manifest_labels(manifest, ids)), label_gating=True)


def describe(tuned: TunedThresholds) -> str:
    """A short table of the tuned values for the console."""
    lines = [f"{'pathology':28s} {'t':>5s} {'cutoff':>6s} {'mIoU':>6s} {'n':>4s}"]
    for k, task in enumerate(TASKS):
        info = tuned.meta.get("pathologies", {}).get(task, {})
        miou = info.get("miou")
        lines.append(
            f"{task:28s} {tuned.thresholds[k]:5.2f} {tuned.cutoffs[k]:6.2f} "
            f"{'  –   ' if miou is None else f'{miou:6.3f}'} {info.get('n_positive', 0):4d}"
            + ("" if info.get("tuned", False) else "  (not tuned: no positive expert mask)")
        )
    return "\n".join(lines)


#: A student's output threshold for a pathology without an expert-select positive (nothing to choose it on).
OUTPUT_FALLBACK_THRESHOLD = 0.5


def choose_output_thresholds(counts: SweepCounts) -> dict[str, Any]:
    """The student's per-pathology output thresholds on expert-select: the full-mode mIoU maximum (ties: the smallest
    threshold) of each pathology's sweep, and the epoch's score.

    Returns:
        ``thresholds`` [10], ``miou_full`` [10] and ``miou_tp`` [10] at them (NaN for a pathology without an
        expert-select positive, which keeps :data:`OUTPUT_FALLBACK_THRESHOLD`), ``positives`` [10] and ``score`` (the
        mean full-mode mIoU over the pathologies with a positive; -1 when there is none).
    """
    gt_area = counts.gt_area
    table = TuningTable.from_sweep(counts, np.zeros(gt_area.shape))
    full, _ = table.miou_curve("full")
    tp, _ = table.miou_curve("tp_only")
    positives = (gt_area > 0).sum(axis=0)
    thresholds = np.full(N_TASKS, OUTPUT_FALLBACK_THRESHOLD)
    miou_full = np.full(N_TASKS, np.nan)
    miou_tp = np.full(N_TASKS, np.nan)
    for k in range(N_TASKS):
        if positives[k] == 0:
            continue
        j = int(np.nanargmax(full[k]))  # gt-positive pairs are always kept in full mode: no all-NaN row
        # A pathology with positives but no kept tp-only pair counts 0, as in the experiment's comparison metric.
        thresholds[k], miou_full[k] = table.grid[j], full[k, j]
        miou_tp[k] = tp[k, j] if np.isfinite(tp[k, j]) else 0.0
    scored = miou_full[positives > 0]
    return {
        "thresholds": thresholds,
        "miou_full": miou_full,
        "miou_tp": miou_tp,
        "positives": positives,
        "score": float(scored.mean()) if scored.size else -1.0,
    }
