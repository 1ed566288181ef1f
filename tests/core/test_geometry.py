import numpy as np
import pytest
import torch

from chexseg_dist.core.geometry import Letterbox, bilinear_matrix, grid_to_frame


@pytest.mark.parametrize(
    ("h", "w", "size", "expected"),
    [
        (300, 200, 64, (300, 200, 64, 64, 43, 0, 10)),  # portrait: pad left/right
        (200, 300, 64, (200, 300, 64, 43, 64, 10, 0)),  # landscape: pad top/bottom
        (320, 320, 320, (320, 320, 320, 320, 320, 0, 0)),
        (2828, 2320, 320, (2828, 2320, 320, 320, 263, 0, 28)),  # a full-size CheXpert frontal
    ],
)
def test_letterbox_parameters(h: int, w: int, size: int, expected: tuple[int, ...]) -> None:
    assert Letterbox(h, w, size).params() == expected


def test_identity_when_no_resize_needed() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((40, 25)).astype(np.float32)
    box = Letterbox(40, 25, 40)
    frame = box.image_to_frame(img)
    assert frame.shape == (40, 40)
    assert np.all(frame[:, : box.pad_left] == 0) and np.all(frame[:, box.pad_left + 25 :] == 0)
    np.testing.assert_array_equal(box.frame_to_original(frame, "nearest"), img)
    np.testing.assert_allclose(box.frame_to_original(frame, "bilinear"), img, atol=1e-6)


def test_mask_round_trip_exact_for_block_masks() -> None:
    # 2x downscale: a mask made of aligned 2x2 blocks must survive original -> frame -> original exactly;
    # an off-by-one pad or scale would shift its edges.
    rng = np.random.default_rng(1)
    blocks = rng.random((30, 20)) > 0.5
    mask = np.kron(blocks, np.ones((2, 2), dtype=bool)).astype(np.uint8)  # 60 x 40
    box = Letterbox(60, 40, 30)
    assert (box.new_height, box.new_width, box.pad_top, box.pad_left) == (30, 20, 0, 5)
    frame = box.mask_to_frame(mask)
    np.testing.assert_array_equal(frame[:, 5:25], blocks.astype(np.uint8))
    assert frame[:, :5].sum() == 0 and frame[:, 25:].sum() == 0
    np.testing.assert_array_equal(box.frame_to_original(frame, "nearest"), mask)


def test_grid_to_original_is_subpixel_exact_for_linear_maps() -> None:
    # A map that is linear in frame coordinates is reproduced exactly by bilinear interpolation, so sampling it at
    # each original pixel must return that pixel centre's frame coordinate. Off by one pixel would be off by scale.
    box = Letterbox(height=97, width=61, size=40)
    g = 40  # one grid cell per frame pixel: grid cell centres are at frame coordinates j + 0.5
    ys, xs = np.meshgrid(np.arange(g) + 0.5, np.arange(g) + 0.5, indexing="ij")
    up_y = box.grid_to_original(ys.astype(np.float32))
    up_x = box.grid_to_original(xs.astype(np.float32))
    r = np.arange(97)[:, None]
    c = np.arange(61)[None, :]
    want_y = box.pad_top + (r + 0.5) * box.new_height / 97
    want_x = box.pad_left + (c + 0.5) * box.new_width / 61
    inside_y = (want_y > 0.5) & (want_y < g - 0.5)
    inside_x = (want_x > 0.5) & (want_x < g - 0.5)
    np.testing.assert_allclose(
        np.broadcast_to(up_y, (97, 61))[inside_y[:, 0]], np.broadcast_to(want_y, (97, 61))[inside_y[:, 0]], atol=1e-4
    )
    np.testing.assert_allclose(up_x[:, inside_x[0]], np.broadcast_to(want_x, (97, 61))[:, inside_x[0]], atol=1e-4)


def test_grid_to_frame_matches_torch_interpolate() -> None:
    grid = np.random.default_rng(2).random((3, 10, 10)).astype(np.float32)
    ours = grid_to_frame(grid, 320)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(grid)[None], size=(320, 320), mode="bilinear", align_corners=False
    )[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_grid_to_original_equals_frame_upsampling_then_inverse_on_square_images() -> None:
    # For a square image the frame has no padding: upsampling to the frame and resizing back must agree closely.
    grid = np.random.default_rng(3).random((10, 10)).astype(np.float32)
    box = Letterbox(640, 640, 320)
    direct = box.grid_to_original(grid)
    via_frame = torch.nn.functional.interpolate(
        torch.from_numpy(grid_to_frame(grid, 320))[None, None], size=(640, 640), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    assert np.abs(direct - via_frame).max() < 0.02


def test_bilinear_rows_sum_to_one() -> None:
    w = bilinear_matrix(57, 10, 3.3, 0.11)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)


def test_wrong_shapes_are_rejected_with_the_shape() -> None:
    box = Letterbox(10, 20, 16)
    with pytest.raises(ValueError, match=r"\(20, 10\)"):
        box.image_to_frame(np.zeros((20, 10)))
    with pytest.raises(ValueError, match="size"):
        Letterbox(10, 20, 1)


def test_content_masks_cover_exactly_the_non_padding_of_each_frame() -> None:
    # The student scores expert-select only inside each frame's content: a window off by one row would count
    # padding as background pixels of every pathology.
    boxes = [Letterbox(300, 200, 64), Letterbox(200, 300, 64), Letterbox(64, 64, 64)]
    stack = Letterbox.content_masks(np.array([b.params() for b in boxes]))
    assert stack.shape == (3, 64, 64)
    for box, mask in zip(boxes, stack):
        ones = np.ones((box.height, box.width), dtype=np.float32)
        np.testing.assert_array_equal(mask, box.image_to_frame(ones) > 0)
        np.testing.assert_array_equal(mask, box.content_mask())
    with pytest.raises(ValueError, match="sizes 64 and 32"):
        Letterbox.content_masks(np.array([boxes[0].params(), Letterbox(10, 10, 32).params()]))
