"""Typed configuration: one dataclass per component, a root :class:`Config`, presets as data.

Resolution order: dataclass defaults <- preset (``tiny`` or ``paper``) <- YAML file (``--config``) <- command-line
overrides (``--set section.field=value``). The resolved config is written next to every output
(:func:`save_config`), and every section validates itself in ``__post_init__`` with a message that names the field,
the allowed values and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILENAME = "config.yaml"


def _check_choice(section: str, name: str, value: object, allowed: typing.Iterable[object]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"config {section}.{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _check_positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"config {section}.{name}={value!r} must be {bound}")


@dataclass
class SynthConfig:
    """Phantom radiograph generator (``chexseg synth``)."""

    seed: int = 0
    """Random seed; the same seed gives byte-identical output."""
    n_train: int = 600
    """Radiographs in the image-labelled train split (the pseudo-labelling corpus)."""
    n_valid: int = 80
    """Radiographs in the expert-annotated valid split (threshold tuning, model selection)."""
    n_test: int = 80
    """Radiographs in the expert-annotated test split (reported numbers)."""
    size: int = 256
    """Typical long side of generated images in pixels; sizes and aspect ratios vary around it."""
    conspicuity: float = 1.0
    """Multiplies the contrast of every drawn finding: < 1 makes the task harder, > 1 easier (1 = calibrated)."""
    lateral_fraction: float = 0.05
    """Share of train studies that also get a lateral view (an extra CSV row; n_train counts frontal images)."""
    odd_mode_fraction: float = 0.01
    """Share of train frontal images stored as 16-bit PNG, and again as RGB JPEG (>= 1 each when > 0)."""
    jpeg_quality: int = 90
    """libjpeg quality of the written JPEGs (fixed encoder settings keep the output byte-identical per seed)."""
    train_masks: bool = False
    """Also write gt_segmentations_train.json (exact masks of the train split, e.g. to score pseudo-masks)."""
    workers: int = 1
    """Generator processes (spawned pool); the output does not depend on it."""

    def __post_init__(self) -> None:
        for name in ("n_train", "n_valid", "n_test"):
            _check_positive("synth", name, getattr(self, name), allow_zero=True)
        if self.size < 64:
            raise ValueError(f"config synth.size={self.size} must be >= 64 pixels")
        _check_positive("synth", "conspicuity", self.conspicuity)
        _check_positive("synth", "workers", self.workers)
        for name in ("lateral_fraction", "odd_mode_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"config synth.{name}={getattr(self, name)!r} must be in [0, 1]")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"config synth.jpeg_quality={self.jpeg_quality!r} must be in 1..100")


@dataclass
class ClassifierConfig:
    """The saliency classifier: architecture and input geometry."""

    arch: str = "tiny_cnn"
    """Architecture name in the model registry: tiny_cnn, resnet18, resnet50, densenet121."""
    image_size: int = 128
    """Side S of the square letterbox frame the classifier sees."""
    target_layer: str = ""
    """Grad-CAM target layer (dotted module name); empty = the architecture's last feature block."""

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"config classifier.image_size={self.image_size} must be >= 32 pixels")


@dataclass
class TrainClassifierConfig:
    """Data-parallel classifier training with Ray Train (``chexseg train-classifier``)."""

    epochs: int = 6
    batch_size: int = 32
    """Per-worker batch size."""
    lr: float = 2e-3
    weight_decay: float = 1e-5
    num_workers: int = 1
    """Ray Train workers (processes); one GPU each when use_gpu."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    uncertain_policy: str = "ones"
    """Uncertain (-1) labels: ones (U-Ones), zeros (U-Zeros) or ignore (U-Ignore, masked out of the loss)."""
    blank_policy: str = "negative"
    """Blank (not mentioned) labels: negative (treated as 0) or ignore (masked out of the loss)."""
    frontal_only: bool = True
    augment: bool = True
    """Small affine and brightness/contrast jitter; never a horizontal flip (anatomy is lateralised)."""
    seed: int = 0
    max_failures: int = 2
    """Ray Train FailureConfig: worker-group restarts before the run fails."""
    run_name: str = ""
    """Ray Train run name under the storage path; empty = derived from the output checkpoint path."""
    storage_path: str = ""
    """Ray Train storage (local dir, NFS or s3://); empty = <out>.ray next to the output checkpoint."""
    lr_schedule: str = "cosine"
    """Learning-rate schedule over all steps: cosine (to 0) or constant."""
    num_to_keep: int = 2
    """Ray Train checkpoints kept, best by mean task AUROC (Ray also keeps the latest, for resuming)."""
    decode_cpus: float = 1.0
    """CPUs per Ray Data read/decode/letterbox task (leave room next to the training workers)."""
    log_every_steps: int = 20
    """Progress line from rank 0 every this many steps (0 = only per epoch)."""
    aug_rotate_deg: float = 7.0
    """Augmentation: rotation drawn uniformly in +-this many degrees."""
    aug_scale: float = 0.1
    """Augmentation: isotropic scale drawn uniformly in 1 +- this."""
    aug_translate: float = 0.05
    """Augmentation: translation drawn uniformly in +-this fraction of the frame side, per axis."""
    aug_brightness: float = 0.1
    """Augmentation: brightness gain drawn uniformly in 1 +- this (black stays black)."""
    aug_contrast: float = 0.1
    """Augmentation: contrast as a gamma exp(u), u uniform in +-this (black and white stay fixed)."""
    hflip: bool = False
    """Random horizontal flips; off by default because chest anatomy is lateralised (heart on the left)."""

    def __post_init__(self) -> None:
        _check_choice("train_classifier", "uncertain_policy", self.uncertain_policy, ("ones", "zeros", "ignore"))
        _check_choice("train_classifier", "lr_schedule", self.lr_schedule, ("cosine", "constant"))
        for name in ("num_to_keep", "decode_cpus"):
            _check_positive("train_classifier", name, getattr(self, name))
        for name in ("log_every_steps", "aug_rotate_deg", "aug_translate", "aug_brightness", "aug_contrast"):
            _check_positive("train_classifier", name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.aug_scale < 1.0:
            raise ValueError(f"config train_classifier.aug_scale={self.aug_scale} must be in [0, 1)")
        _check_choice("train_classifier", "blank_policy", self.blank_policy, ("negative", "ignore"))
        for name in ("epochs", "batch_size", "num_workers", "lr", "cpus_per_worker"):
            _check_positive("train_classifier", name, getattr(self, name))
        _check_positive("train_classifier", "max_failures", self.max_failures, allow_zero=True)


@dataclass
class PseudolabelConfig:
    """The pseudo-labelling job: Ray Data, classifier actors, Zarr store (``chexseg pseudolabel``)."""

    batch_size: int = 16
    """Images per model batch inside an actor."""
    num_actors: int = 1
    """Fixed size of the classifier actor pool."""
    gpus_per_actor: float = 0.0
    """GPUs per classifier actor; 0 runs on CPU."""
    cpus_per_actor: float = 1.0
    torch_threads: int = 0
    """Intra-op torch threads per CPU classifier actor; 0 = max(1, int(cpus_per_actor)). More threads than CPUs
    requested lets the model use cores that decode tasks leave idle (small machines)."""
    decode_cpus: float = 1.0
    """CPUs per read/decode/letterbox task (kept apart from the model actors)."""
    images_per_decode_task: int = 256
    """Images per read/decode task: enough to amortise Ray's per-task overhead (tens of ms on a busy node), few
    enough to stream (256 frames of 320 px are a 26 MB block)."""
    images_per_chunk: int = 256
    """Images per Zarr chunk along the image axis, and rows per staged fragment; only the committer writes chunks."""
    frontal_only: bool = True
    """Skip lateral views (Grad-CAM pseudo-masks are defined for frontal radiographs); unknown views are kept."""
    decode_memory_mb: float = 256.0
    """Memory reserved per decode task (Ray logical resource; a 3000x3000 16-bit decode peaks near 200 MB)."""
    commit_interval_s: float = 30.0
    """Seconds between the driver's commits of staged fragments into the store (the store fills as the job runs)."""
    progress_interval_s: float = 10.0
    """Seconds between progress lines (images done/total, images/s)."""
    lock_stale_s: float = 120.0
    """A store lock whose heartbeat is older than this belongs to a dead job and is taken over."""
    retry_failed: bool = False
    """Retry images that failed in an earlier run (missing or corrupt files); False skips them."""
    write_concurrency: int = 2
    """Most write tasks staging fragments at once (each a worker process); raise it only for slow object stores."""

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "num_actors",
            "cpus_per_actor",
            "decode_cpus",
            "images_per_chunk",
            "decode_memory_mb",
            "commit_interval_s",
            "progress_interval_s",
            "lock_stale_s",
            "write_concurrency",
            "images_per_decode_task",
        ):
            _check_positive("pseudolabel", name, getattr(self, name))
        _check_positive("pseudolabel", "gpus_per_actor", self.gpus_per_actor, allow_zero=True)
        _check_positive("pseudolabel", "torch_threads", self.torch_threads, allow_zero=True)


@dataclass
class MasksConfig:
    """Saliency map -> binary mask (pseudo-labels and predictions)."""

    strategy: str = "otsu"
    """Binarisation: otsu (per map, on the 0..255-quantised normalised map, holes filled) or tuned (map > t)."""
    thresholds: str = ""
    """Tuned thresholds JSON (chexseg tune-thresholds); required for strategy=tuned."""
    prob_cutoff: bool = False
    """Empty mask when the classifier probability is below the tuned per-pathology cutoff."""
    label_gating: bool = False
    """Empty mask when the image-level label of that pathology is not positive (pseudo-labels on labelled data)."""
    threshold_steps: int = 100
    """Tuning grid of map thresholds: t = k / threshold_steps for k = 0..threshold_steps (100: 0.00..1.00)."""
    cutoff_steps: int = 100
    """Tuning grid of probability cutoffs: c = k / cutoff_steps for k = 0..cutoff_steps."""
    tune_mode: str = "tp_only"
    """Evaluation mode whose mIoU the map thresholds maximise (tp_only: the benchmark's choice; or full)."""
    fallback_threshold: float = 0.5
    """Threshold for a pathology with no positive expert mask in the tuning set (nothing to tune on)."""
    workers: int = 2
    """Processes for export-masks and tune-thresholds (1 = in the calling process)."""

    def __post_init__(self) -> None:
        _check_choice("masks", "strategy", self.strategy, ("otsu", "tuned"))
        _check_choice("masks", "tune_mode", self.tune_mode, ("tp_only", "full"))
        for name in ("threshold_steps", "cutoff_steps", "workers"):
            _check_positive("masks", name, getattr(self, name))
        if not 0.0 <= self.fallback_threshold <= 1.0:
            raise ValueError(f"config masks.fallback_threshold={self.fallback_threshold!r} must be in [0, 1]")


@dataclass
class EvaluateConfig:
    """CheXlocalize-style evaluation (``chexseg evaluate``)."""

    n_bootstrap: int = 1000
    """Bootstrap resamples over images for the 95% CIs."""
    seed: int = 0
    """Seed of the bootstrap resampling (numpy.random.default_rng): the same seed gives the same CIs."""
    full: bool = False
    """Full-dataset mode: also score pairs where exactly one of prediction and ground truth is empty (IoU 0)."""
    allow_missing: bool = False
    """Score images/pathologies missing from the predictions as empty masks (with a warning) instead of failing."""

    def __post_init__(self) -> None:
        _check_positive("evaluate", "n_bootstrap", self.n_bootstrap, allow_zero=True)


@dataclass
class SegmentationConfig:
    """The semi-supervised segmentation model (CheXseg's student) and its expert/pseudo mixing."""

    arch: str = "deeplabv3plus"
    encoder: str = "resnet18"
    image_size: int = 128
    expert_ratio: float = 0.9
    """Probability w that a training sample comes from the expert set (the paper used 0.9)."""
    batch_size: int = 16
    lr: float = 1e-4
    epochs: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.expert_ratio <= 1.0:
            raise ValueError(f"config segmentation.expert_ratio={self.expert_ratio} must be in [0, 1]")


@dataclass
class Config:
    """The root configuration; one section per component."""

    preset: str = "tiny"
    synth: SynthConfig = field(default_factory=SynthConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    train_classifier: TrainClassifierConfig = field(default_factory=TrainClassifierConfig)
    pseudolabel: PseudolabelConfig = field(default_factory=PseudolabelConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Presets are data: partial dicts merged over the dataclass defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores, minutes: a small CNN at 128 px on a few hundred phantom radiographs.
    "tiny": {
        # tiny_cnn at 128 px trains at ~150 images/s on one core: 15 epochs of 3000 phantoms take ~6 min and reach a
        # mean task AUROC of ~0.9 on valid (measured; see chexseg_dist/training.py).
        "train_classifier": {"epochs": 15, "batch_size": 32, "lr": 2e-3},
        # On 2 cores the one classifier actor holds 1 CPU and the decode tasks the other, which sit mostly idle:
        # two torch threads raised DenseNet121 pseudo-labelling from 0.53x to 0.75x of a single-process loop.
        # Batches of 64 amortise Ray Data's per-batch conversions, which dominate for tiny_cnn (0.85x -> 0.98-1.17x
        # of the loop at 30,000 images; docs/benchmarks.md). DenseNet121 on a CPU is faster at 16.
        "pseudolabel": {"torch_threads": 2, "batch_size": 64},
    },
    # The paper: DenseNet121 at 320 px (Adam 1e-4, batch 16, 3 epochs); DeepLabV3+ ResNet-18 student, w = 0.9.
    "paper": {
        "synth": {"n_train": 5000, "n_valid": 234, "n_test": 668, "size": 1024},
        "classifier": {"arch": "densenet121", "image_size": 320},
        "train_classifier": {"epochs": 3, "batch_size": 16, "lr": 1e-4, "weight_decay": 0.0, "lr_schedule": "constant"},
        "pseudolabel": {"batch_size": 64, "images_per_chunk": 1024},
        "segmentation": {
            "arch": "deeplabv3plus",
            "encoder": "resnet18",
            "image_size": 512,
            "expert_ratio": 0.9,
            "batch_size": 16,
            "lr": 1e-4,
        },
    },
}


def load_config(preset: str = "tiny", path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Resolve a :class:`Config` from a preset, an optional YAML file and ``section.field=value`` overrides.

    Raises:
        ValueError: unknown preset, section or field, or a value of the wrong type, naming it.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    merged: dict[str, Any] = {"preset": preset}
    _merge(merged, PRESETS[preset])
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
        data.pop("run", None)  # run facts written by save_config(extra=...) are a record, not settings
        if "preset" in data and data["preset"] != preset:
            # A saved config names its preset; honour it unless the caller overrides on the command line.
            merged = {"preset": data["preset"]}
            _merge(merged, PRESETS[_valid_preset(data["preset"], path)])
        _merge(merged, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r}: expected section.field=value, e.g. train_classifier.epochs=3")
        section, name = key.split(".", 1)
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise ValueError(f"override {item!r}: {section!r} is not a config section")
        merged[section][name] = _parse_override(section, name, raw)
    return from_dict(merged)


def _valid_preset(name: Any, source: object) -> str:
    if name not in PRESETS:
        raise ValueError(f"{source}: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return str(name)


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        elif isinstance(value, dict):
            dst[key] = {}
            _merge(dst[key], value)
        else:
            dst[key] = value


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "preset"}


def _parse_override(section: str, name: str, raw: str) -> Any:
    sections = _section_types()
    if section not in sections:
        raise ValueError(f"override {section}.{name}: unknown section {section!r}; sections are {sorted(sections)}")
    hints = typing.get_type_hints(sections[section])
    if name not in hints:
        raise ValueError(f"override {section}.{name}: unknown field {name!r}; fields are {sorted(hints)}")
    return parse_value(hints[name], raw, f"{section}.{name}")


def parse_value(tp: Any, raw: str, where: str) -> Any:
    """Parse a command-line string into a field's type. Booleans accept only true/false/yes/no/1/0.

    (The original CheXseg code treated the string "False" as true; here it is an error or False, never True.)
    """
    if tp is bool:
        low = raw.strip().lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{where}={raw!r}: expected a boolean (true/false, yes/no, 1/0)")
    try:
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"{where}={raw!r}: expected {tp.__name__}") from None
    return raw


def from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a nested dict, rejecting unknown keys and wrong types by name."""
    sections = _section_types()
    unknown = set(data) - set(sections) - {"preset"}
    if unknown:
        raise ValueError(f"config: unknown section(s) {sorted(unknown)}; sections are {sorted(sections)}")
    kwargs: dict[str, Any] = {"preset": _valid_preset(data.get("preset", "tiny"), "config")}
    for name, cls in sections.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config section {name!r}: expected a mapping, got {values!r}")
        hints = typing.get_type_hints(cls)
        bad = set(values) - set(hints)
        if bad:
            raise ValueError(f"config section {name!r}: unknown field(s) {sorted(bad)}; fields are {sorted(hints)}")
        kwargs[name] = cls(**{k: _coerce(hints[k], v, f"{name}.{k}") for k, v in values.items()})
    return Config(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if isinstance(value, str) and tp is not str:
        return parse_value(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = tp if isinstance(tp, type) else None
    if isinstance(tp, types.UnionType):
        expected = None
    if expected is not None and not isinstance(value, expected):
        raise ValueError(f"config {where}={value!r}: expected {expected.__name__}, got {type(value).__name__}")
    if tp is int and isinstance(value, bool):
        raise ValueError(f"config {where}={value!r}: expected int, got bool")
    return value


def save_config(
    cfg: Config, directory: str | Path, filename: str = CONFIG_FILENAME, extra: dict[str, Any] | None = None
) -> str:
    """Write the resolved config (plus optional ``extra`` run facts) as YAML next to an output.

    ``directory`` may be a local path or an fsspec URI (s3://...). Returns the written path.
    """
    from chexseg_dist.fsio import join, open_file

    payload = cfg.to_dict()
    if extra:
        payload["run"] = json.loads(json.dumps(extra, default=str))
    target = join(str(directory), filename)
    with open_file(target, "w") as f:
        yaml.safe_dump(payload, f, sort_keys=False)
    return target
