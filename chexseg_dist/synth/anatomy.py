"""The patient and the geometry every view is drawn in: body habitus, the patient frame, and anatomical pieces.

Everything is laid out in a patient frame ``(u, v)``: ``u`` runs across the thorax from -1 (image left = patient
right, as radiographs are displayed) to +1, ``v`` from 0 at the lung apices to 1 at the costophrenic angles;
:class:`Frame` maps it to pixels. Besides the patient (:class:`Anatomy`) this module holds the raster and curve
helpers shared by the renderer and the findings, and the anatomy drawn the same way in every frontal view
(hemithorax outlines, hilar vessels, bones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

Array = np.ndarray


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
    """Draw a patient's body habitus (sizes in image fractions and patient-frame units).

    Args:
        rng: the patient's generator (shared by all of the patient's studies and views).

    Returns:
        The patient's anatomy.
    """
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


class Frame:
    """The affine from the patient frame (u, v) to pixels, with per-pixel (U, V) grids and raster helpers."""

    def __init__(self, height: int, width: int, cx: float, cy: float, hw: float, lh: float, theta: float) -> None:
        """Set up the affine and the per-pixel grids.

        Args:
            height: image height in pixels.
            width: image width in pixels.
            cx: pixel column of the frame's centre (u = 0).
            cy: pixel row of the frame's centre (v = 0.5).
            hw: pixels per unit of u (the thorax half width).
            lh: pixels per unit of v (the lung field height).
            theta: rotation in radians.
        """
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
        """A blank 8-bit image of the frame's size and a drawing context on it."""
        img = Image.new("L", (self.w, self.h))
        return img, ImageDraw.Draw(img)

    def polygon(self, uv: Array) -> Array:
        """Rasterised filled polygon (outline included), bool ``[h, w]``."""
        img, draw = self.canvas()
        draw.polygon(self.px(uv).ravel().tolist(), fill=1, outline=1)
        return np.asarray(img, dtype=bool)

    def polygon_px(self, xy: Array) -> Array:
        """Rasterised filled polygon from ``[N, 2]`` (x, y) pixel coordinates, bool ``[h, w]``."""
        img, draw = self.canvas()
        draw.polygon(xy.ravel().tolist(), fill=1, outline=1)
        return np.asarray(img, dtype=bool)

    def stroke_width(self, width_u: float) -> int:
        """A line width given in u units, in whole pixels (at least 1)."""
        return max(1, round(width_u * self.hw))


def blur(a: Array, sigma: float) -> Array:
    """Gaussian blur as float32 (sigma in pixels, at least 0.3; edges extended).

    Args:
        a: the array to blur (bool or float).
        sigma: standard deviation in pixels.

    Returns:
        The blurred array, float32.
    """
    return ndimage.gaussian_filter(a.astype(np.float32), max(sigma, 0.3), truncate=3.0, mode="nearest")


def smoothstep(x: Array, lo: float, hi: float) -> Array:
    """Smooth 0 -> 1 ramp of ``x`` between ``lo`` and ``hi`` (cubic Hermite), elementwise.

    Args:
        x: the values.
        lo: where the ramp starts (0 at and below).
        hi: where it ends (1 at and above).

    Returns:
        The ramp, same shape as ``x``.
    """
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def chaikin(pts: Array, corners: Array, iterations: int = 3) -> Array:
    """Corner-cutting smoothing of a closed polygon that keeps the vertices flagged in ``corners`` sharp.

    Args:
        pts: the polygon's vertices, ``[N, 2]``.
        corners: bool ``[N]``, the vertices to keep sharp.
        iterations: smoothing rounds; each doubles the vertex count.

    Returns:
        The smoothed polygon, ``[N * 2**iterations, 2]``.
    """
    for _ in range(iterations):
        prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        left = np.where(corners[:, None], pts, 0.25 * prev + 0.75 * pts)
        right = np.where(corners[:, None], pts, 0.75 * pts + 0.25 * nxt)
        pts = np.stack([left, right], axis=1).reshape(-1, 2)
        corners = np.repeat(corners, 2)
    return pts


def spline(ctrl: Sequence[tuple[float, float]], n: int = 40) -> Array:
    """Uniform Catmull-Rom curve through the control points (open), ``[M, 2]``.

    Args:
        ctrl: two or more control points; the curve passes through each.
        n: about how many points to return.

    Returns:
        The curve's points, ``[M, 2]``, ending at the last control point.
    """
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


def fractal_noise(rng: np.random.Generator, h: int, w: int, cells: Sequence[int], gains: Sequence[float]) -> Array:
    """Smooth noise with roughly unit standard deviation: bicubic-upsampled random grids summed over octaves.

    Args:
        rng: the generator the grids are drawn from.
        h: output height.
        w: output width.
        cells: grid cells along the long side, per octave.
        gains: weight of each octave.

    Returns:
        The noise, float32 ``[h, w]``.
    """
    out = np.zeros((h, w), dtype=np.float32)
    for n, g in zip(cells, gains):
        gh, gw = max(2, round(n * h / max(h, w))), max(2, round(n * w / max(h, w)))
        small = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32))
        out += g * np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return out / np.float32(math.sqrt(sum(g * g for g in gains)))


def image_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """Draw an image's ``(height, width)``: long side within 25% of ``size``, aspect ratio 0.8 to 1.25.

    Args:
        rng: the view's generator.
        size: typical long side in pixels.

    Returns:
        ``(height, width)`` in pixels.
    """
    long_side = size * rng.uniform(0.75, 1.25)
    ratio = rng.uniform(0.8, 1.25)  # height / width
    if ratio >= 1:
        return round(long_side), round(long_side / ratio)
    return round(long_side * ratio), round(long_side)


def lung_outline(anat: Anatomy, side: int) -> Array:
    """Hemithorax outline ``[N, 2]`` in (u, v); side -1 = image left (patient right), +1 = image right.

    Control points follow the apex, the lateral wall, the sharp costophrenic angle, the diaphragm dome and the
    mediastinal border, jittered per patient, then smoothed with the two angles kept sharp.

    Args:
        anat: the patient.
        side: -1 for the image left (patient right) hemithorax, +1 for the image right one.

    Returns:
        The outline, ``[N, 2]`` (u, v), closed implicitly.
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
    return chaikin(pts, corners, 3)


def ellipse(
    cu: float, cv: float, ru: float, rv: float, n: int = 32, angle: float = 0.0, wobble: Array | None = None
) -> Array:
    """An ellipse as a polygon, optionally with a wobbling radius.

    Args:
        cu: centre, first coordinate.
        cv: centre, second coordinate.
        ru: semi-axis along the first coordinate (before rotation).
        rv: semi-axis along the second coordinate (before rotation).
        n: vertex count.
        angle: rotation in radians.
        wobble: relative radius change per vertex, ``[n]``, or None for a plain ellipse.

    Returns:
        The vertices, ``[n, 2]``, in the same coordinates as the centre.
    """
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 1.0 + (wobble if wobble is not None else 0.0)
    x, y = ru * r * np.cos(t), rv * r * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cu + x * ca - y * sa, cv + x * sa + y * ca], axis=1)


def lerp(lo: float, hi: float, t: float) -> float:
    """Linear interpolation: ``lo`` at ``t = 0``, ``hi`` at ``t = 1``."""
    return lo + (hi - lo) * t


def vessel_tree(rng: np.random.Generator, f: Frame) -> Array:
    """Branching, tapering, slightly tortuous vessels from both hila, as a float ``[h, w]`` canvas in [0, 1].

    Grown level by level (vectorised): 8 trunks per hilum, each branch three kinked steps, two children per
    branch (90% kept), five levels; width and brightness fall with depth.

    Args:
        rng: the study's anatomy stream.
        f: the frontal view's frame.

    Returns:
        The vessels, float32 ``[h, w]`` in [0, 1].
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


def bones(rng: np.random.Generator, f: Frame, broken: tuple[int, int, float] | None, fracture_c: float) -> Array:
    """Ribs, clavicles, spine and humeral heads as additive density ``[h, w]``.

    Args:
        rng: the study's anatomy stream.
        f: the frontal view's frame.
        broken: (rib index, side, position along the rib) of a fracture: a gap with a small step, or None.
        fracture_c: the fracture's conspicuity (a larger step), 0 without one.

    Returns:
        Additive density, float32 ``[h, w]``.
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
            pts = spline([(side * 0.98, v0), (side * 0.7, v0 + 0.06), (side * 0.4, v0 + 0.17)], 20)
            draw.line(f.px(pts).ravel().tolist(), fill=255, width=f.stroke_width(0.035 * f.lh / f.hw), joint="curve")
        clav = spline([(side * 0.07, -0.05), (side * 0.3, -0.09), (side * 0.6, -0.1), (side * 0.9, -0.2)], 24)
        draw.line(f.px(clav).ravel().tolist(), fill=255, width=f.stroke_width(0.05 * f.lh / f.hw), joint="curve")
    ant = np.asarray(img, dtype=np.float32) / 255.0
    chest = smoothstep(1.08 - np.abs(U), 0.0, 0.08)
    # Posterior ribs fade laterally (they turn away from the film); anterior ribs are faint.
    fade = 1.0 - 0.45 * smoothstep(np.abs(U), 0.3, 1.0)
    out = 0.06 * blur(ribs, 0.6 * f.px_scale) * chest * fade + 0.03 * blur(ant, 1.2 * f.px_scale) * chest
    clav_boost = (V < 0.05).astype(np.float32)
    out += 0.06 * blur(ant, 0.8 * f.px_scale) * clav_boost
    # Spine: a band with vertebral bodies and disc spaces; pedicles as paired ovals.
    band = smoothstep(0.1 - np.abs(U), 0.0, 0.03)
    period = 0.092
    verts = 0.7 + 0.3 * np.cos(np.pi * (V - phase) / period) ** 2
    out += 0.09 * band * verts
    ped = np.exp(-(((np.abs(U) - 0.065) / 0.016) ** 2) - ((np.mod(V - phase, 2 * period) - period) / 0.03) ** 2)
    out += 0.03 * ped
    # Humeral heads and scapular edges.
    for side in (-1, 1):
        head = f.polygon(ellipse(side * 1.32, -0.12, 0.16, 0.14, 24))
        out += 0.07 * blur(head, 1.5 * f.px_scale)
    return out.astype(np.float32)
