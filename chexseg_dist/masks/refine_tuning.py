"""Tuning the affinity refiner's foreground fraction per pathology on expert masks (``chexseg tune-thresholds`` with
``masks.refiner=affinity``).

For every expert-annotated image: the gated-in maps are walked over the network's boundaries in the model frame
(:meth:`~chexseg_dist.masks.refine.AffinityRefiner.walk`: each walked map divided by its maximum), mapped back to the
original size (nearest, as refined masks are), and for every fraction ``f = k / steps`` the masks ``walked > f`` are
scored against the expert masks with the threshold tuner's one-pass counts and mIoU convention
(:class:`~chexseg_dist.masks.tuning.TuningTable`, ``masks.tune_mode``). Per pathology the fraction with the highest
mIoU is chosen among ``0 < f < 1`` (ties: the smallest); a pathology without an expert positive keeps
``masks.fg_fraction``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from chexseg_dist.config import MasksConfig
from chexseg_dist.core.pathologies import N_TASKS, TASKS
from chexseg_dist.errors import InputError
from chexseg_dist.masks.maps import content_window, normalise_maps, upsample_maps
from chexseg_dist.masks.tuning import TuningTable, binned_histogram, gated_keep
from chexseg_dist.metrics.sweep import threshold_grid


def tune_fg_fractions(
    store_uri: str,
    gt_path: str,
    images: str,
    cfg: MasksConfig,
    manifest: str | None = None,
    label_gating: bool = False,
    steps: int = 20,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``([10] fractions, details)`` chosen on the expert masks of ``gt_path`` (module docstring).

    Args:
        store_uri: the map store of the expert-annotated images.
        gt_path: their expert segmentation JSON (all 10 pathologies per image).
        images: a manifest with their image paths.
        cfg: the ``masks`` section (``refiner=affinity``, its checkpoint and walk; ``tune_mode``).
        manifest: labels for ``label_gating``.
        label_gating: walk only the maps of positive labels (as the student's masks are made).
        steps: fractions ``k / steps``.
    """
    from chexseg_dist.data.chexlocalize import decode_mask, read_segmentations
    from chexseg_dist.masks.export import image_paths, refine_frame
    from chexseg_dist.masks.refine import AffinityRefiner
    from chexseg_dist.store.mapstore import MapStore

    refiner = AffinityRefiner.from_config(cfg)
    gt = read_segmentations(gt_path)
    ids = sorted(gt)
    store = MapStore.open(store_uri)
    batch = store.read(store.index_of(ids, wanted_by=f"--gt {gt_path}"))
    paths = image_paths(images, np.asarray(ids))
    keep = gated_keep(manifest, ids) if label_gating and manifest else np.ones((len(ids), N_TASKS), dtype=bool)
    grid = threshold_grid(steps)
    n = len(ids)
    gt_area = np.zeros((n, N_TASKS), dtype=np.int64)
    inter = np.zeros((n, N_TASKS, steps + 1), dtype=np.int64)
    pred = np.zeros((n, N_TASKS, steps + 1), dtype=np.int64)
    for i, image_id in enumerate(ids):
        box = batch.letterboxes[i]
        if box is None:
            raise InputError(f"map store {store_uri}: no maps yet for {image_id}; run chexseg pseudolabel first")
        refiner.check_frame(box.size)
        todo = np.flatnonzero(keep[i])
        rles = [gt[image_id][t] for t in TASKS]
        gt_area[i] = [int(decode_mask(r, image_id=image_id, pathology=t).sum()) for r, t in zip(rles, TASKS)]
        if todo.size == 0:
            continue
        rows, cols = content_window(box, "model")
        frame = refine_frame(paths[i], box)
        norm = normalise_maps(upsample_maps(batch.cams[i][todo], box, "model")[:, rows, cols])
        walked = refiner.walk(frame[rows, cols].astype(np.float32), norm)
        model = np.zeros((len(todo), box.size, box.size), dtype=np.float32)
        model[:, rows, cols] = walked
        original = box.frame_to_original(model, mode="nearest")
        for p, k in enumerate(todo.tolist()):
            if gt_area[i, k] == 0:
                above = original[p].max() > grid  # only whether the mask is empty matters here
                pred[i, k] = above.astype(np.int64)
                continue
            mask = decode_mask(rles[k], image_id=image_id, pathology=TASKS[k])
            hist = binned_histogram(original[p], np.float32(0.0), np.float32(1.0), mask, steps)
            cum = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
            inter[i, k] = cum[1, 1:]
            pred[i, k] = cum[0, 1:] + cum[1, 1:]
    table = TuningTable(ids, gt_area, inter, pred, np.full((n, N_TASKS), np.nan), grid)
    curve, n_pairs = table.miou_curve(cfg.tune_mode)
    fractions = np.full(N_TASKS, cfg.fg_fraction)
    details: dict[str, Any] = {}
    inner = slice(1, steps)  # 0 < f < 1
    for k, task in enumerate(TASKS):
        info: dict[str, Any] = {"n_positive": int((gt_area[:, k] > 0).sum()), "tuned": False}
        values = curve[k, inner]
        if info["n_positive"] and np.isfinite(values).any():
            j = int(np.nanargmax(values)) + 1
            fractions[k] = grid[j]
            info.update(tuned=True, miou=float(curve[k, j]), n=int(n_pairs[k, j]))
        details[task] = info
    return fractions, details
