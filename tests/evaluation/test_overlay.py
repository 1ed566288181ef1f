import numpy as np
import pytest
from maps_helpers import image_ids, make_manifest, make_store, write_png
from PIL import Image

from chexseg_dist.cli.main import main
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.data.chexlocalize import encode_mask, write_segmentations
from chexseg_dist.evaluation.overlay import BASE_COLOR, GT_COLOR, PRED_COLOR, figure_size, render_overlay
from chexseg_dist.masks.binarize import OtsuBinarizer
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.masks.refine import CrfParams, CrfRefiner


def _count_color(png: np.ndarray, hex_color: str, tol: int = 40) -> int:
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(png[..., :3].astype(int) - rgb).max(axis=-1) < tol).sum())


@pytest.mark.parametrize(("h", "w"), [(300, 240), (180, 260)])
def test_overlay_png_size_and_contours(tmp_path, h: int, w: int) -> None:
    rng = np.random.default_rng(0)
    box = Letterbox(h, w, 32)
    cams = rng.random((10, 6, 6)).astype(np.float32)
    image = rng.random((h, w)).astype(np.float32) * 0.5
    gt = np.zeros((h, w), dtype=bool)
    gt[h // 4 : h // 2, w // 4 : w // 2] = True
    maker = MaskMaker(OtsuBinarizer())
    with_gt, without = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    size = render_overlay(with_gt, image, cams, box, maker, gt_masks={"Edema": gt}, title="x")
    render_overlay(without, image, cams, box, maker, title="x")
    assert size == figure_size(h, w)
    a, b = np.asarray(Image.open(with_gt)), np.asarray(Image.open(without))
    assert (a.shape[1], a.shape[0]) == figure_size(h, w)
    # Landscape images give shorter panels than portrait ones: the aspect ratio is kept.
    assert figure_size(h, w)[1] == 30 + 2 * (round(320 * h / w) + 36)
    assert _count_color(a, GT_COLOR) > 50 and _count_color(b, GT_COLOR) < 5  # the expert contour is drawn
    assert _count_color(a, PRED_COLOR) > 200  # predicted contours in every panel


def test_overlay_cli_reads_radiographs_from_the_manifest(tmp_path) -> None:
    rng = np.random.default_rng(1)
    sizes = [(120, 100), (90, 130)]
    ids = image_ids(2)
    paths = [write_png(str(tmp_path / "img" / f"{i}.png"), rng.random(s)) for i, s in zip(ids, sizes)]
    uri = str(tmp_path / "maps.zarr")
    make_store(uri, rng.random((2, 10, 6, 6)).astype(np.float32), sizes, 32, ids=ids)
    manifest = str(tmp_path / "m.parquet")
    make_manifest(manifest, ids, image_paths=paths)
    gt = {
        i: {t: encode_mask(np.ones(s, bool) if t == "Edema" else np.zeros(s, bool)) for t in TASKS}
        for i, s in zip(ids, sizes)
    }
    write_segmentations(str(tmp_path / "gt.json"), gt)
    out = tmp_path / "overlays"
    argv = ["overlay", "--store", uri, "--manifest", manifest, "--ids", ",".join(ids), "--out", str(out)]
    assert main([*argv, "--gt", str(tmp_path / "gt.json")]) == 0
    for image_id, (h, w) in zip(ids, sizes):
        png = Image.open(out / f"{image_id}.png")
        assert png.size == figure_size(h, w)
    assert main([*argv[:5], "--ids", "patient1_study1_view1_frontal", "--out", str(out)]) == 2


def test_overlay_with_a_refiner_draws_the_unrefined_and_the_refined_mask(tmp_path) -> None:
    h, w = 120, 160
    box = Letterbox(h, w, 64)
    image = np.full((h, w), 0.2, dtype=np.float32)
    image[30:80, 40:100] = 0.8  # the finding, with sharp edges
    truth = np.zeros((h, w), dtype=bool)
    truth[30:80, 40:100] = True
    grid = box.mask_to_frame(truth).astype(np.float32)[::8, ::8]
    cams = np.zeros((10, 8, 8), dtype=np.float32)
    cams[:] = grid + 0.5 * np.roll(grid, 1, axis=1)  # smeared: the unrefined mask spills over the edge
    plain, refined = str(tmp_path / "plain.png"), str(tmp_path / "refined.png")
    render_overlay(plain, image, cams, box, MaskMaker(OtsuBinarizer()))
    maker = MaskMaker(OtsuBinarizer(), refiner=CrfRefiner(CrfParams(stride=2)))
    render_overlay(refined, image, cams, box, maker)
    a, b = np.asarray(Image.open(plain)), np.asarray(Image.open(refined))
    assert _count_color(a, BASE_COLOR) < 5 and _count_color(b, BASE_COLOR) > 200  # the unrefined masks, dotted
    assert _count_color(b, PRED_COLOR) > 200  # and the refined ones
