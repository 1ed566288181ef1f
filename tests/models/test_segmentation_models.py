"""The student's models: every registered architecture builds offline with the contract shapes; checkpoints round
trip; a classifier's backbone initialises the encoder only when it is the same ResNet."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from chexseg_dist.core.pathologies import OBSERVATIONS, TASKS
from chexseg_dist.core.registry import SEGMENTATION_ARCHS, SEGMENTATION_ENCODERS
from chexseg_dist.errors import CheckpointError
from chexseg_dist.models.checkpoint import save_checkpoint
from chexseg_dist.models.classifiers import create_classifier
from chexseg_dist.models.segmentation import (
    create_segmentation,
    init_encoder_from_classifier,
    load_segmentation,
    save_segmentation,
)

torch.set_num_threads(2)


def test_every_registered_model_builds_without_network_and_keeps_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError(f"network access while building a model: {args[:2]}")

    # Any download (a model hub, a URL) needs a name lookup or a connection: both now fail loudly.
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    built = []
    for arch in SEGMENTATION_ARCHS.names():
        for encoder in SEGMENTATION_ENCODERS.names():
            model = create_segmentation(arch, encoder).eval()
            with torch.no_grad():
                out = model(torch.rand(2, 1, 64, 64))
            assert out.shape == (2, len(TASKS), 64, 64), (arch, encoder)
            built.append((arch, encoder))
    assert len(built) == 9 and ("deeplabv3plus", "resnet18") in built


def test_checkpoint_round_trip_keeps_outputs_and_thresholds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_segmentation("unet", "resnet18").eval()
    thresholds = np.linspace(0.1, 0.55, len(TASKS))
    path = save_segmentation(
        str(tmp_path / "ck"), model, image_size=64, thresholds=thresholds, config={"a": 1}, metrics={"score": 0.3}
    )
    meta = json.loads((tmp_path / "ck" / "segmentation.json").read_text())
    assert meta["arch"] == "unet" and meta["encoder"] == "resnet18" and meta["image_size"] == 64
    assert meta["tasks"] == list(TASKS) and meta["metrics"] == {"score": 0.3} and meta["config"] == {"a": 1}
    loaded = load_segmentation(path)
    assert np.allclose(loaded.thresholds, thresholds) and loaded.image_size == 64
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x), atol=1e-6)
    with pytest.raises(CheckpointError, match="expected 10 thresholds in"):
        save_segmentation(str(tmp_path / "bad"), model, image_size=64, thresholds=[2.0] * 10, config={})
    (tmp_path / "ck" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="ck"):
        load_segmentation(path)


def test_encoder_init_copies_a_same_resnet_backbone_and_refuses_another_arch(tmp_path: Path) -> None:
    torch.manual_seed(1)
    classifier = create_classifier("resnet18", num_classes=len(OBSERVATIONS))
    save_checkpoint(str(tmp_path / "r18"), classifier, arch="resnet18", image_size=64, config={})
    student = create_segmentation("deeplabv3plus", "resnet18")
    init_encoder_from_classifier(student, str(tmp_path / "r18"))
    theirs = classifier.state_dict()
    mine = student.net.encoder.state_dict()
    copied = [k for k in theirs if not k.startswith("fc.") and k in mine]
    assert copied and all(torch.equal(mine[k], theirs[k]) for k in copied)
    tiny = create_classifier("tiny_cnn", num_classes=len(OBSERVATIONS))
    save_checkpoint(str(tmp_path / "tiny"), tiny, arch="tiny_cnn", image_size=64, config={})
    with pytest.raises(CheckpointError, match="a tiny_cnn classifier cannot initialise a resnet18 encoder"):
        init_encoder_from_classifier(create_segmentation("fpn", "resnet18"), str(tmp_path / "tiny"))
    with pytest.raises(CheckpointError, match="a resnet18 classifier cannot initialise a resnet34 encoder"):
        init_encoder_from_classifier(create_segmentation("fpn", "resnet34"), str(tmp_path / "r18"))
