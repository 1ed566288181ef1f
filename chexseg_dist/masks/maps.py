"""Saliency map -> binary mask (CheXlocalize conventions), in the original image or in the model frame.

The steps, per image and pathology (vectorised over the 10 pathologies of an image):

1. **Upsample** the raw Grad-CAM grid bilinearly: to the original ``height x width`` with
   :meth:`Letterbox.grid_to_original` (evaluation, exported predictions) or to the ``S x S`` model frame with
   :func:`grid_to_frame` (pseudo-labels for a segmentation model trained in the frame). Nothing else resizes maps.
2. **Normalise** each map by min-max to ``[0, 1]`` in float32, ``(m - min) / (max - min)``. A map whose range is
   below :data:`CONSTANT_RTOL` of its magnitude (an all-zero Grad-CAM, or interpolation noise on a constant grid)
   is *constant* and normalises to all zeros: no NaN, and it binarises to an empty mask under every strategy.
3. **Binarise** with a named strategy (:mod:`chexseg_dist.masks.binarize`; names in ``core.registry.BINARIZERS``):

   - ``otsu``: the normalised map quantised to ``0..255`` the way the benchmark does it (``uint8(255 * m)``,
     truncation), Otsu's threshold on that 256-bin histogram (identical to ``skimage.filters.threshold_otsu`` on
     the quantised map, ties going to the lower level), foreground ``q > level``, then holes filled (the result
     of ``scipy.ndimage.binary_fill_holes``, computed by labelling the 4-connected background).
   - ``tuned``: ``m > t`` with a per-pathology threshold ``t`` in ``[0, 1]`` from ``chexseg tune-thresholds``;
     the comparison is exact (float32 map against float64 threshold).

4. **Gate** (composable options of :class:`MaskMaker`): an empty mask when the classifier probability of that
   pathology is below its cutoff (kept when ``prob >= cutoff``), and/or when its image-level label is not positive
   (kept only for label ``1.0``; uncertain ``-1``, ``0`` and blank are gated out).

The model frame and its padding: the letterbox pads the image with black to ``S x S`` and the Grad-CAM grid spans
the whole frame, padding included. In the original frame the padding does not exist. In the model frame we make the
padding *not participate*: min-max statistics and Otsu's histogram come from the content window only, and the mask
is always 0 in the padding. So a frame mask is the frame version of the original-resolution mask (same threshold
level, same normalisation), a segmentation model trained on frame pseudo-masks learns exactly what evaluation
scores, and the padding (no anatomy) is never labelled positive.
"""

from __future__ import annotations

import numpy as np

from chexseg_dist.core.geometry import Letterbox, grid_to_frame

#: The frames masks can be made in.
FRAMES: tuple[str, ...] = ("original", "model")


#: A map whose range (max - min) is at most this fraction of max(|min|, |max|) is treated as constant. Bilinear
#: interpolation in float32 perturbs a constant grid by a few ulps (~1e-7 relative); real maps vary by far more.
CONSTANT_RTOL = 1e-5


#: Levels of the quantised map Otsu works on (``uint8(255 * m)``).
OTSU_LEVELS = 256


# ---------------------------------------------------------------------------------------------------- geometry
def _check_frame(frame: str) -> None:
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {list(FRAMES)}, got {frame!r}")


def frame_shape(box: Letterbox, frame: str = "original") -> tuple[int, int]:
    """``(h, w)`` of masks in ``frame``: the original size, or ``(S, S)``."""
    _check_frame(frame)
    return (box.height, box.width) if frame == "original" else (box.size, box.size)


def content_window(box: Letterbox, frame: str = "original") -> tuple[slice, slice]:
    """The rows and columns of ``frame`` that show the image: everything in the original frame, the letterbox
    content box (padding excluded) in the model frame."""
    _check_frame(frame)
    if frame == "original":
        return slice(0, box.height), slice(0, box.width)
    return (
        slice(box.pad_top, box.pad_top + box.new_height),
        slice(box.pad_left, box.pad_left + box.new_width),
    )


def upsample_maps(cams: np.ndarray, box: Letterbox, frame: str = "original") -> np.ndarray:
    """Bilinearly upsample raw maps to ``frame`` (the one geometry: :class:`Letterbox` / :func:`grid_to_frame`).

    Args:
        cams: ``[..., gh, gw]`` float raw Grad-CAM grids spanning the whole ``S x S`` frame.
        box: the image's letterbox.
        frame: ``"original"`` (``[..., height, width]``) or ``"model"`` (``[..., S, S]``).

    Returns:
        float32 ``[..., h, w]``.
    """
    _check_frame(frame)
    if frame == "original":
        return box.grid_to_original(cams)
    return grid_to_frame(cams, box.size)


def grid_weights(box: Letterbox, grid_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The separable interpolation weights of :meth:`Letterbox.grid_to_original` (``map = wy @ grid @ wx.T``).

    Returns:
        ``(wy [height, gh], wx [width, gw])`` float32.
    """
    return box.grid_weights(*grid_shape)


def _kinks(w: np.ndarray) -> np.ndarray:
    """Sorted rows of an interpolation matrix ``[n, g]`` between which the sampled function is affine.

    Along one axis the upsampled map is affine in the pixel index except where the interpolation weights change
    slope (at grid-cell centres and where clamping starts). Every affine piece takes its extrema at its two ends,
    so the extrema (and the first argmax in row-major order) of the whole map lie on the returned rows.
    """
    n = w.shape[0]
    if n <= 3:
        return np.arange(n)
    d2 = np.abs(w[2:].astype(np.float64) - 2 * w[1:-1] + w[:-2]).max(axis=1)
    # A real kink changes some weight's slope by >= one grid step per pixel (~1e-3); float32 noise is ~1e-7.
    flagged = np.flatnonzero(d2 > 1e-5) + 1
    idx = np.concatenate(([0, n - 1], flagged - 1, flagged, flagged + 1))
    return np.unique(np.clip(idx, 0, n - 1))


def _candidate_values(cams: np.ndarray, box: Letterbox) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The upsampled map (original frame) on the candidate rows x columns: ``(values [..., nr, nc], rows, cols)``."""
    wy, wx = grid_weights(box, cams.shape[-2:])
    rows, cols = _kinks(wy), _kinks(wx)
    vals = wy[rows].astype(np.float64) @ cams.astype(np.float64) @ wx[cols].T.astype(np.float64)
    return vals, rows, cols


def map_extrema(cams: np.ndarray, box: Letterbox) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of ``box.grid_to_original(cams)`` per map, without upsampling (float64, to ~1e-7 relative).

    Args:
        cams: ``[..., gh, gw]`` raw grids.

    Returns:
        ``(min [...], max [...])`` float64.
    """
    vals, _, _ = _candidate_values(cams, box)
    return vals.min(axis=(-2, -1)), vals.max(axis=(-2, -1))


def map_argmax(cams: np.ndarray, box: Letterbox) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixel of the maximum of each upsampled map (original frame), without upsampling.

    Equals ``np.unravel_index(np.argmax(box.grid_to_original(g)), (height, width))`` (first maximum in row-major
    order) up to float rounding between near-equal pixels.

    Args:
        cams: ``[..., gh, gw]`` raw grids.

    Returns:
        ``(row [...], col [...], constant [...])``: int64 pixel coordinates and a bool flag for constant maps
        (see :data:`CONSTANT_RTOL`), whose argmax is meaningless.
    """
    vals, rows, cols = _candidate_values(cams, box)
    lead = vals.shape[:-2]
    flat = vals.reshape(*lead, -1)
    k = np.argmax(flat, axis=-1)
    nc = len(cols)
    mn, mx = flat.min(axis=-1), flat.max(axis=-1)
    return rows[k // nc], cols[k % nc], is_constant(mn, mx)


# ---------------------------------------------------------------------------------------------------- normalisation
def is_constant(mn: np.ndarray | float, mx: np.ndarray | float) -> np.ndarray:
    """True where a map with these extrema counts as constant (range <= CONSTANT_RTOL * magnitude, or not finite)."""
    mn64, mx64 = np.asarray(mn, dtype=np.float64), np.asarray(mx, dtype=np.float64)
    rng = mx64 - mn64
    mag = np.maximum(np.abs(mn64), np.abs(mx64))
    with np.errstate(invalid="ignore"):
        return np.asarray(~np.isfinite(rng) | (rng <= CONSTANT_RTOL * mag))


def map_range(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-map offset and scale of the min-max normalisation.

    Args:
        maps: ``[..., h, w]`` float32 upsampled maps (already cropped to the content window).

    Returns:
        ``(lo, span)`` float32 ``[...]``: normalised = ``(maps - lo) / span``; for constant maps ``span`` is
        ``inf`` (so they normalise to exact zeros).
    """
    lo = maps.min(axis=(-2, -1))
    hi = maps.max(axis=(-2, -1))
    const = is_constant(lo, hi)
    span = np.where(const, np.float32(np.inf), hi - lo).astype(np.float32)
    return lo.astype(np.float32), span


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Per-map min-max normalisation to ``[0, 1]`` (float32); constant maps become all zeros (no NaN).

    Args:
        maps: ``[..., h, w]`` float upsampled maps.

    Returns:
        float32 ``[..., h, w]`` in ``[0, 1]``: ``(m - min) / (max - min)`` computed in float32.
    """
    maps = np.asarray(maps, dtype=np.float32)
    lo, span = map_range(maps)
    out = np.subtract(maps, lo[..., None, None])
    return np.divide(out, span[..., None, None], out=out)


def quantise_maps(norm: np.ndarray) -> np.ndarray:
    """The benchmark's 8-bit version of a normalised map: ``uint8(255 * m)`` (truncation), ``[..., h, w]`` uint8."""
    scaled = np.multiply(norm, np.float32(255.0), dtype=np.float32)
    out = np.empty(scaled.shape, dtype=np.uint8)
    # float -> uint8 cast truncates toward zero, as numpy.uint8(...) does in the benchmark's code.
    np.copyto(out, scaled, casting="unsafe")
    return out
