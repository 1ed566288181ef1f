import csv
import json
import math

import numpy as np
import pytest
from maps_helpers import blob_mask, make_store

from chexseg_dist.cli.main import main
from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.data.chexlocalize import encode_mask, write_segmentations
from chexseg_dist.evaluation.pointing import hit_stats, point_in_rle
from chexseg_dist.metrics.bootstrap import bootstrap_counts, ratio_metric
from chexseg_dist.metrics.segmentation import MissingPredictionsError, evaluate_stats, pair_stats

H, W = 4, 5
A, B, C = "patient1_study1_view1_frontal", "patient2_study1_view1_frontal", "patient3_study1_view1_frontal"
CARDIO, EDEMA = TASKS.index("Cardiomegaly"), TASKS.index("Edema")


def _m(*cells: tuple[int, int]) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    for r, c in cells:
        m[r, c] = True
    return m


def hand_case() -> tuple[dict, dict]:
    """Three images; only Cardiomegaly and Edema have any mask.

    Cardiomegaly: A gt {(0,0),(0,1),(1,0),(1,1)}, pred {(0,1),(0,2),(1,1),(1,2)} -> I=2, U=6, IoU 1/3;
                  B gt 2x2, pred empty (one empty); C both empty.
    Edema:        A gt = pred = everything (IoU 1); B gt empty, pred 3 px (one empty); C gt = pred = one pixel (IoU 1).
    """
    empty = np.zeros((H, W), dtype=bool)
    gt = {i: {t: empty for t in TASKS} for i in (A, B, C)}
    pred = {i: {t: empty for t in TASKS} for i in (A, B, C)}
    gt[A]["Cardiomegaly"] = _m((0, 0), (0, 1), (1, 0), (1, 1))
    pred[A]["Cardiomegaly"] = _m((0, 1), (0, 2), (1, 1), (1, 2))
    gt[B]["Cardiomegaly"] = _m((2, 3), (2, 4), (3, 3), (3, 4))
    gt[A]["Edema"] = pred[A]["Edema"] = np.ones((H, W), dtype=bool)
    pred[B]["Edema"] = _m((0, 0), (1, 1), (2, 2))
    gt[C]["Edema"] = pred[C]["Edema"] = _m((3, 4))
    enc = lambda d: {i: {t: encode_mask(m) for t, m in e.items()} for i, e in d.items()}  # noqa: E731
    return enc(gt), enc(pred)


def test_hand_computed_tp_only_and_full() -> None:
    gt, pred = hand_case()
    stats = pair_stats(gt, pred)
    assert stats.image_ids == [A, B, C]
    assert stats.inter[:, CARDIO].tolist() == [2, 0, 0]
    assert stats.union[:, CARDIO].tolist() == [6, 4, 0]
    assert stats.union[:, EDEMA].tolist() == [20, 3, 1]

    tp = evaluate_stats(stats, "tp_only", n_bootstrap=0)
    assert tp.miou.value[CARDIO] == pytest.approx(1 / 3) and tp.miou.n[CARDIO] == 1  # B (one empty), C excluded
    assert tp.miou.value[EDEMA] == pytest.approx(1.0) and tp.miou.n[EDEMA] == 2
    assert tp.miou.mean == pytest.approx((1 / 3 + 1) / 2)  # the 8 pathologies without kept pairs are left out
    assert sorted(tp.excluded) == sorted(set(TASKS) - {"Cardiomegaly", "Edema"})

    full = evaluate_stats(stats, "full", n_bootstrap=0)
    assert full.miou.value[CARDIO] == pytest.approx(1 / 6) and full.miou.n[CARDIO] == 2  # B counts 0; C never
    assert full.miou.value[EDEMA] == pytest.approx(2 / 3) and full.miou.n[EDEMA] == 3
    assert full.miou.mean == pytest.approx((1 / 6 + 2 / 3) / 2)

    # Dataset-level IoU: sums over all images, the same in both modes.
    for result in (tp, full):
        assert result.dataset_iou.value[CARDIO] == pytest.approx(2 / 10)
        assert result.dataset_iou.value[EDEMA] == pytest.approx(21 / 24)


def test_summary_json_structure_and_csv(tmp_path) -> None:
    gt, pred = hand_case()
    write_segmentations(str(tmp_path / "gt.json"), gt)
    write_segmentations(str(tmp_path / "pred.json"), pred)
    out = tmp_path / "eval"
    argv = ["evaluate", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"), "--out", str(out)]
    assert main([*argv, "--n-bootstrap", "50"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "tp_only"
    assert list(summary["pathologies"]) == list(TASKS)
    assert set(summary["pathologies"]["Cardiomegaly"]) >= {"miou", "ci", "n"}
    assert summary["pathologies"]["Cardiomegaly"]["miou"] == pytest.approx(1 / 3)
    assert summary["pathologies"]["Cardiomegaly"]["n"] == 1
    assert summary["pathologies"]["Lung Lesion"] == {"miou": None, "ci": [None, None], "n": 0}
    assert summary["mean_miou"] == pytest.approx(2 / 3)
    assert "Lung Lesion" in summary["excluded_pathologies"]
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image_id", "pathology", "gt_area", "pred_area", "intersection", "union", "iou", "kept"]
    assert len(rows) == 3 * len(TASKS)
    row = next(r for r in rows if r["image_id"] == B and r["pathology"] == "Cardiomegaly")
    assert (row["gt_area"], row["pred_area"], row["union"], row["iou"], row["kept"]) == ("4", "0", "4", "0.000000", "0")
    both_empty = next(r for r in rows if r["image_id"] == C and r["pathology"] == "Cardiomegaly")
    assert both_empty["iou"] == "" and both_empty["kept"] == "0"
    report = (out / "report.md").read_text()
    assert "true positives only" in report and "chexseg evaluate --gt" in report
    assert "Excluded from the mean mIoU" in report and "Lung Lesion" in report
    assert "Dataset-level IoU" in report
    assert (out / "miou.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").exists()

    assert main([*argv, "--full", "--n-bootstrap", "50"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "full"
    assert summary["pathologies"]["Edema"]["miou"] == pytest.approx(2 / 3)


def test_missing_predictions_error_and_allow_missing(tmp_path, capsys) -> None:
    gt, pred = hand_case()
    del pred[B]
    del pred[C]["Edema"]
    with pytest.raises(MissingPredictionsError, match=rf"1 of 3 images missing \(e.g. \['{B}'\]\).*'{C}', 'Edema'"):
        pair_stats(gt, pred)
    with pytest.warns(UserWarning, match="EMPTY"):
        stats = pair_stats(gt, pred, allow_missing=True)
    assert stats.pred_area[1].sum() == 0 and stats.pred_area[2, EDEMA] == 0
    assert stats.inter[2, EDEMA] == 0

    write_segmentations(str(tmp_path / "gt.json"), gt)
    write_segmentations(str(tmp_path / "pred.json"), pred)
    argv = ["evaluate", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json")]
    assert main([*argv, "--out", str(tmp_path / "e")]) == 2
    assert B in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "e"), "--allow-missing", "--n-bootstrap", "10"]) == 0
    assert "EMPTY" in (tmp_path / "e" / "report.md").read_text()


def test_size_mismatch_is_an_error() -> None:
    gt, pred = hand_case()
    pred[A]["Edema"] = encode_mask(np.ones((H, W + 1), dtype=bool))
    with pytest.raises(ValueError, match=rf"image '{A}', pathology 'Edema': prediction size \[4, 6\]"):
        pair_stats(gt, pred)


def test_iou_on_rles_at_original_size_matches_decoded_masks() -> None:
    rng = np.random.default_rng(0)
    h, w = 2321, 2827
    gt_m, pred_m = blob_mask(rng, h, w), blob_mask(rng, h, w)
    gt = {A: {t: encode_mask(gt_m if t == "Edema" else np.zeros((h, w), bool)) for t in TASKS}}
    pred = {A: {t: encode_mask(pred_m if t == "Edema" else np.zeros((h, w), bool)) for t in TASKS}}
    stats = pair_stats(gt, pred)
    assert stats.inter[0, EDEMA] == (gt_m & pred_m).sum() > 0
    assert stats.union[0, EDEMA] == (gt_m | pred_m).sum()


# ---------------------------------------------------------------------------------------------------- bootstrap
def _random_stats(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    gt = {}
    pred = {}
    for i in range(n):
        gt[f"patient{i}_study1_view1_frontal"] = {
            t: encode_mask(rng.random((6, 7)) < 0.3 * rng.random()) for t in TASKS
        }
        pred[f"patient{i}_study1_view1_frontal"] = {t: encode_mask(rng.random((6, 7)) < 0.4) for t in TASKS}
    return pair_stats(gt, pred)


def test_bootstrap_matches_a_naive_resampling_loop() -> None:
    stats = _random_stats()
    n, n_boot, seed = len(stats.image_ids), 200, 7
    result = evaluate_stats(stats, "tp_only", n_bootstrap=n_boot, seed=seed)
    kept, iou = stats.kept("tp_only"), np.nan_to_num(stats.iou())
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # the documented draw
    naive = np.full((n_boot, len(TASKS)), np.nan)
    for b in range(n_boot):
        for k in range(len(TASKS)):
            vals = [iou[i, k] for i in idx[b] if kept[i, k]]
            if vals:
                naive[b, k] = np.mean(vals)
    assert result.miou.samples is not None
    np.testing.assert_allclose(result.miou.samples, naive, rtol=1e-12)
    np.testing.assert_allclose(result.miou.ci, np.nanpercentile(naive, [2.5, 97.5], axis=0).T, rtol=1e-12)
    # The reported value is the point estimate on the full set, not the bootstrap mean.
    point = [np.mean(iou[kept[:, k], k]) for k in range(len(TASKS))]
    np.testing.assert_allclose(result.miou.value, point)
    assert not np.allclose(result.miou.value, np.nanmean(naive, axis=0))


def test_bootstrap_is_seeded() -> None:
    stats = _random_stats()
    a = evaluate_stats(stats, "full", n_bootstrap=300, seed=1)
    b = evaluate_stats(stats, "full", n_bootstrap=300, seed=1)
    c = evaluate_stats(stats, "full", n_bootstrap=300, seed=2)
    np.testing.assert_array_equal(a.miou.ci, b.miou.ci)
    np.testing.assert_array_equal(a.miou.mean_ci, b.miou.mean_ci)
    assert not np.array_equal(a.miou.ci, c.miou.ci)
    assert np.all((a.miou.ci[:, 0] <= a.miou.value) & (a.miou.value <= a.miou.ci[:, 1]))
    counts = bootstrap_counts(10, 5, 0)
    assert counts.shape == (5, 10) and (counts.sum(axis=1) == 10).all()


def test_resamples_without_kept_pairs_are_ignored() -> None:
    num = np.array([[0.5], [0.0]])
    den = np.array([[1.0], [0.0]])  # only image 0 has a kept pair
    counts = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    m = ratio_metric(num, den, counts)
    assert m.samples is not None and math.isnan(m.samples[1, 0])
    assert m.ci[0].tolist() == [0.5, 0.5]


# ---------------------------------------------------------------------------------------------------- hit rate
def test_point_in_rle_boundary_and_outside() -> None:
    mask = np.zeros((6, 9), dtype=bool)
    mask[2:5, 3:6] = True
    rle = encode_mask(mask)
    assert point_in_rle(rle, 2, 3) and point_in_rle(rle, 4, 5)  # corners of the square
    assert not point_in_rle(rle, 1, 3) and not point_in_rle(rle, 2, 6)
    assert point_in_rle(encode_mask(np.ones((6, 9), bool)), 0, 0) and point_in_rle(
        encode_mask(np.ones((6, 9), bool)), 5, 8
    )


def _hit_store(tmp_path):
    """Four 8x8 images with an 8x8 grid in an 8x8 frame: the upsampled map is the grid itself."""
    grid = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    peak = grid.copy()
    peak[2, 3] = 2.0  # the argmax
    cams = np.stack([np.stack([peak] * 10)] * 4)
    cams[3] = 0.0  # image 3: an all-zero map
    uri = str(tmp_path / "maps.zarr")
    ids = [f"patient{i}_study1_view1_frontal" for i in range(4)]
    make_store(uri, cams, [(8, 8)] * 4, 8, ids=ids)
    square = lambda r, c: np.pad(np.ones((3, 3), bool), ((r, 5 - r), (c, 5 - c)))  # noqa: E731
    masks = [square(2, 3), square(3, 3), np.zeros((8, 8), bool), square(0, 0)]
    gt = {i: {t: encode_mask(m) for t in TASKS} for i, m in zip(ids, masks)}
    return uri, gt, ids


def test_hit_rate_hand_case(tmp_path) -> None:
    uri, gt, ids = _hit_store(tmp_path)
    hits = hit_stats(uri, gt, ids)
    # image 0: the peak (2, 3) is the square's corner -> hit; image 1: the square starts one row below -> miss;
    # image 2: empty ground truth -> not counted; image 3: constant map -> miss (no argmax), though (0, 0) is inside.
    assert hits.valid[:, 0].tolist() == [True, True, False, True]
    assert hits.hit[:, 0].tolist() == [True, False, False, False]
    stats = pair_stats(gt, gt)
    result = evaluate_stats(stats, n_bootstrap=20, hits=hits)
    assert result.hit_rate is not None
    assert result.hit_rate.value[0] == pytest.approx(1 / 3) and result.hit_rate.n[0] == 3


def test_evaluate_cli_with_maps_radiologist_and_reference(tmp_path) -> None:
    uri, gt, _ids = _hit_store(tmp_path)
    write_segmentations(str(tmp_path / "gt.json"), gt)
    write_segmentations(str(tmp_path / "rad.json"), gt)  # a perfect "radiologist"
    (tmp_path / "ref.json").write_text(json.dumps({"Cardiomegaly": 0.71, "Lung Opacity": 0.5}))
    out = tmp_path / "eval"
    argv = ["evaluate", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "gt.json"), "--out", str(out)]
    argv += ["--maps", uri, "--radiologist", str(tmp_path / "rad.json"), "--reference", str(tmp_path / "ref.json")]
    assert main([*argv, "--n-bootstrap", "20"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hit_rate"]["pathologies"]["Enlarged Cardiomediastinum"]["hit_rate"] == pytest.approx(1 / 3)
    assert summary["radiologist"]["mean_miou"] == pytest.approx(1.0)
    assert summary["reference"]["pathologies"]["Airspace Opacity"] == 0.5
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["hit"] == "1" and rows[-1]["hit"] == "0"
    report = (out / "report.md").read_text()
    assert "hit rate" in report and "radiologist mIoU" in report and "reference mIoU" in report
