"""All-class Grad-CAM: every class's map from one backbone pass, for any PyTorch classifier.

Grad-CAM (Selvaraju et al.) for class ``k`` at a target layer with activation ``A`` (``[C, h, w]``) is
``ReLU(sum_c alpha_kc * A_c)`` with ``alpha_kc = mean_ij d z_k / d A_cij`` (``z_k`` the class logit). Peers
(pytorch-grad-cam, captum, MONAI) obtain ``d z_k / d A`` with one full backward pass per class. Here the backbone
(everything up to the target) runs once under :func:`torch.no_grad` and the gradients of all classes come from the
layers *after* the target only, by one of three routes, chosen per call:

1. **Closed form** (no autograd at all). When the model says the head is ``[ReLU ->] global average pool -> linear``
   (:class:`LinearHead`), ``d z_k / d A_cij = W_kc / (h w) * m_cij`` where ``m = [A > 0]`` with the ReLU (PyTorch's
   ReLU has derivative 0 at 0, so the mask is strict) and ``m = 1`` without it. Hence
   ``alpha_kc = W_kc * p_c / (h w)`` with ``p_c = mean_ij m_cij`` (the fraction of positive positions of channel
   ``c``; ``p_c = 1`` without the ReLU), and ``cam_k = ReLU(sum_c alpha_kc A_c)``. This is the class activation map
   (CAM) of row ``k`` of the linear weights, rescaled per channel by ``p_c``: all classes cost one
   ``[K, C] x [C, h w]`` product per image.
2. **Split model, any head**. When the model implements :class:`SplitModel` (``split_at_target(name)`` returns
   ``(features, head)`` callables), the backbone runs once without a graph, and the gradients of all ``K`` logits
   with respect to the detached activation come from one batched vector-Jacobian product through ``head`` only
   (:func:`torch.autograd.grad` with ``is_grads_batched=True``, i.e. ``vmap`` over the head's backward).
3. **Any other ``nn.Module``** (generic fallback). A forward hook on the target layer replaces its output with a
   detached copy that requires grad and switches gradient recording on for the rest of that same forward pass; the
   backbone before the target still runs once and without a graph, the head is differentiated as in route 2.
   Requirements: the target layer runs exactly once per forward and returns a tensor; the model's output is the
   ``[B, K]`` logits. Modules that run after the target but do not depend on it also record a graph (harmless).

All routes evaluate the model in eval mode (BatchNorm uses running statistics, dropout is off), restore every
module's train/eval flag afterwards, never write to ``.grad`` of any parameter and never change the weights.
Because eval-mode models treat the samples of a batch independently, ``d (sum_b z_bk) / d A_b = d z_bk / d A_b``:
one vector per class serves the whole batch.

Maps are raw: not normalised, not upsampled, at the target layer's resolution (e.g. ``10 x 10`` for DenseNet121 at
320 px). Grad-CAM on the sigmoid probability differs from Grad-CAM on the logit by the positive factor
``sigma'(z_k)`` per (image, class), so the two agree after per-map min-max normalisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chexseg_dist.models._base import LinearHead, SplitModel


def grad_cam(model: nn.Module, images: Tensor, target_layer: str | nn.Module) -> tuple[Tensor, Tensor]:
    """Grad-CAM of every class in one backbone pass.

    Args:
        model: any classifier mapping ``images`` to logits ``[B, K]``; evaluated in eval mode, its train/eval
            flags are restored afterwards and its parameters and buffers are left untouched.
        images: ``[B, C, H, W]`` batch on the model's device, in whatever dtype and range the model expects
            (the registered classifiers take ``[B, 1, S, S]`` float32 in ``[0, 1]``).
        target_layer: the module whose output is the activation ``A``, or its dotted name in
            ``model.named_modules()`` (e.g. ``"features"`` for DenseNet121, ``"layer4"`` for ResNet).

    Returns:
        ``(logits, cams)``: logits ``[B, K]`` (detached) and cams ``[B, K, h, w]`` >= 0, raw (not normalised, not
        upsampled) at the target layer's spatial resolution, same dtype and device as ``A``.

    Raises:
        ValueError: ``images`` is not 4-D, the target layer is not part of ``model`` or did not run, or its output
            is not a ``[B, C, h, w]`` tensor.
        RuntimeError: the logits do not depend on the target layer, or the target ran more than once.
    """
    if images.dim() != 4:
        raise ValueError(f"grad_cam: images must be [B, C, H, W], got shape {tuple(images.shape)}")
    name, layer = _resolve_layer(model, target_layer)
    # inference_mode(False): callers may wrap inference in torch.inference_mode(), under which no head graph can exist.
    with torch.inference_mode(False), _eval_mode(model):
        split = model.split_at_target(name) if isinstance(model, SplitModel) else None
        if split is None:
            return _grad_cam_hooked(model, images, layer, name)
        features, head = split
        with torch.no_grad():
            act = features(images)
        _check_activation(act, name)
        linear_head = getattr(model, "linear_head", None)
        described = linear_head(name) if callable(linear_head) else None
        if isinstance(described, LinearHead):
            cams = cams_linear_head(act, described)  # before the head runs, in case it rectifies in place
            with torch.no_grad():
                logits = head(act)
            return logits, cams
        act = act.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head(act.clone())  # a copy: a head that starts with ReLU(inplace=True) must not touch A
        return logits.detach(), _cams_from_head_graph(logits, act, name)


def cams_linear_head(act: Tensor, head: LinearHead) -> Tensor:
    """Closed-form Grad-CAM of all classes when the head is ``[ReLU ->] GAP -> linear`` (see the module docstring).

    Args:
        act: target activation ``[B, C, h, w]`` (before the head's ReLU, if any).
        head: the head description; ``head.linear.weight`` is ``[K, C]``.

    Returns:
        ``[B, K, h, w]`` maps >= 0, same dtype and device as ``act``.
    """
    _, channels, h, w = act.shape
    weight = head.linear.weight.detach()
    if weight.shape[1] != channels:
        raise ValueError(f"linear head expects {weight.shape[1]} channels but the target activation has {channels}")
    with torch.no_grad():
        if head.relu:
            # d GAP(ReLU(A)) / d A = [A > 0] / (hw); its spatial mean is p_c / (hw), p_c = fraction of A_c > 0.
            scale = (act > 0).to(act.dtype).mean(dim=(2, 3)) / (h * w)  # [B, C]
            alpha = weight.to(act.dtype).unsqueeze(0) * scale.unsqueeze(1)  # [B, K, C]
            cams = torch.einsum("bkc,bchw->bkhw", alpha, act)
        else:
            cams = torch.einsum("kc,bchw->bkhw", weight.to(act.dtype) / (h * w), act)
        return F.relu(cams)


def _cams_from_head_graph(logits: Tensor, act: Tensor, name: str) -> Tensor:
    """Grad-CAM of all classes from a graph ``act -> logits`` that covers the head only."""
    if logits.dim() != 2:
        raise ValueError(f"grad_cam: the model output must be logits [B, K], got shape {tuple(logits.shape)}")
    if not logits.requires_grad:
        raise RuntimeError(f"grad_cam: the model's logits do not depend on target layer {name!r}")
    batch, classes = logits.shape
    # One-hot cotangents [K, B, K]: row k selects class k for every image (samples are independent in eval mode).
    eye = torch.eye(classes, dtype=logits.dtype, device=logits.device)
    cotangents = eye.unsqueeze(1).expand(classes, batch, classes)
    try:
        # retain_graph: a failed batched attempt must leave the graph intact for the fallback.
        (grads,) = torch.autograd.grad(logits, act, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True)
    except RuntimeError:
        # Some ops have no vmap rule for their backward; fall back to one head-only backward per class.
        grads = torch.stack(
            [torch.autograd.grad(logits, act, grad_outputs=cotangents[k], retain_graph=True)[0] for k in range(classes)]
        )
    with torch.no_grad():
        alpha = grads.mean(dim=(3, 4))  # [K, B, C]
        cams = torch.einsum("kbc,bchw->bkhw", alpha, act.detach())
        return F.relu(cams)


def _grad_cam_hooked(model: nn.Module, images: Tensor, layer: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """Generic route: flip gradient recording on at the target layer, inside one forward pass."""
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> Tensor:
        if captured:
            raise RuntimeError(
                f"grad_cam: target layer {name!r} ran more than once in one forward pass; choose a layer that "
                "runs once (e.g. the last feature block)"
            )
        if not isinstance(output, Tensor):
            raise ValueError(f"grad_cam: target layer {name!r} returned {type(output).__name__}, not a tensor")
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        # Everything after the target records a graph; the enclosing no_grad() restores the mode on exit.
        torch.set_grad_enabled(True)
        # A copy, so that in-place ops after the target (DenseNet's F.relu(..., inplace=True)) leave A intact.
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"grad_cam: target layer {name!r} did not run in the model's forward pass")
    act = captured[0]
    _check_activation(act, name)
    if not isinstance(logits, Tensor):
        raise ValueError(f"grad_cam: the model returned {type(logits).__name__}; expected logits [B, K]")
    return logits.detach(), _cams_from_head_graph(logits, act, name)


def _resolve_layer(model: nn.Module, target: str | nn.Module) -> tuple[str, nn.Module]:
    if isinstance(target, str):
        try:
            return target, model.get_submodule(target)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n and n.count(".") < 2]
            raise ValueError(
                f"grad_cam: target layer {target!r} is not a module of {type(model).__name__}; "
                f"top-level names include {names[:20]}"
            ) from None
    for name, module in model.named_modules():
        if module is target:
            return name, module
    raise ValueError(f"grad_cam: the target layer {type(target).__name__} is not a submodule of the model")


def _check_activation(act: object, name: str) -> None:
    if not isinstance(act, Tensor) or act.dim() != 4:
        shape = tuple(act.shape) if isinstance(act, Tensor) else type(act).__name__
        raise ValueError(f"grad_cam: target layer {name!r} must output [B, C, h, w], got {shape}")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode, then restore every module's own train/eval flag (they can differ)."""
    training = [m for m in model.modules() if m.training]
    if not training:  # the usual inference case: nothing to switch (walking ~600 DenseNet modules twice costs ~1 ms)
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for module in training:
            module.training = True
