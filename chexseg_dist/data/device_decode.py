"""Decoding JPEG batches on the accelerator (nvJPEG) into the same letterboxed frames the CPU path makes.

The pseudo-labelling actor decodes its batch where the model runs: one batched ``torchvision.io.decode_jpeg`` call
on the device, then the letterbox on the device, with the geometry of :class:`Letterbox` and the resampling of
:func:`~chexseg_dist.data.images.frame_from_bytes`. Whatever the device decoder is not given or refuses goes, per
image, to ``frame_from_bytes`` itself, so it yields the CPU path's frame or the CPU path's failure record:

- not a JPEG (PNG, 16-bit, anything else), or a JPEG that is not 8-bit gray / YCbCr (CMYK, Adobe RGB-coded), or one
  above the pixel limit, or one that does not end with its EOI marker (truncated, or bytes after the image);
- a JPEG the device decoder raises on. One bad file fails a whole batched call, so the batch is then decoded one
  image at a time and only the files that raise on their own go to the CPU path.

Matching the CPU path: it decodes large JPEGs with DCT scaling (Pillow's ``draft``: ``1/s`` of the size, ``s`` in
1, 2, 4, 8), which is close to an ``s x s`` block mean of the full decode. The device path computes that block
mean (edges replicated to whole blocks, as JPEG encoders pad), rounds it to 8 bits as a decoder would, and then
resizes with antialiased bilinear interpolation, which is Pillow's ``BILINEAR`` reduction filter. Gray is the
decoder's luma (Y); the CPU path converts RGB back to luminance, the same weights up to one grey level of
rounding. EXIF orientation is ignored on both paths. Measured agreement with the CPU path (libjpeg-turbo on both
sides, S = 320 and 512, 150 to 2,830 px, gray and colour JPEGs): at most 2 grey levels, mean under 0.1.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.serialize import now_utc
from chexseg_dist.data.frames import read_error
from chexseg_dist.data.images import MAX_PIXELS, frame_from_bytes
from chexseg_dist.errors import ImageDecodeError

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; decode_jpeg(device="cuda") is still the nvJPEG
# batch decoder we want, so its per-call deprecation notice is silenced here and nowhere else.
_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


@dataclass
class DeviceFrames:
    """The decoded batch, row for row with the inputs (the columns of :func:`~chexseg_dist.data.frames.decode_frames`).

    Attributes:
        frames: ``[n, S, S]`` uint8 on the decoding device (0 = padding; zeros for a failure).
        letterbox: ``[n, 7]`` int32 :meth:`Letterbox.params` (zeros for a failure).
        stage: ``""`` when fine, ``"read"`` (the bytes could not be fetched) or ``"decode"``.
        error: the failure record's reason (``""`` when fine), worded as the CPU path words it.
        time: UTC time of the failure (``""`` when fine).
        on_device: images decoded by the device decoder.
        fallback: images sent to the CPU path (decoded there, or failed there); ``on_device + fallback`` plus the
            read failures is ``n``.
    """

    frames: torch.Tensor
    letterbox: np.ndarray
    stage: list[str]
    error: list[str]
    time: list[str]
    on_device: int = 0
    fallback: int = 0

    def _fail(self, i: int, stage: str, error: str) -> None:
        self.stage[i], self.error[i], self.time[i] = stage, error, now_utc()


def decode_on_device(
    datas: Sequence[bytes | BaseException], paths: Sequence[str], image_size: int, device: str | torch.device
) -> DeviceFrames:
    """Decode and letterbox a batch: JPEGs with one batched call on ``device``, the rest on the CPU path.

    Args:
        datas: each image's bytes, or the exception that reading it raised (:func:`fetch_bytes`).
        paths: the file or URI of each image, for failure records.
        image_size: side ``S`` of the model frame.
        device: where to decode and where the frames live (``"cuda"``, ``"cuda:1"``, ``"cpu"``).

    Returns:
        :class:`DeviceFrames`; a failed image has a zero frame and its reason, and never raises.
    """
    if len(datas) != len(paths):
        raise ValueError(f"decode_on_device: {len(datas)} byte strings for {len(paths)} paths; pass one per path")
    n, dev = len(paths), torch.device(device)
    out = DeviceFrames(
        frames=torch.zeros((n, image_size, image_size), dtype=torch.uint8, device=dev),
        letterbox=np.zeros((n, 7), dtype=np.int32),
        stage=[""] * n,
        error=[""] * n,
        time=[""] * n,
    )
    blobs: dict[int, bytes] = {}
    jpegs: dict[int, tuple[int, int]] = {}  # row -> (height, width) from the JPEG's header
    for i, data in enumerate(datas):
        if isinstance(data, BaseException):
            out._fail(i, "read", read_error(data, paths[i]))
            continue
        blobs[i] = bytes(data)
        size = device_decodable(blobs[i])
        if size is not None:
            jpegs[i] = size
    on_cpu = [i for i in blobs if i not in jpegs]
    decoded = _decode_jpegs([blobs[i] for i in jpegs], dev)
    for (i, size), image in zip(jpegs.items(), decoded):
        if image is None or tuple(image.shape) != size:
            on_cpu.append(i)
            continue
        frame, box = letterbox_tensor(image, image_size, jpeg=True)
        out.frames[i] = frame
        out.letterbox[i] = box.params()
        out.on_device += 1
    for i in sorted(on_cpu):
        out.fallback += 1
        try:
            cpu_frame, box = frame_from_bytes(blobs[i], image_size, paths[i])
        except ImageDecodeError as exc:
            out._fail(i, "decode", str(exc))
            continue
        except Exception as exc:  # As on the CPU path: whatever a decoder throws is this one image's problem.
            out._fail(i, "decode", f"{paths[i]}: {type(exc).__name__}: {exc}")
            continue
        out.frames[i] = torch.from_numpy(cpu_frame).to(dev)
        out.letterbox[i] = box.params()
    return out


def device_decodable(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG the device decoder is given, or None for one that goes to the CPU path.

    Only the markers are read (no pixel data): a complete baseline or progressive 8-bit JPEG in gray or YCbCr,
    within the CPU path's pixel limit, qualifies.
    """
    if not data.startswith(JPEG_MAGIC) or not data.endswith(JPEG_EOI):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if img.format != "JPEG" or img.mode not in ("L", "RGB") or width * height > MAX_PIXELS:
                    return None
                if img.mode == "RGB" and img.info.get("adobe_transform") == 0:  # RGB-coded, not YCbCr: no luma
                    return None
                return height, width
    except Exception:  # Anything the header parser refuses is the CPU path's to report.
        return None


def letterbox_tensor(image: torch.Tensor, image_size: int, *, jpeg: bool = False) -> tuple[torch.Tensor, Letterbox]:
    """Letterbox an 8-bit gray image into the model frame on its own device, as :func:`frame_from_bytes` does.

    Args:
        image: ``[H, W]`` uint8 (gray levels 0..255), any device.
        image_size: side ``S`` of the model frame.
        jpeg: the image is the full decode of a JPEG: first reduce it as the CPU path's DCT-scaled decode does
            (an ``s x s`` block mean rounded to 8 bits, ``s`` chosen as Pillow's ``draft`` chooses it).

    Returns:
        ``(frame, letterbox)``: frame is ``[S, S]`` uint8 on ``image.device`` (0 = padding).
    """
    if image.ndim != 2 or image.dtype != torch.uint8:
        raise ValueError(f"letterbox_tensor: expected a [H, W] uint8 image, got {image.dtype} {tuple(image.shape)}")
    height, width = image.shape
    box = Letterbox(height=height, width=width, size=image_size)
    x = image.to(torch.float32)[None, None]
    s = draft_scale(box) if jpeg else 1
    if s > 1:
        x = F.pad(x, (0, -width % s, 0, -height % s), mode="replicate")
        x = F.avg_pool2d(x, s).round_().clamp_(0, 255)
    x = x / 255.0
    if x.shape[-2:] != (box.new_height, box.new_width):
        x = F.interpolate(x, size=(box.new_height, box.new_width), mode="bilinear", align_corners=False, antialias=True)
    frame = torch.zeros((image_size, image_size), dtype=torch.uint8, device=image.device)
    rows = slice(box.pad_top, box.pad_top + box.new_height)
    cols = slice(box.pad_left, box.pad_left + box.new_width)
    frame[rows, cols] = (x[0, 0] * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return frame, box


def draft_scale(box: Letterbox) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) Pillow's ``draft`` picks for a JPEG decoded towards ``box``."""
    ratio = min(box.width // box.new_width, box.height // box.new_height)
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def _decode_jpegs(blobs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG as ``[H, W]`` uint8 on ``device``, or None where the decoder raised on that file."""
    if not blobs:
        return []
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        return list(_decode(encoded, device))
    except Exception:  # One bad file fails the batched call: find it by decoding one image at a time.
        pass
    out: list[torch.Tensor | None] = []
    for one in encoded:
        try:
            out.append(_decode([one], device)[0])
        except Exception:
            out.append(None)
    return out


def _decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
        images = decode_jpeg(encoded, mode=ImageReadMode.GRAY, device=device, apply_exif_orientation=False)
    return [image[0] for image in images]
