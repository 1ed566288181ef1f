"""CheXlocalize annotation formats: image ids, COCO RLE segmentation JSON, polygon JSON, radiologist points."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from scipy import ndimage

from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.data.chexlocalize import (
    AnnotationError,
    decode_mask,
    encode_mask,
    image_id_from_path,
    mask_to_polygons,
    polygons_json_to_segmentations,
    polygons_to_mask,
    read_points,
    read_polygons,
    read_segmentations,
    write_points,
    write_polygons,
    write_segmentations,
)


# ---------------------------------------------------------------------------------------------------- image ids
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "patient00001_study1_view1_frontal"),
        ("/data/CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg", "patient64541_study1_view1_frontal"),
        ("test/patient64741/study1/view1_frontal.jpg", "patient64741_study1_view1_frontal"),
        ("s3://bucket/cxr/train/patient00005/study2/view2_lateral.png", "patient00005_study2_view2_lateral"),
        ("patient1/study3/view1.frontal.jpg", "patient1_study3_view1.frontal"),
    ],
)
def test_image_id_from_path(path: str, expected: str) -> None:
    assert image_id_from_path(path) == expected


@pytest.mark.parametrize(
    "path", ["view1_frontal.jpg", "study1/view1_frontal.jpg", "data/train/img001.jpg", "a/patient1/scan1/v.jpg"]
)
def test_image_id_from_path_rejects_non_chexpert_paths(path: str) -> None:
    with pytest.raises(ValueError, match="patient") as info:
        image_id_from_path(path)
    assert path in str(info.value)


# ---------------------------------------------------------------------------------------------------- RLE
def _blobs(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:h, :w]
    m = np.zeros((h, w), dtype=bool)
    for _ in range(4):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(2, max(3, h // 4)), rng.integers(2, max(3, w // 4))
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return m


def test_rle_hand_computed_column_major() -> None:
    # Column-major (Fortran) scan of [[0,1,0],[1,1,0]] is 0,1 | 1,1 | 0,0 -> runs 1,3,2 -> chars '1','3','2'.
    mask = np.array([[0, 1, 0], [1, 1, 0]], dtype=np.uint8)
    rle = encode_mask(mask)
    assert rle == {"size": [2, 3], "counts": "132"}
    np.testing.assert_array_equal(decode_mask(rle), mask)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools vs numpy 2
def test_rle_round_trip_at_original_odd_size() -> None:
    mask = _blobs(2321, 2827, seed=0)
    rle = encode_mask(mask)
    assert rle["size"] == [2321, 2827] and isinstance(rle["counts"], str)
    out = decode_mask(rle)
    assert out.dtype == np.uint8 and out.shape == (2321, 2827)
    np.testing.assert_array_equal(out, mask)
    # Interoperable with pycocotools (what the benchmark's evaluation script uses).
    np.testing.assert_array_equal(coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}), mask)


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trip_random_small(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 50, 2)
    mask = rng.random((h, w)) < rng.random()
    np.testing.assert_array_equal(decode_mask(encode_mask(mask)), mask)


def test_rle_empty_and_full() -> None:
    for mask in (np.zeros((7, 3), np.uint8), np.ones((7, 3), np.uint8)):
        np.testing.assert_array_equal(decode_mask(encode_mask(mask)), mask)


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ({"size": [5, 7], "counts": ""}, "empty"),
        ({"size": [5, 7], "counts": "13"}, "5x7"),  # runs sum to 4, not 35
        ({"size": [5, 7], "counts": "1\x7f"}, "invalid character"),
        ({"size": [5, 7], "counts": "1P"}, "truncated"),
        ({"size": [5], "counts": "13"}, "size"),
        ({"size": [5, -7], "counts": "13"}, "size"),
        ({"size": [5, 7], "counts": [1, 2]}, "string"),
        ({"counts": "13"}, "RLE object"),
    ],
)
def test_decode_mask_errors_name_image_and_pathology(rle: dict, match: str) -> None:
    with pytest.raises(AnnotationError, match=match) as info:
        decode_mask(rle, image_id="patient1_study1_view1_frontal", pathology="Edema")
    assert "patient1_study1_view1_frontal" in str(info.value) and "Edema" in str(info.value)


def test_decode_mask_checks_expected_size() -> None:
    rle = encode_mask(np.zeros((4, 6), np.uint8))
    with pytest.raises(AnnotationError, match="4x6 differs from the image size 6x4"):
        decode_mask(rle, image_id="x", pathology="Edema", expected_size=(6, 4))


def test_segmentations_file_round_trip_and_alias(tmp_path: Path) -> None:
    m1, m2 = _blobs(31, 45, 1), _blobs(31, 45, 2)
    path = str(tmp_path / "seg.json")
    write_segmentations(path, {"patient1_study1_view1_frontal": {"Lung Opacity": m1, "Edema": encode_mask(m2)}})
    raw = json.loads(Path(path).read_text())
    assert set(raw["patient1_study1_view1_frontal"]) == {"Airspace Opacity", "Edema"}
    seg = read_segmentations(path)
    entry = seg["patient1_study1_view1_frontal"]
    np.testing.assert_array_equal(decode_mask(entry["Airspace Opacity"]), m1)
    np.testing.assert_array_equal(decode_mask(entry["Edema"]), m2)
    # Files written by others with the CheXpert spelling are read under the canonical name.
    raw["patient1_study1_view1_frontal"]["Lung Opacity"] = raw["patient1_study1_view1_frontal"].pop("Airspace Opacity")
    Path(path).write_text(json.dumps(raw))
    assert set(read_segmentations(path)["patient1_study1_view1_frontal"]) == {"Airspace Opacity", "Edema"}


def _write(tmp_path: Path, obj: object) -> str:
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(obj))
    return str(p)


def test_read_segmentations_errors(tmp_path: Path) -> None:
    good = encode_mask(np.zeros((4, 5), np.uint8))
    path = _write(tmp_path, {"imgA": {"Edema": good, "Pneumonia": good}})
    with pytest.raises(AnnotationError, match="unknown pathology 'Pneumonia'") as info:
        read_segmentations(path)
    assert "imgA" in str(info.value) and path in str(info.value)

    path = _write(tmp_path, {"imgB": {"Edema": good, "Cardiomegaly": {"size": [4, 5], "counts": "9"}}})
    with pytest.raises(AnnotationError, match="does not describe a 4x5 mask") as info:
        read_segmentations(path)
    assert "imgB" in str(info.value) and "Cardiomegaly" in str(info.value)

    path = _write(tmp_path, {"imgC": {"Airspace Opacity": good, "Lung Opacity": good}})
    with pytest.raises(AnnotationError, match="given twice"):
        read_segmentations(path)

    other = encode_mask(np.zeros((5, 4), np.uint8))
    path = _write(tmp_path, {"imgD": {"Edema": good, "Cardiomegaly": other}})
    with pytest.raises(AnnotationError, match="different sizes") as info:
        read_segmentations(path)
    assert "imgD" in str(info.value)

    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        read_segmentations(str(tmp_path / "broken.json"))


# ---------------------------------------------------------------------------------------------------- polygons
def test_polygon_outline_included_triangle() -> None:
    # Right triangle (0,0), (5,0), (0,5) on a 6x6 grid: the filled polygon with its outline is x + y <= 5; the
    # hypotenuse pixels (x + y == 5) lie exactly on the outline and must be included.
    mask = polygons_to_mask([[[0, 0], [5, 0], [0, 5]]], 6, 6)
    yy, xx = np.mgrid[:6, :6]
    np.testing.assert_array_equal(mask, (xx + yy <= 5).astype(np.uint8))


def test_polygon_rectangle_includes_border_rows_and_columns() -> None:
    mask = polygons_to_mask([[[1, 1], [4, 1], [4, 3], [1, 3]]], 5, 6)
    expected = np.zeros((5, 6), np.uint8)
    expected[1:4, 1:5] = 1  # rows 1..3, columns 1..4 inclusive
    np.testing.assert_array_equal(mask, expected)


def test_polygon_x_is_column_y_is_row() -> None:
    # A 5-wide, 2-tall bar in a 4 x 7 (h x w) image: swapping x and y would give a 2-wide, 5-tall bar (clipped).
    mask = polygons_to_mask([[[1, 1], [5, 1], [5, 2], [1, 2]]], 4, 7)
    assert mask.shape == (4, 7)
    expected = np.zeros((4, 7), np.uint8)
    expected[1:3, 1:6] = 1
    np.testing.assert_array_equal(mask, expected)


def test_polygons_of_one_pathology_are_unioned() -> None:
    mask = polygons_to_mask([[[0, 0], [1, 0], [1, 1], [0, 1]], [[3, 2], [4, 2], [4, 3], [3, 3]], [[6, 0]]], 4, 7)
    assert mask.sum() == 4 + 4 + 1
    assert mask[0:2, 0:2].all() and mask[2:4, 3:5].all() and mask[0, 6] == 1


@pytest.mark.parametrize("seed", range(4))
def test_mask_polygon_round_trip_exact_for_filled_blobs(seed: int) -> None:
    mask = _blobs(151, 203, seed)
    mask = ndimage.binary_fill_holes(mask)  # the class that round-trips exactly: masks without holes
    polys = mask_to_polygons(mask)
    assert all(isinstance(v, int) for poly in polys for pt in poly for v in pt)
    np.testing.assert_array_equal(polygons_to_mask(polys, 151, 203), mask)


@pytest.mark.parametrize("seed", range(6))
def test_mask_polygon_round_trip_fills_holes_of_any_mask(seed: int) -> None:
    # Documented contract for arbitrary masks (noise, one-pixel lines, diagonal touches): holes get filled.
    rng = np.random.default_rng(seed)
    h, w = rng.integers(5, 40, 2)
    mask = rng.random((h, w)) < rng.uniform(0.2, 0.7)
    np.testing.assert_array_equal(polygons_to_mask(mask_to_polygons(mask), h, w), ndimage.binary_fill_holes(mask))


def test_mask_to_polygons_ring_loses_hole_and_empty_mask() -> None:
    ring = np.zeros((7, 7), np.uint8)
    ring[1:6, 1:6] = 1
    ring[3, 3] = 0
    assert polygons_to_mask(mask_to_polygons(ring), 7, 7)[3, 3] == 1
    assert mask_to_polygons(np.zeros((4, 4), np.uint8)) == []


def _polygon_file(tmp_path: Path) -> tuple[str, dict]:
    data = {
        "patient1_study1_view1_frontal": {
            "img_size": [9, 13],
            "Lung Opacity": [[[1, 1], [5, 1], [5, 4], [1, 4]]],
            "Cardiomegaly": [[[8, 2], [11, 2], [11, 7]], [[0, 8]]],
        },
        "patient2_study1_view1_frontal": {"img_size": [6, 5]},
    }
    path = tmp_path / "gt_polygons.json"
    path.write_text(json.dumps(data))
    return str(path), data


def test_read_polygons_normalises_and_keeps_size(tmp_path: Path) -> None:
    path, data = _polygon_file(tmp_path)
    polys = read_polygons(path)
    entry = polys["patient1_study1_view1_frontal"]
    assert entry["img_size"] == (9, 13)
    assert set(entry) == {"img_size", "Airspace Opacity", "Cardiomegaly"}
    assert entry["Airspace Opacity"] == data["patient1_study1_view1_frontal"]["Lung Opacity"]
    out = str(tmp_path / "again.json")
    write_polygons(out, polys)
    assert read_polygons(out) == polys


def test_polygons_json_to_segmentations_lists_every_task(tmp_path: Path) -> None:
    path, data = _polygon_file(tmp_path)
    out = str(tmp_path / "gt_segmentations.json")
    seg = polygons_json_to_segmentations(path, out)
    assert read_segmentations(out) == seg
    for image_id, (h, w) in (("patient1_study1_view1_frontal", (9, 13)), ("patient2_study1_view1_frontal", (6, 5))):
        assert list(seg[image_id]) == list(TASKS)
        for task in TASKS:
            assert seg[image_id][task]["size"] == [h, w]
    first = seg["patient1_study1_view1_frontal"]
    opacity = decode_mask(first["Airspace Opacity"])
    assert opacity.sum() == 5 * 4 and opacity[1:5, 1:6].all()
    np.testing.assert_array_equal(
        decode_mask(first["Cardiomegaly"]),
        polygons_to_mask(data["patient1_study1_view1_frontal"]["Cardiomegaly"], 9, 13),
    )
    assert decode_mask(first["Edema"]).sum() == 0
    assert all(decode_mask(r).sum() == 0 for r in seg["patient2_study1_view1_frontal"].values())


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"Edema": [[[1, 1], [2, 2], [1, 2]]]}, "missing 'img_size'"),
        ({"img_size": [0, 5]}, "img_size"),
        ({"img_size": [4, 5], "Edema": [[[1, 1], [2], [1, 2]]]}, "polygon 0"),
        ({"img_size": [4, 5], "Edema": [[[1, "a"], [2, 2], [1, 2]]]}, "point"),
        ({"img_size": [4, 5], "Edema": [[]]}, "non-empty"),
        ({"img_size": [4, 5], "Nodule": []}, "unknown pathology 'Nodule'"),
    ],
)
def test_read_polygons_errors(tmp_path: Path, entry: dict, match: str) -> None:
    path = _write(tmp_path, {"imgX": entry})
    with pytest.raises(AnnotationError, match=match) as info:
        read_polygons(path)
    assert "imgX" in str(info.value) and path in str(info.value)


# ---------------------------------------------------------------------------------------------------- points
def test_points_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path, {"imgP": {"Lung Opacity": [[10, 20], [30.5, 1]], "Edema": []}})
    pts = read_points(path)
    np.testing.assert_array_equal(pts["imgP"]["Airspace Opacity"], [[10, 20], [30.5, 1]])
    assert pts["imgP"]["Edema"].shape == (0, 2)
    out = str(tmp_path / "points_out.json")
    write_points(out, pts)
    again = read_points(out)
    np.testing.assert_array_equal(again["imgP"]["Airspace Opacity"], pts["imgP"]["Airspace Opacity"])
    bad = _write(tmp_path, {"imgQ": {"Edema": [[1, 2, 3]]}})
    with pytest.raises(AnnotationError, match=r"imgQ.*Edema"):
        read_points(bad)


# ---------------------------------------------------------------------------------------------------- S3
@pytest.mark.s3
def test_annotations_s3_round_trip(s3_bucket: str) -> None:
    mask = _blobs(37, 29, 3)
    seg_uri = f"{s3_bucket}/eval/seg.json"
    write_segmentations(seg_uri, {"imgS": {"Edema": mask}})
    np.testing.assert_array_equal(decode_mask(read_segmentations(seg_uri)["imgS"]["Edema"]), mask)

    poly_uri = f"{s3_bucket}/gt/polygons.json"
    polys = {"imgS": {"img_size": (37, 29), "Edema": mask_to_polygons(ndimage.binary_fill_holes(mask))}}
    write_polygons(poly_uri, polys)
    seg = polygons_json_to_segmentations(poly_uri, f"{s3_bucket}/gt/seg.json")
    np.testing.assert_array_equal(
        decode_mask(read_segmentations(f"{s3_bucket}/gt/seg.json")["imgS"]["Edema"]), ndimage.binary_fill_holes(mask)
    )
    assert list(seg["imgS"]) == list(TASKS)
