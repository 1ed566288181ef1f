"""Decoding radiographs and putting them into the model frame.

Every stage that feeds a model (classifier training, pseudo-labelling, overlays) calls :func:`frame_from_bytes`
(or :func:`load_frame`), so the classifier sees exactly the same pixels in training and in pseudo-labelling.

Accepted: anything Pillow decodes, JPEG and PNG in practice; 8-bit grayscale, 16-bit grayscale (``I;16``/``I``),
RGB/RGBA/palette/CMYK (converted to luminance) and 32-bit float. EXIF orientation is ignored, as CheXpert does.
Intensities: 8-bit images are divided by 255; deeper images (16-bit, float) are min-max windowed to [0, 1],
because DICOM-derived PNGs rarely use their full nominal range (a 12-bit image in a 16-bit container would
otherwise be nearly black).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from chexseg_dist.core.fsio import read_bytes
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.errors import ImageDecodeError, InputNotFoundError

# Radiographs are large but never this large; beyond it we refuse instead of exhausting memory.
MAX_PIXELS = 100_000_000


def _open(data: bytes, source: str) -> Image.Image:
    if len(data) == 0:
        raise ImageDecodeError(source, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageDecodeError(source, f"image is {w}x{h} pixels, above the {MAX_PIXELS} pixel limit")
            return img
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for non-images.
        raise ImageDecodeError(source, f"not a decodable image ({type(exc).__name__}: {exc})") from None


def _to_unit_float(img: Image.Image, source: str) -> np.ndarray:
    """Pixels of a loaded PIL image as a 2-D float32 array in [0, 1]."""
    mode = img.mode
    if mode in ("L", "1"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if mode in ("RGB", "RGBA", "P", "PA", "LA", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.ndim != 2:
            raise ImageDecodeError(source, f"unsupported image layout: mode {mode!r} with shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ImageDecodeError(source, f"image (mode {mode!r}) contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            return np.zeros(arr.shape, dtype=np.float32)
        return ((arr - lo) / (hi - lo)).astype(np.float32)
    raise ImageDecodeError(source, f"unsupported image mode {mode!r}; expected grayscale (8/16-bit) or RGB")


def decode_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode image bytes to a 2-D float32 array in [0, 1] at the original resolution.

    Args:
        data: the encoded file (JPEG, PNG, ...).
        source: the file or URI, used in error messages.

    Returns:
        ``[height, width]`` float32 array in [0, 1].

    Raises:
        ImageDecodeError: empty, truncated, corrupt or non-image bytes, or an unsupported mode.
    """
    img = _open(data, source)
    try:
        img.load()
    except Exception as exc:
        raise ImageDecodeError(source, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    return _to_unit_float(img, source)


def frame_from_bytes(data: bytes, size: int, source: str = "<bytes>") -> tuple[np.ndarray, Letterbox]:
    """Decode image bytes and letterbox them into the ``size x size`` model frame.

    Large JPEGs are decoded with DCT scaling straight to at least the content size (Pillow's ``draft``), which is
    several times faster than a full decode and changes nothing about the geometry: the letterbox is computed
    from the original size.

    Returns:
        ``(frame, letterbox)``: frame is ``[size, size]`` uint8 (0 = padding / black), letterbox maps it back.
    """
    img = _open(data, source)
    width, height = img.size
    box = Letterbox(height=height, width=width, size=size)
    if img.format == "JPEG" and img.mode in ("L", "RGB"):
        img.draft(img.mode, (box.new_width, box.new_height))
    try:
        img.load()
    except Exception as exc:
        raise ImageDecodeError(source, f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    pixels = _to_unit_float(img, source)
    frame = box.image_to_frame(pixels, reduced=pixels.shape != (height, width))
    return np.clip(np.rint(frame * 255.0), 0, 255).astype(np.uint8), box


def read_image(path: str) -> np.ndarray:
    """Read and decode a local file or URI to ``[height, width]`` float32 in [0, 1] (see :func:`decode_image`)."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: no such image file or object") from None
    return decode_image(data, path)


def load_frame(path: str, size: int) -> tuple[np.ndarray, Letterbox]:
    """Read a local file or URI and letterbox it: ``([size, size]`` uint8 frame, :class:`Letterbox`)."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: no such image file or object") from None
    return frame_from_bytes(data, size, path)
