"""CheXlocalize annotation formats: image ids, segmentation JSON (COCO RLE), polygon JSON and radiologist points.

Formats (see the CheXlocalize benchmark, Saporta et al. 2022):

- Image id: the last three components of a CheXpert path, extension dropped:
  ``.../patient64541/study1/view1_frontal.jpg`` -> ``patient64541_study1_view1_frontal``.
- Segmentation JSON: ``{id: {pathology: {"size": [h, w], "counts": "<COCO compressed RLE>"}}}``, the standard
  pycocotools RLE of a uint8, Fortran-ordered ``h x w`` mask. Ground-truth files list all 10 tasks per image
  (empty masks for negatives).
- Polygon JSON: ``{id: {"img_size": [h, w], pathology: [[[x, y], ...], ...]}}``; ``x`` is the column and ``y`` the
  row, in original pixels; only positive pathologies are present. A polygon is rasterised the way the benchmark's
  ``annotation_to_segmentation.py`` does it (Pillow, ``outline=1, fill=1`` on a ``"1"`` image), so a filled polygon
  includes its outline and several polygons of one pathology are unioned. We call Pillow ourselves so that the
  masks are pixel-identical to the benchmark's.
- Radiologist points: ``{id: {pathology: [[x, y], ...]}}``.

Pathology keys are normalised to the CheXlocalize spelling (``"Lung Opacity"`` is read as ``"Airspace Opacity"``).
Every reader and writer takes local paths or URIs (``s3://...``) through :mod:`chexseg_dist.core.fsio`; writers
publish a file only once it is complete (temporary name and rename locally, one PUT on object stores).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask
from scipy import ndimage

from chexseg_dist.core import fsio
from chexseg_dist.core.pathologies import TASKS, UnknownPathologyError, canonical_task
from chexseg_dist.errors import AnnotationError, InputError

#: The pattern of a CheXpert image path: an optional prefix, an optional split directory, then
#: ``patient*/study*/<view file>``. Python ``re`` and RE2 (pyarrow.compute) read it the same way, so the
#: manifest's vectorised id derivation and :func:`image_id_from_path` cannot disagree.
CHEXPERT_PATH_PATTERN = (
    r"^(?:(?P<prefix>.*?)/)??"
    r"(?P<rel>(?:(?P<split>train|valid|test)/)?"
    r"(?P<patient>patient[^/]+)/(?P<study>study[^/]+)/(?P<file>(?P<view>[^/]+?)(?:\.[^./]*)?))$"
)
_PATH_RE = re.compile(CHEXPERT_PATH_PATTERN)

#: Key of the image size in polygon JSON files.
IMG_SIZE_KEY = "img_size"

RLE = dict[str, Any]
Polygon = list[list[float]]


def _where(source: str | None, image_id: str | None = None, pathology: str | None = None) -> str:
    parts = [p for p in (source, f"image {image_id!r}" if image_id is not None else None) if p]
    if pathology is not None:
        parts.append(f"pathology {pathology!r}")
    return ", ".join(parts) or "annotation"


# ---------------------------------------------------------------------------------------------------- image ids
def image_id_from_path(path: str) -> str:
    """The CheXlocalize image id of a CheXpert image path or URI.

    ``.../patient64541/study1/view1_frontal.jpg`` -> ``patient64541_study1_view1_frontal``: the patient, study and
    view components joined by ``_``, the extension dropped. The patient directory must start with ``patient`` and
    the study directory with ``study`` (as in every CheXpert release and in CheXlocalize); anything before them
    (dataset folder, split, bucket) is ignored. POSIX paths and ``scheme://`` URIs; no backslashes.

    Raises:
        InputError: naming the path, when it has fewer than 3 components or does not end in
            ``patient*/study*/<file>``.
    """
    m = _PATH_RE.match(path)
    if m is None or not m.group("view"):
        n = len([p for p in path.split("/") if p])
        why = "it has fewer than 3 path components" if n < 3 else "it does not end in patient*/study*/<view file>"
        raise InputError(
            f"cannot derive a CheXlocalize image id from {path!r}: {why}; expected a CheXpert layout such as "
            "'.../patient00001/study1/view1_frontal.jpg'"
        )
    return f"{m.group('patient')}_{m.group('study')}_{m.group('view')}"


def _canonical(pathology: str, where: str) -> str:
    try:
        return canonical_task(pathology)
    except UnknownPathologyError:
        raise AnnotationError(
            f"{where}: unknown pathology {pathology!r}; expected one of {list(TASKS)} (or the alias 'Lung Opacity')"
        ) from None


# ---------------------------------------------------------------------------------------------------- COCO RLE
def encode_mask(mask: np.ndarray) -> RLE:
    """COCO compressed RLE of a binary mask, as stored in CheXlocalize segmentation JSON.

    Args:
        mask: ``[h, w]`` array, bool or integer; nonzero is foreground.

    Returns:
        ``{"size": [h, w], "counts": str}`` (pycocotools RLE of the uint8 Fortran-ordered mask, counts decoded).
    """
    if mask.ndim != 2:
        raise ValueError(f"encode_mask: expected a 2-D [h, w] mask, got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _rle_size(rle: Any, where: str) -> tuple[int, int]:
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise AnnotationError(f"{where}: expected an RLE object {{'size': [h, w], 'counts': str}}, got {rle!r:.80}")
    size = rle["size"]
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in size)
    ):
        raise AnnotationError(f"{where}: RLE 'size' must be [height, width] (two non-negative integers), got {size!r}")
    return int(size[0]), int(size[1])


def _rle_counts(counts: str | bytes, where: str) -> np.ndarray:
    """Parse a COCO compressed RLE string into run lengths (int64), vectorised.

    pycocotools does not check the string: an empty or truncated one decodes to uninitialised memory, so every
    string is parsed and checked here first (pycocotools' ``rleFrString`` format: 6-bit groups offset by 48,
    continuation bit 0x20, sign bit 0x10 on the last group, runs from the 4th on delta-coded against two before).
    """
    raw = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        raise AnnotationError(f"{where}: RLE 'counts' is empty (a valid RLE has at least one run)")
    if (c < 0).any() or (c > 63).any():
        bad = int(np.flatnonzero((c < 0) | (c > 63))[0])
        raise AnnotationError(f"{where}: RLE 'counts' has an invalid character at offset {bad}")
    more = (c & 0x20) != 0
    if more[-1]:
        raise AnnotationError(f"{where}: RLE 'counts' is truncated (ends inside a run)")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    k = np.arange(c.size) - np.repeat(starts, ends - starts + 1)
    if k.max() > 10:
        raise AnnotationError(f"{where}: RLE 'counts' holds a run longer than 10 characters (corrupt string)")
    vals = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    sign = (c[ends] & 0x10) != 0
    vals = vals - np.where(sign, np.left_shift(1, 5 * (k[ends] + 1)), 0)
    # Undo the delta coding: run i (i >= 3) is stored relative to run i - 2.
    if vals.size > 3:
        vals[3::2] = vals[1] + np.cumsum(vals[3::2])
        if vals.size > 4:
            vals[4::2] = vals[2] + np.cumsum(vals[4::2])
    return vals


def decode_mask(
    rle: RLE,
    *,
    image_id: str | None = None,
    pathology: str | None = None,
    source: str | None = None,
    expected_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode one COCO RLE into a mask, checking it first.

    Args:
        rle: ``{"size": [h, w], "counts": str | bytes}``.
        image_id, pathology, source: named in error messages.
        expected_size: when given, the ``(h, w)`` the mask must have (e.g. the image's size).

    Returns:
        ``[h, w]`` uint8 array of 0/1, C-contiguous.

    Raises:
        AnnotationError: naming the source, image id and pathology, for a malformed size or counts string or a
            size different from ``expected_size``.
    """
    where = _where(source, image_id, pathology)
    h, w, runs = _check_rle(rle, where, allow_bytes=True)
    if expected_size is not None and (h, w) != tuple(expected_size):
        raise AnnotationError(
            f"{where}: mask size {h}x{w} differs from the image size {expected_size[0]}x{expected_size[1]}"
        )
    # Runs alternate background/foreground over the column-major pixel order, exactly as pycocotools decodes
    # them; decoding the already-checked runs here avoids a second parse.
    flat = np.repeat((np.arange(runs.size) % 2).astype(np.uint8), runs)
    return np.ascontiguousarray(flat.reshape(w, h).T)


def _check_rle(rle: Any, where: str, allow_bytes: bool = False) -> tuple[int, int, np.ndarray]:
    """Check an RLE's structure and that its runs cover exactly ``h * w`` pixels; returns ``(h, w, runs)``."""
    h, w = _rle_size(rle, where)
    counts = rle["counts"]
    if not isinstance(counts, str | bytes) or (isinstance(counts, bytes) and not allow_bytes):
        raise AnnotationError(f"{where}: RLE 'counts' must be a compressed RLE string, got {type(counts).__name__}")
    runs = _rle_counts(counts, where)
    if (runs < 0).any() or int(runs.sum()) != h * w:
        raise AnnotationError(
            f"{where}: RLE 'counts' does not describe a {h}x{w} mask (runs sum to {int(runs.sum())}, "
            f"{'with negative runs, ' if (runs < 0).any() else ''}expected {h * w})"
        )
    return h, w, runs


# ---------------------------------------------------------------------------------------------------- file I/O
def _read_json(path: str) -> Any:
    try:
        return json.loads(fsio.read_input(path, "annotation file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from None


def _write_json(path: str, obj: Any) -> None:
    fsio.write_bytes_atomic(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def _image_entries(data: Any, source: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    if not isinstance(data, Mapping):
        raise AnnotationError(
            f"{source}: expected a JSON object mapping image ids to annotations, got {type(data).__name__}"
        )
    for image_id, entry in data.items():
        if not isinstance(entry, Mapping):
            raise AnnotationError(f"{_where(source, image_id)}: expected an object of pathologies, got {entry!r:.80}")
        yield str(image_id), entry


def _normalise_keys(entry: Mapping[str, Any], source: str, image_id: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key in skip:
            continue
        name = _canonical(key, _where(source, image_id))
        if name in out:
            raise AnnotationError(
                f"{_where(source, image_id, name)}: given twice (as {name!r} and its alias 'Lung Opacity')"
            )
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------- segmentation JSON
def read_segmentations(path: str, *, validate: bool = True) -> dict[str, dict[str, RLE]]:
    """Read a CheXlocalize segmentation JSON file.

    Args:
        path: local path or URI.
        validate: parse every RLE string and check its size (cheap, vectorised); also checks that all masks of an
            image have the same size.

    Returns:
        ``{image_id: {pathology: {"size": [h, w], "counts": str}}}`` with canonical pathology names.

    Raises:
        AnnotationError: naming the file, image id and pathology of the first malformed entry.
    """
    data = _read_json(path)
    out: dict[str, dict[str, RLE]] = {}
    for image_id, entry in _image_entries(data, path):
        masks = _normalise_keys(entry, path, image_id)
        sizes: dict[tuple[int, int], str] = {}
        for name, rle in masks.items():
            if validate:
                size = _check_rle(rle, _where(path, image_id, name))[:2]
                sizes.setdefault(size, name)
        if len(sizes) > 1:
            desc = ", ".join(f"{h}x{w} ({name})" for (h, w), name in sizes.items())
            raise AnnotationError(f"{_where(path, image_id)}: masks of one image have different sizes: {desc}")
        out[image_id] = {name: {"size": list(rle["size"]), "counts": rle["counts"]} for name, rle in masks.items()}
    return out


def write_segmentations(path: str, data: Mapping[str, Mapping[str, RLE | np.ndarray]]) -> None:
    """Write a CheXlocalize segmentation JSON file (local path or URI), atomically.

    Args:
        data: ``{image_id: {pathology: rle or [h, w] mask}}``; masks are encoded with :func:`encode_mask`,
            pathology names are normalised to the CheXlocalize spelling and RLEs are checked.
    """
    out: dict[str, dict[str, RLE]] = {}
    for image_id, entry in _image_entries(data, path):
        masks = _normalise_keys(entry, path, image_id)
        enc: dict[str, RLE] = {}
        for name, value in masks.items():
            if isinstance(value, np.ndarray):
                enc[name] = encode_mask(value)
            else:
                _check_rle(value, _where(path, image_id, name))
                enc[name] = {"size": [int(s) for s in value["size"]], "counts": value["counts"]}
        out[image_id] = enc
    _write_json(path, out)


# ---------------------------------------------------------------------------------------------------- polygons
def _check_point(pt: Any, where: str) -> list[float]:
    if (
        not isinstance(pt, Sequence)
        or isinstance(pt, str)
        or len(pt) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in pt)
    ):
        raise AnnotationError(f"{where}: expected a point [x, y] of two finite numbers, got {pt!r:.80}")
    return [pt[0], pt[1]]


def _check_polygons(value: Any, where: str) -> list[Polygon]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise AnnotationError(f"{where}: expected a list of polygons [[[x, y], ...], ...], got {value!r:.80}")
    polys: list[Polygon] = []
    for i, poly in enumerate(value):
        pw = f"{where}, polygon {i}"
        if not isinstance(poly, Sequence) or isinstance(poly, str) or len(poly) == 0:
            raise AnnotationError(f"{pw}: expected a non-empty list of points [[x, y], ...], got {poly!r:.80}")
        polys.append([_check_point(pt, pw) for pt in poly])
    return polys


def _check_img_size(value: Any, where: str) -> tuple[int, int]:
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value)
    ):
        raise AnnotationError(
            f"{where}: '{IMG_SIZE_KEY}' must be [height, width] (two positive integers), got {value!r}"
        )
    return int(value[0]), int(value[1])


def read_polygons(path: str) -> dict[str, dict[str, Any]]:
    """Read a CheXlocalize polygon (annotation) JSON file.

    Returns:
        ``{image_id: {"img_size": (h, w), pathology: [polygon, ...]}}`` where a polygon is a list of ``[x, y]``
        points (x column, y row, original pixels) and pathology names are canonical.

    Raises:
        AnnotationError: naming the file, image id, pathology (and polygon index) of the first malformed entry,
            e.g. a missing ``img_size``.
    """
    data = _read_json(path)
    out: dict[str, dict[str, Any]] = {}
    for image_id, entry in _image_entries(data, path):
        if IMG_SIZE_KEY not in entry:
            raise AnnotationError(f"{_where(path, image_id)}: missing '{IMG_SIZE_KEY}': [height, width]")
        item: dict[str, Any] = {IMG_SIZE_KEY: _check_img_size(entry[IMG_SIZE_KEY], _where(path, image_id))}
        for name, value in _normalise_keys(entry, path, image_id, skip=(IMG_SIZE_KEY,)).items():
            item[name] = _check_polygons(value, _where(path, image_id, name))
        out[image_id] = item
    return out


def write_polygons(path: str, data: Mapping[str, Mapping[str, Any]]) -> None:
    """Write a CheXlocalize polygon JSON file atomically; same structure as :func:`read_polygons` returns."""
    out: dict[str, dict[str, Any]] = {}
    for image_id, entry in _image_entries(data, path):
        if IMG_SIZE_KEY not in entry:
            raise AnnotationError(f"{_where(path, image_id)}: missing '{IMG_SIZE_KEY}': [height, width]")
        h, w = _check_img_size(entry[IMG_SIZE_KEY], _where(path, image_id))
        item: dict[str, Any] = {IMG_SIZE_KEY: [h, w]}
        for name, value in _normalise_keys(entry, path, image_id, skip=(IMG_SIZE_KEY,)).items():
            item[name] = _check_polygons(value, _where(path, image_id, name))
        out[image_id] = item
    _write_json(path, out)


def polygons_to_mask(polygons: Sequence[Sequence[Sequence[float]]], height: int, width: int) -> np.ndarray:
    """Rasterise polygons the CheXlocalize way (filled, outline included, unioned).

    Args:
        polygons: list of polygons, each a list of ``[x, y]`` points (x column, y row, original pixels; floats
            allowed, Pillow rounds them as the benchmark does). A one-point polygon marks that pixel.
        height, width: size of the mask (the image's original size).

    Returns:
        ``[height, width]`` uint8 array of 0/1.
    """
    img = Image.new("1", (width, height))
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        pts = [(float(p[0]), float(p[1])) for p in poly]
        if len(pts) == 1:  # Pillow refuses a 1-point polygon; a 2-point one with equal points draws the pixel.
            pts = pts * 2
        if pts:
            draw.polygon(pts, outline=1, fill=1)
    return np.array(img, dtype=np.uint8)


# Neighbour offsets (dy, dx), clockwise on screen (y down) starting east.
_OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))
_DIRECTION = {off: i for i, off in enumerate(_OFFSETS)}


def _trace_outer_border(img: np.ndarray, y0: int, x0: int) -> list[tuple[int, int]]:
    """Outer border of the 8-connected component containing ``(y0, x0)`` (Suzuki & Abe 1985, algorithm 1).

    ``img`` is a zero-padded binary image holding only this component and ``(y0, x0)`` its first pixel in raster
    order. Returns the border pixels ``(y, x)`` in counterclockwise order; a pixel is repeated where the border
    passes through it twice (one-pixel-wide parts).
    """
    for k in range(8):  # clockwise from the west neighbour, which is background for the raster-first pixel
        d = (4 + k) % 8
        if img[y0 + _OFFSETS[d][0], x0 + _OFFSETS[d][1]]:
            break
    else:
        return [(y0, x0)]
    p1 = (y0 + _OFFSETS[d][0], x0 + _OFFSETS[d][1])
    p2, p3 = p1, (y0, x0)
    border = []
    while True:
        back = _DIRECTION[(p2[0] - p3[0], p2[1] - p3[1])]
        for k in range(1, 9):  # counterclockwise, starting after the pixel we came from
            d = (back - k) % 8
            p4 = (p3[0] + _OFFSETS[d][0], p3[1] + _OFFSETS[d][1])
            if img[p4]:
                break
        border.append(p3)
        if p4 == (y0, x0) and p3 == p1:
            return border
        p2, p3 = p3, p4


def _drop_collinear(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Keep only the corners of a closed chain of unit (axis or diagonal) steps."""
    n = len(points)
    if n < 3:
        return points
    keep = []
    for i in range(n):
        a, b, c = points[i - 1], points[i], points[(i + 1) % n]
        if (b[0] - a[0], b[1] - a[1]) != (c[0] - b[0], c[1] - b[1]):
            keep.append(b)
    return keep or points[:1]


def mask_to_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """Polygons (CheXlocalize convention) whose rasterisation by :func:`polygons_to_mask` is the mask, holes filled.

    One polygon per 8-connected component: its outer border traced through pixel centres, with collinear
    vertices dropped. Exactness: ``polygons_to_mask(mask_to_polygons(m), h, w)`` equals
    ``scipy.ndimage.binary_fill_holes(m)`` (holes = background not 4-connected to the image border) for every
    binary mask; so it reproduces ``m`` pixel-exactly iff ``m`` has no holes. Polygons cannot express holes, which
    is also true of the benchmark's format; every mask this project writes as polygons (filled blobs) qualifies.

    Args:
        mask: ``[h, w]`` array, nonzero is foreground.

    Returns:
        list of polygons, each a list of ``[x, y]`` integer points (x column, y row); components in raster order of
        their first pixel. A single-pixel component gives a one-point polygon.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask_to_polygons: expected a 2-D [h, w] mask, got shape {mask.shape}")
    fg = mask != 0
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    polygons: list[list[list[int]]] = []
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = np.pad(labels[sl] == index, 1)
        first = int(np.flatnonzero(comp.ravel())[0])
        y0, x0 = divmod(first, comp.shape[1])
        border = _drop_collinear(_trace_outer_border(comp, y0, x0))
        oy, ox = sl[0].start - 1, sl[1].start - 1
        polygons.append([[x + ox, y + oy] for y, x in border])
    # find_objects orders by label, and labels follow raster order of each component's first pixel.
    return polygons


def polygons_to_segmentations(polygons: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, RLE]]:
    """Ground-truth segmentations from polygon annotations: every task of TASKS for every image.

    Args:
        polygons: as returned by :func:`read_polygons` (``{id: {"img_size": (h, w), pathology: polygons}}``).

    Returns:
        ``{image_id: {task: rle}}`` with all 10 tasks in TASKS order, empty masks (at ``img_size``) for the tasks
        without polygons: the CheXlocalize ground-truth convention.
    """
    out: dict[str, dict[str, RLE]] = {}
    for image_id, entry in polygons.items():
        h, w = _check_img_size(entry.get(IMG_SIZE_KEY), _where(None, image_id))
        given = _normalise_keys(entry, "polygons", image_id, skip=(IMG_SIZE_KEY,))
        out[image_id] = {task: encode_mask(polygons_to_mask(given.get(task, []), h, w)) for task in TASKS}
    return out


def polygons_json_to_segmentations(src: str, dst: str | None = None) -> dict[str, dict[str, RLE]]:
    """Convert a whole polygon JSON file into ground-truth segmentation JSON.

    Args:
        src: polygon JSON (local path or URI).
        dst: where to write the segmentation JSON; nothing is written when None.

    Returns:
        The segmentations, as :func:`polygons_to_segmentations`.
    """
    seg = polygons_to_segmentations(read_polygons(src))
    if dst is not None:
        write_segmentations(dst, seg)
    return seg


# ---------------------------------------------------------------------------------------------------- points
def read_points(path: str) -> dict[str, dict[str, np.ndarray]]:
    """Read radiologist points ``{id: {pathology: [[x, y], ...]}}``.

    Returns:
        ``{image_id: {pathology: float64 array [n, 2]}}``, columns ``(x, y)`` = (column, row) in original pixels,
        canonical pathology names.

    Raises:
        AnnotationError: naming the file, image id and pathology of a malformed entry.
    """
    data = _read_json(path)
    out: dict[str, dict[str, np.ndarray]] = {}
    for image_id, entry in _image_entries(data, path):
        item: dict[str, np.ndarray] = {}
        for name, value in _normalise_keys(entry, path, image_id).items():
            where = _where(path, image_id, name)
            if not isinstance(value, Sequence) or isinstance(value, str):
                raise AnnotationError(f"{where}: expected a list of points [[x, y], ...], got {value!r:.80}")
            pts = [_check_point(pt, where) for pt in value]
            item[name] = np.asarray(pts, dtype=np.float64).reshape(len(pts), 2)
        out[image_id] = item
    return out


def write_points(path: str, data: Mapping[str, Mapping[str, Any]]) -> None:
    """Write radiologist points ``{id: {pathology: [[x, y], ...] or array [n, 2]}}`` atomically."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for image_id, entry in _image_entries(data, path):
        out[image_id] = {
            name: [[float(x), float(y)] for x, y in np.asarray(value, dtype=np.float64).reshape(-1, 2)]
            for name, value in _normalise_keys(entry, path, image_id).items()
        }
    _write_json(path, out)
