"""The classifier registry, the shared input contract and the feature/head split (parametrised over the registry)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from chexseg_dist.models._base import IMAGENET_MEAN, IMAGENET_STD, LinearHead, SplitModel
from chexseg_dist.models.classifiers import (
    create_classifier,
    default_target_layer,
    list_archs,
    register_arch,
    unregister_arch,
)
from chexseg_dist.saliency.gradcam import grad_cam

torch.set_num_threads(2)


def test_registry_lists_the_four_architectures() -> None:
    assert {"densenet121", "resnet18", "resnet50", "tiny_cnn"} <= set(list_archs())
    assert default_target_layer("densenet121") == "features"
    assert default_target_layer("resnet18") == "layer4"
    assert default_target_layer("resnet50") == "layer4"


@pytest.mark.parametrize("arch", ["densenet121", "resnet18", "resnet50", "tiny_cnn"])
def test_every_arch_takes_grayscale_frames_and_splits_at_its_target(arch: str) -> None:
    torch.manual_seed(0)
    model: Any = create_classifier(arch, num_classes=14).eval()
    images = torch.rand(2, 1, 64, 64)
    seen: list[Tensor] = []
    handle = model.get_submodule(default_target_layer(arch)).register_forward_hook(lambda _m, _i, o: seen.append(o))
    with torch.no_grad():
        logits = model(images)
        features = model.forward_features(images)
        from_head = model.forward_head(features)
    handle.remove()
    assert logits.shape == (2, 14) and logits.dtype == torch.float32
    torch.testing.assert_close(from_head, logits)
    # The hooked target output is exactly the split point (and nothing rewrote it after the hook ran).
    torch.testing.assert_close(seen[0], features)
    implements_protocol = isinstance(model, SplitModel)  # what grad_cam checks (kept out of mypy's narrowing)
    assert implements_protocol
    assert model.split_at_target(default_target_layer(arch)) is not None
    head = model.linear_head(default_target_layer(arch))
    assert isinstance(head, LinearHead) and head.linear.out_features == 14
    assert model.arch == arch


def test_densenet_feature_output_keeps_its_negative_values() -> None:
    # torchvision rectifies `features` in place; a Grad-CAM hook there must see the pre-ReLU activation (norm5).
    torch.manual_seed(1)
    model: Any = create_classifier("densenet121").eval()
    captured: list[tuple[Tensor, Tensor]] = []
    model.features.register_forward_hook(lambda _m, _i, o: captured.append((o, o.clone())))
    with torch.no_grad():
        model(torch.rand(2, 1, 64, 64))
    live, snapshot = captured[0]
    assert (snapshot < 0).any()
    assert torch.equal(live, snapshot)


def test_normalisation_happens_inside_and_expands_to_three_channels() -> None:
    model: Any = create_classifier("resnet18")
    x = torch.full((1, 1, 8, 8), 0.5)
    out = model.normalize(x)
    assert out.shape == (1, 3, 8, 8)
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    custom: Any = create_classifier("tiny_cnn", mean=[0.25], std=[0.5])
    torch.testing.assert_close(custom.normalize(x), torch.full((1, 1, 8, 8), 0.5))
    assert custom.arch_kwargs == {}  # normalisation is recorded separately, not as an arch option


def test_input_contract_violations_say_what_to_do() -> None:
    model: Any = create_classifier("tiny_cnn")
    with pytest.raises(TypeError, match="255"):
        model(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 1, S, S\]"):
        model(torch.rand(1, 3, 32, 32))


def test_unknown_arch_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="tiny_cnn"):
        create_classifier("vgg16")
    with pytest.raises(ValueError, match="num_classes"):
        create_classifier("tiny_cnn", num_classes=0)


def test_register_arch_adds_a_builder_and_refuses_duplicates() -> None:
    @register_arch(target_layer="0")
    def test_only_linear(num_classes: int = 14, **kw: Any) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    try:
        assert "test_only_linear" in list_archs()
        assert create_classifier("test_only_linear", num_classes=3)(torch.rand(2, 1, 8, 8)).shape == (2, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_arch(target_layer="0")(test_only_linear)
    finally:
        unregister_arch("test_only_linear")
    assert "test_only_linear" not in list_archs()


def test_tiny_cnn_grid_follows_its_number_of_stages() -> None:
    model: Any = create_classifier("tiny_cnn", widths=(8, 16, 32)).eval()
    with torch.no_grad():
        assert model.forward_features(torch.rand(1, 1, 64, 64)).shape == (1, 32, 8, 8)
    assert model.arch_kwargs == {"widths": (8, 16, 32)}
    with pytest.raises(ValueError, match="widths"):
        create_classifier("tiny_cnn", widths=())


def test_tiny_cnn_learns_a_finding_and_its_grad_cam_is_hotter_near_it() -> None:
    """Class 0 = a bright blob somewhere in the frame; after seconds of training Grad-CAM is hotter near the blob."""
    torch.manual_seed(0)
    n, size, blob = 256, 64, 7
    images = torch.rand(n, 1, size, size) * 0.3
    labels = torch.zeros(n, 14)
    positive = torch.rand(n) < 0.5
    centres = torch.randint(blob, size - blob, (n, 2))
    for i in torch.nonzero(positive).flatten().tolist():
        r, c = centres[i].tolist()
        images[i, 0, r - blob // 2 : r + blob // 2 + 1, c - blob // 2 : c + blob // 2 + 1] = 1.0
    labels[:, 0] = positive.float()
    model: Any = create_classifier("tiny_cnn", widths=(8, 16, 32))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(6):
        for start in range(0, n, 32):
            optimiser.zero_grad()
            loss = loss_fn(model(images[start : start + 32])[:, :1], labels[start : start + 32, :1])
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = ((model(images)[:, 0] > 0) == positive).float().mean().item()
    assert accuracy > 0.9
    _, cams = grad_cam(model, images[positive], "features")  # [P, 14, 8, 8], one cell = 8 px
    grid = cams.shape[-1]
    blob_cells = centres[positive] * grid // size
    near = torch.zeros(len(blob_cells), grid, grid, dtype=torch.bool)
    for i, (r, c) in enumerate(blob_cells.tolist()):
        near[i, max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = True
    heat = cams[:, 0]
    mean_near = (heat * near).sum((1, 2)) / near.sum((1, 2))
    mean_far = (heat * ~near).sum((1, 2)) / (~near).sum((1, 2))
    assert (mean_near > mean_far).float().mean() > 0.8
