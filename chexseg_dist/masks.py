"""Saliency map -> binary mask (CheXlocalize conventions), in the original image or in the model frame.

The steps, per image and pathology (vectorised over the 10 pathologies of an image):

1. **Upsample** the raw Grad-CAM grid bilinearly: to the original ``height x width`` with
   :meth:`Letterbox.grid_to_original` (evaluation, exported predictions) or to the ``S x S`` model frame with
   :func:`grid_to_frame` (pseudo-labels for a segmentation model trained in the frame). Nothing else resizes maps.
2. **Normalise** each map by min-max to ``[0, 1]`` in float32, ``(m - min) / (max - min)``. A map whose range is
   below :data:`CONSTANT_RTOL` of its magnitude (an all-zero Grad-CAM, or interpolation noise on a constant grid)
   is *constant* and normalises to all zeros: no NaN, and it binarises to an empty mask under every strategy.
3. **Binarise** with a named strategy from :data:`BINARIZERS`:

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

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from scipy import ndimage

from chexseg_dist.geometry import Letterbox, grid_to_frame
from chexseg_dist.pathologies import OBSERVATIONS, TASK_OBSERVATION_INDEX, TASKS, observation_for_task

#: The frames masks can be made in.
FRAMES: tuple[str, ...] = ("original", "model")

#: A map whose range (max - min) is at most this fraction of max(|min|, |max|) is treated as constant. Bilinear
#: interpolation in float32 perturbs a constant grid by a few ulps (~1e-7 relative); real maps vary by far more.
CONSTANT_RTOL = 1e-5

#: Levels of the quantised map Otsu works on (``uint8(255 * m)``).
OTSU_LEVELS = 256

N_TASKS = len(TASKS)

#: 4-connected background per 2-D slice of a ``[P, h, w]`` stack (no connectivity across pathologies): the
#: structure scipy.ndimage.binary_fill_holes uses in 2-D.
_FILL_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_FILL_STRUCTURE[1] = ndimage.generate_binary_structure(2, 1)


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


# ---------------------------------------------------------------------------------------------------- Otsu
def otsu_levels(hist: np.ndarray) -> np.ndarray:
    """Otsu's threshold level per histogram, exactly as ``skimage.filters.threshold_otsu`` computes it.

    Args:
        hist: ``[P, L]`` integer counts of levels ``0..L-1``.

    Returns:
        ``[P]`` int64 levels; foreground is ``q > level``. A histogram with one occupied level returns that level
        (empty foreground), as skimage does for a constant image.
    """
    counts = np.asarray(hist, dtype=np.int64)
    n_levels = counts.shape[-1]
    centers = np.arange(n_levels, dtype=np.int64)
    # skimage works on the occupied range [min, max]; the extra empty bins below and above add exact zeros to
    # every cumulative sum, so the values (hence the argmax) are bit-identical once the empty ends are masked.
    weight1 = np.cumsum(counts, axis=-1)
    weight2 = np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean1 = np.cumsum(counts * centers, axis=-1) / weight1
        mean2 = (np.cumsum((counts * centers)[..., ::-1], axis=-1) / weight2[..., ::-1])[..., ::-1]
        variance12 = weight1[..., :-1] * weight2[..., 1:] * (mean1[..., :-1] - mean2[..., 1:]) ** 2
    occupied = counts > 0
    first = np.argmax(occupied, axis=-1)
    last = n_levels - 1 - np.argmax(occupied[..., ::-1], axis=-1)
    idx = np.arange(n_levels - 1)
    valid = (idx >= first[..., None]) & (idx < last[..., None])
    variance12 = np.where(valid, variance12, -np.inf)
    level = np.argmax(variance12, axis=-1)
    return np.where(first == last, first, level).astype(np.int64)


def fill_holes(masks: np.ndarray) -> np.ndarray:
    """Fill the holes of each 2-D mask of a stack: the result of ``scipy.ndimage.binary_fill_holes`` per slice.

    A hole is a background region not 4-connected to the border of its slice. Labelling the background once and
    filling only the (few, small) holes is several times faster than ``binary_fill_holes``' iterated dilation at
    radiograph sizes; ``tests/test_masks.py`` checks the two agree.

    Args:
        masks: ``[P, h, w]`` bool.

    Returns:
        ``[P, h, w]`` bool (a new array).
    """
    out = np.array(masks, dtype=bool)
    if out.size == 0:
        return out
    labels, n = ndimage.label(~out, structure=_FILL_STRUCTURE)
    if n == 0:
        return out
    border = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[edge] = True
    holes = np.flatnonzero(~border[1:]) + 1
    if holes.size:
        objects = ndimage.find_objects(labels)
        for lab in holes:
            sl = objects[lab - 1]
            if sl is not None:
                out[sl] |= labels[sl] == lab
    return out


# ---------------------------------------------------------------------------------------------------- strategies
class Binarizer(ABC):
    """A binarisation strategy: normalised maps -> masks (chosen by name through :data:`BINARIZERS`)."""

    name: ClassVar[str]

    @abstractmethod
    def binarise(self, norm: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        """Binarise normalised maps.

        Args:
            norm: ``[P, h, w]`` float32 in ``[0, 1]`` (constant maps all zero), cropped to the content window.
            tasks: ``[P]`` int indices into TASKS of each map (for per-pathology parameters).

        Returns:
            ``[P, h, w]`` bool masks (empty for constant maps).
        """


class OtsuBinarizer(Binarizer):
    """Otsu's threshold on the 0..255-quantised normalised map, holes filled (the benchmark's default)."""

    name = "otsu"

    def __init__(self, fill: bool = True) -> None:
        self.fill = fill

    def binarise(self, norm: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        q = quantise_maps(norm)
        p = q.shape[0]
        hist = np.stack([np.bincount(q[i].ravel(), minlength=OTSU_LEVELS) for i in range(p)]) if p else None
        if hist is None:
            return np.zeros(q.shape, dtype=bool)
        levels = otsu_levels(hist)
        masks = q > levels.astype(np.uint8)[:, None, None]
        return fill_holes(masks) if self.fill else masks


class ThresholdBinarizer(Binarizer):
    """``map > t`` with a tuned per-pathology threshold ``t`` in ``[0, 1]`` (exact float64 comparison)."""

    name = "tuned"

    def __init__(self, thresholds: Sequence[float] | np.ndarray) -> None:
        t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if t.shape != (N_TASKS,):
            raise ValueError(f"tuned strategy: expected {N_TASKS} thresholds (one per pathology), got {t.shape[0]}")
        if not np.all((t >= 0) & (t <= 1)):
            raise ValueError(f"tuned strategy: thresholds must be in [0, 1], got {t.tolist()}")
        self.thresholds = t

    def binarise(self, norm: np.ndarray, tasks: np.ndarray) -> np.ndarray:
        out = np.empty(norm.shape, dtype=bool)
        for i, k in enumerate(np.asarray(tasks, dtype=np.int64)):
            # float32 vs float64 scalar: numpy compares in float64, i.e. exactly (see tuning's one-pass binning).
            np.greater(norm[i], np.float64(self.thresholds[k]), out=out[i])
        return out


#: Binarisation strategies by name.
BINARIZERS: dict[str, type[Binarizer]] = {"otsu": OtsuBinarizer, "tuned": ThresholdBinarizer}


def create_binarizer(name: str, thresholds: Sequence[float] | np.ndarray | None = None) -> Binarizer:
    """Build a binarisation strategy by name (``otsu`` or ``tuned``; ``tuned`` needs the 10 thresholds)."""
    if name not in BINARIZERS:
        raise ValueError(f"unknown mask strategy {name!r}; choose one of {sorted(BINARIZERS)}")
    if name == "tuned":
        if thresholds is None:
            raise ValueError(
                "mask strategy 'tuned' needs thresholds: pass --thresholds T.json (chexseg tune-thresholds)"
            )
        return ThresholdBinarizer(thresholds)
    return OtsuBinarizer()


# ---------------------------------------------------------------------------------------------------- gating
def task_values(obs_values: np.ndarray) -> np.ndarray:
    """Columns of the 10 TASKS from ``[..., 14]`` values in OBSERVATIONS order (probabilities or labels)."""
    arr = np.asarray(obs_values)
    if arr.shape[-1] != len(OBSERVATIONS):
        raise ValueError(f"expected [..., 14] values in OBSERVATIONS order, got shape {arr.shape}")
    return arr[..., list(TASK_OBSERVATION_INDEX)]


def task_labels(manifest_rows: Any) -> np.ndarray:
    """Image-level labels of the 10 TASKS from manifest rows: ``[N, 10]`` float64 (1, 0, -1, NaN for blank).

    Each task's label is the manifest column of :func:`observation_for_task` (``Lung Opacity`` for
    ``Airspace Opacity``).
    """
    from chexseg_dist.labels import label_column

    return np.stack([label_column(manifest_rows, observation_for_task(t)) for t in TASKS], axis=1)


def gate(
    task_probs: np.ndarray | None = None,
    cutoffs: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    label_gating: bool = False,
) -> np.ndarray:
    """Which masks survive the gates (True = keep).

    Args:
        task_probs: ``[..., 10]`` probabilities (TASKS order); needed when ``cutoffs`` is given.
        cutoffs: ``[10]`` probability cutoffs; a mask is kept when ``prob >= cutoff`` (NaN probabilities: gated).
        labels: ``[..., 10]`` image-level labels; needed when ``label_gating``.
        label_gating: keep a mask only where its label is positive (``1.0``).

    Returns:
        ``[..., 10]`` bool.
    """
    shape: tuple[int, ...] = (N_TASKS,)
    if task_probs is not None:
        shape = np.shape(task_probs)
    elif labels is not None:
        shape = np.shape(labels)
    keep = np.ones(shape, dtype=bool)
    if cutoffs is not None:
        if task_probs is None:
            raise ValueError("probability cutoffs need the classifier probabilities")
        with np.errstate(invalid="ignore"):
            keep &= np.asarray(task_probs, dtype=np.float64) >= np.asarray(cutoffs, dtype=np.float64)
    if label_gating:
        if labels is None:
            raise ValueError("label gating needs the image-level labels: pass --manifest with the label columns")
        keep &= np.asarray(labels, dtype=np.float64) == 1.0
    return keep


# ---------------------------------------------------------------------------------------------------- tuned file
THRESHOLDS_FORMAT = "chexseg-thresholds"


@dataclass
class TunedThresholds:
    """The content of a thresholds file written by ``chexseg tune-thresholds``.

    Attributes:
        thresholds: ``[10]`` map thresholds in ``[0, 1]`` (TASKS order).
        cutoffs: ``[10]`` probability cutoffs in ``[0, 1]`` (TASKS order).
        meta: everything else recorded in the file (objective, grid, mIoU, store fingerprint...).
    """

    thresholds: np.ndarray
    cutoffs: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": THRESHOLDS_FORMAT, "version": 1}
        out["thresholds"] = {t: float(v) for t, v in zip(TASKS, self.thresholds)}
        out["cutoffs"] = {t: float(v) for t, v in zip(TASKS, self.cutoffs)}
        out.update(self.meta)
        return out

    def save(self, path: str) -> None:
        from chexseg_dist.fsio import open_file

        with open_file(path, "w") as f:
            json.dump(json_safe(self.to_json()), f, indent=2)

    @classmethod
    def load(cls, path: str) -> TunedThresholds:
        """Read a thresholds file.

        Raises:
            ValueError: naming the file and the missing or malformed field.
        """
        from chexseg_dist.fsio import open_file

        try:
            with open_file(path, "r") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no such thresholds file (write it with chexseg tune-thresholds)"
            ) from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != THRESHOLDS_FORMAT:
            raise ValueError(f'{path}: not a thresholds file (expected "format": "{THRESHOLDS_FORMAT}")')
        values = []
        for key in ("thresholds", "cutoffs"):
            section = data.get(key)
            if not isinstance(section, dict):
                raise ValueError(f"{path}: missing the {key!r} object {{pathology: value}}")
            missing = [t for t in TASKS if t not in section]
            if missing:
                raise ValueError(f"{path}: {key!r} lacks pathologies {missing}")
            arr = np.asarray([section[t] for t in TASKS], dtype=np.float64)
            if not np.all(np.isfinite(arr) & (arr >= 0) & (arr <= 1)):
                raise ValueError(f"{path}: {key!r} values must be numbers in [0, 1], got {arr.tolist()}")
            values.append(arr)
        meta = {k: v for k, v in data.items() if k not in ("thresholds", "cutoffs", "format", "version")}
        return cls(thresholds=values[0], cutoffs=values[1], meta=meta)


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---------------------------------------------------------------------------------------------------- the pipeline
@dataclass
class MaskMaker:
    """Maps -> masks: a binarisation strategy plus optional probability cutoffs and label gating.

    Attributes:
        binarizer: the strategy (:func:`create_binarizer`).
        cutoffs: ``[10]`` probability cutoffs, or None for no probability gate.
        label_gating: empty masks where the image-level label is not positive.
        max_pixels: pathologies are processed in groups of at most this many pixels (bounds memory: ten
            2800 x 2300 float32 maps are 260 MB).
    """

    binarizer: Binarizer
    cutoffs: np.ndarray | None = None
    label_gating: bool = False
    max_pixels: int = 20_000_000

    @classmethod
    def from_config(cls, cfg: Any, thresholds_path: str | None = None) -> MaskMaker:
        """Build from a :class:`~chexseg_dist.config.MasksConfig` (``thresholds_path`` overrides ``cfg.thresholds``).

        Raises:
            ValueError: ``tuned`` or ``prob_cutoff`` without a thresholds file.
        """
        path = thresholds_path or cfg.thresholds
        tuned = TunedThresholds.load(path) if path else None
        if (cfg.strategy == "tuned" or cfg.prob_cutoff) and tuned is None:
            what = "strategy=tuned" if cfg.strategy == "tuned" else "prob_cutoff"
            raise ValueError(
                f"masks.{what} needs a thresholds file: pass --thresholds T.json (chexseg tune-thresholds)"
            )
        binarizer = create_binarizer(cfg.strategy, tuned.thresholds if tuned is not None else None)
        cutoffs = tuned.cutoffs if (cfg.prob_cutoff and tuned is not None) else None
        return cls(binarizer=binarizer, cutoffs=cutoffs, label_gating=cfg.label_gating)

    def keep(self, probs: np.ndarray | None, labels: np.ndarray | None) -> np.ndarray:
        """``[10]`` bool: pathologies whose mask passes the gates (``probs``/``labels`` in OBSERVATIONS order)."""
        return gate(
            task_values(probs) if probs is not None else None,
            self.cutoffs,
            task_values(labels) if labels is not None else None,
            self.label_gating,
        )

    def masks(
        self,
        cams: np.ndarray,
        box: Letterbox,
        probs: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        frame: str = "original",
    ) -> np.ndarray:
        """The 10 masks of one image.

        Args:
            cams: ``[10, gh, gw]`` float raw Grad-CAM grids in TASKS order (as read from the map store).
            box: the image's letterbox.
            probs: ``[14]`` classifier probabilities in OBSERVATIONS order (needed with cutoffs).
            labels: ``[14]`` image-level labels in OBSERVATIONS order, NaN for blank (needed with label gating).
            frame: ``"original"`` (``[10, height, width]``) or ``"model"`` (``[10, S, S]``, padding always 0).

        Returns:
            ``[10, h, w]`` bool masks.
        """
        cams = np.asarray(cams, dtype=np.float32)
        if cams.ndim != 3 or cams.shape[0] != N_TASKS:
            raise ValueError(f"expected [{N_TASKS}, gh, gw] maps in TASKS order, got shape {cams.shape}")
        h, w = frame_shape(box, frame)
        rows, cols = content_window(box, frame)
        out = np.zeros((N_TASKS, h, w), dtype=bool)
        todo = np.flatnonzero(self.keep(probs, labels))
        per_group = max(1, self.max_pixels // max(1, h * w))
        for start in range(0, len(todo), per_group):
            tasks = todo[start : start + per_group]
            up = upsample_maps(cams[tasks], box, frame)
            if frame == "model":
                up = up[:, rows, cols]
            out[tasks, rows, cols] = self.binarizer.binarise(normalise_maps(up), tasks)
        return out


# ---------------------------------------------------------------------------------------------------- export
#: Below this many original-resolution pixels in total, export and tuning run in the calling process.
IN_PROCESS_PIXELS = 50_000_000


def process_map(fn: Any, items: Any, workers: int, window: int = 32) -> Any:
    """``map(fn, items)`` in order over a spawned process pool with at most ``window`` items in flight.

    ``Executor.map`` would submit (and hold in memory) every item up front; the window bounds memory for large
    stores. ``workers <= 1`` runs in this process. Spawned, not forked: fsspec/zarr threads are not fork-safe.
    """
    import collections
    import multiprocessing as mp
    from concurrent.futures import Future, ProcessPoolExecutor

    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        pending: collections.deque[Future[Any]] = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _export_job(job: tuple[MaskMaker, str, np.ndarray, tuple[int, int, int], np.ndarray, np.ndarray | None]) -> Any:
    """Worker: one image's 10 masks at original resolution, as RLEs."""
    from chexseg_dist.annotations import encode_mask

    maker, image_id, cams, params, probs, labels = job
    masks = maker.masks(cams, Letterbox(*params), probs, labels, frame="original")
    return image_id, {task: encode_mask(masks[k]) for k, task in enumerate(TASKS)}


def manifest_labels(manifest: str, image_ids: Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
    """Image-level labels ``[N, 14]`` (OBSERVATIONS order, NaN = blank) of the given images from a manifest.

    Args:
        manifest: Parquet manifest (``chexseg manifest``).
        image_ids: the images, matched by ``image_id``.
        rows: their manifest rows, if known (the map store records them): used and checked against the ids.

    Raises:
        ValueError: naming the manifest and up to five ids it lacks.
    """
    from chexseg_dist.labels import label_column
    from chexseg_dist.manifest import read_manifest

    table = read_manifest(manifest, columns=["row", "image_id", *OBSERVATIONS])
    ids = [str(v) for v in table.column("image_id").to_pylist()]
    index = {v: i for i, v in enumerate(ids)}
    missing = [i for i in image_ids if str(i) not in index]
    if missing:
        raise ValueError(
            f"{manifest}: {len(missing)} image(s) of the map store are not in the manifest, e.g. {missing[:5]}; "
            "pass the manifest the store was built from"
        )
    order = np.asarray([index[str(i)] for i in image_ids], dtype=np.int64)
    values = np.stack([label_column(table, name) for name in OBSERVATIONS], axis=1)
    return values[order]


def export_masks(
    store_uri: str,
    out: str,
    cfg: Any,
    manifest: str | None = None,
    skip_missing: bool = False,
    workers: int | None = None,
) -> int:
    """Write the masks of every image and pathology of a map store as CheXlocalize segmentation JSON.

    Args:
        store_uri: the map store.
        out: the JSON to write (local or URI).
        cfg: a :class:`~chexseg_dist.config.MasksConfig` (strategy, thresholds file, cutoffs, label gating, workers).
        manifest: labels for label gating (required when ``cfg.label_gating``).
        skip_missing: leave out images without maps (failed or not yet processed) instead of raising.
        workers: processes (default ``cfg.workers``).

    Returns:
        The number of images written.

    Raises:
        ValueError: images without maps (unless ``skip_missing``), or label gating without a manifest.
    """
    import warnings

    from chexseg_dist.annotations import write_segmentations
    from chexseg_dist.store import MapStore

    maker = MaskMaker.from_config(cfg)
    if maker.label_gating and not manifest:
        raise ValueError("masks.label_gating needs --manifest with the images' labels")
    store = MapStore.open(store_uri)
    done = store.done()
    if not done.all():
        missing = [str(i) for i in store.image_ids[~done]]
        msg = f"map store {store_uri}: {len(missing)} of {store.n} images have no maps (e.g. {missing[:5]})"
        if not skip_missing:
            raise ValueError(msg + "; re-run chexseg pseudolabel, or pass --skip-missing to leave them out")
        warnings.warn(msg + "; leaving them out of the predictions (--skip-missing)", stacklevel=2)
    labels = None
    if maker.label_gating:
        assert manifest is not None
        labels = manifest_labels(manifest, [str(i) for i in store.image_ids])

    def jobs() -> Any:
        for batch in store.iter_batches(batch_size=max(store.images_per_chunk, 64)):
            for j in range(len(batch)):
                box = batch.letterboxes[j]
                assert box is not None
                slot = int(batch.slots[j])
                yield (
                    maker,
                    str(batch.image_id[j]),
                    batch.cams[j],
                    (box.height, box.width, box.size),
                    batch.probs[j],
                    labels[slot] if labels is not None else None,
                )

    n_workers = cfg.workers if workers is None else workers
    sizes = np.asarray(store.array("orig_size")[:], dtype=np.int64)[done]
    if int((sizes[:, 0] * sizes[:, 1]).sum()) < IN_PROCESS_PIXELS:
        n_workers = 1  # starting processes (~1 s each) would cost more than it saves
    results: dict[str, dict[str, Any]] = {}
    for image_id, rles in process_map(_export_job, jobs(), n_workers):
        results[image_id] = rles
    write_segmentations(out, results)
    return len(results)
