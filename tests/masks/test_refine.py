"""The refiners: the windowed CRF equals the fully connected one, snaps masks to edges; the random walk respects
boundaries; gating comes before refinement."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from maps_helpers import image_ids, make_manifest, make_store, write_png

from chexseg_dist.cli.main import main
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_TASKS, OBSERVATIONS, TASKS
from chexseg_dist.data.chexlocalize import decode_mask, encode_mask, read_segmentations, write_segmentations
from chexseg_dist.masks.binarize import ThresholdBinarizer
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.masks.refine import (
    IGNORE,
    CrfParams,
    CrfRefiner,
    crf_foreground,
    crf_kernels,
    crf_refine,
    crf_seeds,
    path_affinity,
    propagate_masks,
    random_walk,
)
from chexseg_dist.store import MapStore


def dense_crf_reference(image: np.ndarray, labels: np.ndarray, p: CrfParams) -> np.ndarray:
    """Fully connected two-label mean field, written out over all pairs (O(N^2)), symmetric-normalised kernels."""
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    pos = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
    inten = image.ravel().astype(np.float64)
    d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    kb = np.exp(-d2 / (2 * p.bilat_sxy**2) - (inten[:, None] - inten[None, :]) ** 2 / (2 * p.bilat_srgb**2))
    kg = np.exp(-d2 / (2 * p.gauss_sxy**2))

    def norm(k: np.ndarray) -> np.ndarray:
        d = k.sum(1)
        return k / np.sqrt(d[:, None] * d[None, :])

    kb, kg = norm(kb), norm(kg)
    lab = labels.reshape(len(labels), -1).astype(np.float64)
    u_fg = -np.where(lab > 0, np.log(p.gt_prob), np.log(1 - p.gt_prob))
    u_bg = -np.where(lab > 0, np.log(1 - p.gt_prob), np.log(p.gt_prob))
    q = np.exp(-u_fg) / (np.exp(-u_fg) + np.exp(-u_bg))
    for _ in range(p.iterations):
        l_fg = -u_fg + p.bilat_compat * q @ kb.T + p.gauss_compat * q @ kg.T
        l_bg = -u_bg + p.bilat_compat * (1 - q) @ kb.T + p.gauss_compat * (1 - q) @ kg.T
        q = 1 / (1 + np.exp(l_bg - l_fg))
    return q.reshape(labels.shape)


def edge_image(size: int = 48) -> np.ndarray:
    img = np.full((size, size), 40.0, dtype=np.float32)
    img[:, : size // 2] = 200.0  # a bright left half: the edge runs down the middle column
    return img


def test_windowed_crf_equals_fully_connected_when_the_window_covers_the_image() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, size=(9, 11)).astype(np.float32)
    image[:, :5] += 40
    labels = rng.random((2, 9, 11)) > 0.6
    params = CrfParams(stride=1, radius=20, gauss_sxy=2.0, bilat_sxy=4.0, bilat_srgb=30.0, iterations=5)
    ours = crf_foreground(labels, crf_kernels(image, params), params).numpy()
    ref = dense_crf_reference(image, labels, params)
    assert np.abs(ours - ref).max() < 1e-3


def test_crf_keeps_a_mask_on_an_edge_and_pulls_a_blurred_one_onto_it() -> None:
    image = edge_image()
    params = CrfParams(stride=2, radius=24)
    exact = np.zeros((1, 48, 48), dtype=bool)
    exact[0, :, :24] = True
    kept = crf_refine(image, exact, params)
    assert (kept == exact).mean() > 0.98
    blurred = np.zeros((1, 48, 48), dtype=bool)
    blurred[0, :, :30] = True  # spills 6 columns over the edge
    blurred[0, :, :3] = False  # and misses 3 columns of the bright side
    pulled = crf_refine(image, blurred, params)
    iou_before = (blurred & exact).sum() / (blurred | exact).sum()
    iou_after = (pulled & exact).sum() / (pulled | exact).sum()
    assert iou_before < 0.85
    assert iou_after > 0.97


def test_crf_leaves_an_empty_mask_empty() -> None:
    out = crf_refine(edge_image(), np.zeros((2, 48, 48), dtype=bool), CrfParams(stride=2))
    assert not out.any()


def test_seeds_mark_confident_foreground_background_and_ignore() -> None:
    image = np.full((32, 32), 100.0, dtype=np.float32)
    maps = np.zeros((2, 32, 32), dtype=np.float32)
    maps[0, 8:24, 8:24] = 1.0
    maps[0, 4:28, 4:28] = np.maximum(maps[0, 4:28, 4:28], 0.18)  # between the planes: ignored
    seeds = crf_seeds(image, maps, CrfParams(stride=1, radius=6, bilat_compat=0.0, gauss_compat=0.0))
    assert seeds[0, 16, 16] == 1
    assert seeds[0, 0, 0] == 0
    assert seeds[0, 5, 5] == IGNORE
    assert (seeds[1] == 0).all()  # an all-zero map: background everywhere, never foreground


def two_regions(h: int = 12, w: int = 16) -> torch.Tensor:
    b = torch.zeros(h, w)
    b[:, 8] = 1.0  # a wall down column 8
    return b


def test_random_walk_spreads_within_a_region_and_not_across_a_boundary() -> None:
    boundary = two_regions()
    offsets, aff = path_affinity(boundary, radius=3)
    seed = torch.zeros(1, 12, 16)
    seed[0, 6, 2] = 1.0
    walked = random_walk(seed, aff, offsets, beta=5.0, exp_times=3)[0]
    left, right = walked[:, :8], walked[:, 9:]
    assert (left[:, :6] > 0).all()  # reached most of its own region
    assert float(right.max()) < 1e-6 * float(left.max())  # nothing crossed the wall
    assert math.isclose(float(left.sum()), 1.0, rel_tol=0.5)  # not amplified


def test_walk_without_boundaries_spreads_everywhere() -> None:
    offsets, aff = path_affinity(torch.zeros(12, 16), radius=3)
    seed = torch.zeros(1, 12, 16)
    seed[0, 6, 2] = 1.0
    walked = random_walk(seed, aff, offsets, beta=5.0, exp_times=3)[0]
    assert float(walked[:, 12:].max()) > 0


def test_propagated_masks_fill_the_region_up_to_the_wall() -> None:
    maps = np.zeros((2, 48, 64), dtype=np.float32)
    maps[0, 20:28, 4:12] = 1.0  # a blob deep in the left region
    boundary = two_regions(12, 16).numpy()
    masks = propagate_masks(maps, boundary, (48, 64), stride=4, radius=3, beta=5.0, exp_times=3, fg_fraction=0.3)
    assert masks[0, 24, 8] and not masks[0, :, 36:].any()
    assert not masks[1].any()  # an all-zero map stays empty (no full-image mask)


@pytest.mark.parametrize("frame", ["model", "original"])
def test_gating_precedes_refinement(frame: str) -> None:
    box = Letterbox(40, 48, 48)
    cams = np.zeros((N_TASKS, 6, 6), dtype=np.float32)
    cams[0, 1:4, 1:3] = 5.0  # gated in, refined
    cams[1, 1:4, 1:3] = 5.0  # gated off by its label
    labels = np.full(14, np.nan)
    labels[OBSERVATIONS.index(TASKS[0])] = 1.0
    labels[OBSERVATIONS.index(TASKS[1])] = 0.0
    labels[OBSERVATIONS.index(TASKS[2])] = 1.0  # positive label, all-zero map: stays empty
    maker = MaskMaker(
        ThresholdBinarizer(np.full(N_TASKS, 0.5)), label_gating=True, refiner=CrfRefiner(CrfParams(stride=2))
    )
    frame_img = np.zeros((48, 48), dtype=np.uint8)
    frame_img[box.pad_top : box.pad_top + box.new_height] = 60
    frame_img[8:32, 8:24] = 200  # the finding the maps point at: a CRF keeps a mask that follows its edges
    masks = maker.masks(cams, box, labels=labels, frame=frame, image=frame_img)
    assert masks[0].any()
    assert not masks[1].any()
    assert not masks[2].any()
    assert masks.shape == ((N_TASKS, 40, 48) if frame == "original" else (N_TASKS, 48, 48))


def test_a_refiner_needs_the_image() -> None:
    maker = MaskMaker(ThresholdBinarizer(np.full(N_TASKS, 0.5)), refiner=CrfRefiner(CrfParams()))
    with pytest.raises(ValueError, match="image"):
        maker.masks(np.ones((N_TASKS, 6, 6), np.float32), Letterbox(48, 48, 48), frame="model")


# ---------------------------------------------------------------------------------------------------- through the CLI
def _refine_inputs(tmp_path, n: int = 3) -> tuple[str, str, str, list[np.ndarray]]:
    """A store whose blurry maps point at a bright rectangle in each image; the images on disk; gt masks."""
    h, w, frame = 48, 64, 64
    rng = np.random.default_rng(3)
    cams = np.zeros((n, N_TASKS, 8, 8), dtype=np.float32)
    gts, paths = [], []
    gt_json = {}
    for i, image_id in enumerate(image_ids(n)):
        top, left = int(rng.integers(8, 16)), int(rng.integers(8, 24))
        truth = np.zeros((h, w), dtype=bool)
        truth[top : top + 20, left : left + 24] = True
        image = np.where(truth, 0.8, 0.25) + rng.normal(0, 0.01, (h, w))
        paths.append(write_png(str(tmp_path / "img" / f"{image_id}.png"), image))
        box = Letterbox(h, w, frame)
        cams[i, 0] = box.mask_to_frame(truth).astype(np.float32)[::8, ::8]  # a coarse 8 x 8 view of the finding
        cams[i, 0] += 0.3 * np.roll(cams[i, 0], 1, axis=1)  # smeared to the right, as Grad-CAM blurs
        gts.append(truth)
        gt_json[image_id] = {t: encode_mask(truth if k == 0 else np.zeros((h, w), bool)) for k, t in enumerate(TASKS)}
    store = str(tmp_path / "maps.zarr")
    make_store(store, cams, [(h, w)] * n, frame)
    manifest = str(tmp_path / "m.parquet")
    make_manifest(manifest, image_ids(n), image_paths=paths)
    gt = str(tmp_path / "gt.json")
    write_segmentations(gt, gt_json)
    return store, manifest, gt, gts


def test_crf_masks_round_trip_through_export_and_evaluate_and_beat_the_unrefined_ones(tmp_path) -> None:
    store, manifest, gt, _ = _refine_inputs(tmp_path)
    scores = {}
    for refiner in ("none", "crf"):
        pred = str(tmp_path / f"{refiner}.json")
        argv = ["export-masks", "--store", store, "--strategy", "otsu", "--images", manifest, "--out", pred]
        argv += ["--workers", "1", "--set", f"masks.refiner={refiner}", "--set", "masks.crf_stride=2"]
        assert main(argv) == 0
        masks = read_segmentations(pred)
        assert all(decode_mask(m[TASKS[0]]).shape == (48, 64) for m in masks.values())
        assert not any(decode_mask(m[TASKS[1]]).any() for m in masks.values())  # all-zero maps stay empty
        out = str(tmp_path / f"eval_{refiner}")
        assert main(["evaluate", "--gt", gt, "--pred", pred, "--out", out, "--n-bootstrap", "10"]) == 0
        with open(f"{out}/summary.json") as f:
            scores[refiner] = json.load(f)["pathologies"][TASKS[0]]["miou"]
    assert scores["crf"] > scores["none"] + 0.05
    assert scores["crf"] > 0.9


def test_refiner_errors_are_one_line_and_write_nothing(tmp_path, capsys) -> None:

    store, manifest, _, _ = _refine_inputs(tmp_path, n=2)
    pred = tmp_path / "p.json"
    base = ["export-masks", "--store", store, "--out", str(pred), "--workers", "1"]
    assert main([*base, "--images", manifest, "--set", "masks.refiner=bogus"]) == 2
    err = capsys.readouterr().err
    assert "masks.refiner='bogus': unknown mask refiner; choose one of ['affinity', 'crf', 'none']" in err
    assert err.count("\n") == 1
    assert main([*base, "--set", "masks.refiner=crf"]) == 2
    assert "--images" in capsys.readouterr().err
    wrong = [write_png(str(tmp_path / "other" / f"{i}.png"), np.zeros((30, 30))) for i in image_ids(2)]
    other = str(tmp_path / "other.parquet")
    make_manifest(other, image_ids(2), image_paths=wrong)
    assert main([*base, "--images", other, "--set", "masks.refiner=crf"]) == 2
    err = capsys.readouterr().err
    assert "is 30x30 but its maps were made from a 48x64 image" in err and wrong[0] in err
    assert not pred.exists()


def test_refine_command_refuses_bad_input_in_one_line(tmp_path, capsys) -> None:
    store, manifest, _, _ = _refine_inputs(tmp_path, n=2)
    base = ["refine", "--store", store, "--manifest", manifest]
    assert main(base) == 2  # masks.refiner=none: nothing to refine
    assert "masks.refiner=none: nothing to refine" in capsys.readouterr().err
    assert main([*base, "--set", "masks.refiner=bogus"]) == 2
    assert "unknown mask refiner" in capsys.readouterr().err
    empty = str(tmp_path / "empty.zarr")
    make_store(empty, np.zeros((2, N_TASKS, 8, 8), np.float32), [(48, 64)] * 2, 64, done=[False, False])
    assert main(["refine", "--store", empty, "--manifest", manifest, "--set", "masks.refiner=crf"]) == 2
    assert "holds no maps yet: run chexseg pseudolabel" in capsys.readouterr().err
    other = str(tmp_path / "other.parquet")
    make_manifest(other, ["someone_else_study1_view1_frontal", *image_ids(1)])
    assert main(["refine", "--store", store, "--manifest", other, "--set", "masks.refiner=crf"]) == 2
    err = capsys.readouterr().err
    assert "image id(s) of the store are not in it" in err and err.count("\n") == 1
    assert "refined" not in MapStore.open(store).group  # nothing was written
