"""Classifier checkpoints: a directory, local or ``s3://``, written and loaded with their fingerprint.

A checkpoint is a directory holding two files:

- ``model.pt``: the model's ``state_dict`` (CPU tensors, :func:`torch.save`, loaded with ``weights_only=True``).
- ``checkpoint.json``: ``{format_version, arch, arch_kwargs, num_classes, labels, image_size, in_channels,
  normalisation: {mean, std}, target_layer, config, metrics, fingerprint}``. ``labels`` are the output names in
  order (CheXpert's 14 :data:`~chexseg_dist.core.pathologies.OBSERVATIONS`); ``config`` is the resolved
  :class:`~chexseg_dist.config.Config` dict that trained the weights; ``fingerprint`` is the SHA-256 of the
  weights' bytes (:func:`weights_fingerprint`), checked on load and recorded by every stage that uses the model.

``checkpoint.json`` is written last, so a directory without it is an interrupted save, never a usable checkpoint.

Loading an ensemble and predicting maps with it is the saliency stage's (:mod:`chexseg_dist.saliency.classifier`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from chexseg_dist.core import fsio
from chexseg_dist.core.pathologies import OBSERVATIONS
from chexseg_dist.errors import CheckpointError
from chexseg_dist.models.classifiers import create_classifier, default_target_layer, list_archs

FORMAT_VERSION = 1


WEIGHTS_FILE = "model.pt"


META_FILE = "checkpoint.json"


_REQUIRED = (
    "format_version",
    "arch",
    "num_classes",
    "labels",
    "image_size",
    "in_channels",
    "normalisation",
    "target_layer",
    "fingerprint",
)


@dataclass
class LoadedClassifier:
    """A classifier loaded from one checkpoint.

    Attributes:
        model: the network, in eval mode, on the requested device.
        meta: the parsed ``checkpoint.json``.
        fingerprint: SHA-256 hex digest of the weights (verified against ``meta["fingerprint"]``).
        path: the checkpoint directory it came from.
    """

    model: nn.Module
    meta: dict[str, Any]
    fingerprint: str
    path: str

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.meta["labels"])

    @property
    def target_layer(self) -> str:
        return str(self.meta["target_layer"])

    @property
    def paths(self) -> list[str]:
        return [self.path]


def weights_fingerprint(state_dict: Mapping[str, Tensor]) -> str:
    """SHA-256 of the weights: every tensor's name, dtype, shape and raw bytes, in sorted name order.

    Independent of the serialisation format and of the device the tensors live on.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def ensemble_fingerprint(fingerprints: Iterable[str]) -> str:
    """The fingerprint of an ensemble: SHA-256 of ``"ensemble:"`` + the sorted member fingerprints joined by commas.

    Order-independent (the ensemble averages), and computable from ``checkpoint.json`` files alone.
    """
    return hashlib.sha256(("ensemble:" + ",".join(sorted(fingerprints))).encode()).hexdigest()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str,
    model: nn.Module,
    *,
    arch: str,
    image_size: int,
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    target_layer: str | None = None,
    labels: Sequence[str] = OBSERVATIONS,
) -> str:
    """Write ``model.pt`` then ``checkpoint.json`` into the directory ``path`` (local or any fsspec URI).

    Args:
        path: checkpoint directory; created locally if needed, overwritten if it exists.
        model: a classifier from :func:`~chexseg_dist.models.create_classifier` (wrappers such as DDP are removed).
        arch: its registry name.
        image_size: side ``S`` of the square frame it was trained on.
        config: the resolved config dict that trained it (``Config.to_dict()``); must be JSON-serialisable.
        metrics: optional validation metrics (JSON-serialisable).
        target_layer: Grad-CAM target layer; ``None`` = the architecture's default.
        labels: output names in order; ``len(labels)`` must equal the model's ``num_classes``.

    Returns:
        ``path``.

    Raises:
        CheckpointError: unknown ``arch``, a ``target_layer`` that is not a module of the model, a label count
            that differs from the model's outputs, or a non-JSON-serialisable ``config``/``metrics``.
    """
    model = unwrap(model)
    if arch not in list_archs():
        raise CheckpointError(f"save_checkpoint {path}: unknown arch {arch!r}; choose one of {list_archs()}")
    target = target_layer or default_target_layer(arch)
    try:
        model.get_submodule(target)
    except AttributeError:
        raise CheckpointError(f"save_checkpoint {path}: target_layer {target!r} is not a module of {arch}") from None
    num_classes = int(getattr(model, "num_classes", len(labels)))
    if len(labels) != num_classes:
        raise CheckpointError(
            f"save_checkpoint {path}: labels has {len(labels)} names but the model has {num_classes} outputs"
        )
    normalize = getattr(model, "normalize", None)
    if normalize is None or not hasattr(normalize, "statistics"):
        raise CheckpointError(
            f"save_checkpoint {path}: the model has no Normalize front module (build it with create_classifier)"
        )
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(getattr(model, "arch_kwargs", {}) or {}),
        "num_classes": num_classes,
        "labels": list(labels),
        "image_size": int(image_size),
        "in_channels": int(getattr(model, "in_channels", 1)),
        "normalisation": normalize.statistics(),
        "target_layer": target,
        "config": config,
        "metrics": metrics,
    }
    return write_checkpoint_dir(path, model, meta, META_FILE, WEIGHTS_FILE)


def write_checkpoint_dir(path: str, model: nn.Module, meta: dict[str, Any], meta_file: str, weights_file: str) -> str:
    """Write a model's state dict, then its metadata JSON (last: its presence marks a complete checkpoint).

    ``meta`` gains ``fingerprint`` (of the weights) and ``torch_version``. Returns ``path``.

    Raises:
        CheckpointError: metadata that is not JSON-serialisable.
    """
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    meta = {**meta, "fingerprint": weights_fingerprint(state), "torch_version": torch.__version__}
    try:
        text = json.dumps(meta, indent=2, sort_keys=False, allow_nan=True)
    except TypeError as err:
        raise CheckpointError(f"checkpoint {path}: its metadata must be JSON-serialisable: {err}") from None
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fsio.makedirs(path)
    with fsio.open_file(fsio.join(path, weights_file), "wb") as f:
        f.write(buffer.getvalue())
    with fsio.open_file(fsio.join(path, meta_file), "w") as f:
        f.write(text)
    return path


def read_json_meta(path: str, meta_file: str, what: str) -> dict[str, Any]:
    """The JSON object ``<path>/<meta_file>`` of a checkpoint directory.

    Raises:
        CheckpointError: missing file (an interrupted save, or not ``what``), invalid JSON, not an object.
    """
    meta_path = fsio.join(path, meta_file)
    if not fsio.exists(meta_path):
        raise CheckpointError(
            f"checkpoint {path}: {meta_file} not found; pass {what} (a directory without it is an interrupted save)"
        )
    try:
        meta = json.loads(fsio.read_bytes(meta_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {meta_path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load_strict(model: nn.Module, state: Mapping[str, Tensor], misfit: str, suffix: str = "") -> None:
    """``model.load_state_dict(state, strict=True)``; weights that do not fit raise ``CheckpointError`` as
    ``"<misfit> (<torch's first line>)<suffix>"``."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{misfit} ({first}){suffix}") from None


def read_weights(path: str, weights_file: str, fingerprint: str) -> dict[str, Tensor]:
    """Load ``<path>/<weights_file>`` (``weights_only``) and check it against the recorded fingerprint.

    Raises:
        CheckpointError: missing, unreadable or replaced weights, naming the file.
    """
    weights_path = fsio.join(path, weights_file)
    if not fsio.exists(weights_path):
        raise CheckpointError(f"checkpoint {path}: {weights_file} not found next to its metadata")
    try:
        state = torch.load(io.BytesIO(fsio.read_bytes(weights_path)), map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {weights_path}: cannot read the weights ({type(err).__name__}: {first}); the file is damaged "
            "or not a chexseg checkpoint: save it again"
        ) from None
    actual = weights_fingerprint(state)
    if actual != fingerprint:
        raise CheckpointError(
            f"checkpoint {path}: {weights_file} does not match field fingerprint (recorded {fingerprint[:12]}..., "
            f"actual {actual[:12]}...); the weights were replaced or corrupted"
        )
    return dict(state)


def read_meta(path: str) -> dict[str, Any]:
    """Parse and validate ``<path>/checkpoint.json`` (without loading weights).

    Raises:
        CheckpointError: missing file, invalid JSON, missing fields or a different ``format_version``.
    """
    meta_path = fsio.join(path, META_FILE)
    meta = read_json_meta(path, META_FILE, "a classifier checkpoint directory (chexseg train-classifier)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {meta_path}: field format_version={meta.get('format_version')!r}, this version of "
            f"chexseg_dist reads format_version={FORMAT_VERSION}; re-save the checkpoint with a matching version"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {meta_path}: missing field(s) {missing}")
    if meta["arch"] not in list_archs():
        raise CheckpointError(
            f"checkpoint {meta_path}: field arch={meta['arch']!r} is not a registered architecture {list_archs()}"
        )
    if len(meta["labels"]) != meta["num_classes"]:
        raise CheckpointError(
            f"checkpoint {meta_path}: field labels has {len(meta['labels'])} names, num_classes={meta['num_classes']}"
        )
    return meta


def _check_labels(path: str, labels: Sequence[str], expected: Sequence[str]) -> None:
    if list(labels) == list(expected):
        return
    if sorted(labels) == sorted(expected):
        first = next(i for i, (a, b) in enumerate(zip(labels, expected)) if a != b)
        raise CheckpointError(
            f"checkpoint {fsio.join(path, META_FILE)}: field labels is in a different order than expected "
            f"(position {first}: {labels[first]!r}, expected {expected[first]!r}); the model's outputs would be "
            "assigned to the wrong pathologies"
        )
    raise CheckpointError(
        f"checkpoint {fsio.join(path, META_FILE)}: field labels {list(labels)} differs from the expected "
        f"{list(expected)}"
    )


def load_checkpoint(
    path: str, device: str | torch.device = "cpu", *, expected_labels: Sequence[str] | None = OBSERVATIONS
) -> LoadedClassifier:
    """Load one checkpoint directory (local or URI).

    Args:
        path: the checkpoint directory.
        device: where to put the model.
        expected_labels: required output names in order (CheXpert's 14 observations); ``None`` skips the check.

    Returns:
        A :class:`LoadedClassifier` with the model in eval mode on ``device``.

    Raises:
        CheckpointError: missing ``checkpoint.json`` or ``model.pt``, wrong ``format_version``, label order
            mismatch, weights that do not match the fingerprint or the architecture; each names the path and field.
    """
    path = str(path)
    meta = read_meta(path)
    if expected_labels is not None:
        _check_labels(path, meta["labels"], expected_labels)
    state = read_weights(path, WEIGHTS_FILE, meta["fingerprint"])
    fingerprint = meta["fingerprint"]
    norm = meta["normalisation"]
    model = create_classifier(
        meta["arch"],
        num_classes=int(meta["num_classes"]),
        mean=norm["mean"],
        std=norm["std"],
        **(meta.get("arch_kwargs") or {}),
    )
    load_strict(
        model, state, f"checkpoint {path}: {WEIGHTS_FILE} does not fit arch={meta['arch']!r}", "; it was replaced"
    )
    try:
        model.get_submodule(meta["target_layer"])
    except AttributeError:
        raise CheckpointError(
            f"checkpoint {path}: field target_layer={meta['target_layer']!r} is not a module of {meta['arch']}"
        ) from None
    model.to(device).eval()
    return LoadedClassifier(model=model, meta=meta, fingerprint=fingerprint, path=path)


def split_paths(paths: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (whitespace stripped, empty entries dropped)."""
    items = paths.split(",") if isinstance(paths, str) else [str(p) for p in paths]
    return [p.strip() for p in items if p.strip()]
