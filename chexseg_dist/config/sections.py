"""The configuration sections: one documented dataclass per component, and the root :class:`Config`.

Every section validates itself when built, with a message that names the field, the allowed values and the fix
(:class:`~chexseg_dist.errors.ConfigError`): every float must be finite, and every strategy name must be in its
registry (:mod:`chexseg_dist.core.registry`), so an unknown name fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from chexseg_dist.core.registry import (
    BINARIZERS,
    BLANK_POLICIES,
    CLASSIFIER_ARCHS,
    EVAL_MODES,
    MIXING_POLICIES,
    PRECISIONS,
    REFINERS,
    SCHEDULES,
    SEGMENTATION_ARCHS,
    SEGMENTATION_ENCODERS,
    SEGMENTATION_LOSSES,
    TRAINING_MODES,
    UNCERTAIN_POLICIES,
)
from chexseg_dist.errors import ConfigError


def _check_positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config {section}.{name}={value!r} must be {bound}")


def _check_range(section: str, name: str, value: float, lo: float, hi: float, hi_open: bool = False) -> None:
    if not (lo <= value < hi if hi_open else lo <= value <= hi):
        raise ConfigError(f"config {section}.{name}={value!r} must be in [{lo}, {hi}{')' if hi_open else ']'}")


def check_gpu_choice(section: str, name: str, value: object) -> None:
    """``use_gpu`` (a boolean) or ``gpus_per_actor`` (a number >= 0), or ``"auto"``."""
    if value == "auto":
        return
    if name == "use_gpu":
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    if not ok:
        what = "true, false or auto" if name == "use_gpu" else "a number >= 0 or auto"
        raise ConfigError(f"config {section}.{name}={value!r}: expected {what}")


class Section:
    """Base of every section: checks that float fields are finite, then runs the section's own :meth:`validate`."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config {self.SECTION}.{f.name}={value!r} must be a finite number")
        self.validate()

    def validate(self) -> None:
        """Section-specific checks (override); raise :class:`ConfigError` naming the field."""

    def to_dict(self) -> dict[str, Any]:
        """The fields by name: the section's own first (in declaration order), then those of its shared bases
        (:class:`TrainRunFields`, :class:`AugmentFields`, :class:`ActorPoolFields`), as a resolved config lists them."""
        values = dataclasses.asdict(self)  # type: ignore[call-overload]
        own = [name for name in inspect.get_annotations(type(self)) if name in values]
        return {name: values[name] for name in [*own, *(n for n in values if n not in own)]}


@dataclass
class TrainRunFields(Section):
    """The Ray Train run fields every training section shares with the loop
    (:class:`~chexseg_dist.train._loop.LoopSettings`); each section sets its own defaults where they differ."""

    epochs: int = 5
    num_workers: int = 1
    """Ray Train workers (processes); one GPU each when use_gpu."""
    use_gpu: bool | str = False
    """true, false, or auto: GPUs when the Ray cluster has one per worker when the run starts (said on the console)."""
    cpus_per_worker: float = 1.0
    torch_threads: int = 0
    """Intra-op torch threads per CPU worker; 0 = max(1, int(cpus_per_worker)). More threads than CPUs requested lets
    the model use cores that the data tasks leave idle (small machines)."""
    decode_cpus: float = 1.0
    """CPUs per Ray Data read/decode task (leave room next to the training workers)."""
    seed: int = 0
    max_failures: int = 2
    """Ray Train FailureConfig: worker-group restarts before the run fails."""
    run_name: str = ""
    """Ray Train run name under the storage path; empty = derived from the output checkpoint path."""
    storage_path: str = ""
    """Ray Train storage (local dir, NFS or s3://); empty = <out>.ray next to the output checkpoint."""
    num_to_keep: int = 2
    """Ray Train checkpoints kept, best by the run's score (Ray also keeps the latest, for resuming)."""
    log_every_steps: int = 20
    """Progress line from rank 0 every this many steps (0 = only per epoch)."""

    def validate_run(self) -> None:
        """The shared fields' checks (each section's validate calls it)."""
        sec = self.SECTION
        check_gpu_choice(sec, "use_gpu", self.use_gpu)
        for name in ("epochs", "num_workers", "cpus_per_worker", "decode_cpus", "num_to_keep"):
            _check_positive(sec, name, getattr(self, name))
        for name in ("torch_threads", "max_failures", "log_every_steps"):
            _check_positive(sec, name, getattr(self, name), allow_zero=True)


@dataclass
class AugmentFields(Section):
    """Training-time augmentation (small affine, brightness/contrast; no flip by default), shared by the classifier
    and the student (``train/augment.py``)."""

    augment: bool = False
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

    def validate_augment(self) -> None:
        sec = self.SECTION
        for name in ("aug_rotate_deg", "aug_translate", "aug_brightness", "aug_contrast"):
            _check_positive(sec, name, getattr(self, name), allow_zero=True)
        _check_range(sec, "aug_scale", self.aug_scale, 0.0, 1.0, hi_open=True)


@dataclass
class ActorPoolFields(Section):
    """A Ray Data job's decode tasks and fixed pool of model actors (``pseudolabel``, ``segment``)."""

    batch_size: int = 16
    """Images per model batch inside an actor."""
    num_actors: int = 1
    """Fixed size of the model actor pool."""
    gpus_per_actor: float | str = 0.0
    """GPUs per model actor; 0 runs on CPU; auto: one per actor when the Ray cluster has that many GPUs when the
    job starts, a share of them when it has fewer, CPUs when it has none (said on the console)."""
    cpus_per_actor: float = 1.0
    torch_threads: int = 0
    """Intra-op torch threads per CPU actor; 0 = max(1, int(cpus_per_actor)). More threads than CPUs requested lets
    the model use cores that decode tasks leave idle (small machines)."""
    decode_cpus: float = 1.0
    """CPUs per read/decode/letterbox task (kept apart from the model actors)."""
    images_per_decode_task: int = 256
    """Images per read/decode task: enough to amortise Ray's per-task overhead (tens of ms on a busy node), few
    enough to stream (256 frames of 320 px are a 26 MB block)."""
    decode_memory_mb: float = 256.0
    """Memory reserved per decode task (Ray logical resource; a 3000x3000 16-bit decode peaks near 200 MB)."""
    frontal_only: bool = True
    """Skip lateral views (pseudo-masks and the student are defined for frontal radiographs); unknown views are
    kept."""
    progress_interval_s: float = 10.0
    """Seconds between progress lines (images done/total, images/s)."""

    def validate_pool(self) -> None:
        sec = self.SECTION
        names = ("batch_size", "num_actors", "cpus_per_actor", "decode_cpus", "images_per_decode_task")
        for name in (*names, "decode_memory_mb", "progress_interval_s"):
            _check_positive(sec, name, getattr(self, name))
        check_gpu_choice(sec, "gpus_per_actor", self.gpus_per_actor)
        _check_positive(sec, "torch_threads", self.torch_threads, allow_zero=True)


@dataclass
class SynthConfig(Section):
    """Phantom radiograph generator (``chexseg synth``)."""

    SECTION: ClassVar[str] = "synth"

    seed: int = 0
    """Random seed; the same seed gives byte-identical output."""
    n_train: int = 3000
    """Radiographs in the image-labelled train split (the pseudo-labelling corpus). 3000 is where the tiny classifier
    reaches a mean test AUROC of ~0.9 (600 gave 0.67: pseudo-labels too weak to study)."""
    n_valid: int = 234
    """Radiographs in the expert-annotated valid split (the expert set: expert-train and expert-select; threshold
    tuning); CheXpert's validation set has 234 images."""
    n_test: int = 668
    """Radiographs in the expert-annotated test split (reported numbers only), as CheXlocalize's test set."""
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
    annotator: bool = True
    """Also write an expert annotator's hand-drawn masks of valid and test (expert_annotations_<split>.json polygons,
    expert_segmentations_<split>.json RLEs), calibrated to CheXlocalize's human benchmark; the gt_* files stay exact."""
    workers: int = 1
    """Generator processes (spawned pool); the output does not depend on it."""

    def validate(self) -> None:
        for name in ("n_train", "n_valid", "n_test"):
            _check_positive("synth", name, getattr(self, name), allow_zero=True)
        if self.size < 64:
            raise ConfigError(f"config synth.size={self.size} must be >= 64 pixels")
        _check_positive("synth", "conspicuity", self.conspicuity)
        _check_positive("synth", "workers", self.workers)
        for name in ("lateral_fraction", "odd_mode_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"config synth.{name}={getattr(self, name)!r} must be in [0, 1]")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"config synth.jpeg_quality={self.jpeg_quality!r} must be in 1..100")


@dataclass
class ClassifierConfig(Section):
    """The saliency classifier: architecture and input geometry."""

    SECTION: ClassVar[str] = "classifier"

    arch: str = "tiny_cnn"
    """Architecture name in the model registry: tiny_cnn, resnet18, resnet50, densenet121."""
    image_size: int = 128
    """Side S of the square letterbox frame the classifier sees."""
    target_layer: str = ""
    """Grad-CAM target layer (dotted module name); empty = the architecture's last feature block."""

    def validate(self) -> None:
        CLASSIFIER_ARCHS.check(self.arch, "classifier.arch")
        if self.image_size < 32:
            raise ConfigError(f"config classifier.image_size={self.image_size} must be >= 32 pixels")


@dataclass
class TrainClassifierConfig(TrainRunFields, AugmentFields):
    """Data-parallel classifier training with Ray Train (``chexseg train-classifier``)."""

    SECTION: ClassVar[str] = "train_classifier"

    epochs: int = 6
    batch_size: int = 32
    """Per-worker batch size."""
    lr: float = 2e-3
    weight_decay: float = 1e-5
    uncertain_policy: str = "ones"
    """Uncertain (-1) labels: ones (U-Ones), zeros (U-Zeros) or ignore (U-Ignore, masked out of the loss)."""
    blank_policy: str = "negative"
    """Blank (not mentioned) labels: negative (treated as 0) or ignore (masked out of the loss)."""
    frontal_only: bool = True
    augment: bool = True
    """Small affine and brightness/contrast jitter; never a horizontal flip (anatomy is lateralised)."""
    lr_schedule: str = "cosine"
    """Learning-rate schedule over all steps: cosine (to 0) or constant."""
    preserve_order: bool = False
    """Deliver the rows in the order of the seeded per-epoch shuffle (Ray Data's ``preserve_order``) instead of as
    decode tasks finish: with one worker, a run is then reproducible bit for bit wherever the data live (local disk
    or S3). Costs some throughput (a slow decode task holds back the ones behind it)."""

    def validate(self) -> None:
        self.validate_run()
        self.validate_augment()
        UNCERTAIN_POLICIES.check(self.uncertain_policy, "train_classifier.uncertain_policy")
        SCHEDULES.check(self.lr_schedule, "train_classifier.lr_schedule")
        BLANK_POLICIES.check(self.blank_policy, "train_classifier.blank_policy")
        for name in ("batch_size", "lr"):
            _check_positive("train_classifier", name, getattr(self, name))


@dataclass
class PseudolabelConfig(ActorPoolFields):
    """The pseudo-labelling job: Ray Data, classifier actors, Zarr store (``chexseg pseudolabel``)."""

    SECTION: ClassVar[str] = "pseudolabel"

    precision: str = "fp32"
    """fp32, or bf16: the classifier's forward and Grad-CAM's backward under bf16 autocast (on GPUs with channels-last
    weights; also runs on CPUs). Recorded in the store: a store is resumed only at its own precision."""
    max_queued_frames: int = 0
    """Most decoded frames waiting for the classifier actors at once (decode tasks under way, frames queued, batches
    in the actors; each ``S x S`` bytes); 0 = Ray Data's default budget, a share of the object store (several GB on a
    GPU node). Raised to at least ``batch_size + images_per_decode_task`` so the job always progresses; below two
    decode tasks' worth decoding and the model take turns instead of overlapping."""
    images_per_chunk: int = 256
    """Images per Zarr chunk along the image axis, and rows per staged fragment; only the committer writes chunks."""
    commit_interval_s: float = 30.0
    """Seconds between the driver's commits of staged fragments into the store (the store fills as the job runs)."""
    lock_stale_s: float = 120.0
    """A store lock whose heartbeat is older than this belongs to a dead job and is taken over."""
    retry_failed: bool = False
    """Retry images that failed in an earlier run (missing or corrupt files); False skips them."""
    write_concurrency: int = 2
    """Most write tasks staging fragments at once (each a worker process); raise it only for slow object stores."""

    def validate(self) -> None:
        self.validate_pool()
        for name in ("images_per_chunk", "commit_interval_s", "lock_stale_s", "write_concurrency"):
            _check_positive("pseudolabel", name, getattr(self, name))
        _check_positive("pseudolabel", "max_queued_frames", self.max_queued_frames, allow_zero=True)
        PRECISIONS.check(self.precision, "pseudolabel.precision")


@dataclass
class MasksConfig(Section):
    """Saliency map -> binary mask (pseudo-labels and predictions)."""

    SECTION: ClassVar[str] = "masks"

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
    refiner: str = "none"
    """Refinement after binarisation and gating, against the radiograph: none, crf (dense CRF, the crf_* fields) or
    affinity (random walk of the gated-in maps over a trained affinity network's boundaries, the rw_* fields and
    fg_fraction). Runs in the model frame's content box (chexseg_dist.masks.refine)."""
    crf_iterations: int = 10
    """Mean-field iterations of the dense CRF."""
    crf_gt_prob: float = 0.7
    """Confidence of the CRF's input labels (pydensecrf's unary_from_labels gt_prob)."""
    crf_gauss_sxy: float = 3.0
    """Gaussian (smoothness) kernel width, frame pixels."""
    crf_gauss_compat: float = 3.0
    """Gaussian kernel weight (Potts)."""
    crf_bilat_sxy: float = 50.0
    """Bilateral kernel spatial width, frame pixels."""
    crf_bilat_srgb: float = 5.0
    """Bilateral kernel intensity width, on 0..255 intensities."""
    crf_bilat_compat: float = 10.0
    """Bilateral kernel weight (Potts)."""
    crf_stride: int = 4
    """Working grid of the CRF and the random walk: cells of stride x stride frame pixels."""
    crf_radius: float = 48.0
    """Half-width of the CRF's message window, frame pixels (a window covering the image = fully connected)."""
    refine_cpus: float = 1.0
    """CPUs per task of chexseg refine (one task per store chunk; torch threads = max(1, int(refine_cpus)))."""
    affinity_checkpoint: str = ""
    """Affinity network (chexseg train-affinity) for refiner=affinity; it must have been trained at the frame size
    the masks are made in."""
    rw_radius: int = 3
    """Random walk (refiner=affinity): affinity radius in boundary cells (4 frame pixels each)."""
    rw_beta: float = 5.0
    """Random walk: power of the affinities."""
    rw_exp: int = 3
    """Random walk: 2**rw_exp propagation steps."""
    fg_fraction: float = 0.6
    """Random walk: foreground where the propagated map exceeds this fraction of its maximum."""
    seed_fg_plane: float = 0.25
    """Affinity training seeds: background plane of the confident-foreground CRF (foreground = map above it)."""
    seed_bg_plane: float = 0.1
    """Affinity training seeds: background plane of the confident-background CRF."""

    def validate(self) -> None:
        BINARIZERS.check(self.strategy, "masks.strategy")
        REFINERS.check(self.refiner, "masks.refiner")
        for name in ("crf_iterations", "crf_stride", "crf_radius", "crf_gauss_sxy", "crf_bilat_sxy", "crf_bilat_srgb"):
            _check_positive("masks", name, getattr(self, name))
        for name in ("crf_gt_prob", "fg_fraction", "seed_fg_plane", "seed_bg_plane"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"config masks.{name}={getattr(self, name)!r} must be in (0, 1)")
        for name in ("rw_radius", "rw_beta"):
            _check_positive("masks", name, getattr(self, name))
        _check_positive("masks", "rw_exp", self.rw_exp, allow_zero=True)
        if self.refiner == "affinity" and not self.affinity_checkpoint:
            raise ConfigError(
                "masks.refiner=affinity needs a trained affinity network: run chexseg train-affinity, then pass "
                "--set masks.affinity_checkpoint=DIR"
            )
        EVAL_MODES.check(self.tune_mode, "masks.tune_mode")
        for name in ("threshold_steps", "cutoff_steps", "workers"):
            _check_positive("masks", name, getattr(self, name))
        if not 0.0 <= self.fallback_threshold <= 1.0:
            raise ConfigError(f"config masks.fallback_threshold={self.fallback_threshold!r} must be in [0, 1]")


@dataclass
class EvaluateConfig(Section):
    """CheXlocalize-style evaluation (``chexseg evaluate``)."""

    SECTION: ClassVar[str] = "evaluate"

    n_bootstrap: int = 1000
    """Bootstrap resamples over images for the 95% CIs."""
    seed: int = 0
    """Seed of the bootstrap resampling (numpy.random.default_rng): the same seed gives the same CIs."""
    full: bool = False
    """Full-dataset mode: also score pairs where exactly one of prediction and ground truth is empty (IoU 0)."""
    allow_missing: bool = False
    """Score images/pathologies missing from the predictions as empty masks (with a warning) instead of failing."""

    def validate(self) -> None:
        _check_positive("evaluate", "n_bootstrap", self.n_bootstrap, allow_zero=True)


@dataclass
class SegmentationConfig(Section):
    """The segmentation model (CheXseg's student): architecture, encoder, frame size, encoder initialisation."""

    SECTION: ClassVar[str] = "segmentation"

    arch: str = "deeplabv3plus"
    """Architecture in the registry: deeplabv3plus (the paper's), unet or fpn (segmentation-models-pytorch)."""
    encoder: str = "resnet18"
    """Encoder: resnet18, resnet34 or resnet50 (torchvision ResNets, random initialisation unless encoder_init)."""
    image_size: int = 128
    """Side S of the square letterbox frame the student sees and predicts in (a multiple of 32)."""
    encoder_init: str = ""
    """A classifier checkpoint of the same torchvision ResNet whose backbone initialises the encoder; empty = random."""

    def validate(self) -> None:
        SEGMENTATION_ARCHS.check(self.arch, "segmentation.arch")
        SEGMENTATION_ENCODERS.check(self.encoder, "segmentation.encoder")
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(
                f"config segmentation.image_size={self.image_size} must be a positive multiple of 32 (the encoders "
                "downsample 32 times)"
            )


@dataclass
class TrainSegmentationConfig(TrainRunFields, AugmentFields):
    """Training the student with Ray Train on expert and pseudo-labelled samples (``chexseg train-segmentation``)."""

    SECTION: ClassVar[str] = "train_segmentation"

    mode: str = "semi"
    """weak (pseudo-labelled images only), full (expert-train only), semi (both, mixed at expert_ratio) or distill
    (a student of the teacher's architecture trained on the teacher's soft outputs over the pseudo set's images)."""
    expert_ratio: float = 0.9
    """w: the share of expert samples in a semi batch (the paper drew each sample from the expert set with p = 0.9)."""
    mixing: str = "exact"
    """exact: every batch on every worker holds round(w * B) expert rows; bernoulli: each sample is expert with
    probability w (the paper's), seeded by (seed, rank, step)."""
    batch_size: int = 16
    """Per-worker batch size B."""
    lr: float = 1e-4
    """Adam learning rate (the paper: 1e-4, no schedule)."""
    epochs: int = 5
    steps_per_epoch: int = 0
    """Optimizer steps per epoch and worker; 0 = one pass over the rows the mode trains on (weak and distill: the
    pseudo set; full: expert-train; semi: both) split over the workers. Give it explicitly to compare modes at equal
    steps (chexseg experiment needs it)."""
    loss: str = "dice"
    """dice (class-averaged soft Dice, the paper's) or bce_dice (binary cross-entropy plus soft Dice)."""
    expert_weight: float = 1.0
    """Weight of the expert rows' loss."""
    pseudo_weight: float = 1.0
    """Weight of the pseudo-labelled rows' loss."""
    ignore_uncertain: bool = False
    """Leave a pseudo row's channel out of the loss when that image's label for the pathology is uncertain (-1)."""
    label_gating: bool = True
    """Gate the pseudo-masks by the pseudo-labelled images' own labels: a pathology's mask is kept only where the
    image is labelled positive (its label is known, so a mask elsewhere is known to be wrong). This replaces
    masks.label_gating for the student (that one serves export-masks and overlays, where the labels may be a test
    split's); tune the pseudo-mask thresholds the same way (chexseg tune-thresholds --manifest)."""
    teacher: str = ""
    """distill: a trained full-mode segmentation checkpoint (same architecture and frame size)."""
    distill_temperature: float = 10.0
    """distill: T in the targets sigmoid(teacher logits / T) and the student's sigmoid(logits / T)."""
    select_fraction: float = 0.214
    """Share of the expert patients held out for model selection (expert-select; the paper's 40 of 187)."""
    threshold_steps: int = 20
    """Output thresholds tuned on expert-select over t = k / threshold_steps (per pathology, full-mode IoU)."""
    amp: bool = True
    """bf16 autocast on GPU workers (ignored on CPU)."""
    augment: bool = False
    """Joint image and mask augmentation (small affine, brightness/contrast); off, as in the paper."""

    def validate(self) -> None:
        self.validate_run()
        self.validate_augment()
        sec = "train_segmentation"
        TRAINING_MODES.check(self.mode, f"{sec}.mode")
        MIXING_POLICIES.check(self.mixing, f"{sec}.mixing")
        SEGMENTATION_LOSSES.check(self.loss, f"{sec}.loss")
        _check_range(sec, "expert_ratio", self.expert_ratio, 0.0, 1.0)
        _check_range(sec, "select_fraction", self.select_fraction, 0.0, 1.0, hi_open=True)
        for name in ("batch_size", "lr"):
            _check_positive(sec, name, getattr(self, name))
        for name in ("steps_per_epoch", "expert_weight", "pseudo_weight"):
            _check_positive(sec, name, getattr(self, name), allow_zero=True)
        _check_positive(sec, "distill_temperature", self.distill_temperature)
        _check_positive(sec, "threshold_steps", self.threshold_steps)
        if self.mode == "semi" and self.expert_ratio in (0.0, 1.0):
            same = "weak (pseudo-labelled rows only)" if self.expert_ratio == 0.0 else "full (expert rows only)"
            raise ConfigError(
                f"config train_segmentation.mode=semi with expert_ratio={self.expert_ratio} is mode {same}: set "
                f"train_segmentation.mode={same.split()[0]} or an expert_ratio strictly between 0 and 1"
            )


@dataclass
class SegmentConfig(ActorPoolFields):
    """Predicting with a trained student (``chexseg segment``): a Ray Data job, model actors, CheXlocalize JSON out."""

    SECTION: ClassVar[str] = "segment"

    amp: bool = True
    """bf16 autocast on GPU actors (ignored on CPU)."""
    images_per_decode_task: int = 64
    """Images per read/decode task (and per mask-encoding task)."""

    def validate(self) -> None:
        self.validate_pool()


@dataclass
class TrainAffinityConfig(TrainRunFields):
    """Training the inter-pixel affinity network with Ray Train on CRF seeds of a store (``chexseg train-affinity``).

    Frames are the student's (``segmentation.image_size``): the network refines masks in that frame only."""

    SECTION: ClassVar[str] = "train_affinity"

    epochs: int = 5
    batch_size: int = 16
    """Per-worker batch size (IRNet's: 16)."""
    lr: float = 1e-3
    width: int = 32
    """Channels of the boundary network."""
    radius: int = 5
    """Training pairs: cells (4 frame pixels each) within this radius (IRNet's: 10 on larger frames)."""
    valid_fraction: float = 0.05
    """Share of the store's images (by id hash) held out: the epoch's score is minus their mean loss."""

    def validate(self) -> None:
        self.validate_run()
        for name in ("batch_size", "lr", "width", "radius"):
            _check_positive("train_affinity", name, getattr(self, name))
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"config train_affinity.valid_fraction={self.valid_fraction!r} must be in (0, 1)")


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
    train_segmentation: TrainSegmentationConfig = field(default_factory=TrainSegmentationConfig)
    train_affinity: TrainAffinityConfig = field(default_factory=TrainAffinityConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Section) else value
        return out
