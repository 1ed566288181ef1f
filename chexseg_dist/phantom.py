"""Phantom chest radiographs with exact masks, written as a CheXpert / CheXlocalize tree.

No real radiograph can be obtained where this project is tested, so every test, the demo and the experiments run on
these phantoms. They are built to behave like the real problem: a classifier must learn lung fields, the cardiac
silhouette and faint focal findings from image-level labels with CheXpert-like prevalence, co-occurrence, uncertain
and blank labels; subtle instances sit at noise-level contrast, so it is neither trivial nor hopeless.

Visual model. Everything is laid out in a patient frame ``(u, v)``: ``u`` runs across the thorax from -1 (image
left = patient right, as radiographs are displayed) to +1, ``v`` from 0 at the lung apices to 1 at the
costophrenic angles; an affine (shift, scale, rotation of a few degrees) maps it to pixels. The pixel value is a
sum of densities: air outside the body; soft tissue (torso, shoulders, arms, breasts); two hemithoraces whose air
darkens the image, minus the cardiomediastinal silhouette (mediastinum, aortic knob, heart; trachea as an air
column); ribs (posterior arcs with bright cortex, fainter anterior ribs), clavicles, spine with vertebral
banding, humeral heads; hilar vessels branching into lung markings and a fine parenchymal texture; a gastric
bubble under the left dome; then exposure (heel effect, window, gamma), quantum noise, and an R/L marker. Findings
change those densities and their masks are the pixels they change:

- Enlarged Cardiomediastinum: a widened upper mediastinum (half width from 0.13 to 0.25 of the hemithorax, normal
  0.09-0.16, so mild cases overlap); mask = mediastinum + heart (the expert masks include the heart, so it contains
  the Cardiomegaly mask). Cardiomegaly: cardiothoracic ratio from 0.48 to 0.68 (normal 0.37-0.52; AP views
  magnify the heart by 3-12%, as portable films do). Mask = heart.
- Lung Lesion: 1-3 round, slightly lobulated nodules or masses. Airspace Opacity: patchy, textured opacities
  (pneumonia-like), one or two clusters; its mask is the union of those patches and the Edema, Consolidation and
  Atelectasis opacities (CheXlocalize's Airspace Opacity covers any airspace opacity; CheXpert's Lung Opacity
  label is positive whenever one of them is), never lesions or effusions.
- Edema: bilateral perihilar ("bat-wing") haze with interstitial texture and blurred vessels. Consolidation:
  a dense region bounded by a lobe (fissures give sharp edges), sometimes with air bronchograms. Atelectasis:
  a plate-like band or a basal band along the diaphragm. Pneumothorax: an apical/lateral crescent of pure air
  without lung markings and a thin bright visceral pleural line. Pleural Effusion: dependent fluid with a
  lateral meniscus that blunts the costophrenic angle and hides the dome (or, on AP views, a layering veil).
- Support Devices: endotracheal tube, enteric tube, central lines (jugular, subclavian, PICC), pacemaker box and
  leads, ECG electrodes and wires, chest tubes; masks are the drawn strokes.
- Fracture draws a rib discontinuity and Pleural Other a thin lateral pleural thickening (label-only tasks, weak
  image evidence); Pneumonia is label-only and co-occurs with consolidation and patchy opacity.

Difficulty (seed 0, size 256): the 4-stage TinyCNN at 128 px, trained 25 epochs on 2000 train images with U-ones
labels and blanks as negatives, reaches test AUROC 0.89-0.97 on the localised observations except Lung Lesion
(~0.6 at 4% prevalence); after 10 epochs the mean is about 0.08 lower. Pneumonia and Fracture stay near 0.7.

Labels come from a small latent model (normal study, ICU/portable, heart failure, infection) tuned to CheXpert's
train prevalences. In train, negatives are mostly blank (not mentioned) or sometimes 0.0, and uncertain (-1.0)
labels mark a mix of faint present findings and absent ones; a 1.0 always has a drawn, non-empty mask. Valid and
test labels are certain (0/1), as in the expert-annotated CheXpert validation set.

Files: all splits are JPEG (CheXpert's release is JPEG, and the classifier must see the same compression in
training and evaluation; the masks are exact whatever the encoding). A few train frontals are 16-bit PNGs
(12-bit values, like DICOM exports) and a few are RGB JPEGs, so odd decoding paths are exercised. Polygons in
``gt_annotations_*.json`` are traced from the masks (:func:`chexseg_dist.annotations.mask_to_polygons`), one set
per drawn object, so rasterising them gives the segmentation masks exactly.

Determinism: each study draws from ``SeedSequence(seed, spawn_key=(split, kind, index))``, so output is byte-identical
for the same seed and config, whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
from collections.abc import Generator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from chexseg_dist import fsio
from chexseg_dist.annotations import encode_mask, image_id_from_path, mask_to_polygons
from chexseg_dist.config import SynthConfig
from chexseg_dist.pathologies import CSV_HEADER, OBSERVATIONS, TASKS, observation_for_task

GENERATOR_VERSION = "phantom-1.0"
#: The dataset folder that leads every CSV path, as in the real small release.
DATASET_DIR = "CheXpert-v1.0-small"
SPLITS: tuple[str, ...] = ("train", "valid", "test")
_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}
# CheXpert numbers valid patients from 64541 and CheXlocalize's test patients from 64741.
_VALID_FIRST_PATIENT = 64541
_CHEXPERT_VALID_PATIENTS = 200

# Seed-key kinds under a split.
_KEY_LAYOUT, _KEY_STUDY, _KEY_PATIENT, _KEY_LATERAL = 0, 1, 2, 3

# Findings that are drawn, keyed by CheXpert observation; "_patchy" is Airspace Opacity's own patches.
_PATCHY = "_patchy"
_LOCALISED_OBS = {observation_for_task(t): t for t in TASKS}
_MIN_COMPONENT_PIXELS = 4

Array = np.ndarray


# ====================================================================================================== labels
@dataclass
class Study:
    """What one study shows: drawn findings with their conspicuity, the view, and (after rendering) labels.

    Attributes:
        present: finding -> conspicuity in (0, 1] (CheXpert observation names, plus ``"_patchy"``).
        ap: anteroposterior (portable) view, else posteroanterior.
        labels: observation -> CSV cell ("1.0", "0.0", "-1.0" or ""); filled by :func:`_label_cells`.
    """

    present: dict[str, float]
    ap: bool
    labels: dict[str, str] = field(default_factory=dict)


def _conspicuity(rng: np.random.Generator) -> float:
    # Near-uniform on (0, 1): ~16% of instances below 0.2, which are drawn at noise-level contrast.
    return float(np.clip(rng.beta(1.2, 1.1), 0.02, 1.0))


def sample_study(rng: np.random.Generator) -> Study:
    """Draw which findings a study shows from a small latent model tuned to CheXpert's train prevalences.

    Latents: a fully normal study (5%; ~10% of studies end up with nothing drawn), an ICU/portable setting
    (devices, effusions, pneumothorax), heart failure (cardiomegaly, oedema, effusion) and infection
    (consolidation, patchy opacity, pneumonia).
    """
    present: dict[str, float] = {}

    def maybe(name: str, p: float) -> None:
        if rng.random() < p:
            present[name] = _conspicuity(rng)

    if rng.random() < 0.05:
        return Study(present={}, ap=bool(rng.random() < 0.3))
    icu = bool(rng.random() < 0.62)
    chf = bool(rng.random() < (0.36 if icu else 0.16))
    infection = bool(rng.random() < (0.22 if icu else 0.14))
    maybe("Support Devices", 0.84 if icu else 0.2)
    maybe("Cardiomegaly", 0.4 if chf else 0.07)
    maybe("Edema", 0.72 if chf else 0.1)
    maybe("Enlarged Cardiomediastinum", 0.2 if "Cardiomegaly" in present else 0.06)
    maybe("Pleural Effusion", 0.29 + 0.33 * chf + 0.15 * icu)
    maybe("Atelectasis", 0.14 + 0.12 * ("Pleural Effusion" in present))
    maybe("Consolidation", 0.33 if infection else 0.02)
    maybe("Pneumonia", (0.42 if "Consolidation" in present else 0.2) if infection else 0.008)
    maybe(_PATCHY, 0.6 if infection else 0.15)
    maybe("Pneumothorax", 0.15 if icu else 0.065)
    maybe("Lung Lesion", 0.055)
    maybe("Fracture", 0.045 + 0.08 * ("Pneumothorax" in present))
    maybe("Pleural Other", 0.02)
    ap = bool(rng.random() < (0.97 if icu else 0.5))
    return Study(present=present, ap=ap)


# Train-label noise per observation: P(-1.0 | absent), P(0.0 | absent); the rest of the absent cases are blank.
_UNCERTAIN_ABSENT = {
    "Enlarged Cardiomediastinum": 0.025, "Cardiomegaly": 0.015, "Lung Opacity": 0.015, "Lung Lesion": 0.004,
    "Edema": 0.02, "Consolidation": 0.05, "Pneumonia": 0.045, "Atelectasis": 0.06, "Pneumothorax": 0.01,
    "Pleural Effusion": 0.03, "Pleural Other": 0.01, "Fracture": 0.003, "Support Devices": 0.004,
}  # fmt: skip
_ZERO_ABSENT = {
    "Enlarged Cardiomediastinum": 0.1, "Cardiomegaly": 0.05, "Lung Opacity": 0.03, "Lung Lesion": 0.01,
    "Edema": 0.1, "Consolidation": 0.13, "Pneumonia": 0.02, "Atelectasis": 0.01, "Pneumothorax": 0.26,
    "Pleural Effusion": 0.16, "Pleural Other": 0.01, "Fracture": 0.01, "Support Devices": 0.03,
}  # fmt: skip


def _label_cells(rng: np.random.Generator, present: dict[str, float], certain: bool) -> dict[str, str]:
    """CSV cells of the 14 observations from what was actually drawn.

    ``certain`` (valid/test): 1.0 / 0.0 exactly. Otherwise (train) report-like noise: a faint finding is often
    uncertain or unmentioned, an absent one mostly unmentioned, sometimes negated or uncertain. Never 1.0 for an
    absent finding.
    """
    cells: dict[str, str] = {}
    for obs in OBSERVATIONS[1:]:
        c = present.get(obs)
        if certain:
            cells[obs] = "1.0" if c is not None else "0.0"
            continue
        r = rng.random()
        if c is not None:
            if c < 0.35:
                pu = 0.05 if obs == "Support Devices" else 0.45  # devices are seldom reported as uncertain
                cells[obs] = "-1.0" if r < pu else ("" if r < pu + 0.1 else "1.0")
            else:
                cells[obs] = "-1.0" if r < 0.04 else ("" if r < 0.06 else "1.0")
        else:
            pu, pz = _UNCERTAIN_ABSENT[obs], _ZERO_ABSENT[obs]
            cells[obs] = "-1.0" if r < pu else ("0.0" if r < pu + pz else "")
    anything = any(v in ("1.0", "-1.0") for v in cells.values()) or bool(present)
    if certain:
        cells["No Finding"] = "0.0" if present else "1.0"
    else:
        cells["No Finding"] = "" if anything else "1.0"
    return {obs: cells[obs] for obs in OBSERVATIONS}


# ====================================================================================================== geometry
@dataclass(frozen=True)
class Anatomy:
    """Patient-level body habitus, shared by all studies (and views) of one patient."""

    sex: str
    age: int
    lung_height: float  # lung field height / image height
    half_width_ratio: float  # thorax half width / lung height
    apex: float  # lung apex row / image height
    ctr: float  # normal cardiothoracic ratio
    ap_magnification: float  # relative heart enlargement on AP views
    heart_right_share: float  # share of the heart right of the midline
    heart_top: float  # v of the top of the heart
    mediastinum: float  # half width of the upper mediastinum in u units
    aortic_knob: float
    dome: float  # v of the right dome's peak
    dome_drop: float  # the left dome sits this much lower
    body_fat: float
    breasts: float
    rib_phase: float
    rib_spacing: float
    jitter: tuple[float, ...]  # lung outline control-point jitter


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a patient's body habitus (sizes in image fractions and patient-frame units)."""
    sex = "Female" if rng.random() < 0.43 else "Male"
    return Anatomy(
        sex=sex,
        age=int(np.clip(round(rng.normal(61, 17)), 18, 90)),
        lung_height=float(rng.uniform(0.58, 0.7)),
        half_width_ratio=float(rng.uniform(0.55, 0.68)),
        apex=float(rng.uniform(0.09, 0.17)),
        ctr=float(rng.uniform(0.37, 0.52)),
        ap_magnification=float(rng.uniform(0.03, 0.12)),
        heart_right_share=float(rng.uniform(0.26, 0.36)),
        heart_top=float(rng.uniform(0.4, 0.48)),
        mediastinum=float(rng.uniform(0.09, 0.16)),
        aortic_knob=float(rng.uniform(0.04, 0.09)),
        dome=float(rng.uniform(0.78, 0.86)),
        dome_drop=float(rng.uniform(0.0, 0.06)),
        body_fat=float(rng.uniform(0.0, 0.14)),
        breasts=float(rng.uniform(0.5, 1.0)) if sex == "Female" else 0.0,
        rib_phase=float(rng.uniform(-0.06, 0.01)),
        rib_spacing=float(rng.uniform(0.088, 0.1)),
        jitter=tuple(float(x) for x in rng.normal(0.0, 0.012, 64)),
    )


class _Frame:
    """The affine from the patient frame (u, v) to pixels, with per-pixel (U, V) grids and raster helpers."""

    def __init__(self, height: int, width: int, cx: float, cy: float, hw: float, lh: float, theta: float) -> None:
        self.h, self.w, self.cx, self.cy, self.hw, self.lh = height, width, cx, cy, hw, lh
        self.c, self.s = math.cos(theta), math.sin(theta)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        dx, dy = xx - np.float32(cx), yy - np.float32(cy)
        self.U = (dx * np.float32(self.c) + dy * np.float32(self.s)) / np.float32(hw)
        self.V = (-dx * np.float32(self.s) + dy * np.float32(self.c)) / np.float32(lh) + np.float32(0.5)
        #: Pixels per unit of a 256-pixel image's thorax: scales strokes and blurs with the image size.
        self.px_scale = hw / 95.0

    def px(self, uv: Array) -> Array:
        """``[N, 2]`` (u, v) -> ``[N, 2]`` (x, y) pixel coordinates (pixel centres at integers)."""
        lx, ly = uv[:, 0] * self.hw, (uv[:, 1] - 0.5) * self.lh
        return np.stack([self.cx + lx * self.c - ly * self.s, self.cy + lx * self.s + ly * self.c], axis=1)

    def canvas(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        img = Image.new("L", (self.w, self.h))
        return img, ImageDraw.Draw(img)

    def polygon(self, uv: Array) -> Array:
        """Rasterised filled polygon (outline included), bool ``[h, w]``."""
        img, draw = self.canvas()
        draw.polygon(self.px(uv).ravel().tolist(), fill=1, outline=1)
        return np.asarray(img, dtype=bool)

    def polygon_px(self, xy: Array) -> Array:
        img, draw = self.canvas()
        draw.polygon(xy.ravel().tolist(), fill=1, outline=1)
        return np.asarray(img, dtype=bool)

    def stroke_width(self, width_u: float) -> int:
        return max(1, round(width_u * self.hw))


def _blur(a: Array, sigma: float) -> Array:
    return ndimage.gaussian_filter(a.astype(np.float32), max(sigma, 0.3), truncate=3.0, mode="nearest")


def _smoothstep(x: Array, lo: float, hi: float) -> Array:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _chaikin(pts: Array, corners: Array, iterations: int = 3) -> Array:
    """Corner-cutting smoothing of a closed polygon that keeps the vertices flagged in ``corners`` sharp."""
    for _ in range(iterations):
        prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        left = np.where(corners[:, None], pts, 0.25 * prev + 0.75 * pts)
        right = np.where(corners[:, None], pts, 0.75 * pts + 0.25 * nxt)
        pts = np.stack([left, right], axis=1).reshape(-1, 2)
        corners = np.repeat(corners, 2)
    return pts


def _spline(ctrl: Sequence[tuple[float, float]], n: int = 40) -> Array:
    """Uniform Catmull-Rom curve through the control points (open), ``[M, 2]``."""
    p = np.asarray(ctrl, dtype=np.float64)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = np.linspace(0.0, 1.0, max(2, n // (len(p) - 3)), endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(
            0.5
            * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        )
    out.append(p[-2][None])
    return np.vstack(out)


def _fractal_noise(rng: np.random.Generator, h: int, w: int, cells: Sequence[int], gains: Sequence[float]) -> Array:
    """Smooth noise with roughly unit standard deviation: bicubic-upsampled random grids summed over octaves."""
    out = np.zeros((h, w), dtype=np.float32)
    for n, g in zip(cells, gains):
        gh, gw = max(2, round(n * h / max(h, w))), max(2, round(n * w / max(h, w)))
        small = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32))
        out += g * np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return out / np.float32(math.sqrt(sum(g * g for g in gains)))


def _image_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    long_side = size * rng.uniform(0.75, 1.25)
    ratio = rng.uniform(0.8, 1.25)  # height / width
    if ratio >= 1:
        return round(long_side), round(long_side / ratio)
    return round(long_side * ratio), round(long_side)


def _lung_outline(anat: Anatomy, side: int) -> Array:
    """Hemithorax outline ``[N, 2]`` in (u, v); side -1 = image left (patient right), +1 = image right.

    Control points follow the apex, the lateral wall, the sharp costophrenic angle, the diaphragm dome and the
    mediastinal border, jittered per patient, then smoothed with the two angles kept sharp.
    """
    d = anat.dome + (anat.dome_drop if side > 0 else 0.0)
    medial = 0.07 if side < 0 else 0.05
    ctrl = [
        (0.36, 0.0, 0), (0.53, 0.05, 0), (0.69, 0.17, 0), (0.83, 0.34, 0), (0.92, 0.56, 0), (0.965, 0.8, 0),
        (0.98, 1.0, 1), (0.87, d + 0.1, 0), (0.7, d + 0.025, 0), (0.52, d, 0), (0.34, d + 0.015, 0),
        (0.2, d + 0.06, 0), (medial + 0.02, d + 0.11, 1), (medial, 0.64, 0), (medial + 0.02, 0.42, 0),
        (0.11, 0.22, 0), (0.16, 0.07, 0), (0.26, 0.012, 0),
    ]  # fmt: skip
    j = (
        np.asarray(anat.jitter[: 2 * len(ctrl)]).reshape(-1, 2)
        if side < 0
        else np.asarray(anat.jitter[-2 * len(ctrl) :]).reshape(-1, 2)
    )
    pts = np.array([[side * (u + j[i, 0]), v + j[i, 1]] for i, (u, v, _) in enumerate(ctrl)])
    corners = np.array([c == 1 for _, _, c in ctrl])
    return _chaikin(pts, corners, 3)


def _ellipse(
    cu: float, cv: float, ru: float, rv: float, n: int = 32, angle: float = 0.0, wobble: Array | None = None
) -> Array:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 1.0 + (wobble if wobble is not None else 0.0)
    x, y = ru * r * np.cos(t), rv * r * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cu + x * ca - y * sa, cv + x * sa + y * ca], axis=1)


def _wobble(rng: np.random.Generator, n: int, amount: float) -> Array:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    out = np.zeros(n)
    for k in range(2, 6):
        out += rng.uniform(0, amount) / (k - 1) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    return out


def _random_pixel(rng: np.random.Generator, region: Array) -> tuple[int, int] | None:
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return None
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


def _blob_px(rng: np.random.Generator, f: _Frame, y: float, x: float, r_px: float, wobble: float = 0.15) -> Array:
    n = 28
    return f.polygon_px(
        _ellipse(x, y, r_px, r_px * rng.uniform(0.75, 1.0), n, rng.uniform(0, np.pi), _wobble(rng, n, wobble))
    )


# ====================================================================================================== rendering
@dataclass
class _Scene:
    """Accumulators while drawing one frontal radiograph."""

    f: _Frame
    opacity: list[Array] = field(default_factory=list)  # fields in [0, 1] that replace lung air
    add: list[Array] = field(default_factory=list)  # additive density (pleural lines, devices...)
    masks: dict[str, list[Array]] = field(default_factory=dict)  # task -> components
    no_markings: Array | None = None  # pneumothorax: no vessels or texture
    extra_air: Array | None = None
    bronchograms: Array | None = None
    vessel_blur: Array | None = None

    def mask(self, task: str, comp: Array) -> None:
        self.masks.setdefault(task, []).append(comp)


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def _render_frontal(
    rng: np.random.Generator, anat: Anatomy, study: Study, size: int, k: float
) -> tuple[Array, dict[str, list[Array]]]:
    """Draw one frontal radiograph.

    Args:
        rng: the study's generator. anat: the patient. study: findings (drawn ones may be dropped if their mask
            came out empty). size: typical long side. k: global conspicuity multiplier.

    Returns:
        ``(image, masks)``: image ``[h, w]`` float32 in [0, 1]; masks: task -> list of bool ``[h, w]`` components.
    """
    # Independent streams for anatomy/pose, findings and exposure/noise: the same study with or without a finding
    # differs only where the finding is drawn (what the tests and counterfactual analyses rely on).
    rng, rng_find, rng_expo = rng.spawn(3)
    h, w = _image_shape(rng, size)
    present = study.present
    lh = anat.lung_height * h * (0.95 if study.ap else 1.0)
    hw = lh * anat.half_width_ratio
    if hw > 0.45 * w:  # a narrow image: shrink the whole thorax, keeping its proportions
        hw = 0.45 * w
        lh = hw / anat.half_width_ratio
    top = (anat.apex + rng.normal(0, 0.015)) * h
    top = float(np.clip(top, 0.05 * h, 0.93 * h - lh))
    f = _Frame(
        h, w, w / 2 + rng.normal(0, 0.025) * w, top + lh / 2, hw, lh, float(np.clip(rng.normal(0, 0.03), -0.08, 0.08))
    )
    sc = _Scene(f)
    U, V = f.U, f.V
    s1 = f.px_scale

    # ---------------------------------------------------------------- anatomy shapes
    fat = anat.body_fat
    half = [(0.2, -3.0), (0.23, -0.6), (0.42, -0.36), (0.82, -0.27), (1.12, -0.15), (1.2 + fat, 0.05),
            (1.16 + fat, 0.4), (1.12 + fat, 0.9), (1.16 + fat, 1.5), (1.2 + fat, 3.5)]  # fmt: skip
    body_uv = np.array([(-u, v) for u, v in half] + [(u, v) for u, v in reversed(half)])
    body = f.polygon(_chaikin(body_uv, np.zeros(len(body_uv), bool), 2))
    arm_gap = rng.uniform(0.05, 0.7)
    for side in (-1, 1):
        x0 = 1.2 + fat + arm_gap
        arm = np.array([(side * x0, 3.5), (side * x0, 0.3), (side * (x0 + 0.05), -0.15), (side * (x0 + 0.3), -0.25),
                        (side * (x0 + 0.6), -0.1), (side * (x0 + 0.6), 3.5)])  # fmt: skip
        body |= f.polygon(_chaikin(arm, np.zeros(len(arm), bool), 2))
    body_s = _blur(body, 1.5 * s1)

    lung_uv = {side: _lung_outline(anat, side) for side in (-1, 1)}
    hemi = {side: f.polygon(lung_uv[side]) for side in (-1, 1)}
    hemi_all = hemi[-1] | hemi[1]

    ctr = anat.ctr
    if "Cardiomegaly" in present:
        ctr = anat.ctr + (0.48 - anat.ctr + _lerp(0.0, 0.2, present["Cardiomegaly"])) * k
    if study.ap:  # the portable AP view magnifies the heart
        ctr *= 1.0 + anat.ap_magnification
    heart_w = ctr * 2 * 0.97
    right = anat.heart_right_share * heart_w
    dome_l = anat.dome + anat.dome_drop
    bottom = dome_l + 0.12
    left, top = heart_w - right, anat.heart_top
    span = bottom - top
    heart_ctrl = np.array([
        (-0.7 * right, top + 0.08 * span), (-0.97 * right, top + 0.3 * span), (-right, top + 0.62 * span),
        (-0.8 * right, top + 0.95 * span), (0.2 * left, bottom + 0.03), (0.8 * left, bottom - 0.01),
        (left, top + 0.8 * span), (0.93 * left, top + 0.5 * span), (0.62 * left, top + 0.2 * span),
        (0.3 * left, top), (0.0, top - 0.02),
    ])  # fmt: skip
    heart_ctrl += rng.normal(0, 0.012, heart_ctrl.shape)
    hu = _chaikin(heart_ctrl, np.zeros(len(heart_ctrl), bool), 3)
    hu[:, 1] = np.minimum(hu[:, 1], bottom)
    heart = f.polygon(hu)

    mw = anat.mediastinum
    if "Enlarged Cardiomediastinum" in present:
        mw = anat.mediastinum + (0.13 - anat.mediastinum + _lerp(0.0, 0.12, present["Enlarged Cardiomediastinum"])) * k
    kn = anat.aortic_knob
    med_uv = np.array([
        (-0.9 * mw, -3.0), (-mw, -0.15), (-1.1 * mw, 0.22), (-max(1.1 * mw, 0.7 * right), anat.heart_top + 0.08),
        (0.3 * heart_w, anat.heart_top + 0.04), (mw + 0.6 * kn, 0.3), (mw + kn, 0.2), (mw + 0.5 * kn, 0.12),
        (0.9 * mw, -0.1), (0.8 * mw, -3.0),
    ])  # fmt: skip
    med = f.polygon(_chaikin(med_uv, np.zeros(len(med_uv), bool), 2)) & (V > -0.06)  # from the thoracic inlet
    cm = med | heart
    cm_s = _blur(cm, 0.9 * s1)
    lung_vis = hemi_all & ~cm
    side_vis = {side: hemi[side] & ~cm for side in (-1, 1)}
    hemi_s = _blur(hemi_all, 1.1 * s1)
    lung_s = hemi_s * (1.0 - cm_s)

    if "Enlarged Cardiomediastinum" in present:
        sc.mask("Enlarged Cardiomediastinum", cm.copy())
    if "Cardiomegaly" in present:
        sc.mask("Cardiomegaly", heart.copy())

    # ---------------------------------------------------------------- findings
    noise_tex = _fractal_noise(rng, h, w, (6, 14, 30, 60), (1.0, 0.7, 0.5, 0.4))
    tex01 = np.clip(0.5 + 0.25 * noise_tex, 0.0, 1.0)
    if "Lung Lesion" in present:
        _draw_lesions(rng_find, sc, lung_vis, present["Lung Lesion"], k)
    if _PATCHY in present:
        _draw_patchy(rng_find, sc, lung_vis, tex01, present[_PATCHY], k)
    if "Edema" in present:
        _draw_edema(rng_find, sc, lung_vis, tex01, present["Edema"], k)
    if "Consolidation" in present:
        _draw_consolidation(rng_find, sc, side_vis, tex01, present["Consolidation"], k)
    if "Atelectasis" in present:
        _draw_atelectasis(rng_find, sc, side_vis, present["Atelectasis"], k)
    if "Pneumothorax" in present:
        _draw_pneumothorax(rng_find, sc, lung_uv, hemi, cm, present["Pneumothorax"], k)
    if "Pleural Effusion" in present:
        _draw_effusion(rng_find, sc, hemi, cm, study.ap, present["Pleural Effusion"], k)
    if "Pleural Other" in present:
        side = int(rng_find.choice([-1, 1]))
        band = (
            hemi[side]
            & ~ndimage.binary_erosion(hemi[side], iterations=max(1, round(2.5 * s1)))
            & (V > 0.2)
            & (V < 0.75)
        )
        band &= np.abs(U) > 0.5
        sc.opacity.append(_blur(band, 0.8 * s1) * _lerp(0.25, 0.7, present["Pleural Other"]) * min(k, 1.4))
    if "Support Devices" in present:
        _draw_devices(rng_find, sc, study, present["Support Devices"], k, dome_l)

    # ---------------------------------------------------------------- composition
    opacity = np.zeros((h, w), np.float32)
    for o in sc.opacity:
        opacity = 1.0 - (1.0 - opacity) * (1.0 - np.clip(o, 0.0, 1.0))
    air = lung_s * (1.0 - opacity)
    if sc.extra_air is not None:
        air = air * (1.0 + 0.22 * sc.extra_air)
    markings = 1.0 - (sc.no_markings if sc.no_markings is not None else 0.0)

    d = np.full((h, w), 0.05, np.float32)
    d += 0.5 * body_s
    # Below the domes the beam crosses the whole abdomen: about as dense as the heart, so the heart merges into it.
    d += 0.13 * _blur(body & ~hemi_all & ~heart & (V > 0.72), 3.0 * s1) * _smoothstep(1.12 - np.abs(U), 0.0, 0.2)
    if anat.breasts > 0:
        for side in (-1, 1):
            br = _blur(f.polygon(_ellipse(side * 0.68, 1.02, 0.42, 0.27, 24)), 4 * s1)
            d += 0.07 * anat.breasts * br * body_s
    d += 0.15 * cm_s
    d -= 0.36 * air
    # Lungs are a little denser at the bases and near the hila (more tissue in the beam).
    d += 0.05 * lung_s * _smoothstep(V, 0.55, 1.05) + 0.035 * lung_s * (1 - _smoothstep(np.abs(U), 0.2, 0.6))
    d += (0.032 * noise_tex) * air * markings

    # Trachea and main bronchi: an air column through the mediastinum.
    trachea = f.polygon(np.array([(-0.035, -3.0), (-0.04, 0.28), (-0.2, 0.38), (-0.17, 0.42), (0.0, 0.33),
                                  (0.17, 0.39), (0.19, 0.35), (0.04, 0.27), (0.035, -3.0)]))  # fmt: skip
    d -= 0.08 * _blur(trachea, 1.2 * s1) * body_s

    # Gastric bubble under the left dome.
    if rng.random() < 0.6:
        bubble = f.polygon(
            _ellipse(rng.uniform(0.3, 0.55), dome_l + rng.uniform(0.1, 0.16), rng.uniform(0.08, 0.15), 0.06, 24)
        )
        d -= 0.18 * _blur(bubble & ~hemi_all, 1.5 * s1)

    # Vessels: trees from the hila, hidden where the lung has collapsed (pneumothorax) or by dense opacity.
    vessels = _vessel_tree(rng, f)
    vblur = _blur(vessels, 0.7 * s1)
    if sc.vessel_blur is not None:
        vblur = vblur * (1 - sc.vessel_blur) + _blur(vessels, 1.6 * s1) * sc.vessel_blur
    d += 0.11 * vblur * lung_s * markings * (1.0 - 0.7 * opacity)
    if sc.bronchograms is not None:
        d -= 0.12 * vblur * sc.bronchograms
    hila = f.polygon(_ellipse(-0.21, 0.42, 0.07, 0.1, 20)) | f.polygon(_ellipse(0.2, 0.39, 0.06, 0.09, 20))
    d += 0.06 * _blur(hila, 2.5 * s1) * lung_s

    # Bones.
    broken = None
    if "Fracture" in present:
        broken = (int(rng_find.integers(3, 8)), int(rng_find.choice([-1, 1])), float(rng_find.uniform(0.45, 0.85)))
    d += _bones(rng, f, broken, present.get("Fracture", 0.0)) * body_s * (1.0 - 0.6 * cm_s)
    for o in sc.add:
        d += o

    # Marker letter in an upper corner, outside the body.
    if rng_expo.random() < 0.6:
        d = np.maximum(d, 0.9 * _marker(rng_expo, h, w))

    # ---------------------------------------------------------------- exposure and noise
    xx = np.arange(w, dtype=np.float32)[None, :] / w - 0.5
    d += np.float32(rng_expo.uniform(-0.04, 0.04)) * xx
    d += 0.012 * _fractal_noise(rng_expo, h, w, (3, 6), (1.0, 0.5))
    sigma = rng_expo.uniform(0.008, 0.024)
    d += np.float32(sigma * 1.6) * _blur(rng_expo.standard_normal((h, w)).astype(np.float32), 0.55)
    lo, hi = rng_expo.uniform(-0.02, 0.08), rng_expo.uniform(0.78, 0.98)
    img = np.clip((d - lo) / (hi - lo), 0.0, 1.0) ** np.float32(math.exp(rng_expo.normal(0, 0.12)))
    return img.astype(np.float32), _finalise_masks(sc.masks, present)


def _fill_holes(mask: Array) -> Array:
    """``binary_fill_holes`` on the bounding box only (the flood fill dominates the cost on a full image)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    out = mask.copy()
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    out[sl] = ndimage.binary_fill_holes(mask[sl])
    return out


def _finalise_masks(masks: dict[str, list[Array]], present: dict[str, float]) -> dict[str, list[Array]]:
    """Drop specks, fill holes per drawn object, and drop findings whose mask came out empty.

    Airspace Opacity gets its own patches plus the oedema, consolidation and atelectasis opacities.
    """
    out: dict[str, list[Array]] = {}
    for task, comps in masks.items():
        clean = []
        for comp in comps:
            lab, n = ndimage.label(comp, structure=np.ones((3, 3), bool))
            if n == 0:
                continue
            sizes = np.bincount(lab.ravel())
            keep = sizes >= _MIN_COMPONENT_PIXELS
            keep[0] = False
            if keep.any():
                clean.append(_fill_holes(keep[lab]))
        if clean:
            out[task] = clean
    for obs, task in _LOCALISED_OBS.items():
        if obs in present and task not in out and task != "Airspace Opacity":
            del present[obs]
    if _PATCHY in present and "Airspace Opacity" not in out:
        del present[_PATCHY]
    aso = list(out.get("Airspace Opacity", []))
    for task in ("Edema", "Consolidation", "Atelectasis"):
        aso += out.get(task, [])
    if aso:
        out["Airspace Opacity"] = aso
        present["Lung Opacity"] = max(present.get(o, 0.0) for o in (_PATCHY, "Edema", "Consolidation", "Atelectasis"))
    else:
        out.pop("Airspace Opacity", None)
        present.pop("Lung Opacity", None)
    present.pop(_PATCHY, None)
    return out


# ---------------------------------------------------------------------------------------------------- findings
def _draw_lesions(rng: np.random.Generator, sc: _Scene, lung_vis: Array, c: float, k: float) -> None:
    f = sc.f
    n = 1 if rng.random() < 0.7 else (2 if rng.random() < 0.67 else 3)
    region = ndimage.binary_erosion(lung_vis, iterations=max(1, round(3 * f.px_scale)))
    for _ in range(n):
        at = _random_pixel(rng, region if region.any() else lung_vis)
        if at is None:
            return
        r = rng.uniform(0.11, 0.18) if rng.random() < 0.35 else rng.uniform(0.05, 0.1)
        r_px = max(1.6, r * f.hw)
        blob = _blob_px(rng, f, at[0], at[1], r_px, 0.2)
        amp = _lerp(0.3, 1.0, float(np.clip(c + rng.normal(0, 0.1), 0.0, 1.0))) * k
        sc.opacity.append(_blur(blob, 0.3 * r_px) * amp)
        sc.mask("Lung Lesion", blob & lung_vis)


def _draw_patchy(rng: np.random.Generator, sc: _Scene, lung_vis: Array, tex01: Array, c: float, k: float) -> None:
    f = sc.f
    clusters = 1 if rng.random() < 0.7 else 2
    for _ in range(clusters):
        at = _random_pixel(rng, lung_vis)
        if at is None:
            return
        region = np.zeros_like(lung_vis)
        for _ in range(int(rng.integers(2, 6))):
            r_px = rng.uniform(0.06, 0.16) * f.hw
            oy, ox = rng.normal(0, 0.1 * f.hw, 2)
            region |= _blob_px(rng, f, at[0] + oy, at[1] + ox, r_px, 0.25)
        region &= lung_vis
        amp = _lerp(0.1, 0.6, c) * k
        sc.opacity.append(_blur(region, 0.05 * f.hw) * amp * (0.55 + 0.9 * tex01))
        sc.mask("Airspace Opacity", region)


def _draw_edema(rng: np.random.Generator, sc: _Scene, lung_vis: Array, tex01: Array, c: float, k: float) -> None:
    U, V = sc.f.U, sc.f.V
    field_ = np.zeros_like(U)
    for side in (-1, 1):
        weight = 1.0 if rng.random() < 0.75 else rng.uniform(0.55, 0.9)
        g = np.exp(-(((U - side * 0.3) / 0.4) ** 2 + ((V - 0.55) / 0.33) ** 2))
        field_ += weight * g * (np.sign(U) == side)
    mask = (field_ > 0.42) & lung_vis
    amp = _lerp(0.07, 0.4, c) * k
    sc.opacity.append(field_ * amp * (0.6 + 0.8 * tex01))
    sc.vessel_blur = np.clip(field_ * (0.5 + c), 0.0, 1.0)
    sc.mask("Edema", mask)


_LOBES = ("RUL", "RML", "RLL", "LUL", "LLL")


def _draw_consolidation(
    rng: np.random.Generator, sc: _Scene, side_vis: dict[int, Array], tex01: Array, c: float, k: float
) -> None:
    """A dense region in one lobe: sharp where it meets a fissure, ill-defined elsewhere."""
    f = sc.f
    U, V = f.U, f.V
    lobe = _LOBES[int(rng.choice(5, p=[0.15, 0.15, 0.3, 0.15, 0.25]))]
    horizontal = 0.42 + 0.04 * (U + 0.5) + 0.03 * np.sin(3.0 * U)
    zone = {
        "RUL": horizontal > V,
        "RML": (horizontal <= V) & (V < 0.85),
        "RLL": V > 0.52,
        "LUL": V < 0.55,
        "LLL": V > 0.45,
    }[lobe] & side_vis[-1 if lobe[0] == "R" else 1]
    centre = {"RUL": (-0.5, 0.22), "RML": (-0.35, 0.6), "RLL": (-0.6, 0.75), "LUL": (0.55, 0.3), "LLL": (0.65, 0.72)}[
        lobe
    ]
    cu, cv = centre[0] + rng.normal(0, 0.08), centre[1] + rng.normal(0, 0.06)
    n = 32
    blob = f.polygon(
        _ellipse(
            cu, cv, rng.uniform(0.2, 0.45), rng.uniform(0.15, 0.3), n, rng.uniform(-0.5, 0.5), _wobble(rng, n, 0.35)
        )
    )
    region = zone & blob
    if region.sum() < 30 * f.px_scale**2:
        region = zone
    amp = _lerp(0.22, 0.95, c) * k
    soft = np.maximum(_blur(region, 0.035 * f.hw), _blur(region, 0.008 * f.hw) * zone)
    sc.opacity.append(np.clip(soft * 1.3, 0.0, 1.0) * amp * (0.7 + 0.5 * tex01))
    if rng.random() < 0.5:
        sc.bronchograms = _blur(region, 1.0) * min(1.0, amp)
    sc.mask("Consolidation", region)


def _draw_atelectasis(rng: np.random.Generator, sc: _Scene, side_vis: dict[int, Array], c: float, k: float) -> None:
    f = sc.f
    side = int(rng.choice([-1, 1]))
    lung = side_vis[side]
    if rng.random() < 0.55:  # plate-like band
        u0 = rng.uniform(0.25, 0.55)
        u1 = u0 + rng.uniform(0.25, 0.45)
        v0 = rng.uniform(0.6, 0.8)
        tilt, bend, t = rng.uniform(-0.06, 0.06), rng.uniform(-0.03, 0.03), rng.uniform(0.03, 0.07)
        us = np.linspace(u0, u1, 8)
        vs = v0 + tilt * (us - u0) + bend * np.sin(np.pi * (us - u0) / (u1 - u0))
        upper = np.stack([side * us, vs - t / 2], 1)
        lower = np.stack([side * us, vs + t / 2], 1)[::-1]
        region = f.polygon(np.vstack([upper, lower])) & lung
        amp = _lerp(0.25, 0.9, c) * k
        blur = 0.5 * f.px_scale
    else:  # basal band along the diaphragm
        t_px = max(2, round(rng.uniform(0.06, 0.14) * f.lh))
        below = np.zeros_like(lung)
        below[:-t_px] = lung[t_px:]
        ua = rng.uniform(0.2, 0.5)
        region = lung & ~below & (np.abs(f.U) > ua) & (np.abs(f.U) < ua + rng.uniform(0.35, 0.6)) & (f.V > 0.55)
        amp = _lerp(0.2, 0.8, c) * k
        blur = 1.2 * f.px_scale
    sc.opacity.append(_blur(region, blur) * amp)
    sc.mask("Atelectasis", region)


def _draw_pneumothorax(
    rng: np.random.Generator,
    sc: _Scene,
    lung_uv: dict[int, Array],
    hemi: dict[int, Array],
    cm: Array,
    c: float,
    k: float,
) -> None:
    f = sc.f
    side = -1 if rng.random() < 0.55 else 1
    outline = lung_uv[side]
    hilum = np.array([side * 0.22, 0.42])
    depth = _lerp(0.06, 0.45, c)
    v_cut = _lerp(0.35, 1.0, c) + rng.uniform(-0.05, 0.05)
    region = np.zeros_like(cm)
    collapsed = np.zeros_like(cm)
    for _ in range(4):
        wgt = np.clip(1.0 - outline[:, 1] / v_cut, 0.0, 1.0) ** 0.6
        wgt *= _smoothstep(np.abs(outline[:, 0]), 0.14, 0.34)
        inner = outline + (hilum - outline) * (depth * wgt)[:, None]
        collapsed = f.polygon(inner)
        region = hemi[side] & ~collapsed & ~cm
        if region.sum() >= 12 * f.px_scale**2:
            break
        depth *= 1.5
    img, draw = f.canvas()
    draw.line(f.px(np.vstack([inner, inner[:1]])).ravel().tolist(), fill=1, width=1)
    line = np.asarray(img, dtype=bool) & ndimage.binary_dilation(region, iterations=2) & ~region & hemi[side]
    boost = _blur(region, 0.7 * f.px_scale)
    sc.no_markings = boost if sc.no_markings is None else np.maximum(sc.no_markings, boost)
    sc.extra_air = boost * _lerp(0.25, 1.0, c) * min(k, 1.5)
    sc.add.append(_blur(line, 0.45) * _lerp(0.05, 0.2, c) * k)
    sc.opacity.append(_blur(collapsed & hemi[side] & ~cm, 1.5 * f.px_scale) * 0.12 * min(c * 2, 1.0) * k)
    sc.mask("Pneumothorax", region)


def _draw_effusion(
    rng: np.random.Generator, sc: _Scene, hemi: dict[int, Array], cm: Array, ap: bool, c: float, k: float
) -> None:
    f = sc.f
    U, V = f.U, f.V
    r = rng.random()
    sides = [-1] if r < 0.35 else ([1] if r < 0.6 else [-1, 1])
    for side in sides:
        cs = float(np.clip(c + rng.normal(0, 0.15), 0.0, 1.0)) if len(sides) == 2 else c
        if ap and rng.random() < 0.25:  # supine layering effusion: a veil, densest at the base, no meniscus
            top = _lerp(0.75, 0.35, cs)
            ramp = np.clip((V - top) / (1.05 - top), 0.0, 1.0)
            region = hemi[side] & ~cm & (top + 0.25 * (1.0 - top) < V)
            sc.opacity.append(hemi[side] * ramp * _lerp(0.2, 0.55, cs) * k)
        else:
            height = _lerp(0.05, 0.55, cs)
            meniscus = rng.uniform(0.3, 1.0)
            lateral = np.clip((np.abs(U) - 0.1) / 0.87, 0.0, 1.0) ** 1.3
            for _ in range(4):  # the meniscus: fluid climbs higher along the lateral chest wall
                surface = 1.0 - height * (0.3 + 0.7 * (0.5 + 0.5 * meniscus) * lateral)
                region = hemi[side] & ~cm & (surface < V)
                if region.sum() >= 15 * f.px_scale**2:
                    break
                height *= 1.4
            ramp = np.clip((V - surface) / 0.12, 0.0, 1.0) ** 0.7
            sc.opacity.append(_blur(hemi[side] * ramp, 0.8 * f.px_scale) * _lerp(0.35, 0.95, cs) * k)
        sc.mask("Pleural Effusion", region)


# ---------------------------------------------------------------------------------------------------- devices
def _draw_devices(rng: np.random.Generator, sc: _Scene, study: Study, c: float, k: float, dome_l: float) -> None:
    """Support devices: each device is one mask component and a bright stroke in the image."""
    f = sc.f
    present = study.present
    icu = study.ap
    kinds: list[str] = []
    if rng.random() < (0.5 if icu else 0.05):
        kinds.append("ett")
    if rng.random() < (0.4 if icu else 0.05):
        kinds.append("enteric")
    if rng.random() < (0.6 if icu else 0.3):
        kinds.append(str(rng.choice(["ij", "subclavian", "picc"])))
    if rng.random() < (0.15 if icu else 0.45):
        kinds.append("pacemaker")
    if rng.random() < 0.3:
        kinds.append("ecg")
    if rng.random() < (0.6 if "Pneumothorax" in present else (0.15 if "Pleural Effusion" in present else 0.04)):
        kinds.append("chest_tube")
    if not kinds:
        kinds.append(str(rng.choice(["ij", "pacemaker", "ett"])))
    level = _lerp(0.08, 0.45, c) * k
    for kind in kinds:
        img, draw = f.canvas()  # intensity 0..255
        contrast = level * rng.uniform(0.7, 1.2)
        if kind in ("ett", "chest_tube"):
            if kind == "ett":
                x = rng.normal(0, 0.01)
                pts = _spline([(x, -3.0), (x, -0.5), (x + 0.01, rng.uniform(0.05, 0.22))], 30)
                width = 0.032
            else:
                side = -1 if rng.random() < 0.55 else 1
                pts = _spline([(side * 1.3, 0.95), (side * 0.98, 0.75), (side * 0.86, 0.5), (side * 0.62, 0.22),
                               (side * rng.uniform(0.35, 0.5), rng.uniform(0.05, 0.15))], 60)  # fmt: skip
                width = 0.038
            xy = f.px(pts).ravel().tolist()
            draw.line(xy, fill=110, width=f.stroke_width(width), joint="curve")
            draw.line(xy, fill=255, width=max(1, round(0.3 * f.stroke_width(width))), joint="curve")
        elif kind == "enteric":
            stomach = (rng.uniform(0.45, 0.6), dome_l + rng.uniform(0.08, 0.18))
            ctrl: list[tuple[float, float]] = [
                (0.03, -3.0),
                (0.02, -0.3),
                (0.05, 0.35),
                (0.08, 0.75),
                (0.16, dome_l + 0.08),
                (0.34, dome_l + 0.17),
            ]
            pts = _spline([*ctrl, stomach], 70)
            draw.line(f.px(pts).ravel().tolist(), fill=200, width=f.stroke_width(0.02), joint="curve")
        elif kind in ("ij", "subclavian", "picc"):
            tip = rng.uniform(0.22, 0.45)
            ctrl = {
                "ij": [(-0.42, -1.2), (-0.32, -0.45), (-0.16, -0.06), (-0.09, 0.14), (-0.07, tip)],
                "subclavian": [(1.2, -0.26), (0.72, -0.13), (0.35, -0.06), (0.1, 0.05), (-0.04, 0.2), (-0.06, tip)],
                "picc": [(-1.9, 0.1), (-1.2, -0.06), (-0.62, -0.09), (-0.25, -0.02), (-0.1, 0.15), (-0.07, tip)],
            }[kind]
            if kind != "subclavian" and rng.random() < 0.35:  # left-sided line
                ctrl = [(-u if i < len(ctrl) - 2 else u, v) for i, (u, v) in enumerate(ctrl)]
            draw.line(f.px(_spline(ctrl, 60)).ravel().tolist(), fill=230, width=f.stroke_width(0.014), joint="curve")
        elif kind == "pacemaker":
            side = 1 if rng.random() < 0.8 else -1
            cu, cv = side * rng.uniform(0.5, 0.75), rng.uniform(-0.1, 0.05)
            box = np.array(
                [(cu - 0.09, cv - 0.055), (cu + 0.09, cv - 0.055), (cu + 0.09, cv + 0.055), (cu - 0.09, cv + 0.055)]
            )
            draw.polygon(f.px(_chaikin(box, np.zeros(4, bool), 2)).ravel().tolist(), fill=255, outline=255)
            inner = np.array(
                [(cu - 0.05, cv - 0.03), (cu + 0.06, cv - 0.03), (cu + 0.06, cv + 0.03), (cu - 0.05, cv + 0.03)]
            )
            draw.polygon(f.px(inner).ravel().tolist(), fill=190)
            targets = ([(-0.12, 0.56)], [(0.1, 0.72), (0.28, rng.uniform(0.8, 0.9))])  # atrium, ventricle
            for target in targets[: 1 + int(rng.random() < 0.8)]:
                lead = [(cu - side * 0.06, cv), (side * 0.3, cv - 0.08), (0.02, 0.02), (-0.07, 0.3), *target]
                draw.line(
                    f.px(_spline(lead, 60)).ravel().tolist(), fill=235, width=f.stroke_width(0.014), joint="curve"
                )
        else:  # ECG electrodes with wires running off the image
            for _ in range(int(rng.integers(1, 4))):
                eu, ev = rng.uniform(-1.0, 1.0), rng.uniform(-0.25, 0.9)
                r = 0.035 * f.hw
                x, y = f.px(np.array([[eu, ev]]))[0]
                draw.ellipse((x - r, y - r, x + r, y + r), outline=210, width=f.stroke_width(0.012))
                draw.ellipse((x - r / 3, y - r / 3, x + r / 3, y + r / 3), fill=230)
                end_u = np.sign(eu or 1.0) * 2.2
                wire = [
                    (eu, ev),
                    (eu + (end_u - eu) * 0.4, ev + rng.uniform(-0.2, 0.2)),
                    (end_u, ev + rng.uniform(-0.5, 0.5)),
                ]
                draw.line(f.px(_spline(wire, 40)).ravel().tolist(), fill=140, width=1, joint="curve")
        stroke = np.asarray(img, dtype=np.float32) / 255.0
        sc.add.append(_blur(stroke, 0.4) * contrast)
        sc.mask("Support Devices", stroke > 0)


# ---------------------------------------------------------------------------------------------------- anatomy pieces
def _vessel_tree(rng: np.random.Generator, f: _Frame) -> Array:
    """Branching, tapering, slightly tortuous vessels from both hila, as a float ``[h, w]`` canvas in [0, 1].

    Grown level by level (vectorised): 8 trunks per hilum, each branch three kinked steps, two children per
    branch (90% kept), five levels; width and brightness fall with depth.
    """
    roots_u, roots_v, roots_a = [], [], []
    for side, (hu, hv) in ((-1, (-0.2, 0.42)), (1, (0.19, 0.39))):
        a = np.linspace(-0.6 * np.pi, 0.62 * np.pi, 8)
        roots_a.append((np.pi - a) if side < 0 else a)
        roots_u.append(np.full(8, hu))
        roots_v.append(np.full(8, hv))
    u, v = np.concatenate(roots_u), np.concatenate(roots_v)
    angle = np.concatenate(roots_a) + rng.normal(0, 0.1, 16)
    length = rng.uniform(0.16, 0.22, 16)
    img, draw = f.canvas()
    for depth in range(5):
        n = len(u)
        kinks = angle[:, None] + np.cumsum(rng.normal(0, 0.15, (n, 3)), axis=1)
        us = u[:, None] + np.cumsum(length[:, None] / 3 * np.cos(kinks), axis=1)
        vs = v[:, None] + np.cumsum(length[:, None] / 3 * np.sin(kinks) * 1.15, axis=1)
        pts = np.stack([np.concatenate([u[:, None], us], 1), np.concatenate([v[:, None], vs], 1)], axis=2)
        xy = f.px(pts.reshape(-1, 2)).reshape(n, -1).tolist()
        fill, width = int(255 * (1.0 - 0.12 * depth)), f.stroke_width(0.03 * 0.68**depth)
        for line in xy:
            draw.line(line, fill=fill, width=width)
        keep = rng.random((n, 2)) < 0.9
        turn = np.stack([rng.uniform(-0.6, -0.15, n), rng.uniform(0.15, 0.6, n)], 1)
        u, v = np.repeat(us[:, -1], 2)[keep.ravel()], np.repeat(vs[:, -1], 2)[keep.ravel()]
        angle = (kinks[:, -1:] + turn).ravel()[keep.ravel()]
        length = (np.repeat(length, 2) * rng.uniform(0.72, 0.9, 2 * n))[keep.ravel()]
    return np.asarray(img, dtype=np.float32) / 255.0


def _bones(rng: np.random.Generator, f: _Frame, broken: tuple[int, int, float] | None, fracture_c: float) -> Array:
    """Ribs, clavicles, spine and humeral heads as additive density ``[h, w]``.

    ``broken``: (rib index, side, position along the rib) of a fracture: a gap with a small step, or None.
    """
    U, V = f.U, f.V
    img, draw = f.canvas()
    phase = rng.uniform(-0.06, 0.0)
    for side in (-1, 1):
        for i in range(10):  # posterior ribs: arcs from the spine, up then down laterally
            v0 = phase + i * 0.097 + rng.normal(0, 0.006)
            s = np.linspace(0.0, 1.0, 24)
            bend = 1.0 + 0.3 * i / 10
            u = side * (0.08 + 0.96 * s)
            v = v0 - 0.07 * s + 0.32 * bend * s**2
            width = f.stroke_width(rng.uniform(0.038, 0.048) * f.lh / f.hw)
            pieces = [(u, v)]
            if broken is not None and broken[0] == i and broken[1] == side:
                cut = np.searchsorted(s, broken[2])
                gap = max(1, round(0.03 * 24))
                shift = 0.012 * (1 + fracture_c)
                pieces = [(u[:cut], v[:cut]), (u[cut + gap :], v[cut + gap :] + shift)]
            for pu, pv in pieces:
                if len(pu) < 2:
                    continue
                xy = f.px(np.stack([pu, pv], 1)).ravel().tolist()
                draw.line(xy, fill=255, width=width)
                draw.line(xy, fill=150, width=max(1, width - 2 * max(1, round(0.25 * width))))
    ribs = np.asarray(img, dtype=np.float32) / 255.0
    img, draw = f.canvas()
    for side in (-1, 1):
        for i in range(6):  # anterior ribs: fainter, sloping down medially
            v0 = 0.05 + i * 0.13
            pts = _spline([(side * 0.98, v0), (side * 0.7, v0 + 0.06), (side * 0.4, v0 + 0.17)], 20)
            draw.line(f.px(pts).ravel().tolist(), fill=255, width=f.stroke_width(0.035 * f.lh / f.hw), joint="curve")
        clav = _spline([(side * 0.07, -0.05), (side * 0.3, -0.09), (side * 0.6, -0.1), (side * 0.9, -0.2)], 24)
        draw.line(f.px(clav).ravel().tolist(), fill=255, width=f.stroke_width(0.05 * f.lh / f.hw), joint="curve")
    ant = np.asarray(img, dtype=np.float32) / 255.0
    chest = _smoothstep(1.08 - np.abs(U), 0.0, 0.08)
    # Posterior ribs fade laterally (they turn away from the film); anterior ribs are faint.
    fade = 1.0 - 0.45 * _smoothstep(np.abs(U), 0.3, 1.0)
    out = 0.06 * _blur(ribs, 0.6 * f.px_scale) * chest * fade + 0.03 * _blur(ant, 1.2 * f.px_scale) * chest
    clav_boost = (V < 0.05).astype(np.float32)
    out += 0.06 * _blur(ant, 0.8 * f.px_scale) * clav_boost
    # Spine: a band with vertebral bodies and disc spaces; pedicles as paired ovals.
    band = _smoothstep(0.1 - np.abs(U), 0.0, 0.03)
    period = 0.092
    verts = 0.7 + 0.3 * np.cos(np.pi * (V - phase) / period) ** 2
    out += 0.09 * band * verts
    ped = np.exp(-(((np.abs(U) - 0.065) / 0.016) ** 2) - ((np.mod(V - phase, 2 * period) - period) / 0.03) ** 2)
    out += 0.03 * ped
    # Humeral heads and scapular edges.
    for side in (-1, 1):
        head = f.polygon(_ellipse(side * 1.32, -0.12, 0.16, 0.14, 24))
        out += 0.07 * _blur(head, 1.5 * f.px_scale)
    return out.astype(np.float32)


_GLYPHS = {
    "R": ("1110", "1001", "1001", "1110", "1010", "1001", "1001"),
    "L": ("1000", "1000", "1000", "1000", "1000", "1000", "1111"),
}


def _marker(rng: np.random.Generator, h: int, w: int) -> Array:
    """A lead side marker (R or L) in an upper corner, as a [0, 1] canvas."""
    glyph = np.array([[ch == "1" for ch in row] for row in _GLYPHS[str(rng.choice(["R", "L"]))]], dtype=np.float32)
    cell = max(1, round(min(h, w) / 110))
    g = np.kron(glyph, np.ones((cell, cell), np.float32))
    out = np.zeros((h, w), np.float32)
    y = int(rng.integers(2, max(3, h // 12)))
    x = (
        int(rng.integers(2, max(3, w // 10)))
        if rng.random() < 0.5
        else w - g.shape[1] - int(rng.integers(2, max(3, w // 10)))
    )
    out[y : y + g.shape[0], x : x + g.shape[1]] = g[: h - y, : w - x]
    return out


def _render_lateral(rng: np.random.Generator, anat: Anatomy, size: int) -> Array:
    """A simple lateral view, patient facing image left: chest wall and sternum in front, one large lung field that
    reaches behind the heart and down into the posterior recess, the heart anteroinferior, the thoracic spine with
    vertebral bodies and the back muscles behind it, arms raised in front of the face. ``[h, w]`` float32 [0, 1].
    """
    h, w = _image_shape(rng, size)
    f = _Frame(h, w, w * rng.uniform(0.47, 0.53), h * (anat.apex + 0.32), 0.4 * w, anat.lung_height * h, 0.0)
    U, V = f.U, f.V
    body_uv = np.array([(-0.8, -3.0), (-0.85, 0.1), (-0.9, 0.6), (-0.95, 1.2), (-0.9, 3.0),
                        (1.05, 3.0), (1.02, 1.2), (0.98, 0.3), (0.9, -3.0)])  # fmt: skip
    lung_uv = np.array([(-0.25, 0.0), (0.15, -0.05), (0.5, 0.12), (0.72, 0.45), (0.78, 0.85), (0.76, 1.12),
                        (0.55, 1.02), (0.2, 0.9), (-0.35, 0.86), (-0.68, 0.8), (-0.72, 0.5), (-0.6, 0.15)])  # fmt: skip
    lung_uv += rng.normal(0, 0.015, lung_uv.shape)
    body = f.polygon(_chaikin(body_uv, np.zeros(len(body_uv), bool), 2))
    lung = f.polygon(_chaikin(lung_uv, np.zeros(len(lung_uv), bool), 3))
    heart = f.polygon(_ellipse(-0.3 + rng.normal(0, 0.03), 0.7, 0.38, 0.24, 32, -0.5))
    arms = f.polygon(_ellipse(-0.55, -0.25, 0.75, 0.2, 32, 0.25))
    s1 = f.px_scale
    d = np.full((h, w), 0.05, np.float32)
    d += 0.5 * _blur(body, 2 * s1)
    d += 0.1 * _blur(body & (V > 0.85) & ~lung, 3 * s1)  # abdomen under the domes
    lung_s = _blur(lung, 1.5 * s1) * (1 - 0.75 * _blur(heart, 1.5 * s1))
    d -= 0.3 * lung_s
    d += 0.1 * _blur(arms & body, 3 * s1)
    column = _smoothstep(0.09 - np.abs(U - 0.62), 0.0, 0.02)
    bodies = 0.65 + 0.35 * (np.cos(np.pi * V / 0.1) ** 2 > 0.25)  # vertebral bodies and disc spaces
    d += 0.1 * _blur(column * bodies, 0.8 * s1) * _blur(body, 2 * s1)
    d += 0.05 * _smoothstep(0.03 - np.abs(U + 0.8), 0.0, 0.02) * (V > -0.1) * (V < 0.75)  # sternum
    d += 0.025 * _fractal_noise(rng, h, w, (8, 20, 40), (1.0, 0.6, 0.4)) * lung_s
    d += np.float32(rng.uniform(0.008, 0.024) * 1.6) * _blur(rng.standard_normal((h, w)).astype(np.float32), 0.55)
    lo, hi = rng.uniform(-0.02, 0.08), rng.uniform(0.72, 0.95)
    return np.clip((d - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


# ====================================================================================================== one study
def render_study(
    rng: np.random.Generator,
    anat: Anatomy,
    study: Study,
    size: int = 256,
    conspicuity: float = 1.0,
    certain: bool = False,
) -> tuple[Array, dict[str, Array], dict[str, list[Array]]]:
    """Render one frontal radiograph and derive its labels from what was drawn.

    Args:
        rng: the study's generator. anat: the patient. study: sampled findings; updated in place (findings whose
            mask came out empty are removed, ``labels`` filled). size: typical long side in pixels.
        conspicuity: global contrast multiplier. certain: valid/test labels (0/1) instead of train-like cells.

    Returns:
        ``(image, masks, components)``: image ``[h, w]`` float32 in [0, 1]; masks task -> bool ``[h, w]`` for all
        10 tasks (empty for negatives); components task -> the drawn objects whose union is the mask.
    """
    present = study.present
    img, comps = _render_frontal(rng, anat, study, size, conspicuity)
    h, w = img.shape
    masks = {t: np.zeros((h, w), bool) for t in TASKS}
    for task, parts in comps.items():
        for part in parts:
            masks[task] |= part
    study.labels = _label_cells(rng, present, certain)
    return img, masks, comps


# ====================================================================================================== the dataset
@dataclass(frozen=True)
class _Job:
    """One study to render: everything a worker process needs (picklable)."""

    split: str
    index: int  # frontal image index within the split
    patient: int  # patient number in the path
    patient_key: int  # seed key of the patient (index within the split)
    study: int
    lateral: bool
    mode: str  # "jpeg", "png16" or "rgb"
    seed: int
    size: int
    conspicuity: float
    jpeg_quality: int
    want_masks: bool


@dataclass
class _Result:
    """A rendered study: encoded files, CSV rows and (valid/test) ground truth."""

    files: list[tuple[str, bytes]]
    rows: list[list[str]]
    present: list[str]  # tasks with a non-empty mask
    image_id: str
    size: tuple[int, int]
    segmentation: dict[str, dict[str, Any]] | None
    polygons: dict[str, list[list[list[int]]]] | None


def _seed(job_seed: int, split: str, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(job_seed, spawn_key=(_SPLIT_CODE[split], kind, index)))


def _encode(img: Array, mode: str, quality: int) -> bytes:
    """Encode a [h, w] float image in [0, 1]: 8-bit JPEG (grey or RGB) or 16-bit PNG holding 12-bit values."""
    buf = io.BytesIO()
    if mode == "png16":
        Image.fromarray(np.rint(img * 4095.0).astype(np.uint16)).save(buf, format="PNG", compress_level=6)
        return buf.getvalue()
    grey = Image.fromarray(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8))
    if mode == "rgb":
        grey = grey.convert("RGB")
    # Fixed encoder settings (no optimisation pass, baseline, fixed subsampling) keep the bytes reproducible.
    grey.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling=0)
    return buf.getvalue()


def _rel_path(split: str, patient: int, study: int, view: str, ext: str) -> str:
    return f"{DATASET_DIR}/{split}/patient{patient:05d}/study{study}/{view}.{ext}"


def _render_job(job: _Job) -> _Result:
    """Render and encode one study (frontal plus an optional lateral view); runs in worker processes."""
    anat = sample_anatomy(_seed(job.seed, job.split, _KEY_PATIENT, job.patient_key))
    rng = _seed(job.seed, job.split, _KEY_STUDY, job.index)
    study = sample_study(rng)
    certain = job.split != "train"
    img, masks, comps = render_study(rng, anat, study, job.size, job.conspicuity, certain)
    ext = "png" if job.mode == "png16" else "jpg"
    path = _rel_path(job.split, job.patient, job.study, "view1_frontal", ext)
    meta = [anat.sex, str(anat.age)]
    labels = [study.labels[o] for o in OBSERVATIONS]
    files = [(path, _encode(img, job.mode, job.jpeg_quality))]
    rows = [[path, *meta, "Frontal", "AP" if study.ap else "PA", *labels]]
    if job.lateral:
        lat_path = _rel_path(job.split, job.patient, job.study, "view2_lateral", "jpg")
        lat = _render_lateral(_seed(job.seed, job.split, _KEY_LATERAL, job.index), anat, job.size)
        files.append((lat_path, _encode(lat, "jpeg", job.jpeg_quality)))
        rows.append([lat_path, *meta, "Lateral", "", *labels])
    segmentation = polygons = None
    if job.want_masks:
        segmentation = {t: encode_mask(masks[t]) for t in TASKS}
        if certain:
            # Per drawn object, so that crossing devices do not enclose (and fill) the space between them.
            polygons = {t: [p for comp in comps[t] for p in mask_to_polygons(comp)] for t in TASKS if t in comps}
    h, w = img.shape
    return _Result(
        files=files,
        rows=rows,
        present=[t for t in TASKS if masks[t].any()],
        image_id=image_id_from_path(path),
        size=(h, w),
        segmentation=segmentation,
        polygons=polygons,
    )


def _layout(cfg: SynthConfig, split: str, n: int, first_patient: int) -> list[_Job]:
    """Patients, studies, lateral views and odd file modes of a split (deterministic from the seed)."""
    rng = _seed(cfg.seed, split, _KEY_LAYOUT, 0)
    train = split == "train"
    odd = math.ceil(cfg.odd_mode_fraction * n) if train and n > 0 and cfg.odd_mode_fraction > 0 else 0
    order = rng.permutation(n) if n else np.zeros(0, int)
    png16 = {int(i) for i in order[:odd]}
    rgb = {int(i) for i in order[odd : 2 * odd]}
    jobs: list[_Job] = []
    patient_key = 0
    while len(jobs) < n:
        # CheXpert has ~3.5 studies per patient in train; valid/test have one study per patient.
        n_studies = min(int(rng.geometric(0.45)), 6) if train else 1
        for study in range(1, n_studies + 1):
            if len(jobs) == n:
                break
            i = len(jobs)
            mode = "png16" if i in png16 else ("rgb" if i in rgb else "jpeg")
            jobs.append(
                _Job(
                    split=split,
                    index=i,
                    patient=first_patient + patient_key,
                    patient_key=patient_key,
                    study=study,
                    lateral=bool(train and rng.random() < cfg.lateral_fraction),
                    mode=mode,
                    seed=cfg.seed,
                    size=cfg.size,
                    conspicuity=cfg.conspicuity,
                    jpeg_quality=cfg.jpeg_quality,
                    want_masks=not train or cfg.train_masks,
                )
            )
        patient_key += 1
    return jobs


def _run_jobs(jobs: list[_Job], workers: int) -> Generator[_Result, None, None]:
    if workers <= 1 or len(jobs) < 2 * workers:
        for job in jobs:
            yield _render_job(job)
        return
    # Spawn, not fork: callers may hold threads (Ray, torch) that fork would copy in a broken state. An executor,
    # not a multiprocessing.Pool: a worker that dies (or cannot start, e.g. when __main__ is read from stdin) breaks
    # the executor with an error, where a Pool would replace it forever and hang.
    chunksize = max(1, min(16, len(jobs) // (8 * workers)))
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        yield from pool.map(_render_job, jobs, chunksize=chunksize)
    except BrokenProcessPool as exc:
        raise RuntimeError(
            f"phantom generator: a worker process died ({exc}); if the calling program is read from stdin or an "
            "interactive session, run it from a file, or use synth.workers=1"
        ) from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # also when the caller stops early: no work left queued


def _write(out_dir: str, rel: str, data: bytes) -> None:
    with fsio.open_file(fsio.join(out_dir, rel), "wb") as f:
        f.write(data)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")


def _prevalence(rows: list[list[str]]) -> dict[str, dict[str, float]]:
    n = max(1, len(rows))
    out: dict[str, dict[str, float]] = {}
    for j, obs in enumerate(OBSERVATIONS):
        cells = [r[len(CSV_HEADER) - len(OBSERVATIONS) + j] for r in rows]
        out[obs] = {
            name: round(sum(c == cell for c in cells) / n, 4)
            for name, cell in (("positive", "1.0"), ("negative", "0.0"), ("uncertain", "-1.0"), ("blank", ""))
        }
    return out


def _write_split(
    out_dir: str, split: str, jobs: list[_Job], results: Generator[_Result, None, None], train_masks: bool
) -> dict[str, Any]:
    """Write one split's images, CSV and ground truth from the next ``len(jobs)`` results; return its summary."""
    frontal_rows: list[list[str]] = []
    all_rows: list[list[str]] = []
    segs: dict[str, Any] = {}
    polys: dict[str, Any] = {}
    mask_counts = dict.fromkeys(TASKS, 0)
    modes = {"jpeg": 0, "png16": 0, "rgb": 0}
    for job in jobs:
        res = next(results)
        for rel, data in res.files:
            _write(out_dir, rel, data)
        frontal_rows.append(res.rows[0])
        all_rows.extend(res.rows)
        modes[job.mode] += 1
        for t in res.present:
            mask_counts[t] += 1
        if res.segmentation is not None:
            segs[res.image_id] = res.segmentation
        if res.polygons is not None:
            polys[res.image_id] = {"img_size": list(res.size), **res.polygons}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(all_rows)
    _write(out_dir, f"{split}.csv", buf.getvalue().encode("utf-8"))
    if split != "train" or train_masks:
        _write(out_dir, f"gt_segmentations_{split}.json", _json_bytes(segs))
    if split != "train":
        _write(out_dir, f"gt_annotations_{split}.json", _json_bytes(polys))
    n = max(1, len(jobs))
    return {
        "frontal_images": len(jobs),
        "rows": len(all_rows),
        "lateral_images": len(all_rows) - len(frontal_rows),
        "patients": len({j.patient for j in jobs}),
        "file_modes": modes,
        "label_prevalence": _prevalence(frontal_rows),
        "mask_prevalence": {t: round(c / n, 4) for t, c in mask_counts.items()},
    }


def generate(out_dir: str, cfg: SynthConfig) -> dict[str, Any]:
    """Write a phantom CheXpert tree with CheXlocalize ground truth under ``out_dir``.

    Writes (paths relative to ``out_dir``): ``train.csv``, ``valid.csv``, ``test.csv`` (exactly CSV_HEADER; Path
    like ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``, relative to ``out_dir``); the
    images under ``CheXpert-v1.0-small/``; ``gt_segmentations_{valid,test}.json`` (all 10 tasks per image, COCO
    RLE at original size, empty for negatives); ``gt_annotations_{valid,test}.json`` (polygons of the positive
    tasks); ``gt_segmentations_train.json`` if ``cfg.train_masks``; and ``phantom_meta.json``.

    Args:
        out_dir: local directory or fsspec URI.
        cfg: the generator settings; the same settings give byte-identical files whatever ``cfg.workers``.

    Returns:
        The contents of ``phantom_meta.json``: generator version, seed, settings, counts and per-split label
        prevalences (share of frontal rows that are positive / negative / uncertain / blank) and mask prevalences.
    """
    fsio.makedirs(out_dir)
    layouts: dict[str, list[_Job]] = {}
    layouts["train"] = _layout(cfg, "train", cfg.n_train, 1)
    n_train_patients = layouts["train"][-1].patient if layouts["train"] else 0
    first_valid = max(_VALID_FIRST_PATIENT, n_train_patients + 1)
    layouts["valid"] = _layout(cfg, "valid", cfg.n_valid, first_valid)
    layouts["test"] = _layout(cfg, "test", cfg.n_test, first_valid + max(_CHEXPERT_VALID_PATIENTS, cfg.n_valid))
    meta: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "splits": {},
    }
    meta["config"].pop("workers")  # an execution detail: the output does not depend on it
    # One pool for all splits (spawning workers costs seconds); results arrive in job order.
    results = _run_jobs([job for split in SPLITS for job in layouts[split]], cfg.workers)
    try:
        for split in SPLITS:
            meta["splits"][split] = _write_split(out_dir, split, layouts[split], results, cfg.train_masks)
    finally:
        results.close()  # stops the worker pool even if writing failed
    _write(out_dir, "phantom_meta.json", _json_bytes(meta))
    return meta
