"""The phantom's expert annotator: hand-drawn masks that disagree with the exact ones as radiologists do.

Real expert masks are far from exact: a second group of radiologists scores a per-pathology mIoU of 0.12 to 0.71
against CheXlocalize's ground truth (:data:`HUMAN_MIOU`, method.md). The phantom's masks are exact, which would
flatter full supervision; so ``chexseg synth`` also writes what an annotator would have drawn for the expert-annotated
splits (``expert_annotations_<split>.json`` as polygons, ``expert_segmentations_<split>.json`` as RLEs), from the
exact masks and a random generator of its own (the exact files are unchanged).

The annotator, per pathology and per connected component of the exact mask (``r = sqrt(area / pi)``):

1. **Misses** the finding with probability ``MISS_BASE + (1 - MISS_BASE) * MISS_SMALL * exp(-area_fraction /
   SMALL_FRACTION)``: small or faint findings are sometimes missed (a missed finding is an empty expert mask).
2. **Traces** the outline with few vertices: the border resampled evenly by arc length to
   ``clip(perimeter / (VERTEX_SPACING * r), MIN_VERTICES, MAX_VERTICES)`` points.
3. **Misplaces** it, each scaled by the pathology's disagreement strength ``s`` (:data:`STRENGTH`): a boundary shift
   of the whole outline (normal, ``SHIFT * s * r`` per axis), a dilation or erosion about its centroid (scale
   ``exp(N(DILATE_BIAS * s, DILATE_SD * s))``: annotators tend to draw generously), and hand-like wobble of the
   vertices (normal ``WOBBLE * s * r``, smoothed along the outline like a stroke).
4. Rasterises the polygons the CheXlocalize way (:func:`~chexseg_dist.data.chexlocalize.polygons_to_mask`).

Calibration (once, before any student was trained): ``python benchmarks/calibrate_annotator.py`` generates a
calibration set (its own seed, never an experiment seed), and bisects each pathology's ``s`` until the annotator's
true-positive-only mIoU against the exact masks matches :data:`HUMAN_MIOU`; it prints the achieved table (kept in
docs/results.md) and the constants below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.data.chexlocalize import mask_to_polygons, polygons_to_mask

Polygon = list[list[float]]

#: CheXlocalize's human benchmark: a second radiologist group's mIoU against the ground truth (method.md).
HUMAN_MIOU: dict[str, float] = {
    "Airspace Opacity": 0.232,
    "Atelectasis": 0.122,
    "Cardiomegaly": 0.712,
    "Consolidation": 0.148,
    "Edema": 0.307,
    "Enlarged Cardiomediastinum": 0.564,
    "Lung Lesion": 0.424,
    "Pleural Effusion": 0.213,
    "Pneumothorax": 0.393,
    "Support Devices": 0.438,
}

#: Per-pathology disagreement strength, calibrated to :data:`HUMAN_MIOU` (see the module docstring).
#: Measured by ``python benchmarks/calibrate_annotator.py --n 1000`` (1000 calibration images, seed 7919, 256 px).
STRENGTH: dict[str, float] = {
    "Enlarged Cardiomediastinum": 0.661,
    "Cardiomegaly": 0.42,
    "Lung Lesion": 1.124,
    "Airspace Opacity": 1.695,
    "Edema": 1.357,
    "Consolidation": 2.228,
    "Atelectasis": 2.732,
    "Pneumothorax": 0.602,
    "Pleural Effusion": 1.91,
    "Support Devices": 0.051,
}

MISS_BASE = 0.03
MISS_SMALL = 0.5
SMALL_FRACTION = 0.002
VERTEX_SPACING = 0.6
MIN_VERTICES, MAX_VERTICES = 5, 24
SHIFT = 0.35
DILATE_BIAS = 0.1
DILATE_SD = 0.3
WOBBLE = 0.2
WOBBLE_SMOOTH = 2


def _resample(border: np.ndarray, n: int) -> np.ndarray:
    """``n`` points evenly spaced by arc length along a closed outline ``[m, 2]``."""
    closed = np.vstack([border, border[:1]])
    seg = np.hypot(*np.diff(closed, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    if cum[-1] <= 0:
        return border[:1].astype(np.float64)
    at = np.linspace(0.0, cum[-1], n, endpoint=False)
    return np.stack([np.interp(at, cum, closed[:, k]) for k in range(2)], axis=1)


def draw_component(rng: np.random.Generator, component: np.ndarray, strength: float) -> Polygon:
    """The annotator's polygon (``[[x, y], ...]``) for one connected component of an exact mask."""
    border = np.asarray(mask_to_polygons(component)[0], dtype=np.float64)  # [x, y] through pixel centres
    area = float(component.sum())
    r = max(1.0, math.sqrt(area / math.pi))
    perimeter = float(np.hypot(*np.diff(np.vstack([border, border[:1]]), axis=0).T).sum()) if len(border) > 1 else 0.0
    n = int(np.clip(round(perimeter / (VERTEX_SPACING * r)), MIN_VERTICES, MAX_VERTICES))
    pts = _resample(border, n) if len(border) > 2 else border
    centre = pts.mean(axis=0)
    scale = math.exp(rng.normal(DILATE_BIAS * strength, DILATE_SD * strength))
    shift = rng.normal(0.0, SHIFT * strength * r, size=2)
    wobble = rng.normal(0.0, WOBBLE * strength * r, size=pts.shape)
    if len(pts) > 2 * WOBBLE_SMOOTH:  # a stroke: neighbouring vertices move together
        kernel = np.ones(2 * WOBBLE_SMOOTH + 1) / (2 * WOBBLE_SMOOTH + 1)
        wobble = np.stack(
            [np.convolve(np.tile(wobble[:, k], 3), kernel, mode="same")[len(pts) : 2 * len(pts)] for k in range(2)],
            axis=1,
        ) * math.sqrt(2 * WOBBLE_SMOOTH + 1)  # keep the per-vertex spread after averaging
    drawn = centre + (pts - centre) * scale + shift + wobble
    return [[round(float(x), 1), round(float(y), 1)] for x, y in drawn]


def miss_probability(area_fraction: float) -> float:
    """Probability that the annotator misses a finding covering ``area_fraction`` of the image."""
    return MISS_BASE + (1.0 - MISS_BASE) * MISS_SMALL * math.exp(-area_fraction / SMALL_FRACTION)


def annotate_mask(rng: np.random.Generator, mask: np.ndarray, strength: float) -> list[Polygon]:
    """The annotator's polygons for one exact mask ``[h, w]`` (empty when every finding is missed)."""
    labels, _ = ndimage.label(mask != 0, structure=np.ones((3, 3), dtype=bool))
    h, w = mask.shape
    polygons: list[Polygon] = []
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        component = np.zeros((h, w), dtype=np.uint8)
        component[sl] = labels[sl] == index
        area_fraction = float(component.sum()) / (h * w)
        # Every draw happens whether or not the finding is missed: the generator stays in step across strengths.
        missed = rng.random() < miss_probability(area_fraction)
        poly = draw_component(rng, component, strength)
        if not missed:
            polygons.append(poly)
    return polygons


def annotate(
    rng: np.random.Generator, masks: Mapping[str, np.ndarray], strength: Mapping[str, float] | None = None
) -> dict[str, list[Polygon]]:
    """The annotator's polygons for every pathology with a non-empty exact mask (TASKS order)."""
    s = STRENGTH if strength is None else strength
    out: dict[str, list[Polygon]] = {}
    for task in TASKS:
        # One child generator per pathology: calibrating one pathology's strength leaves the others' draws alone.
        child = np.random.default_rng(rng.integers(0, 2**63))
        mask = masks.get(task)
        if mask is not None and mask.any():
            polys = annotate_mask(child, mask, s[task])
            if polys:
                out[task] = polys
    return out


def rasterise(polygons: Mapping[str, list[Polygon]], height: int, width: int) -> dict[str, np.ndarray]:
    """The annotator's masks ``{task: [h, w] uint8}`` for all 10 pathologies (empty where nothing was drawn)."""
    return {task: polygons_to_mask(polygons.get(task, []), height, width) for task in TASKS}
