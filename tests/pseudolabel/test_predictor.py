"""The pseudo-labelling model stage and the job's refusals, without Ray: what a failing model records, and a store of
another (real) model refused before any work starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from chexseg_dist.config import load_config
from chexseg_dist.data import decode_frames, manifest_from_listing, read_manifest, write_manifest
from chexseg_dist.errors import StoreError
from chexseg_dist.models import create_classifier, save_checkpoint
from chexseg_dist.pseudolabel import (
    ClassifierPredictor,
    checkpoint_identity,
    manifest_fingerprint,
    run_pseudolabel,
    select_images,
)
from chexseg_dist.store import (
    Fragment,
    MapStore,
    StoreSpec,
    StoreWriter,
    WriterSettings,
    commit_fragments,
    read_failures,
    write_fragment,
)

SIZE = 32


def _images(root: Path, n: int) -> str:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"patient{i:05d}" / "study1"
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(folder / "view1_frontal.png")
    out = str(root / "m.parquet")
    write_manifest(manifest_from_listing(str(root)), out)
    return out


def _checkpoint(path: Path, seed: int, poison: bool = False) -> str:
    torch.manual_seed(seed)
    model = create_classifier("tiny_cnn", widths=(8, 16))
    if poison:
        with torch.no_grad():
            model.classifier.bias.fill_(float("nan"))  # every output NaN: a model-stage failure for every image
    return save_checkpoint(str(path), model, arch="tiny_cnn", image_size=SIZE, config={})


def _rows(images: pa.Table) -> dict[str, np.ndarray]:
    """The decode stage's input for every image of a selection, slots 0..n-1."""
    return {
        "slot": np.arange(images.num_rows, dtype=np.int64),
        "row": np.asarray(images.column("row")),
        "image_id": np.asarray(images.column("image_id").to_pylist()),
        "path": np.asarray(images.column("path").to_pylist()),
    }


def test_non_finite_model_output_is_recorded_per_image_and_written_as_failed(tmp_path: Path) -> None:
    manifest = _images(tmp_path / "data", 3)
    ckpt = _checkpoint(tmp_path / "nan_ckpt", 0, poison=True)
    images, _ = select_images(read_manifest(manifest), True)
    batch = _rows(images)
    frames = decode_frames(batch, SIZE)
    out = ClassifierPredictor([ckpt], (SIZE // 4, SIZE // 4), use_gpu=False, threads=1)(frames)
    assert out["failed"].tolist() == [1, 1, 1]
    assert out["stage"].tolist() == ["model"] * 3 and all("non-finite" in e for e in out["error"])

    store = MapStore.create(str(tmp_path / "maps.zarr"), batch["image_id"].tolist(), batch["row"], (8, 8))
    write_fragment(store.uri, Fragment.from_columns(out, "r1"))
    commit_fragments(store, "r1")
    assert not store.done().any() and store.failed().all()
    records = read_failures(store.uri)
    assert records.column("stage").to_pylist() == ["model"] * 3
    assert sorted(records.column("image_id").to_pylist()) == sorted(batch["image_id"].tolist())


def test_a_store_of_another_real_model_is_refused_before_any_work(tmp_path: Path) -> None:
    manifest = _images(tmp_path / "data", 4)
    first = _checkpoint(tmp_path / "ckpt_a", 0)
    second = _checkpoint(tmp_path / "ckpt_b", 1)
    images, _ = select_images(read_manifest(manifest), True)
    fingerprint_a, _ = checkpoint_identity([first])
    uri = str(tmp_path / "maps.zarr")
    spec = StoreSpec(
        image_ids=images.column("image_id").to_pylist(),
        rows=np.asarray(images.column("row")),
        identity={"manifest_fingerprint": manifest_fingerprint(images), "model_fingerprint": fingerprint_a},
        grid_shape=(8, 8),
        images_per_chunk=4,
    )
    with StoreWriter(uri, "a", WriterSettings()) as writer:
        writer.open(spec)  # the store as checkpoint A's run made it
    with pytest.raises(StoreError, match=r"mix two models.*--overwrite"):
        run_pseudolabel(load_config("tiny"), manifest, second, uri)  # no Ray is started for a refusal
    assert not MapStore.open(uri).done().any()


@pytest.mark.parametrize("model_batch", [8, 4])  # 4: the batch of eight needs two passes (slots 0 and 4 collide)
def test_an_images_maps_are_the_same_bits_however_its_batch_was_cut(tmp_path: Path, model_batch: int) -> None:
    """Ray Data cuts batches by arrival order, which differs between S3 and local disk: with the job's fixed model
    batch, an image in a partial, shuffled batch gets exactly the row it gets in a full one."""
    manifest = _images(tmp_path / "data", 8)
    ckpt = _checkpoint(tmp_path / "ckpt", 1)
    images, _ = select_images(read_manifest(manifest), True)
    batch = _rows(images)
    frames = decode_frames(batch, SIZE)
    predictor = ClassifierPredictor([ckpt], (SIZE // 4, SIZE // 4), use_gpu=False, threads=2, batch_size=model_batch)
    whole = predictor(frames)
    order = np.random.default_rng(3).permutation(8)
    pieces = [order[:1], order[1:4], order[4:]]  # a batch of one, of three and of four, shuffled
    for piece in pieces:
        out = predictor({k: np.asarray(v)[piece] for k, v in frames.items()})
        for key in ("probs", "cams", "cam_max"):
            assert np.array_equal(out[key], whole[key][piece]), key
