import json

import numpy as np
import pytest
from maps_helpers import image_ids, make_manifest, make_store, stored_cams
from pycocotools import mask as coco_mask
from scipy import ndimage
from skimage.filters import threshold_otsu

from chexseg_dist.cli.main import main
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import OBSERVATIONS, TASKS
from chexseg_dist.data.chexlocalize import decode_mask, encode_mask, read_segmentations
from chexseg_dist.masks.binarize import (
    BINARIZERS,
    OtsuBinarizer,
    ThresholdBinarizer,
    create_binarizer,
    fill_holes,
    otsu_levels,
)
from chexseg_dist.masks.gating import gate
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.masks.maps import grid_weights, map_argmax, map_extrema, normalise_maps, quantise_maps, upsample_maps
from chexseg_dist.masks.thresholds import TunedThresholds

BOXES = [Letterbox(97, 61, 32), Letterbox(61, 97, 32), Letterbox(50, 50, 16), Letterbox(31, 200, 64)]


# ---------------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("box", BOXES, ids=str)
def test_grid_weights_reproduce_grid_to_original_exactly(box: Letterbox) -> None:
    g = np.random.default_rng(0).random((3, 5, 5)).astype(np.float32)
    wy, wx = grid_weights(box, (5, 5))
    np.testing.assert_array_equal(wy @ g @ wx.T, box.grid_to_original(g))


@pytest.mark.parametrize("box", [*BOXES, Letterbox(2321, 2827, 320)], ids=str)
def test_argmax_and_extrema_without_upsampling_match_the_full_map(box: Letterbox) -> None:
    g = np.random.default_rng(1).random((3, 10, 10)).astype(np.float32)
    full = box.grid_to_original(g)
    rows, cols, constant = map_argmax(g, box)
    for k in range(3):
        assert (rows[k], cols[k]) == np.unravel_index(np.argmax(full[k]), full[k].shape)
    assert not constant.any()
    lo, hi = map_extrema(g, box)
    np.testing.assert_allclose(lo, full.min(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(hi, full.max(axis=(1, 2)), rtol=1e-6)


def test_constant_map_argmax_is_flagged() -> None:
    _, _, constant = map_argmax(np.full((2, 4, 4), 3.0, dtype=np.float32), Letterbox(40, 30, 16))
    assert constant.all()


# ---------------------------------------------------------------------------------------------------- normalisation
IDENTITY = Letterbox(4, 4, 4)  # a 4x4 grid in a 4x4 frame of a 4x4 image: upsampling is the identity


def test_identity_upsampling_and_hand_computed_normalisation() -> None:
    grid = np.arange(16, dtype=np.float32).reshape(1, 4, 4) + 5
    np.testing.assert_array_equal(upsample_maps(grid, IDENTITY), grid)
    np.testing.assert_allclose(normalise_maps(grid)[0], np.arange(16).reshape(4, 4) / 15, rtol=1e-6)


def test_tuned_threshold_is_strict_and_per_pathology() -> None:
    # Normalised values are k/16 exactly (dyadic), so k = 8 equals the threshold 0.5 and must stay background.
    grid = np.zeros((10, 4, 4), dtype=np.float32)
    grid[:] = np.arange(16, dtype=np.float32).reshape(4, 4)
    grid[:, 3, 3] = 16  # max 16
    thresholds = np.full(10, 0.5)
    thresholds[1] = 0.0
    masks = MaskMaker(ThresholdBinarizer(thresholds)).masks(grid, IDENTITY)
    expected = grid[0] > 8
    np.testing.assert_array_equal(masks[0], expected)
    assert masks[0].sum() == 7  # values 9..14 and 16 (the 15 became the max, 16)
    np.testing.assert_array_equal(masks[1], grid[1] > 0)  # t = 0: everything but the minimum


@pytest.mark.parametrize("strategy", sorted(BINARIZERS))
@pytest.mark.parametrize("frame", ["original", "model"])
@pytest.mark.parametrize("value", [0.0, 3.7])
def test_constant_map_gives_an_empty_mask_and_no_nan(strategy: str, frame: str, value: float) -> None:
    box = Letterbox(37, 53, 16)
    cams = np.full((10, 4, 4), value, dtype=np.float32)
    norm = normalise_maps(upsample_maps(cams, box))
    assert np.isfinite(norm).all() and (norm == 0).all()
    maker = MaskMaker(create_binarizer(strategy, np.zeros(10)))
    masks = maker.masks(cams, box, frame=frame)
    assert masks.shape == (10, *((37, 53) if frame == "original" else (16, 16)))
    assert not masks.any()


# ---------------------------------------------------------------------------------------------------- Otsu
def test_otsu_levels_agree_with_skimage_on_quantised_maps() -> None:
    rng = np.random.default_rng(2)
    for trial in range(60):
        box = BOXES[trial % len(BOXES)]
        q = quantise_maps(normalise_maps(box.grid_to_original(rng.random((1, 6, 6)).astype(np.float32) ** 3)))[0]
        level = otsu_levels(np.bincount(q.ravel(), minlength=256)[None])[0]
        assert level == threshold_otsu(q)
    for trial in range(60):  # narrow, gappy and two-valued histograms
        lo = int(rng.integers(0, 250))
        q = rng.integers(lo, 256, size=(int(rng.integers(2, 40)), 17)).astype(np.uint8)
        if trial % 3 == 0:
            q = (q > 200).astype(np.uint8) * np.uint8(rng.integers(1, 255))
        if np.all(q == q.flat[0]):
            continue
        level = otsu_levels(np.bincount(q.ravel(), minlength=256)[None])[0]
        assert level == threshold_otsu(q)


def test_otsu_hand_computed_two_level_image() -> None:
    # Values 0 and 255 only: every level 0..254 separates them equally well; the first (0) wins, as in skimage.
    q = np.array([[0, 0, 255], [255, 0, 255]], dtype=np.uint8)
    assert otsu_levels(np.bincount(q.ravel(), minlength=256)[None])[0] == 0
    assert threshold_otsu(q) == 0


def test_quantisation_truncates_like_the_benchmark() -> None:
    norm = np.array([[[0.0, 0.999, 1.0, 0.5]]], dtype=np.float32)
    np.testing.assert_array_equal(quantise_maps(norm)[0, 0], [0, 254, 255, 127])


def test_otsu_mask_is_skimage_threshold_with_holes_filled() -> None:
    rng = np.random.default_rng(3)
    box = Letterbox(120, 90, 32)
    cams = rng.random((10, 8, 8)).astype(np.float32)
    masks = MaskMaker(OtsuBinarizer()).masks(cams, box)
    norm = normalise_maps(box.grid_to_original(cams))
    for k in range(10):
        q = quantise_maps(norm[k : k + 1])[0]
        expected = ndimage.binary_fill_holes(q > threshold_otsu(q))
        np.testing.assert_array_equal(masks[k], expected)


def test_fill_holes_matches_scipy_and_a_hand_case() -> None:
    rng = np.random.default_rng(4)
    stack = rng.random((6, 25, 31)) < 0.55
    np.testing.assert_array_equal(fill_holes(stack), np.stack([ndimage.binary_fill_holes(m) for m in stack]))
    ring = np.zeros((2, 7, 7), dtype=bool)
    ring[:, 1:6, 1:6] = True
    ring[:, 2:5, 2:5] = False  # a 3x3 hole in both slices
    ring[1, 3, 1] = False  # slice 1: a notch through the wall connects the "hole" to the outside
    filled = fill_holes(ring)
    assert filled[0, 1:6, 1:6].all()
    assert not filled[1, 2:5, 2:5].any()
    diag = np.ones((1, 5, 5), dtype=bool)
    diag[0, 0, 0] = diag[0, 1, 1] = False  # (1, 1) touches the border pixel (0, 0) only diagonally
    filled = fill_holes(diag)[0]
    assert filled[1, 1] and not filled[0, 0]  # background is 4-connected: (1, 1) is a hole


# ---------------------------------------------------------------------------------------------------- frames
def test_model_frame_padding_never_participates() -> None:
    # A portrait image: the frame pads left and right. Give the padding columns of the grid a huge value: if padding
    # took part in min-max normalisation, the content would normalise to ~0 and its mask would be empty.
    box = Letterbox(64, 32, 64)  # content columns 16..47
    grid = np.zeros((10, 8, 8), dtype=np.float32)
    grid[:, :, 0] = grid[:, :, 7] = 1000.0  # grid columns entirely in the padding
    grid[:, 2:6, 3:5] = 1.0  # a blob in the content
    masks = MaskMaker(ThresholdBinarizer(np.full(10, 0.5))).masks(grid, box, frame="model")
    rows, cols = slice(box.pad_top, box.pad_top + box.new_height), slice(box.pad_left, box.pad_left + box.new_width)
    assert masks[:, rows, cols].any(axis=(1, 2)).all()
    outside = np.ones((64, 64), dtype=bool)
    outside[rows, cols] = False
    assert not masks[:, outside].any()


def test_original_and_model_frame_masks_agree_through_the_letterbox() -> None:
    rng = np.random.default_rng(5)
    box = Letterbox(300, 220, 64)
    cams = rng.random((10, 8, 8)).astype(np.float32)
    maker = MaskMaker(ThresholdBinarizer(np.full(10, 0.5)))
    orig = maker.masks(cams, box, frame="original")
    model = maker.masks(cams, box, frame="model")
    back = box.frame_to_original(model.astype(np.uint8), mode="nearest").astype(bool)
    agreement = (back == orig).mean()
    assert agreement > 0.97  # only resampling at mask edges differs


# ---------------------------------------------------------------------------------------------------- gating
def test_probability_cutoff_and_label_gating() -> None:
    probs = np.full(len(OBSERVATIONS), 0.4)
    probs[OBSERVATIONS.index("Cardiomegaly")] = 0.3  # exactly at its cutoff: kept
    probs[OBSERVATIONS.index("Edema")] = 0.29  # below: gated
    cutoffs = np.full(10, 0.3)
    maker = MaskMaker(ThresholdBinarizer(np.full(10, 0.5)), cutoffs=cutoffs)
    keep = maker.keep(probs, None)
    assert keep[TASKS.index("Cardiomegaly")] and not keep[TASKS.index("Edema")]
    assert keep.sum() == 9

    labels = np.full(len(OBSERVATIONS), np.nan)
    labels[OBSERVATIONS.index("Lung Opacity")] = 1.0  # CheXpert's name of Airspace Opacity
    labels[OBSERVATIONS.index("Edema")] = -1.0  # uncertain: not positive
    labels[OBSERVATIONS.index("Cardiomegaly")] = 0.0
    gated = MaskMaker(ThresholdBinarizer(np.full(10, 0.5)), label_gating=True)
    keep = gated.keep(None, labels)
    assert keep.tolist() == [t == "Airspace Opacity" for t in TASKS]
    cams = np.random.default_rng(6).random((10, 4, 4)).astype(np.float32)
    masks = gated.masks(cams, Letterbox(40, 30, 16), None, labels)
    assert masks[TASKS.index("Airspace Opacity")].any()
    assert not np.delete(masks, TASKS.index("Airspace Opacity"), axis=0).any()
    with pytest.raises(ValueError, match="label gating needs"):
        gated.masks(cams, Letterbox(40, 30, 16))
    assert gate(np.array([np.nan]), np.array([0.0])).tolist() == [False]  # no probability: gated


def test_registry_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="unknown mask strategy 'kmeans'"):
        create_binarizer("kmeans")
    with pytest.raises(ValueError, match="--thresholds"):
        create_binarizer("tuned")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ThresholdBinarizer(np.full(10, 1.5))


# ---------------------------------------------------------------------------------------------------- RLE at size
def test_rle_round_trip_at_original_size() -> None:
    box = Letterbox(2321, 2827, 320)
    cams = np.random.default_rng(7).random((2, 10, 10)).astype(np.float32)
    masks = OtsuBinarizer().binarise(normalise_maps(upsample_maps(cams, box)), np.arange(2))
    assert masks.shape == (2, 2321, 2827) and masks.any(axis=(1, 2)).all()
    for k in (0, 1):
        rle = encode_mask(masks[k])
        assert rle["size"] == [2321, 2827]
        np.testing.assert_array_equal(decode_mask(rle).astype(bool), masks[k])
        assert coco_mask.area(rle) == masks[k].sum()


# ---------------------------------------------------------------------------------------------------- thresholds file
def test_thresholds_file_round_trip_and_errors(tmp_path) -> None:
    t = TunedThresholds(np.linspace(0, 1, 10), np.full(10, 0.25), meta={"grid": {"steps": 100}})
    path = str(tmp_path / "t.json")
    t.save(path)
    back = TunedThresholds.load(path)
    np.testing.assert_array_equal(back.thresholds, t.thresholds)
    np.testing.assert_array_equal(back.cutoffs, t.cutoffs)
    assert back.meta["grid"] == {"steps": 100}
    data = json.loads((tmp_path / "t.json").read_text())
    del data["cutoffs"]["Edema"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: 'cutoffs' lacks pathologies \['Edema'\]"):
        TunedThresholds.load(str(tmp_path / "bad.json"))


# ---------------------------------------------------------------------------------------------------- export-masks
def _store(tmp_path, n=5, done=None):
    rng = np.random.default_rng(8)
    sizes = [(int(rng.integers(40, 90)), int(rng.integers(40, 90))) for _ in range(n)]
    cams = rng.random((n, 10, 6, 6)).astype(np.float32)
    cams[0, 3] = 0.0  # an all-zero Grad-CAM
    probs = rng.random((n, len(OBSERVATIONS))).astype(np.float32)
    uri = str(tmp_path / "maps.zarr")
    make_store(uri, cams, sizes, 32, probs=probs, done=done)
    return uri, sizes, probs


def test_export_masks_otsu_covers_every_image_and_pathology(tmp_path) -> None:
    uri, sizes, _ = _store(tmp_path)
    out = str(tmp_path / "pred.json")
    assert main(["export-masks", "--store", uri, "--strategy", "otsu", "--out", out, "--workers", "1"]) == 0
    pred = read_segmentations(out)
    assert sorted(pred) == sorted(image_ids(5))
    cams = stored_cams(uri)
    maker = MaskMaker(OtsuBinarizer())
    for i, image_id in enumerate(image_ids(5)):
        assert set(pred[image_id]) == set(TASKS)
        expected = maker.masks(cams[i], Letterbox(*sizes[i], 32))
        for k, task in enumerate(TASKS):
            assert pred[image_id][task]["size"] == list(sizes[i])
            np.testing.assert_array_equal(decode_mask(pred[image_id][task]).astype(bool), expected[k])
    assert coco_mask.area(pred[image_ids(5)[0]][TASKS[3]]) == 0  # the all-zero map
    assert (tmp_path / "pred.json.config.yaml").exists()


def test_export_masks_tuned_with_cutoffs_and_label_gating(tmp_path) -> None:
    uri, sizes, probs = _store(tmp_path)
    thresholds = TunedThresholds(np.full(10, 0.6), np.full(10, 0.5))
    tpath = str(tmp_path / "t.json")
    thresholds.save(tpath)
    labels = np.ones((5, len(OBSERVATIONS)))
    labels[:, OBSERVATIONS.index("Pneumothorax")] = 0.0
    manifest = str(tmp_path / "m.parquet")
    make_manifest(manifest, image_ids(5), labels)
    out = str(tmp_path / "pred.json")
    argv = ["export-masks", "--store", uri, "--strategy", "tuned", "--thresholds", tpath, "--prob-cutoff"]
    assert main([*argv, "--manifest", manifest, "--out", out, "--workers", "1"]) == 0
    pred = read_segmentations(out)
    cams = stored_cams(uri)
    for i, image_id in enumerate(image_ids(5)):
        norm = normalise_maps(Letterbox(*sizes[i], 32).grid_to_original(cams[i]))
        for k, task in enumerate(TASKS):
            mask = decode_mask(pred[image_id][task]).astype(bool)
            prob = probs[i, OBSERVATIONS.index("Lung Opacity" if task == "Airspace Opacity" else task)]
            if task == "Pneumothorax" or prob < 0.5:
                assert not mask.any()
            else:
                np.testing.assert_array_equal(mask, norm[k] > 0.6)


def test_export_masks_missing_maps(tmp_path, caplog) -> None:
    uri, _, _ = _store(tmp_path, done=[True, True, False, True, True])
    out = str(tmp_path / "pred.json")
    assert main(["export-masks", "--store", uri, "--out", out, "--workers", "1"]) == 2
    assert not (tmp_path / "pred.json").exists()
    with caplog.at_level("WARNING", logger="chexseg_dist"):
        assert main(["export-masks", "--store", uri, "--out", out, "--workers", "1", "--skip-missing"]) == 0
    assert "1 of 5 images have no maps" in caplog.text
    assert image_ids(5)[2] not in read_segmentations(out)


def test_export_masks_tuned_needs_thresholds(tmp_path, capsys) -> None:
    uri, _, _ = _store(tmp_path)
    assert main(["export-masks", "--store", uri, "--strategy", "tuned", "--out", str(tmp_path / "p.json")]) == 2
    assert "--thresholds" in capsys.readouterr().err


def test_export_masks_process_pool_matches_in_process(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("chexseg_dist.masks.export.IN_PROCESS_PIXELS", 0)  # use the pool even for tiny images
    uri, _, _ = _store(tmp_path, n=6)
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    assert main(["export-masks", "--store", uri, "--out", a, "--workers", "1"]) == 0
    assert main(["export-masks", "--store", uri, "--out", b, "--workers", "2"]) == 0
    assert read_segmentations(a) == read_segmentations(b)
