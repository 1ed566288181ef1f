"""Rendering: a study's frontal radiograph with its masks and labels, the lateral view, and image encoding.

The pixel value is a sum of densities: air outside the body; soft tissue (torso, shoulders, arms, breasts); two
hemithoraces whose air darkens the image, minus the cardiomediastinal silhouette (mediastinum, aortic knob, heart;
trachea as an air column); bones; hilar vessels branching into lung markings and a fine parenchymal texture; a
gastric bubble under the left dome; then exposure (heel effect, window, gamma), quantum noise, and an R/L marker.
Findings (:mod:`chexseg_dist.synth.findings`) change those densities, and their masks are the pixels they change.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.synth.anatomy import (
    Anatomy,
    Array,
    Frame,
    blur,
    bones,
    chaikin,
    ellipse,
    fractal_noise,
    image_shape,
    lerp,
    lung_outline,
    smoothstep,
    vessel_tree,
)
from chexseg_dist.synth.findings import (
    Scene,
    draw_atelectasis,
    draw_consolidation,
    draw_devices,
    draw_edema,
    draw_effusion,
    draw_lesions,
    draw_patchy,
    draw_pleural_other,
    draw_pneumothorax,
    finalise_masks,
)
from chexseg_dist.synth.labels import PATCHY, Study, label_cells


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
        rng: the study's generator.
        anat: the patient.
        study: sampled findings; updated in place (findings whose mask came out empty are removed, ``labels``
            filled).
        size: typical long side in pixels.
        conspicuity: global contrast multiplier.
        certain: valid/test labels (0/1) instead of train-like cells.

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
    study.labels = label_cells(rng, present, certain)
    return img, masks, comps


def _render_frontal(
    rng: np.random.Generator, anat: Anatomy, study: Study, size: int, k: float
) -> tuple[Array, dict[str, list[Array]]]:
    """Draw one frontal radiograph.

    Args:
        rng: the study's generator.
        anat: the patient.
        study: findings (drawn ones may be dropped if their mask came out empty).
        size: typical long side.
        k: global conspicuity multiplier.

    Returns:
        ``(image, masks)``: image ``[h, w]`` float32 in [0, 1]; masks: task -> list of bool ``[h, w]`` components.
    """
    # Independent streams for anatomy/pose, findings and exposure/noise: the same study with or without a finding
    # differs only where the finding is drawn (what the tests and counterfactual analyses rely on).
    rng, rng_find, rng_expo = rng.spawn(3)
    h, w = image_shape(rng, size)
    present = study.present
    lh = anat.lung_height * h * (0.95 if study.ap else 1.0)
    hw = lh * anat.half_width_ratio
    if hw > 0.45 * w:  # a narrow image: shrink the whole thorax, keeping its proportions
        hw = 0.45 * w
        lh = hw / anat.half_width_ratio
    top = (anat.apex + rng.normal(0, 0.015)) * h
    top = float(np.clip(top, 0.05 * h, 0.93 * h - lh))
    f = Frame(
        h, w, w / 2 + rng.normal(0, 0.025) * w, top + lh / 2, hw, lh, float(np.clip(rng.normal(0, 0.03), -0.08, 0.08))
    )
    sc = Scene(f)
    U, V = f.U, f.V
    s1 = f.px_scale

    # ---------------------------------------------------------------- anatomy shapes
    fat = anat.body_fat
    half = [(0.2, -3.0), (0.23, -0.6), (0.42, -0.36), (0.82, -0.27), (1.12, -0.15), (1.2 + fat, 0.05),
            (1.16 + fat, 0.4), (1.12 + fat, 0.9), (1.16 + fat, 1.5), (1.2 + fat, 3.5)]  # fmt: skip
    body_uv = np.array([(-u, v) for u, v in half] + [(u, v) for u, v in reversed(half)])
    body = f.polygon(chaikin(body_uv, np.zeros(len(body_uv), bool), 2))
    arm_gap = rng.uniform(0.05, 0.7)
    for side in (-1, 1):
        x0 = 1.2 + fat + arm_gap
        arm = np.array([(side * x0, 3.5), (side * x0, 0.3), (side * (x0 + 0.05), -0.15), (side * (x0 + 0.3), -0.25),
                        (side * (x0 + 0.6), -0.1), (side * (x0 + 0.6), 3.5)])  # fmt: skip
        body |= f.polygon(chaikin(arm, np.zeros(len(arm), bool), 2))
    body_s = blur(body, 1.5 * s1)

    lung_uv = {side: lung_outline(anat, side) for side in (-1, 1)}
    hemi = {side: f.polygon(lung_uv[side]) for side in (-1, 1)}
    hemi_all = hemi[-1] | hemi[1]

    ctr = anat.ctr
    if "Cardiomegaly" in present:
        ctr = anat.ctr + (0.48 - anat.ctr + lerp(0.0, 0.2, present["Cardiomegaly"])) * k
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
    hu = chaikin(heart_ctrl, np.zeros(len(heart_ctrl), bool), 3)
    hu[:, 1] = np.minimum(hu[:, 1], bottom)
    heart = f.polygon(hu)

    mw = anat.mediastinum
    if "Enlarged Cardiomediastinum" in present:
        mw = anat.mediastinum + (0.13 - anat.mediastinum + lerp(0.0, 0.12, present["Enlarged Cardiomediastinum"])) * k
    kn = anat.aortic_knob
    med_uv = np.array([
        (-0.9 * mw, -3.0), (-mw, -0.15), (-1.1 * mw, 0.22), (-max(1.1 * mw, 0.7 * right), anat.heart_top + 0.08),
        (0.3 * heart_w, anat.heart_top + 0.04), (mw + 0.6 * kn, 0.3), (mw + kn, 0.2), (mw + 0.5 * kn, 0.12),
        (0.9 * mw, -0.1), (0.8 * mw, -3.0),
    ])  # fmt: skip
    med = f.polygon(chaikin(med_uv, np.zeros(len(med_uv), bool), 2)) & (V > -0.06)  # from the thoracic inlet
    cm = med | heart
    cm_s = blur(cm, 0.9 * s1)
    lung_vis = hemi_all & ~cm
    side_vis = {side: hemi[side] & ~cm for side in (-1, 1)}
    hemi_s = blur(hemi_all, 1.1 * s1)
    lung_s = hemi_s * (1.0 - cm_s)

    if "Enlarged Cardiomediastinum" in present:
        sc.mask("Enlarged Cardiomediastinum", cm.copy())
    if "Cardiomegaly" in present:
        sc.mask("Cardiomegaly", heart.copy())

    # ---------------------------------------------------------------- findings
    noise_tex = fractal_noise(rng, h, w, (6, 14, 30, 60), (1.0, 0.7, 0.5, 0.4))
    tex01 = np.clip(0.5 + 0.25 * noise_tex, 0.0, 1.0)
    if "Lung Lesion" in present:
        draw_lesions(rng_find, sc, lung_vis, present["Lung Lesion"], k)
    if PATCHY in present:
        draw_patchy(rng_find, sc, lung_vis, tex01, present[PATCHY], k)
    if "Edema" in present:
        draw_edema(rng_find, sc, lung_vis, tex01, present["Edema"], k)
    if "Consolidation" in present:
        draw_consolidation(rng_find, sc, side_vis, tex01, present["Consolidation"], k)
    if "Atelectasis" in present:
        draw_atelectasis(rng_find, sc, side_vis, present["Atelectasis"], k)
    if "Pneumothorax" in present:
        draw_pneumothorax(rng_find, sc, lung_uv, hemi, cm, present["Pneumothorax"], k)
    if "Pleural Effusion" in present:
        draw_effusion(rng_find, sc, hemi, cm, study.ap, present["Pleural Effusion"], k)
    if "Pleural Other" in present:
        draw_pleural_other(rng_find, sc, hemi, present["Pleural Other"], k)
    if "Support Devices" in present:
        draw_devices(rng_find, sc, study, present["Support Devices"], k, dome_l)

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
    d += 0.13 * blur(body & ~hemi_all & ~heart & (V > 0.72), 3.0 * s1) * smoothstep(1.12 - np.abs(U), 0.0, 0.2)
    if anat.breasts > 0:
        for side in (-1, 1):
            br = blur(f.polygon(ellipse(side * 0.68, 1.02, 0.42, 0.27, 24)), 4 * s1)
            d += 0.07 * anat.breasts * br * body_s
    d += 0.15 * cm_s
    d -= 0.36 * air
    # Lungs are a little denser at the bases and near the hila (more tissue in the beam).
    d += 0.05 * lung_s * smoothstep(V, 0.55, 1.05) + 0.035 * lung_s * (1 - smoothstep(np.abs(U), 0.2, 0.6))
    d += (0.032 * noise_tex) * air * markings

    # Trachea and main bronchi: an air column through the mediastinum.
    trachea = f.polygon(np.array([(-0.035, -3.0), (-0.04, 0.28), (-0.2, 0.38), (-0.17, 0.42), (0.0, 0.33),
                                  (0.17, 0.39), (0.19, 0.35), (0.04, 0.27), (0.035, -3.0)]))  # fmt: skip
    d -= 0.08 * blur(trachea, 1.2 * s1) * body_s

    # Gastric bubble under the left dome.
    if rng.random() < 0.6:
        bubble = f.polygon(
            ellipse(rng.uniform(0.3, 0.55), dome_l + rng.uniform(0.1, 0.16), rng.uniform(0.08, 0.15), 0.06, 24)
        )
        d -= 0.18 * blur(bubble & ~hemi_all, 1.5 * s1)

    # Vessels: trees from the hila, hidden where the lung has collapsed (pneumothorax) or by dense opacity.
    vessels = vessel_tree(rng, f)
    vblur = blur(vessels, 0.7 * s1)
    if sc.vessel_blur is not None:
        vblur = vblur * (1 - sc.vessel_blur) + blur(vessels, 1.6 * s1) * sc.vessel_blur
    d += 0.11 * vblur * lung_s * markings * (1.0 - 0.7 * opacity)
    if sc.bronchograms is not None:
        d -= 0.12 * vblur * sc.bronchograms
    hila = f.polygon(ellipse(-0.21, 0.42, 0.07, 0.1, 20)) | f.polygon(ellipse(0.2, 0.39, 0.06, 0.09, 20))
    d += 0.06 * blur(hila, 2.5 * s1) * lung_s

    # Bones.
    broken = None
    if "Fracture" in present:
        broken = (int(rng_find.integers(3, 8)), int(rng_find.choice([-1, 1])), float(rng_find.uniform(0.45, 0.85)))
    d += bones(rng, f, broken, present.get("Fracture", 0.0)) * body_s * (1.0 - 0.6 * cm_s)
    for o in sc.add:
        d += o

    # Marker letter in an upper corner, outside the body.
    if rng_expo.random() < 0.6:
        d = np.maximum(d, 0.9 * _marker(rng_expo, h, w))

    # ---------------------------------------------------------------- exposure and noise
    xx = np.arange(w, dtype=np.float32)[None, :] / w - 0.5
    d += np.float32(rng_expo.uniform(-0.04, 0.04)) * xx
    d += 0.012 * fractal_noise(rng_expo, h, w, (3, 6), (1.0, 0.5))
    sigma = rng_expo.uniform(0.008, 0.024)
    d += np.float32(sigma * 1.6) * blur(rng_expo.standard_normal((h, w)).astype(np.float32), 0.55)
    lo, hi = rng_expo.uniform(-0.02, 0.08), rng_expo.uniform(0.78, 0.98)
    img = np.clip((d - lo) / (hi - lo), 0.0, 1.0) ** np.float32(math.exp(rng_expo.normal(0, 0.12)))
    return img.astype(np.float32), finalise_masks(sc.masks, present)


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


def render_lateral(rng: np.random.Generator, anat: Anatomy, size: int) -> Array:
    """A simple lateral view, patient facing image left: chest wall and sternum in front, one large lung field that
    reaches behind the heart and down into the posterior recess, the heart anteroinferior, the thoracic spine with
    vertebral bodies and the back muscles behind it, arms raised in front of the face. ``[h, w]`` float32 [0, 1].

    Args:
        rng: the lateral view's own generator (the frontal view does not depend on it).
        anat: the patient.
        size: typical long side in pixels.

    Returns:
        The image, float32 ``[h, w]`` in [0, 1].
    """
    h, w = image_shape(rng, size)
    f = Frame(h, w, w * rng.uniform(0.47, 0.53), h * (anat.apex + 0.32), 0.4 * w, anat.lung_height * h, 0.0)
    U, V = f.U, f.V
    body_uv = np.array([(-0.8, -3.0), (-0.85, 0.1), (-0.9, 0.6), (-0.95, 1.2), (-0.9, 3.0),
                        (1.05, 3.0), (1.02, 1.2), (0.98, 0.3), (0.9, -3.0)])  # fmt: skip
    lung_uv = np.array([(-0.25, 0.0), (0.15, -0.05), (0.5, 0.12), (0.72, 0.45), (0.78, 0.85), (0.76, 1.12),
                        (0.55, 1.02), (0.2, 0.9), (-0.35, 0.86), (-0.68, 0.8), (-0.72, 0.5), (-0.6, 0.15)])  # fmt: skip
    lung_uv += rng.normal(0, 0.015, lung_uv.shape)
    body = f.polygon(chaikin(body_uv, np.zeros(len(body_uv), bool), 2))
    lung = f.polygon(chaikin(lung_uv, np.zeros(len(lung_uv), bool), 3))
    heart = f.polygon(ellipse(-0.3 + rng.normal(0, 0.03), 0.7, 0.38, 0.24, 32, -0.5))
    arms = f.polygon(ellipse(-0.55, -0.25, 0.75, 0.2, 32, 0.25))
    s1 = f.px_scale
    d = np.full((h, w), 0.05, np.float32)
    d += 0.5 * blur(body, 2 * s1)
    d += 0.1 * blur(body & (V > 0.85) & ~lung, 3 * s1)  # abdomen under the domes
    lung_s = blur(lung, 1.5 * s1) * (1 - 0.75 * blur(heart, 1.5 * s1))
    d -= 0.3 * lung_s
    d += 0.1 * blur(arms & body, 3 * s1)
    column = smoothstep(0.09 - np.abs(U - 0.62), 0.0, 0.02)
    bodies = 0.65 + 0.35 * (np.cos(np.pi * V / 0.1) ** 2 > 0.25)  # vertebral bodies and disc spaces
    d += 0.1 * blur(column * bodies, 0.8 * s1) * blur(body, 2 * s1)
    d += 0.05 * smoothstep(0.03 - np.abs(U + 0.8), 0.0, 0.02) * (V > -0.1) * (V < 0.75)  # sternum
    d += 0.025 * fractal_noise(rng, h, w, (8, 20, 40), (1.0, 0.6, 0.4)) * lung_s
    d += np.float32(rng.uniform(0.008, 0.024) * 1.6) * blur(rng.standard_normal((h, w)).astype(np.float32), 0.55)
    lo, hi = rng.uniform(-0.02, 0.08), rng.uniform(0.72, 0.95)
    return np.clip((d - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def encode_image(img: Array, mode: str, quality: int) -> bytes:
    """Encode a [h, w] float image in [0, 1]: 8-bit JPEG (grey or RGB) or 16-bit PNG holding 12-bit values.

    Args:
        img: the image, ``[h, w]`` in [0, 1].
        mode: "jpeg" (greyscale), "rgb" (the grey image as an RGB JPEG) or "png16".
        quality: JPEG quality, 1-100 (ignored for PNG).

    Returns:
        The encoded file's bytes.
    """
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
