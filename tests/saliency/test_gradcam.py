"""All-class Grad-CAM against a plain per-class autograd reference, on every route and the registered archs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import densenet121 as tv_densenet121

from chexseg_dist.models._base import SplitModel
from chexseg_dist.models.classifiers import create_classifier, default_target_layer
from chexseg_dist.saliency.gradcam import grad_cam

torch.set_num_threads(2)


def reference_grad_cam(model: nn.Module, images: Tensor, layer: nn.Module) -> tuple[Tensor, Tensor]:
    """Textbook Grad-CAM: full forward with autograd, one backward per class, alpha = spatial mean of the gradient."""
    saved: list[Tensor] = []

    def hook(_m: nn.Module, _i: object, out: Tensor) -> Tensor:
        saved.append(out)
        return out.clone()  # downstream in-place ops (DenseNet's ReLU) must not rewrite the saved activation

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(images)
            act = saved[0]
            cams = []
            for k in range(logits.shape[1]):
                (grad,) = torch.autograd.grad(logits[:, k].sum(), act, retain_graph=True)
                alpha = grad.mean(dim=(2, 3), keepdim=True)
                cams.append(F.relu((alpha * act).sum(dim=1)))
    finally:
        handle.remove()
    return logits.detach(), torch.stack(cams, dim=1).detach()


def assert_matches_reference(model: nn.Module, images: Tensor, target: str) -> Tensor:
    model.eval()
    logits, cams = grad_cam(model, images, target)
    ref_logits, ref_cams = reference_grad_cam(model, images, model.get_submodule(target))
    assert cams.shape == ref_cams.shape
    # The comparison must not be vacuous: random weights still give some positive maps.
    assert (ref_cams > 0).float().mean() > 0.05
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cams, ref_cams, rtol=1e-9, atol=1e-12 * float(ref_cams.abs().max()))
    return cams


@pytest.mark.parametrize(
    ("arch", "size", "grid"), [("densenet121", 64, 2), ("resnet18", 64, 2), ("resnet50", 64, 2), ("tiny_cnn", 64, 4)]
)
def test_registered_archs_match_per_class_reference(arch: str, size: int, grid: int) -> None:
    torch.manual_seed(0)
    model: Any = create_classifier(arch).double()
    images = torch.rand(2, 1, size, size, dtype=torch.float64)
    cams = assert_matches_reference(model, images, default_target_layer(arch))
    assert cams.shape == (2, 14, grid, grid)


class CountingBackbone(nn.Module):
    """Conv backbone that records, for each call, whether autograd was recording."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1)
        )
        self.grad_enabled_at_calls: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.grad_enabled_at_calls.append(torch.is_grad_enabled())
        return self.body(x)  # type: ignore[no-any-return]


class MLPHead(nn.Module):
    """ReLU (in place) -> GAP -> Linear -> ReLU -> Linear: Grad-CAM's closed form does not apply."""

    def __init__(self, channels: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)  # must not rewrite the activation Grad-CAM weights
        self.mlp = nn.Sequential(nn.Linear(channels, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, act: Tensor) -> Tensor:
        return self.mlp(self.relu(act).mean(dim=(2, 3)))  # type: ignore[no-any-return]


class AttentionPoolHead(nn.Module):
    """Softmax attention pooling over positions, then a linear layer (a non-linear, spatially weighted head)."""

    def __init__(self, channels: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.score = nn.Conv2d(channels, 1, 1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, act: Tensor) -> Tensor:
        weights = torch.softmax(self.score(act).flatten(2), dim=-1)  # [B, 1, hw]
        pooled = (act.flatten(2) * weights).sum(-1)  # [B, C]
        return self.fc(torch.tanh(pooled))  # type: ignore[no-any-return]


class PlainBackboneHead(nn.Module):
    """A backbone + head model without the SplitModel protocol: grad_cam must use its generic hook route."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.backbone = CountingBackbone()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))  # type: ignore[no-any-return]


class SplitBackboneHead(PlainBackboneHead):
    """The same model implementing the SplitModel protocol."""

    def split_at_target(self, name: str) -> tuple[nn.Module, nn.Module] | None:
        return (self.backbone, self.head) if name == "backbone" else None


@pytest.mark.parametrize("wrapper", [SplitBackboneHead, PlainBackboneHead])
@pytest.mark.parametrize("head", [MLPHead, AttentionPoolHead])
def test_nonlinear_heads_run_the_backbone_once_without_a_graph(wrapper: type[nn.Module], head: type[nn.Module]) -> None:
    torch.manual_seed(1)
    model: Any = wrapper(head()).double()
    assert isinstance(model, SplitModel) == (wrapper is SplitBackboneHead)
    images = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    model.eval()
    logits, cams = grad_cam(model, images, "backbone")
    assert model.backbone.grad_enabled_at_calls == [False]
    assert logits.shape == (3, 5) and cams.shape == (3, 5, 8, 8)
    assert_matches_reference(model, images, "backbone")


def test_model_mode_weights_and_grads_are_left_untouched() -> None:
    torch.manual_seed(2)
    model: Any = create_classifier("tiny_cnn")
    model.train()
    model.classifier.eval()  # a mixed state must come back exactly as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(4, 1, 64, 64)
    for target in ("features", "features.stage3"):  # closed form and generic hook route
        grad_cam(model, images, target)
        assert model.training and not model.classifier.training and model.features.training
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), f"{name} changed (BatchNorm statistics must not update)"
        assert all(p.grad is None for p in model.parameters())


def test_backbone_records_no_graph_on_registered_models() -> None:
    torch.manual_seed(3)
    model: Any = create_classifier("resnet18").eval()
    modes: list[bool] = []
    outputs: list[Tensor] = []
    handles = [model.layer1.register_forward_hook(lambda *_: modes.append(torch.is_grad_enabled()))]
    handles.append(model.layer4.register_forward_hook(lambda _m, _i, out: outputs.append(out)))
    grad_cam(model, torch.rand(2, 1, 64, 64), "layer4")
    for h in handles:
        h.remove()
    assert modes == [False]
    assert len(outputs) == 1 and outputs[0].grad_fn is None and not outputs[0].requires_grad


def test_non_default_target_inside_densenet_with_inplace_relu_after_it() -> None:
    # transition2.norm is followed by nn.ReLU(inplace=True): the generic route must keep A intact.
    torch.manual_seed(4)
    model: Any = create_classifier("densenet121").double()
    assert_matches_reference(model, torch.rand(2, 1, 64, 64, dtype=torch.float64), "features.transition2.norm")


def test_plain_torchvision_densenet_matches_the_registered_one() -> None:
    # torchvision's own forward rectifies `features` in place; the generic route must still give the right maps.
    torch.manual_seed(5)
    ours: Any = create_classifier("densenet121").eval()
    plain = tv_densenet121(weights=None, num_classes=14).eval()
    plain.load_state_dict(ours.state_dict())
    images = torch.rand(2, 1, 64, 64)
    logits, cams = grad_cam(ours, images, "features")
    plain_logits, plain_cams = grad_cam(plain, ours.normalize(images), "features")
    torch.testing.assert_close(plain_logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain_cams, cams, rtol=1e-4, atol=1e-6)
    assert cams.max() > 0


def test_works_inside_a_callers_inference_mode() -> None:
    torch.manual_seed(7)
    model = PlainBackboneHead(AttentionPoolHead()).eval()
    images = torch.rand(2, 1, 16, 16)
    expected = grad_cam(model, images, "backbone")
    with torch.inference_mode():
        got = grad_cam(model, images, "backbone")
    torch.testing.assert_close(got, expected)


def test_target_layer_may_be_a_module_object() -> None:
    torch.manual_seed(6)
    model: Any = create_classifier("tiny_cnn").eval()
    images = torch.rand(2, 1, 64, 64)
    by_name = grad_cam(model, images, "features")
    by_module = grad_cam(model, images, model.features)
    torch.testing.assert_close(by_module, by_name)


class WithUnusedLayer(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.spare = nn.Conv2d(1, 1, 1)  # registered, never called

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)  # type: ignore[no-any-return]


def test_bad_targets_and_inputs_are_named() -> None:
    model: Any = create_classifier("tiny_cnn").eval()
    images = torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="'layer9'"):
        grad_cam(model, images, "layer9")
    with pytest.raises(ValueError, match="not a submodule"):
        grad_cam(model, images, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        grad_cam(model, images[0], "features")
    with pytest.raises(ValueError, match="did not run"):
        grad_cam(WithUnusedLayer(model), images, "spare")
    twice = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    shared = nn.Sequential(twice, twice, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(RuntimeError, match="more than once"):
        grad_cam(shared, torch.rand(1, 4, 16, 16), "0")
