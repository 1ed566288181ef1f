"""The findings drawn on a frontal radiograph, and the masks that come out of them.

Every ``draw_*`` function takes the study's findings stream ``rng``, the :class:`Scene` being drawn, the finding's
conspicuity ``c`` in (0, 1] and the global conspicuity multiplier ``k``. It adds the density change to the scene
(``opacity`` replaces lung air, ``add`` is additive) and records each drawn object as one mask component with
:meth:`Scene.mask`; :func:`finalise_masks` then turns the components into the ground truth. Enlarged
Cardiomediastinum and Cardiomegaly are not drawn here: they change the anatomy itself (see the renderer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from chexseg_dist.core.pathologies import TASKS, observation_for_task
from chexseg_dist.synth.anatomy import Array, Frame, blur, chaikin, ellipse, lerp, smoothstep, spline
from chexseg_dist.synth.labels import PATCHY, Study

_LOCALISED_OBS = {observation_for_task(t): t for t in TASKS}
_MIN_COMPONENT_PIXELS = 4


@dataclass
class Scene:
    """Accumulators while drawing one frontal radiograph."""

    f: Frame
    opacity: list[Array] = field(default_factory=list)  # fields in [0, 1] that replace lung air
    add: list[Array] = field(default_factory=list)  # additive density (pleural lines, devices...)
    masks: dict[str, list[Array]] = field(default_factory=dict)  # task -> components
    no_markings: Array | None = None  # pneumothorax: no vessels or texture
    extra_air: Array | None = None
    bronchograms: Array | None = None
    vessel_blur: Array | None = None

    def mask(self, task: str, comp: Array) -> None:
        """Record one drawn object (bool ``[h, w]``) as a component of ``task``'s mask."""
        self.masks.setdefault(task, []).append(comp)


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


def _blob_px(rng: np.random.Generator, f: Frame, y: float, x: float, r_px: float, wobble: float = 0.15) -> Array:
    n = 28
    return f.polygon_px(
        ellipse(x, y, r_px, r_px * rng.uniform(0.75, 1.0), n, rng.uniform(0, np.pi), _wobble(rng, n, wobble))
    )


def draw_lesions(rng: np.random.Generator, sc: Scene, lung_vis: Array, c: float, k: float) -> None:
    """Lung Lesion: 1-3 round, slightly lobulated nodules or masses, one mask component each.

    Args:
        lung_vis: the lung not hidden by the cardiomediastinal silhouette, bool ``[h, w]``.
    """
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
        amp = lerp(0.3, 1.0, float(np.clip(c + rng.normal(0, 0.1), 0.0, 1.0))) * k
        sc.opacity.append(blur(blob, 0.3 * r_px) * amp)
        sc.mask("Lung Lesion", blob & lung_vis)


def draw_patchy(rng: np.random.Generator, sc: Scene, lung_vis: Array, tex01: Array, c: float, k: float) -> None:
    """Airspace Opacity's own patches: one or two clusters of textured, pneumonia-like blobs.

    Args:
        lung_vis: the lung not hidden by the cardiomediastinal silhouette, bool ``[h, w]``.
        tex01: parenchymal texture in [0, 1] that modulates the opacity, ``[h, w]``.
    """
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
        amp = lerp(0.1, 0.6, c) * k
        sc.opacity.append(blur(region, 0.05 * f.hw) * amp * (0.55 + 0.9 * tex01))
        sc.mask("Airspace Opacity", region)


def draw_edema(rng: np.random.Generator, sc: Scene, lung_vis: Array, tex01: Array, c: float, k: float) -> None:
    """Edema: bilateral perihilar ("bat-wing") haze with interstitial texture and blurred vessels.

    Args:
        lung_vis: the lung not hidden by the cardiomediastinal silhouette, bool ``[h, w]``.
        tex01: parenchymal texture in [0, 1] that modulates the opacity, ``[h, w]``.
    """
    U, V = sc.f.U, sc.f.V
    field_ = np.zeros_like(U)
    for side in (-1, 1):
        weight = 1.0 if rng.random() < 0.75 else rng.uniform(0.55, 0.9)
        g = np.exp(-(((U - side * 0.3) / 0.4) ** 2 + ((V - 0.55) / 0.33) ** 2))
        field_ += weight * g * (np.sign(U) == side)
    mask = (field_ > 0.42) & lung_vis
    amp = lerp(0.07, 0.4, c) * k
    sc.opacity.append(field_ * amp * (0.6 + 0.8 * tex01))
    sc.vessel_blur = np.clip(field_ * (0.5 + c), 0.0, 1.0)
    sc.mask("Edema", mask)


_LOBES = ("RUL", "RML", "RLL", "LUL", "LLL")


def draw_consolidation(
    rng: np.random.Generator, sc: Scene, side_vis: dict[int, Array], tex01: Array, c: float, k: float
) -> None:
    """Consolidation: a dense region in one lobe: sharp where it meets a fissure, ill-defined elsewhere.

    Args:
        side_vis: side (-1 image left, +1 image right) -> that lung minus the cardiomediastinal silhouette.
        tex01: parenchymal texture in [0, 1] that modulates the opacity, ``[h, w]``.
    """
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
        ellipse(
            cu, cv, rng.uniform(0.2, 0.45), rng.uniform(0.15, 0.3), n, rng.uniform(-0.5, 0.5), _wobble(rng, n, 0.35)
        )
    )
    region = zone & blob
    if region.sum() < 30 * f.px_scale**2:
        region = zone
    amp = lerp(0.22, 0.95, c) * k
    soft = np.maximum(blur(region, 0.035 * f.hw), blur(region, 0.008 * f.hw) * zone)
    sc.opacity.append(np.clip(soft * 1.3, 0.0, 1.0) * amp * (0.7 + 0.5 * tex01))
    if rng.random() < 0.5:
        sc.bronchograms = blur(region, 1.0) * min(1.0, amp)
    sc.mask("Consolidation", region)


def draw_atelectasis(rng: np.random.Generator, sc: Scene, side_vis: dict[int, Array], c: float, k: float) -> None:
    """Atelectasis: a plate-like band in one lower zone, or a basal band along the diaphragm.

    Args:
        side_vis: side (-1 image left, +1 image right) -> that lung minus the cardiomediastinal silhouette.
    """
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
        amp = lerp(0.25, 0.9, c) * k
        sigma = 0.5 * f.px_scale
    else:  # basal band along the diaphragm
        t_px = max(2, round(rng.uniform(0.06, 0.14) * f.lh))
        below = np.zeros_like(lung)
        below[:-t_px] = lung[t_px:]
        ua = rng.uniform(0.2, 0.5)
        region = lung & ~below & (np.abs(f.U) > ua) & (np.abs(f.U) < ua + rng.uniform(0.35, 0.6)) & (f.V > 0.55)
        amp = lerp(0.2, 0.8, c) * k
        sigma = 1.2 * f.px_scale
    sc.opacity.append(blur(region, sigma) * amp)
    sc.mask("Atelectasis", region)


def draw_pneumothorax(
    rng: np.random.Generator,
    sc: Scene,
    lung_uv: dict[int, Array],
    hemi: dict[int, Array],
    cm: Array,
    c: float,
    k: float,
) -> None:
    """Pneumothorax: an apical/lateral crescent of pure air without lung markings, and the visceral pleural line.

    Args:
        lung_uv: side (-1 image left, +1 image right) -> hemithorax outline in (u, v), ``[N, 2]``.
        hemi: side -> hemithorax, bool ``[h, w]``.
        cm: the cardiomediastinal silhouette, bool ``[h, w]``.
    """
    f = sc.f
    side = -1 if rng.random() < 0.55 else 1
    outline = lung_uv[side]
    hilum = np.array([side * 0.22, 0.42])
    depth = lerp(0.06, 0.45, c)
    v_cut = lerp(0.35, 1.0, c) + rng.uniform(-0.05, 0.05)
    region = np.zeros_like(cm)
    collapsed = np.zeros_like(cm)
    for _ in range(4):
        wgt = np.clip(1.0 - outline[:, 1] / v_cut, 0.0, 1.0) ** 0.6
        wgt *= smoothstep(np.abs(outline[:, 0]), 0.14, 0.34)
        inner = outline + (hilum - outline) * (depth * wgt)[:, None]
        collapsed = f.polygon(inner)
        region = hemi[side] & ~collapsed & ~cm
        if region.sum() >= 12 * f.px_scale**2:
            break
        depth *= 1.5
    img, draw = f.canvas()
    draw.line(f.px(np.vstack([inner, inner[:1]])).ravel().tolist(), fill=1, width=1)
    line = np.asarray(img, dtype=bool) & ndimage.binary_dilation(region, iterations=2) & ~region & hemi[side]
    boost = blur(region, 0.7 * f.px_scale)
    sc.no_markings = boost if sc.no_markings is None else np.maximum(sc.no_markings, boost)
    sc.extra_air = boost * lerp(0.25, 1.0, c) * min(k, 1.5)
    sc.add.append(blur(line, 0.45) * lerp(0.05, 0.2, c) * k)
    sc.opacity.append(blur(collapsed & hemi[side] & ~cm, 1.5 * f.px_scale) * 0.12 * min(c * 2, 1.0) * k)
    sc.mask("Pneumothorax", region)


def draw_effusion(
    rng: np.random.Generator, sc: Scene, hemi: dict[int, Array], cm: Array, ap: bool, c: float, k: float
) -> None:
    """Pleural Effusion: dependent fluid with a lateral meniscus, or on AP views sometimes a layering veil.

    Args:
        hemi: side (-1 image left, +1 image right) -> hemithorax, bool ``[h, w]``.
        cm: the cardiomediastinal silhouette, bool ``[h, w]``.
        ap: an AP (supine, portable) view, where fluid may layer instead of forming a meniscus.
    """
    f = sc.f
    U, V = f.U, f.V
    r = rng.random()
    sides = [-1] if r < 0.35 else ([1] if r < 0.6 else [-1, 1])
    for side in sides:
        cs = float(np.clip(c + rng.normal(0, 0.15), 0.0, 1.0)) if len(sides) == 2 else c
        if ap and rng.random() < 0.25:  # supine layering effusion: a veil, densest at the base, no meniscus
            top = lerp(0.75, 0.35, cs)
            ramp = np.clip((V - top) / (1.05 - top), 0.0, 1.0)
            region = hemi[side] & ~cm & (top + 0.25 * (1.0 - top) < V)
            sc.opacity.append(hemi[side] * ramp * lerp(0.2, 0.55, cs) * k)
        else:
            height = lerp(0.05, 0.55, cs)
            meniscus = rng.uniform(0.3, 1.0)
            lateral = np.clip((np.abs(U) - 0.1) / 0.87, 0.0, 1.0) ** 1.3
            for _ in range(4):  # the meniscus: fluid climbs higher along the lateral chest wall
                surface = 1.0 - height * (0.3 + 0.7 * (0.5 + 0.5 * meniscus) * lateral)
                region = hemi[side] & ~cm & (surface < V)
                if region.sum() >= 15 * f.px_scale**2:
                    break
                height *= 1.4
            ramp = np.clip((V - surface) / 0.12, 0.0, 1.0) ** 0.7
            sc.opacity.append(blur(hemi[side] * ramp, 0.8 * f.px_scale) * lerp(0.35, 0.95, cs) * k)
        sc.mask("Pleural Effusion", region)


def draw_pleural_other(rng: np.random.Generator, sc: Scene, hemi: dict[int, Array], c: float, k: float) -> None:
    """Pleural Other: a thin lateral pleural thickening; label-only (no task mask), weak image evidence.

    Args:
        hemi: side (-1 image left, +1 image right) -> hemithorax, bool ``[h, w]``.
    """
    f = sc.f
    U, V = f.U, f.V
    side = int(rng.choice([-1, 1]))
    band = (
        hemi[side]
        & ~ndimage.binary_erosion(hemi[side], iterations=max(1, round(2.5 * f.px_scale)))
        & (V > 0.2)
        & (V < 0.75)
    )
    band &= np.abs(U) > 0.5
    sc.opacity.append(blur(band, 0.8 * f.px_scale) * lerp(0.25, 0.7, c) * min(k, 1.4))


# ---------------------------------------------------------------------------------------------------- devices
def draw_devices(rng: np.random.Generator, sc: Scene, study: Study, c: float, k: float, dome_l: float) -> None:
    """Support devices: each device is one mask component and a bright stroke in the image.

    Args:
        study: the study; its view (AP stands for the ICU setting) and other findings choose the devices.
        dome_l: v of the left dome's peak (the enteric tube ends in the stomach below it).
    """
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
    level = lerp(0.08, 0.45, c) * k
    for kind in kinds:
        img, draw = f.canvas()  # intensity 0..255
        contrast = level * rng.uniform(0.7, 1.2)
        if kind in ("ett", "chest_tube"):
            if kind == "ett":
                x = rng.normal(0, 0.01)
                pts = spline([(x, -3.0), (x, -0.5), (x + 0.01, rng.uniform(0.05, 0.22))], 30)
                width = 0.032
            else:
                side = -1 if rng.random() < 0.55 else 1
                pts = spline([(side * 1.3, 0.95), (side * 0.98, 0.75), (side * 0.86, 0.5), (side * 0.62, 0.22),
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
            pts = spline([*ctrl, stomach], 70)
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
            draw.line(f.px(spline(ctrl, 60)).ravel().tolist(), fill=230, width=f.stroke_width(0.014), joint="curve")
        elif kind == "pacemaker":
            side = 1 if rng.random() < 0.8 else -1
            cu, cv = side * rng.uniform(0.5, 0.75), rng.uniform(-0.1, 0.05)
            box = np.array(
                [(cu - 0.09, cv - 0.055), (cu + 0.09, cv - 0.055), (cu + 0.09, cv + 0.055), (cu - 0.09, cv + 0.055)]
            )
            draw.polygon(f.px(chaikin(box, np.zeros(4, bool), 2)).ravel().tolist(), fill=255, outline=255)
            inner = np.array(
                [(cu - 0.05, cv - 0.03), (cu + 0.06, cv - 0.03), (cu + 0.06, cv + 0.03), (cu - 0.05, cv + 0.03)]
            )
            draw.polygon(f.px(inner).ravel().tolist(), fill=190)
            targets = ([(-0.12, 0.56)], [(0.1, 0.72), (0.28, rng.uniform(0.8, 0.9))])  # atrium, ventricle
            for target in targets[: 1 + int(rng.random() < 0.8)]:
                lead = [(cu - side * 0.06, cv), (side * 0.3, cv - 0.08), (0.02, 0.02), (-0.07, 0.3), *target]
                draw.line(f.px(spline(lead, 60)).ravel().tolist(), fill=235, width=f.stroke_width(0.014), joint="curve")
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
                draw.line(f.px(spline(wire, 40)).ravel().tolist(), fill=140, width=1, joint="curve")
        stroke = np.asarray(img, dtype=np.float32) / 255.0
        sc.add.append(blur(stroke, 0.4) * contrast)
        sc.mask("Support Devices", stroke > 0)


def _fill_holes(mask: Array) -> Array:
    """``binary_fill_holes`` on the bounding box only (the flood fill dominates the cost on a full image)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    out = mask.copy()
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    out[sl] = ndimage.binary_fill_holes(mask[sl])
    return out


def finalise_masks(masks: dict[str, list[Array]], present: dict[str, float]) -> dict[str, list[Array]]:
    """Drop specks, fill holes per drawn object, and drop findings whose mask came out empty.

    Airspace Opacity gets its own patches plus the oedema, consolidation and atelectasis opacities.

    Args:
        masks: task -> drawn components, as recorded by :meth:`Scene.mask`.
        present: the study's findings; updated in place: findings whose mask came out empty are removed,
            "Lung Opacity" is set from the airspace opacities and the ``"_patchy"`` entry is dropped.

    Returns:
        Task -> cleaned, hole-filled components (tasks with no pixel left are absent).
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
    if PATCHY in present and "Airspace Opacity" not in out:
        del present[PATCHY]
    aso = list(out.get("Airspace Opacity", []))
    for task in ("Edema", "Consolidation", "Atelectasis"):
        aso += out.get(task, [])
    if aso:
        out["Airspace Opacity"] = aso
        present["Lung Opacity"] = max(present.get(o, 0.0) for o in (PATCHY, "Edema", "Consolidation", "Atelectasis"))
    else:
        out.pop("Airspace Opacity", None)
        present.pop("Lung Opacity", None)
    present.pop(PATCHY, None)
    return out
