"""Checkpoint directories: round trips (local and S3), integrity and format errors, ensembles, predict_with_cams."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from chexseg_dist.config.sections import Config
from chexseg_dist.core import fsio
from chexseg_dist.core.pathologies import OBSERVATIONS
from chexseg_dist.models.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    ensemble_fingerprint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from chexseg_dist.models.classifiers import create_classifier
from chexseg_dist.saliency.classifier import LoadedEnsemble, load_classifier, predict_with_cams
from chexseg_dist.saliency.gradcam import grad_cam

torch.set_num_threads(2)
SIZE = 32


def tiny(seed: int, **kw: Any) -> nn.Module:
    torch.manual_seed(seed)
    model: Any = create_classifier("tiny_cnn", widths=(8, 16), **kw)
    # Non-trivial BatchNorm statistics, so that a round trip that dropped buffers would show.
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 1, SIZE, SIZE))
    return model.eval()


def save(path: Path | str, model: nn.Module, **kw: Any) -> str:
    return save_checkpoint(str(path), model, arch="tiny_cnn", image_size=SIZE, config=Config().to_dict(), **kw)


def edit_meta(path: Path, **changes: object) -> None:
    meta_path = path / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    meta_path.write_text(json.dumps(meta))


def test_round_trip_keeps_outputs_and_records_everything(tmp_path: Path) -> None:
    model = tiny(0, mean=[0.3], std=[0.2])
    config = Config().to_dict()
    save(tmp_path / "ck", model, metrics={"auroc": 0.8})
    loaded = load_checkpoint(str(tmp_path / "ck"))
    images = torch.rand(3, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), model(images))
    assert not loaded.model.training
    meta = loaded.meta
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["labels"] == list(OBSERVATIONS) and meta["num_classes"] == 14
    assert meta["image_size"] == SIZE and meta["in_channels"] == 1
    assert meta["target_layer"] == "features"
    assert meta["normalisation"] == {"mean": [0.3], "std": [0.2]}
    assert meta["arch_kwargs"] == {"widths": [8, 16]}
    assert meta["config"] == json.loads(json.dumps(config))
    assert meta["metrics"] == {"auroc": 0.8}
    assert loaded.fingerprint == meta["fingerprint"] and len(loaded.fingerprint) == 64


def test_fingerprint_identifies_the_weights(tmp_path: Path) -> None:
    model = tiny(0)
    a = load_checkpoint(save(tmp_path / "a", model))
    b = load_checkpoint(save(tmp_path / "b", model, metrics={"note": "same weights, other metadata"}))
    c = load_checkpoint(save(tmp_path / "c", tiny(1)))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_explicit_target_layer_is_used_by_predict(tmp_path: Path) -> None:
    model = tiny(0)
    loaded = load_checkpoint(save(tmp_path / "ck", model, target_layer="features.stage1"))
    images = torch.rand(2, 1, SIZE, SIZE)
    _, cams = predict_with_cams(loaded, images)
    assert cams.shape == (2, 14, SIZE // 2, SIZE // 2)


def test_save_rejects_bad_target_and_label_count(tmp_path: Path) -> None:
    model = tiny(0)
    with pytest.raises(CheckpointError, match="target_layer 'layer4'"):
        save(tmp_path / "x", model, target_layer="layer4")
    with pytest.raises(CheckpointError, match="labels has 3 names"):
        save(tmp_path / "y", model, labels=("a", "b", "c"))
    assert not (tmp_path / "x" / "checkpoint.json").exists()


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nowhere.*checkpoint\.json not found"):
        load_checkpoint(str(tmp_path / "nowhere"))
    path = Path(save(tmp_path / "ck", tiny(0)))
    (path / "model.pt").unlink()
    with pytest.raises(CheckpointError, match=r"ck.*model\.pt not found"):
        load_checkpoint(str(path))


def test_wrong_format_version_names_the_field(tmp_path: Path) -> None:
    path = Path(save(tmp_path / "ck", tiny(0)))
    edit_meta(path, format_version=99)
    with pytest.raises(CheckpointError, match=r"ck/checkpoint\.json: field format_version=99"):
        load_checkpoint(str(path))


def test_label_order_mismatch_names_the_field(tmp_path: Path) -> None:
    path = Path(save(tmp_path / "ck", tiny(0)))
    swapped = list(OBSERVATIONS)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    edit_meta(path, labels=swapped)
    with pytest.raises(CheckpointError, match=r"ck/checkpoint\.json: field labels is in a different order.*position 2"):
        load_checkpoint(str(path))
    # Callers that do not rely on CheXpert's order can opt out of the check.
    assert load_checkpoint(str(path), expected_labels=None).labels == tuple(swapped)


def test_replaced_weights_fail_the_fingerprint_check(tmp_path: Path) -> None:
    path = Path(save(tmp_path / "ck", tiny(0)))
    other = Path(save(tmp_path / "other", tiny(1)))
    (path / "model.pt").write_bytes((other / "model.pt").read_bytes())
    with pytest.raises(CheckpointError, match="does not match field fingerprint"):
        load_checkpoint(str(path))
    (path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(str(path))


def test_single_predict_is_sigmoid_of_logits_and_grad_cam(tmp_path: Path) -> None:
    model = tiny(0)
    loaded = load_classifier(save(tmp_path / "ck", model))
    frames = torch.randint(0, 256, (2, 1, SIZE, SIZE), dtype=torch.uint8)
    probs, cams = predict_with_cams(loaded, frames)
    logits, ref_cams = grad_cam(model, frames.float() / 255, "features")
    torch.testing.assert_close(probs, torch.sigmoid(logits))
    torch.testing.assert_close(cams, ref_cams)
    assert probs.shape == (2, 14) and cams.shape == (2, 14, SIZE // 4, SIZE // 4)
    torch.testing.assert_close(predict_with_cams(loaded, frames.float() / 255)[1], cams)
    with pytest.raises(ValueError, match=r"\[B, 1, 32, 32\].*image_size=32"):
        predict_with_cams(loaded, torch.rand(2, 1, 64, 64))


def test_ensemble_averages_member_probabilities_and_maps(tmp_path: Path) -> None:
    a = save(tmp_path / "a", tiny(0))
    b = save(tmp_path / "b", tiny(1))
    ensemble = load_classifier([a, b])
    assert isinstance(ensemble, LoadedEnsemble) and ensemble.paths == [a, b]
    images = torch.rand(3, 1, SIZE, SIZE)
    probs, cams = predict_with_cams(ensemble, images)
    members = [predict_with_cams(load_classifier(p), images) for p in (a, b)]
    torch.testing.assert_close(probs, (members[0][0] + members[1][0]) / 2)
    torch.testing.assert_close(cams, (members[0][1] + members[1][1]) / 2)
    # Comma-separated form, any order: the same ensemble and fingerprint; it differs from either member's.
    reordered = load_classifier(f"{b}, {a}")
    assert isinstance(reordered, LoadedEnsemble)
    assert reordered.fingerprint == ensemble.fingerprint
    assert ensemble.fingerprint not in {m.fingerprint for m in ensemble.members}
    # Computable from checkpoint.json alone (what the pipeline records before loading any weights).
    assert ensemble_fingerprint(read_meta(p)["fingerprint"] for p in (b, a)) == ensemble.fingerprint
    assert ensemble.meta["members"][0]["path"] == a


def test_ensemble_resizes_members_with_different_grids(tmp_path: Path) -> None:
    a = save(tmp_path / "a", tiny(0))  # 2 stages: 8 x 8 grid at 32 px
    torch.manual_seed(2)
    deep: Any = create_classifier("tiny_cnn", widths=(8, 16, 32)).eval()  # 4 x 4 grid
    b = save(tmp_path / "b", deep)
    _, cams = predict_with_cams(load_classifier([a, b]), torch.rand(2, 1, SIZE, SIZE))
    assert cams.shape == (2, 14, 8, 8)


def test_ensemble_members_must_agree(tmp_path: Path) -> None:
    a = save(tmp_path / "a", tiny(0))
    other_size = save_checkpoint(
        str(tmp_path / "big"), tiny(1), arch="tiny_cnn", image_size=64, config=Config().to_dict()
    )
    with pytest.raises(CheckpointError, match=rf"image_size: {a} has 32, {other_size} has 64"):
        load_classifier([a, other_size])
    relabelled = Path(save(tmp_path / "relabelled", tiny(2)))
    edit_meta(relabelled, labels=list(reversed(OBSERVATIONS)))
    with pytest.raises(CheckpointError, match=rf"labels: {a} has .* {relabelled} has"):
        load_classifier([a, str(relabelled)], expected_labels=None)
    with pytest.raises(CheckpointError, match="no checkpoint path"):
        load_classifier(" , ")


@pytest.mark.s3
def test_round_trip_on_s3(tmp_path: Path, s3_bucket: str) -> None:
    model = tiny(0)
    uri = save(f"{s3_bucket}/runs/classifier", model)
    assert fsio.exists(f"{uri}/model.pt") and fsio.exists(f"{uri}/checkpoint.json")
    loaded = load_checkpoint(uri)
    images = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), model(images))
    with pytest.raises(CheckpointError, match=rf"{s3_bucket}/missing"):
        load_checkpoint(f"{s3_bucket}/missing")
