import io

import numpy as np
import pytest
from PIL import Image

from chexseg_dist.data.images import ImageDecodeError, decode_image, frame_from_bytes, load_frame, read_image


def _encode(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _ramp(h: int, w: int) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)


def test_8bit_png_is_exact() -> None:
    arr = _ramp(30, 50)
    out = decode_image(_encode(arr, "PNG"))
    assert out.dtype == np.float32 and out.shape == (30, 50)
    np.testing.assert_allclose(out * 255, arr, atol=1e-4)


def test_16bit_png_is_windowed_to_its_range() -> None:
    arr = np.linspace(1000, 4095, 40 * 20).reshape(40, 20).astype(np.uint16)  # 12-bit data in 16 bits
    out = decode_image(_encode(arr, "PNG"), "x.png")
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    np.testing.assert_allclose(out, (arr - 1000.0) / 3095.0, atol=1e-6)


def test_rgb_and_rgba_become_luminance() -> None:
    gray = _ramp(16, 16)
    rgb = np.stack([gray] * 3, axis=-1)
    np.testing.assert_allclose(decode_image(_encode(rgb, "PNG")) * 255, gray, atol=1)
    rgba = np.concatenate([rgb, np.full((16, 16, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_allclose(decode_image(_encode(rgba, "PNG")) * 255, gray, atol=1)


def test_exif_orientation_is_ignored() -> None:
    img = Image.fromarray(_ramp(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" orientation tag
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).shape == (20, 40)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not a decodable image"),
        (_encode(_ramp(64, 64), "JPEG")[:300], "(?i)truncated"),  # cut inside the header
        (_encode(_ramp(256, 256), "JPEG")[:2000], "corrupt or truncated"),  # header intact, scan data cut
        (_encode(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8), "PNG")[:5000], "(?i)truncated"),
    ],
)
def test_bad_bytes_name_the_source(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason) as info:
        decode_image(data, "s3://bucket/patient1/study1/view1_frontal.jpg")
    assert info.value.source == "s3://bucket/patient1/study1/view1_frontal.jpg"
    assert "view1_frontal.jpg" in str(info.value)


def test_frame_geometry_and_padding() -> None:
    frame, box = frame_from_bytes(_encode(np.full((100, 50), 200, np.uint8), "PNG"), 64)
    assert frame.dtype == np.uint8 and frame.shape == (64, 64)
    assert box.params() == (100, 50, 64, 64, 32, 0, 16)
    assert frame[:, :16].max() == 0 and frame[:, 48:].max() == 0
    assert abs(int(frame[:, 16:48].mean()) - 200) <= 1


def test_draft_jpeg_decode_matches_full_decode() -> None:
    # Large JPEGs are decoded with DCT scaling; the frame must match a full decode closely, with the same geometry.
    rng = np.random.default_rng(0)
    base = np.add.outer(np.sin(np.linspace(0, 6, 1400)), np.cos(np.linspace(0, 4, 1100))) * 60 + 128
    arr = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    data = _encode(arr, "JPEG", quality=95)
    frame, box = frame_from_bytes(data, 128)
    full = np.clip(np.rint(box.image_to_frame(decode_image(data)) * 255), 0, 255)
    assert box.params()[:2] == (1400, 1100)
    assert np.abs(frame.astype(float) - full).mean() < 1.5


def test_missing_file_names_the_path(tmp_path: object) -> None:
    missing = f"{tmp_path}/nope.jpg"
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg"):
        read_image(missing)
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg"):
        load_frame(missing, 64)
