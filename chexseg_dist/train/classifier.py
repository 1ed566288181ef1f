"""The saliency classifier as a training task on the shared loop (``chexseg train-classifier``).

How the data reach the workers:

1. The driver reads each Parquet manifest, keeps frontal views under the one view rule
   (:func:`~chexseg_dist.data.select_views`), validates every label cell
   (:func:`~chexseg_dist.data.labels_and_mask` names the row), checks that the paths point at images, and hands Ray
   Data ``row``, ``image_id``, ``path`` and the 14 label columns in blocks of :data:`ROWS_PER_BLOCK` rows. Nothing is
   listed or globbed: the manifest is the index.
2. Per epoch, Ray Data shuffles these metadata rows (cheap: no pixels yet); CPU tasks then run the one read-and-decode
   stage (:func:`~chexseg_dist.data.decode_frames`: the exact frames pseudo-labelling sees) and turn the labels into
   targets and loss masks under the configured policies. An image that cannot be read or decoded is left out and
   recorded, with its row and reason, in the run's failures table; the export copies it beside the checkpoint.
3. The loop (:mod:`chexseg_dist.train._loop`) streams the train split to the workers; rank 0 scores the whole valid
   split each epoch (AUROC per observation; the score is the mean AUROC of the 10 localisation tasks).

In a step: uint8 frames -> float ``[B, 1, S, S]`` in [0, 1] -> augmentation (small affine, brightness/contrast, no
horizontal flip unless asked) -> logits ``[B, 14]`` -> masked BCE.

The export writes the best epoch as the one output the rest of the pipeline reads: a checkpoint directory
(:func:`~chexseg_dist.models.save_checkpoint`, with that epoch's metrics and the resolved config) plus
``metrics.json``, ``metrics.csv``, ``config.yaml`` and, when images failed, ``failures.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chexseg_dist.config import Config, TrainClassifierConfig, save_config
from chexseg_dist.core import fsio
from chexseg_dist.core.console import say
from chexseg_dist.core.pathologies import OBSERVATIONS
from chexseg_dist.core.runs import new_run_id
from chexseg_dist.data.frames import with_decode_stage
from chexseg_dist.data.labels import labels_and_mask
from chexseg_dist.data.manifest import check_paths_exist, read_manifest, select_views
from chexseg_dist.errors import ManifestError
from chexseg_dist.metrics.auroc import mean_task_auroc, per_class_auroc, task_aurocs
from chexseg_dist.models.checkpoint import save_checkpoint
from chexseg_dist.models.classifiers import create_classifier
from chexseg_dist.train._loop import (
    FaultInjection,
    StepResult,
    TrainResult,
    TrainTask,
    WorkerContext,
    fit,
    read_run_failures,
    write_failures,
    write_history,
)
from chexseg_dist.train.augment import augment_batch
from chexseg_dist.train.schedules import create_scheduler

#: Manifest rows per Ray Data block before decoding (a block is the unit of parallel decode).
ROWS_PER_BLOCK = 128
#: Images per decode batch inside a Ray Data task.
DECODE_BATCH = 32
#: Where the classifier's decode stages record the images they leave out (``<failures_dir>/<split>``).
SPLITS = ("train", "valid")
#: The batch columns the loop receives; ``iter_torch_batches(dtypes=...)`` must name every one of them.
BATCH_DTYPES: dict[str, torch.dtype] = {"image": torch.uint8, "targets": torch.float32, "mask": torch.float32}


def masked_bce_with_logits(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Binary cross-entropy with logits, averaged over the cells where ``mask`` is set.

    Args:
        logits: ``[B, K]`` float.
        targets: ``[B, K]`` float in {0, 1} (masked cells may hold anything finite).
        mask: ``[B, K]`` float in {0, 1}; 0 removes a cell from the loss (U-Ignore, blank-ignore).

    Returns:
        A scalar: the mean over unmasked cells, or 0 (still connected to ``logits``) when every cell is masked.
    """
    per_cell = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (per_cell * mask).sum() / mask.sum().clamp_min(1.0)


def label_targets(batch: dict[str, np.ndarray], *, uncertain_policy: str, blank_policy: str) -> dict[str, np.ndarray]:
    """Ray Data stage after :func:`decode_frames`: frames and labels -> the loop's columns (:data:`BATCH_DTYPES`)."""
    targets, mask = labels_and_mask(batch, uncertain_policy, blank_policy)
    return {"image": np.asarray(batch["frame"], dtype=np.uint8), "targets": targets, "mask": mask}


def read_label_table(manifest: str, tc: TrainClassifierConfig, what: str) -> pa.Table:
    """Read a manifest, keep frontal views if configured, validate its labels and paths.

    Returns:
        A table of ``row``, ``image_id``, ``path`` and the 14 observations (float64, nulls = blank).

    Raises:
        ManifestError: missing columns, no usable rows, or a label cell that is not 1/0/-1/blank (naming the manifest
            and row); InputNotFoundError: the manifest, or none of a few sampled images, exists.
    """
    table = read_manifest(manifest)
    views = select_views(table, tc.frontal_only)
    if note := views.note(f"train-classifier: {what} manifest {manifest}"):
        say(note)
    table = views.table
    if table.num_rows == 0:
        raise ManifestError(
            f"{what} manifest {manifest}: no rows to train on"
            + (" after keeping frontal views (train_classifier.frontal_only=true)" if tc.frontal_only else "")
        )
    try:
        labels_and_mask(table, tc.uncertain_policy, tc.blank_policy)
    except ManifestError as err:
        raise ManifestError(f"{what} manifest {manifest}: {err}") from None
    check_paths_exist(table.column("path").to_pylist(), f"{what} manifest {manifest}")
    schema = [pa.field("row", pa.int64()), pa.field("image_id", pa.string()), pa.field("path", pa.string())]
    schema += [pa.field(name, pa.float64()) for name in OBSERVATIONS]
    return table.select([f.name for f in schema]).cast(pa.schema(schema))


class ClassifierTask(TrainTask):
    """The classifier on the shared loop: 14 observations, masked BCE, mean task AUROC on valid as the score.

    Args:
        cfg: the resolved config (``classifier`` and ``train_classifier`` sections).
        train_manifest, valid_manifest: Parquet manifests.
        failures_dir: where the decode stage records images it left out, one folder per split (shared storage on a
            cluster): ``<failures_dir>/train`` and ``<failures_dir>/valid``.
        run_id: recorded with those failures.
    """

    name = "train-classifier"

    def __init__(self, cfg: Config, train_manifest: str, valid_manifest: str, failures_dir: str, run_id: str) -> None:
        self.cfg = cfg
        self.tc = cfg.train_classifier
        self.loop = self.tc
        self.preserve_order = self.tc.preserve_order
        self.arch, self.image_size = cfg.classifier.arch, cfg.classifier.image_size
        self.train_manifest, self.valid_manifest = train_manifest, valid_manifest
        self.failures_dir, self.run_id = failures_dir, run_id
        self.n_train = self.n_valid = 0
        self._tables: dict[str, pa.Table] = {}

    # ---------------------------------------------------------------- driver
    def prepare(self) -> None:
        """Read and check both manifests (labels, views, paths) before Ray starts: bad input fails fast."""
        self._tables = {
            "train": read_label_table(self.train_manifest, self.tc, "train"),
            "valid": read_label_table(self.valid_manifest, self.tc, "valid"),
        }
        self.n_train, self.n_valid = self._tables["train"].num_rows, self._tables["valid"].num_rows

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_tables", None)  # the manifests travel to the workers as Ray datasets, not with the task
        return state

    def datasets(self) -> dict[str, Any]:
        import ray.data

        tc = self.tc
        out: dict[str, Any] = {}
        for what, table in self._tables.items():
            blocks = [table.slice(i, ROWS_PER_BLOCK) for i in range(0, table.num_rows, ROWS_PER_BLOCK)]
            ds: Any = ray.data.from_arrow(blocks)
            if what == "train":
                # Metadata only: a full shuffle per epoch costs almost nothing. Seeded: a new order every epoch (Ray
                # reseeds per execution), the same orders in every run of one seed. Its tasks ask for decode_cpus,
                # not Ray's default of 1 CPU: a cluster whose nodes each keep less than a whole CPU free next to their
                # training worker would otherwise never schedule the shuffle, and the run would wait forever.
                ds = ds.random_shuffle(seed=tc.seed, num_cpus=tc.decode_cpus)
            failures = fsio.join(self.failures_dir, what)
            ds = with_decode_stage(
                ds, self.image_size, tc.decode_cpus, failures_dir=failures, run_id=self.run_id, batch_size=DECODE_BATCH
            ).map_batches(
                label_targets,
                fn_kwargs={
                    # Valid AUROC is computed on certain labels only, whatever the training policy.
                    "uncertain_policy": tc.uncertain_policy if what == "train" else "ignore",
                    "blank_policy": tc.blank_policy,
                },
                batch_format="numpy",
                batch_size=DECODE_BATCH,
                num_cpus=tc.decode_cpus,  # the same resources as decoding: Ray Data fuses the two into one task
            )
            out[what] = ds
        return out

    def identity(self) -> dict[str, Any]:
        return {"task": self.name, "arch": self.arch, "image_size": self.image_size}

    def describe(self) -> str:
        tc = self.tc
        device = "GPU" if self.use_gpu else "CPU"
        return (
            f"{self.n_train} train / {self.n_valid} valid radiographs; {self.arch} at {self.image_size} px; "
            f"{tc.num_workers} worker(s) ({device})"
        )

    def export(
        self, state: Mapping[str, Any], best: Mapping[str, Any], history: list[dict[str, Any]], out: str, extra: dict
    ) -> dict[str, str]:
        return export_classifier(self.cfg, state, best, history, out, extra, self.failures_dir)

    # ---------------------------------------------------------------- worker
    def steps_per_epoch(self, world: int) -> int:
        return max(1, math.ceil((self.n_train // world) / self.tc.batch_size))

    def build(self, steps_per_epoch: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        tc = self.tc
        model = create_classifier(self.arch, num_classes=len(OBSERVATIONS))
        optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        return model, optimizer, create_scheduler(tc.lr_schedule, optimizer, tc.epochs * steps_per_epoch)

    def train_batches(self, shards: Mapping[str, Any], ctx: WorkerContext) -> Iterator[Any]:
        batches = shards["train"].iter_torch_batches(
            batch_size=self.tc.batch_size, dtypes=BATCH_DTYPES, device=ctx.device
        )
        return iter(batches)

    def train_step(self, model: nn.Module, batch: Any, ctx: WorkerContext) -> StepResult:
        x = batch["image"].unsqueeze(1).float().div_(255.0)
        if self.tc.augment:
            x = augment_batch(x, self.tc, ctx.generator)
        loss = masked_bce_with_logits(model(x), batch["targets"], batch["mask"])
        return StepResult(loss=loss, images=int(x.shape[0]))

    def validate(self, model: nn.Module, shards: Mapping[str, Any], ctx: WorkerContext) -> dict[str, Any]:
        if ctx.rank != 0:
            return {}
        metrics = score_classifier(model, shards["valid"], 2 * self.tc.batch_size, ctx.device)
        metrics["score"] = metrics["mean_task_auroc"] if math.isfinite(metrics["mean_task_auroc"]) else -1.0
        metrics["failed_images"] = _count_failures(self.failures_dir)
        return metrics

    def epoch_line(self, epoch: int, metrics: Mapping[str, Any]) -> str:
        skipped = f", {metrics['failed_images']} unreadable image(s) left out" if metrics["failed_images"] else ""
        return (
            f"epoch {epoch + 1}/{self.tc.epochs} train_loss {metrics['train_loss']:.4f} valid_loss "
            f"{metrics['valid_loss']:.4f} mean_task_auroc {metrics['mean_task_auroc']:.4f} "
            f"({metrics['epoch_time_s']:.1f} s, {metrics['train_images_per_s']:.1f} img/s{skipped})"
        )


def score_classifier(model: nn.Module, shard: Any, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Score a whole split on this worker: AUROC per observation, mean task AUROC, masked BCE loss."""
    model.eval()
    probs, targets, masks = [], [], []
    loss_sum, cells = 0.0, 0.0
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=BATCH_DTYPES, device=device):
            x = batch["image"].unsqueeze(1).float().div_(255.0)
            logits = model(x)
            t, m = batch["targets"], batch["mask"]
            loss_sum += float((F.binary_cross_entropy_with_logits(logits, t, reduction="none") * m).sum())
            cells += float(m.sum())
            probs.append(torch.sigmoid(logits).cpu().numpy())
            targets.append(t.cpu().numpy())
            masks.append(m.cpu().numpy())
    k = len(OBSERVATIONS)
    p = np.concatenate(probs) if probs else np.zeros((0, k))
    if p.shape[0] == 0:
        raise ManifestError("none of the valid images could be read or decoded (the failures table names them)")
    per_obs = per_class_auroc(p, np.concatenate(targets), np.concatenate(masks))
    metrics: dict[str, Any] = {
        "valid_loss": loss_sum / cells if cells else float("nan"),
        "valid_images": int(p.shape[0]),
        "mean_task_auroc": mean_task_auroc(per_obs),
        "mean_auroc": float(np.nanmean(per_obs)) if np.isfinite(per_obs).any() else float("nan"),
    }
    metrics.update({f"auroc/{name}": float(v) for name, v in zip(OBSERVATIONS, per_obs)})
    return metrics


def _count_failures(failures_dir: str) -> int:
    return len(read_run_failures(failures_dir, SPLITS))


def train_classifier(
    cfg: Config,
    train_manifest: str,
    valid_manifest: str,
    out: str,
    *,
    fault: FaultInjection | None = None,
    verbose: bool = True,
) -> TrainResult:
    """Train the classifier with Ray Train and write the best epoch as a pipeline checkpoint into ``out``.

    Starts a local Ray (or attaches to the cluster, under ``ray job submit``) unless Ray is running, once the
    manifests have been checked. Re-running with the same ``out`` (or the same ``train_classifier.run_name`` and
    ``storage_path``) resumes the run at its next epoch; a run that already finished all epochs only re-exports
    ``out``.

    Args:
        cfg: the resolved configuration (``classifier`` and ``train_classifier`` sections are used).
        train_manifest, valid_manifest: Parquet manifests (``chexseg manifest``), local or URIs.
        out: the output checkpoint directory (local or URI).
        fault: deliberately kill one attempt (testing ``FailureConfig``); default from ``CHEXSEG_FAIL_ONCE_MARKER``.
        verbose: print the final summary table.

    Raises:
        ChexsegError: bad manifests or labels (naming the file and row), or a resumed run of another model.
        RuntimeError: training failed after ``max_failures`` retries (the Ray error is chained).
    """

    from chexseg_dist.train._loop import resolve_run

    storage, run_name = resolve_run(cfg.train_classifier, out, "classifier")
    run_id = new_run_id()
    task = ClassifierTask(cfg, train_manifest, valid_manifest, fsio.join(storage, run_name, "failures"), run_id)
    result = fit(task, out, fault=fault, default_name="classifier")
    if verbose:
        say(format_summary(result))
    return result


def export_classifier(
    cfg: Config,
    state: Mapping[str, Any],
    best: Mapping[str, Any],
    history: list[dict[str, Any]],
    out: str,
    extra: dict[str, Any] | None = None,
    failures_dir: str | None = None,
) -> dict[str, str]:
    """Write the pipeline checkpoint (best epoch) plus ``metrics.json``, ``metrics.csv``, ``config.yaml`` and, when
    images were left out, ``failures.csv`` (one line per image: split, row, image id, path, stage, reason).

    Returns:
        ``{"checkpoint", "metrics_json", "metrics_csv", "config"[, "failures"]}`` paths.
    """
    model = create_classifier(cfg.classifier.arch, num_classes=len(OBSERVATIONS))
    model.load_state_dict(state["model"])
    metrics = dict(best)
    metrics["per_task_auroc"] = task_aurocs([best[f"auroc/{name}"] for name in OBSERVATIONS])
    save_checkpoint(
        out,
        model,
        arch=cfg.classifier.arch,
        image_size=cfg.classifier.image_size,
        config=cfg.to_dict(),
        metrics=metrics,
        target_layer=cfg.classifier.target_layer or None,
    )
    files = {"checkpoint": out, **write_history(out, metrics, history)}
    failures = write_failures(out, failures_dir, SPLITS) if failures_dir else None
    if failures:
        files["failures"] = failures
    files["config"] = save_config(cfg, out, extra=extra)
    return files


def format_summary(res: TrainResult) -> str:
    """The final table: per-task AUROC of the best epoch, the mean, and wall time."""
    best = res.best_metrics
    per_task = task_aurocs([best[f"auroc/{name}"] for name in OBSERVATIONS])
    # Tasks whose valid split lacks positives or negatives have no AUROC and are left out of the mean: say how many.
    n_tasks = sum(1 for v in per_task.values() if np.isfinite(v))
    mean_label = f"mean ({n_tasks} tasks with both classes)"
    width = max(len(mean_label), *(len(t) for t in per_task))
    lines = [
        "",
        f"Classifier: best epoch {res.best_epoch + 1} of {len(res.history)} "
        f"(valid AUROC over {best['valid_images']} images)",
        f"  {'task':<{width}}  AUROC",
    ]
    lines += [f"  {task:<{width}}  {value:.4f}" for task, value in per_task.items()]
    lines += [
        f"  {mean_label:<{width}}  {best['mean_task_auroc']:.4f}",
        f"  {'mean (14 observations)':<{width}}  {best['mean_auroc']:.4f}",
        *res.footer(),
    ]
    return "\n".join(lines)
