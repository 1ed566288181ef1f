"""The one image geometry: a letterbox (longest side to S, centred zero padding to S x S) and its exact inverse.

Every stage (classifier training, pseudo-labelling, pseudo-masks, evaluation, overlays) maps between the original
h x w radiograph and the square model frame through :class:`Letterbox`. The original CheXseg code centre-cropped
the classifier input but letterboxed the masks; using one object for both directions rules that defect out.

Coordinates follow PyTorch's ``align_corners=False`` convention: pixel ``i`` covers ``[i, i + 1)`` and its centre
is ``i + 0.5``. Original pixel ``(r, c)`` has its centre at frame coordinates
``(pad_top + (r + 0.5) * new_height / height, pad_left + (c + 0.5) * new_width / width)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Letterbox:
    """Letterbox of an ``height x width`` image into a ``size x size`` frame.

    Attributes:
        height: original image height in pixels (rows).
        width: original image width in pixels (columns).
        size: side ``S`` of the square model frame.
    """

    height: int
    width: int
    size: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"Letterbox: image size must be positive, got height={self.height} width={self.width}")
        if self.size < 2:
            raise ValueError(f"Letterbox: frame size must be >= 2, got size={self.size}")

    @property
    def scale(self) -> float:
        """Frame pixels per original pixel (the same on both axes)."""
        return self.size / max(self.height, self.width)

    @property
    def new_height(self) -> int:
        """Height of the image content inside the frame."""
        return max(1, min(self.size, round(self.height * self.scale)))

    @property
    def new_width(self) -> int:
        """Width of the image content inside the frame."""
        return max(1, min(self.size, round(self.width * self.scale)))

    @property
    def pad_top(self) -> int:
        """Rows of padding above the content."""
        return (self.size - self.new_height) // 2

    @property
    def pad_left(self) -> int:
        """Columns of padding left of the content."""
        return (self.size - self.new_width) // 2

    def params(self) -> tuple[int, int, int, int, int, int, int]:
        """``(height, width, size, new_height, new_width, pad_top, pad_left)``, as stored per image in the store."""
        return (self.height, self.width, self.size, self.new_height, self.new_width, self.pad_top, self.pad_left)

    def content_mask(self) -> np.ndarray:
        """``[size, size]`` bool: True on the frame's image content, False on its padding."""
        out = np.zeros((self.size, self.size), dtype=bool)
        out[self.pad_top : self.pad_top + self.new_height, self.pad_left : self.pad_left + self.new_width] = True
        return out

    @staticmethod
    def content_masks(params: np.ndarray) -> np.ndarray:
        """``[n, S, S]`` bool content windows of ``n`` frames from their stored :meth:`params` rows ``[n, 7]``
        (all of one frame size ``S``)."""
        rows = np.asarray(params, dtype=np.int64).reshape(-1, 7)
        size = int(rows[0, 2]) if len(rows) else 1
        out = np.zeros((len(rows), size, size), dtype=bool)
        for i, (_, _, s, nh, nw, top, left) in enumerate(rows.tolist()):
            if s != size:
                raise ValueError(f"Letterbox.content_masks: frames of sizes {size} and {s} in one stack")
            out[i, top : top + nh, left : left + nw] = True
        return out

    # ------------------------------------------------------------------ original -> frame
    def image_to_frame(self, image: np.ndarray, reduced: bool = False) -> np.ndarray:
        """Resize (antialiased bilinear) and pad an image into the frame.

        Args:
            image: ``[height, width]`` array, any real dtype.
            reduced: accept a reduced-resolution decode of the same image (e.g. a JPEG decoded with DCT scaling);
                it is resized to exactly the content box of this letterbox, so the geometry stays that of the
                original size.

        Returns:
            ``[size, size]`` float32 array; padding is 0.
        """
        if not reduced:
            self._check_shape(image, "image")
        content = _resize(image.astype(np.float32, copy=False), self.new_height, self.new_width)
        out = np.zeros((self.size, self.size), dtype=np.float32)
        out[self.pad_top : self.pad_top + self.new_height, self.pad_left : self.pad_left + self.new_width] = content
        return out

    def mask_to_frame(self, mask: np.ndarray) -> np.ndarray:
        """Map a binary mask from the original image into the frame (area-weighted, then ``>= 0.5``).

        Args:
            mask: ``[..., height, width]`` array of {0, 1} (bool or integer).

        Returns:
            ``[..., size, size]`` uint8 array of {0, 1}; padding is 0.
        """
        self._check_shape(mask, "mask")
        lead = mask.shape[:-2]
        flat = mask.reshape(-1, self.height, self.width)
        out = np.zeros((flat.shape[0], self.size, self.size), dtype=np.uint8)
        for i, m in enumerate(flat):
            content = _resize(m.astype(np.float32), self.new_height, self.new_width)
            out[i, self.pad_top : self.pad_top + self.new_height, self.pad_left : self.pad_left + self.new_width] = (
                content >= 0.5
            )
        return out.reshape(*lead, self.size, self.size)

    # ------------------------------------------------------------------ frame -> original
    def frame_to_original(self, frame: np.ndarray, mode: str = "bilinear") -> np.ndarray:
        """Map an array in the frame back to the original image (the exact inverse of the letterbox).

        Args:
            frame: ``[..., size, size]`` array.
            mode: ``"bilinear"`` for continuous maps (float32 result) or ``"nearest"`` for masks (dtype kept).

        Returns:
            ``[..., height, width]`` array.
        """
        if frame.shape[-2:] != (self.size, self.size):
            raise ValueError(f"frame_to_original: expected [..., {self.size}, {self.size}], got {frame.shape}")
        if mode == "nearest":
            rows = self._nearest_index(self.height, self.new_height, self.pad_top)
            cols = self._nearest_index(self.width, self.new_width, self.pad_left)
            return frame[..., rows[:, None], cols[None, :]]
        if mode != "bilinear":
            raise ValueError(f"frame_to_original: mode must be 'bilinear' or 'nearest', got {mode!r}")
        return self.grid_to_original(frame)

    def grid_to_original(self, grid: np.ndarray) -> np.ndarray:
        """Bilinearly upsample a low-resolution map that covers the whole frame straight to the original image.

        A ``gh x gw`` saliency grid (e.g. 10 x 10 for a 320 frame) spans the ``size x size`` frame; this samples it
        at the centre of every original pixel in one separable bilinear step (``align_corners=False``), which is
        what upsampling to the frame and then undoing the letterbox computes in continuous coordinates.

        Args:
            grid: ``[..., gh, gw]`` float array.

        Returns:
            ``[..., height, width]`` float32 array.
        """
        wy, wx = self.grid_weights(grid.shape[-2], grid.shape[-1])
        return np.asarray(wy @ grid.astype(np.float32, copy=False) @ wx.T, dtype=np.float32)

    def grid_weights(self, gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
        """The separable weights of :meth:`grid_to_original`: ``map = wy @ grid @ wx.T``.

        Lets callers evaluate the upsampled map at a few rows or columns (argmax, extrema) without materialising it.

        Returns:
            ``(wy [height, gh], wx [width, gw])`` float32.
        """
        wy = bilinear_matrix(
            self.height, gh, self.pad_top * gh / self.size, self.new_height / self.height * gh / self.size
        )
        wx = bilinear_matrix(
            self.width, gw, self.pad_left * gw / self.size, self.new_width / self.width * gw / self.size
        )
        return wy, wx

    def _nearest_index(self, n_out: int, n_content: int, pad: int) -> np.ndarray:
        centres = pad + (np.arange(n_out) + 0.5) * (n_content / n_out)
        return np.clip(np.floor(centres).astype(np.int64), 0, self.size - 1)

    def _check_shape(self, arr: np.ndarray, what: str) -> None:
        if arr.shape[-2:] != (self.height, self.width):
            raise ValueError(f"Letterbox: {what} has shape {arr.shape}, expected [..., {self.height}, {self.width}]")


def grid_to_frame(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly upsample a ``[..., gh, gw]`` grid to the ``[..., size, size]`` frame (``align_corners=False``).

    Equals ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``.
    """
    gh, gw = grid.shape[-2:]
    wy = bilinear_matrix(size, gh, 0.0, gh / size)
    wx = bilinear_matrix(size, gw, 0.0, gw / size)
    return np.asarray(wy @ grid.astype(np.float32, copy=False) @ wx.T, dtype=np.float32)


def bilinear_matrix(n_out: int, n_in: int, offset: float, step: float) -> np.ndarray:
    """Linear-interpolation weights ``[n_out, n_in]`` sampling input coordinate ``offset + (i + 0.5) * step``.

    Input pixel ``j`` covers ``[j, j + 1)``; samples outside the centres of the first or last pixel are clamped,
    as PyTorch's ``align_corners=False`` bilinear interpolation does.
    """
    u = offset + (np.arange(n_out, dtype=np.float64) + 0.5) * step - 0.5
    u = np.clip(u, 0.0, n_in - 1)
    j0 = np.floor(u).astype(np.int64)
    j1 = np.minimum(j0 + 1, n_in - 1)
    frac = u - j0
    w = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(w, (rows, j0), 1.0 - frac)
    np.add.at(w, (rows, j1), frac)
    return w


def _resize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize of a 2-D float32 array (PIL's 'F' mode)."""
    if arr.shape == (height, width):
        return arr.astype(np.float32, copy=True)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))  # float32 -> mode "F"
    return np.asarray(img.resize((width, height), resample=Image.Resampling.BILINEAR), dtype=np.float32)
