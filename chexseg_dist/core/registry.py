"""Named strategies: one registry per kind (architectures, binarisers, label policies, schedules, ...).

The registries are defined here, at the bottom of the package, so that every layer can read their names: config
validation checks a name against its registry (an unknown name fails when the config is resolved, before Ray starts)
and argparse takes its ``choices`` from it. A name is written once. The entries themselves (model builders, binariser
classes) live with the stages that own them; this module names them as lazy ``"module:attribute"`` targets, which
are imported only when an entry is built (the way packaging entry points work), so reading the names imports neither
torch nor the stage. Plug-ins may :meth:`Registry.add` objects directly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from chexseg_dist.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> entry mapping of one kind of strategy.

    Args:
        kind: what the entries are, for messages (e.g. ``"classifier architecture"``).
    """

    def __init__(self, kind: str, lazy: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = dict(lazy or {})

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``.

        Raises:
            ValueError: the name is taken (a programming error, not bad input).
        """
        if name in self._entries or name in self._lazy:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator form of :meth:`add`; the name defaults to the decorated object's ``__name__``."""

        def wrap(entry: T) -> T:
            return self.add(name or getattr(entry, "__name__"), entry)  # noqa: B009 - T is not known to have it

        return wrap

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests and plug-ins); unknown names are ignored."""
        self._entries.pop(name, None)
        self._lazy.pop(name, None)

    def get(self, name: str, where: str | None = None) -> T:
        """The entry called ``name``.

        Args:
            name: the registered name.
            where: what named it (e.g. ``"config masks.strategy"``), for the message.

        Raises:
            ConfigError: naming the unknown name and the registered ones.
        """
        if name in self._entries:
            return self._entries[name]
        if name in self._lazy:
            module, _, attribute = self._lazy[name].partition(":")
            entry: T = getattr(importlib.import_module(module), attribute)
            self._entries[name] = entry
            del self._lazy[name]
            return entry
        prefix = f"config {where}={name!r}: " if where else ""
        raise ConfigError(f"{prefix}unknown {self.kind} {name!r}; choose one of {self.names()}")

    def check(self, name: str, where: str) -> None:
        """Raise :class:`ConfigError` unless ``name`` is registered; imports nothing (config validation)."""
        if name not in self:
            raise ConfigError(f"config {where}={name!r}: unknown {self.kind}; choose one of {self.names()}")

    def names(self) -> list[str]:
        """Registered names, sorted (argparse ``choices``, messages)."""
        return sorted({*self._entries, *self._lazy})

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


# ---------------------------------------------------------------------------------------------------- the registries
#: Classifier architectures: builder functions ``(num_classes, **kw) -> nn.Module`` with a ``target_layer`` attribute.
CLASSIFIER_ARCHS: Registry[Callable[..., Any]] = Registry(
    "classifier architecture",
    {
        "tiny_cnn": "chexseg_dist.models.classifiers:tiny_cnn",
        "resnet18": "chexseg_dist.models.classifiers:resnet18",
        "resnet50": "chexseg_dist.models.classifiers:resnet50",
        "densenet121": "chexseg_dist.models.classifiers:densenet121",
    },
)

#: Map binarisation strategies (``masks.strategy``): :class:`~chexseg_dist.masks.binarize.Binarizer` subclasses.
BINARIZERS: Registry[type] = Registry(
    "mask strategy",
    {"otsu": "chexseg_dist.masks.binarize:OtsuBinarizer", "tuned": "chexseg_dist.masks.binarize:ThresholdBinarizer"},
)

#: Pseudo-mask refiners (``masks.refiner``): :class:`~chexseg_dist.masks.refine.Refiner` subclasses.
REFINERS: Registry[type] = Registry(
    "mask refiner",
    {
        "none": "chexseg_dist.masks.refine:NoRefiner",
        "crf": "chexseg_dist.masks.refine:CrfRefiner",
        "affinity": "chexseg_dist.masks.refine:AffinityRefiner",
    },
)

#: Uncertain (-1) label policies: ``(target, loss_mask)`` per cell (U-Ones, U-Zeros, U-Ignore).
UNCERTAIN_POLICIES: Registry[tuple[float, float]] = Registry("uncertain-label policy")
UNCERTAIN_POLICIES.add("ones", (1.0, 1.0))
UNCERTAIN_POLICIES.add("zeros", (0.0, 1.0))
UNCERTAIN_POLICIES.add("ignore", (0.0, 0.0))

#: Blank (not mentioned) label policies: ``(target, loss_mask)`` per cell.
BLANK_POLICIES: Registry[tuple[float, float]] = Registry("blank-label policy")
BLANK_POLICIES.add("negative", (0.0, 1.0))
BLANK_POLICIES.add("ignore", (0.0, 0.0))

#: Learning-rate schedules: ``(step, total_steps) -> factor`` functions.
SCHEDULES: Registry[Callable[[int, int], float]] = Registry(
    "learning-rate schedule",
    {"cosine": "chexseg_dist.train.schedules:cosine", "constant": "chexseg_dist.train.schedules:constant"},
)

#: Precisions of the pseudo-labelling model stage (``pseudolabel.precision``).
PRECISIONS: Registry[str] = Registry("precision")
PRECISIONS.add("fp32", "float32 throughout (TF32 matmuls on GPUs that have them)")
PRECISIONS.add("bf16", "bf16 autocast for the forward and Grad-CAM's backward; maps stored as float16 as always")

#: CheXlocalize evaluation modes: which (image, pathology) pairs count towards mIoU.
EVAL_MODES: Registry[str] = Registry("evaluation mode")
EVAL_MODES.add("tp_only", "pairs where both the ground truth and the prediction are non-empty")
EVAL_MODES.add("full", "also pairs where exactly one is empty (IoU 0)")

#: Segmentation architectures (segmentation-models-pytorch): builders ``(encoder, num_classes) -> nn.Module``.
SEGMENTATION_ARCHS: Registry[Callable[..., Any]] = Registry(
    "segmentation architecture",
    {
        "deeplabv3plus": "chexseg_dist.models.segmentation:deeplabv3plus",
        "unet": "chexseg_dist.models.segmentation:unet",
        "fpn": "chexseg_dist.models.segmentation:fpn",
    },
)

#: Segmentation encoders: each a torchvision ResNet, named as the classifier architecture that can initialise it.
SEGMENTATION_ENCODERS: Registry[str] = Registry("segmentation encoder")
for _name in ("resnet18", "resnet34", "resnet50"):
    SEGMENTATION_ENCODERS.add(_name, _name)

#: Supervision levels of the student (CheXseg's comparison, plus distillation).
TRAINING_MODES: Registry[str] = Registry("training mode")
TRAINING_MODES.add("weak", "pseudo-labelled images only")
TRAINING_MODES.add("full", "expert-annotated images only")
TRAINING_MODES.add("semi", "both, mixed at train_segmentation.expert_ratio")
TRAINING_MODES.add("distill", "the pseudo set's images with a full-mode teacher's soft outputs as targets")

#: How a batch is drawn from the expert and pseudo-labelled sets.
MIXING_POLICIES: Registry[type] = Registry(
    "mixing policy",
    {"exact": "chexseg_dist.train.mixing:ExactMixing", "bernoulli": "chexseg_dist.train.mixing:BernoulliMixing"},
)

#: Segmentation losses: ``(logits, targets, weights) -> per-image loss`` functions.
SEGMENTATION_LOSSES: Registry[Callable[..., Any]] = Registry(
    "segmentation loss",
    {"dice": "chexseg_dist.train.losses:soft_dice", "bce_dice": "chexseg_dist.train.losses:bce_dice"},
)
