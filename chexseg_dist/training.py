"""Data-parallel training of the saliency classifier with Ray Train V2 (``chexseg train-classifier``).

How the data reach the workers:

1. The driver reads each Parquet manifest (:func:`chexseg_dist.manifest.read_manifest`), keeps frontal views
   (``train_classifier.frontal_only``), validates every label cell (:func:`chexseg_dist.labels.labels_and_mask`
   raises naming the row) and hands Ray Data only ``path`` and the 14 label columns, in blocks of
   :data:`ROWS_PER_BLOCK` rows. Nothing is listed or globbed: the manifest is the index.
2. Per epoch, Ray Data shuffles these metadata rows (cheap: no pixels yet), then CPU tasks read the bytes
   (:func:`chexseg_dist.fsio.read_bytes`, local or ``s3://``), decode and letterbox them with
   :func:`chexseg_dist.images.frame_from_bytes` -- the exact frames pseudo-labelling sees -- and turn the labels into
   targets and loss masks under the configured policies. An unreadable or undecodable image becomes a row with
   ``ok = False`` and a logged warning naming the file; the loop counts these rows and leaves them out of the loss
   and the metrics (they are never fed as if they were radiographs).
3. The train split is streamed to the workers with ``streaming_split(equal=True)`` (Ray Train's default), so every
   worker runs the same number of steps and DDP never waits on a missing batch. The valid split is not split: the
   rank 0 worker scores all of it each epoch and the others wait at ``ray.train.report``.

In the loop: uint8 frames -> float ``[B, 1, S, S]`` in [0, 1] -> augmentation on the tensor (train only: small
affine, brightness/contrast jitter, no horizontal flip unless asked) -> logits ``[B, 14]`` -> masked BCE.

Checkpoints and resume: after every epoch rank 0 reports the metrics with a checkpoint holding the model,
optimizer and scheduler state, the epoch index and the metrics history. ``CheckpointConfig`` keeps the
``num_to_keep`` best by mean task AUROC (Ray keeps the latest as well). Re-running with the same run name and storage
path makes ``ray.train.get_checkpoint()`` return the latest checkpoint, and the loop continues at the next epoch;
``FailureConfig(max_failures)`` restarts a failed worker group from the same latest checkpoint. After ``fit`` the
driver takes the best epoch's weights and writes the one output the rest of the pipeline reads:
:func:`chexseg_dist.checkpoint.save_checkpoint` into ``out`` (with that epoch's metrics and the resolved config),
plus ``metrics.json``, ``metrics.csv`` and ``config.yaml`` in the same directory.

Importing this module does not import Ray; torch is needed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chexseg_dist import fsio
from chexseg_dist.config import Config, TrainClassifierConfig, from_dict, save_config
from chexseg_dist.labels import labels_and_mask, mean_task_auroc, per_class_auroc, task_aurocs
from chexseg_dist.pathologies import OBSERVATIONS

logger = logging.getLogger(__name__)

#: Manifest rows per Ray Data block before decoding (a block is the unit of parallel decode).
ROWS_PER_BLOCK = 128
#: Images per decode batch inside a Ray Data task.
DECODE_BATCH = 32
STATE_FILE = "state.pt"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
#: Driver-side environment hook for failure drills (e.g. with ``ray job submit``): a marker path, optionally
#: ``PATH:EPOCH``. The first attempt reaching that epoch creates the marker and raises (:class:`FaultInjection`).
FAIL_ONCE_ENV = "CHEXSEG_FAIL_ONCE_MARKER"
#: The batch columns after decoding; ``iter_torch_batches(dtypes=...)`` must name every one of them.
BATCH_DTYPES: dict[str, torch.dtype] = {
    "image": torch.uint8,
    "targets": torch.float32,
    "mask": torch.float32,
    "ok": torch.bool,
}


# ------------------------------------------------------------------------------------------ pure building blocks


def masked_bce_with_logits(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Binary cross-entropy with logits, averaged over the cells where ``mask`` is set.

    Args:
        logits: ``[B, K]`` float.
        targets: ``[B, K]`` float in {0, 1} (masked cells may hold anything finite).
        mask: ``[B, K]`` float in {0, 1}; 0 removes a cell from the loss (U-Ignore, blank-ignore, failed image).

    Returns:
        A scalar: the mean over unmasked cells, or 0 (still connected to ``logits``) when every cell is masked.
    """
    per_cell = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (per_cell * mask).sum() / mask.sum().clamp_min(1.0)


def augment_batch(images: Tensor, tc: TrainClassifierConfig, generator: torch.Generator | None = None) -> Tensor:
    """Radiograph-safe augmentation of a batch, each image with its own random parameters.

    Intensity jitter -- a gain ``1 +- aug_brightness`` and a gamma ``exp(+-aug_contrast)``, clipped to [0, 1]; both
    keep black at 0, so the letterbox padding stays exactly what evaluation sees -- then a small affine (rotation
    ``+-aug_rotate_deg``, isotropic scale ``1 +- aug_scale``, translation ``+-aug_translate`` of the frame side),
    bilinear, with zero (black) fill like the letterbox padding. A horizontal flip (probability 0.5) only when
    ``tc.hflip``: anatomy is lateralised (heart on the left, situs), so it is off by default.

    Args:
        images: ``[B, 1, S, S]`` float in [0, 1], any device.
        tc: the training config (the ``aug_*`` fields and ``hflip``).
        generator: a CPU generator for reproducible draws (parameters are drawn on CPU, then moved).

    Returns:
        ``[B, 1, S, S]`` float in [0, 1] on the same device.
    """
    b = images.shape[0]
    if b == 0:
        return images

    def uniform(bound: float) -> Tensor:
        return (torch.rand(b, generator=generator) * 2.0 - 1.0) * bound

    gain = (1.0 + uniform(tc.aug_brightness)).view(b, 1, 1, 1).to(images)
    gamma = torch.exp(uniform(tc.aug_contrast)).view(b, 1, 1, 1).to(images)
    out = (images.clamp(0.0, 1.0).pow(gamma) * gain).clamp(0.0, 1.0)
    angle = uniform(math.radians(tc.aug_rotate_deg))
    scale = 1.0 + uniform(tc.aug_scale)
    # affine_grid maps output coordinates to input coordinates in [-1, 1] (frame side = 2): to enlarge the content
    # by ``scale`` the sampling grid shrinks by it; translation by t of the side is 2t in these units.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 2] = uniform(2.0 * tc.aug_translate)
    theta[:, 1, 2] = uniform(2.0 * tc.aug_translate)
    if tc.hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        theta[flip, :, 0] *= -1.0
    grid = F.affine_grid(theta.to(images), list(out.shape), align_corners=False)
    return F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def decode_batch(
    batch: dict[str, np.ndarray], *, image_size: int, uncertain_policy: str, blank_policy: str
) -> dict[str, np.ndarray]:
    """Ray Data stage: read, decode and letterbox images; labels -> targets and loss mask.

    Args:
        batch: numpy columns ``path`` and the 14 observation columns (float, blank = NaN).
        image_size: side ``S`` of the letterbox frame.
        uncertain_policy, blank_policy: see :func:`chexseg_dist.labels.labels_and_mask`.

    Returns:
        ``image`` uint8 ``[B, S, S]`` (zeros where the image failed), ``targets`` / ``mask`` float32 ``[B, 14]``,
        ``ok`` bool ``[B]`` (False: the file was missing or not a decodable image; a warning names it).
    """
    from chexseg_dist.images import ImageDecodeError, frame_from_bytes

    paths = [str(p) for p in batch["path"]]
    images = np.zeros((len(paths), image_size, image_size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        try:
            images[i], _ = frame_from_bytes(fsio.read_bytes(path), image_size, path)
            ok[i] = True
        except (ImageDecodeError, FileNotFoundError, IsADirectoryError) as err:
            logger.warning("skipping undecodable image %s: %s", path, getattr(err, "reason", err))
    targets, mask = labels_and_mask(batch, uncertain_policy, blank_policy)
    return {"image": images, "targets": targets, "mask": mask, "ok": ok}


def read_label_table(manifest: str, tc: TrainClassifierConfig, what: str) -> Any:
    """Read a manifest, keep frontal views if configured, validate its labels; returns a ``pyarrow.Table``.

    The table has columns ``path`` and the 14 observations (float64, nulls = blank).

    Raises:
        ValueError: no usable rows, or a label cell that is not 1/0/-1/blank (naming the manifest and row).
        KeyError: a missing column.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from chexseg_dist.manifest import read_manifest

    table = read_manifest(manifest)
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    for column in ("path", "frontal", *OBSERVATIONS):
        if column not in table.column_names:
            raise KeyError(f"{what} manifest {manifest}: no column {column!r} (build it with `chexseg manifest`)")
    if tc.frontal_only:
        table = table.filter(pc.fill_null(table["frontal"], False))
    if table.num_rows == 0:
        raise ValueError(
            f"{what} manifest {manifest}: no rows to train on"
            + (" after keeping frontal views (train_classifier.frontal_only=true)" if tc.frontal_only else "")
        )
    try:
        labels_and_mask(table, tc.uncertain_policy, tc.blank_policy)
    except ValueError as err:
        raise ValueError(f"{what} manifest {manifest}: {err}") from None
    _probe_paths(table.column("path").to_pylist(), manifest, what)
    columns = ["path", *OBSERVATIONS]
    return table.select(columns).cast(
        pa.schema([pa.field("path", pa.string())] + [pa.field(name, pa.float64()) for name in OBSERVATIONS])
    )


def _probe_paths(paths: list[str], manifest: str, what: str, n: int = 8) -> None:
    """Fail before any worker starts when none of a few evenly spaced images exists (a wrong root, not bad files)."""
    step = max(1, len(paths) // n)
    sample = paths[::step][:n]
    if sample and not any(fsio.exists(p) for p in sample):
        raise FileNotFoundError(
            f"{what} manifest {manifest}: none of {len(sample)} sampled images exists (e.g. {sample[0]}); the "
            "manifest's paths do not point at the images: rebuild it with `chexseg manifest --root <dataset folder>`"
        )


def resolve_run(cfg: Config, out: str) -> tuple[str, str]:
    """``(storage_path, run_name)`` of the Ray Train run: the config's, or ``<out>.ray`` and ``basename(out)``."""
    tc = cfg.train_classifier
    out = out.rstrip("/")
    storage = tc.storage_path or f"{out}.ray"
    if not fsio.is_uri(storage):
        storage = os.path.abspath(storage)
    return storage, tc.run_name or fsio.basename(out) or "classifier"


@dataclass
class FaultInjection:
    """Deliberately fail one training attempt (to exercise ``FailureConfig``), once per marker file.

    The rank 0 worker that reaches epoch index ``epoch`` while ``marker`` does not exist creates it and raises;
    the restarted attempt finds the marker and trains on. ``marker`` must be visible to the workers (shared
    storage on a multi-node cluster).
    """

    marker: str
    epoch: int = 1

    @classmethod
    def from_env(cls) -> FaultInjection | None:
        raw = os.environ.get(FAIL_ONCE_ENV, "")
        if not raw:
            return None
        path, sep, epoch = raw.rpartition(":")
        if sep and epoch.isdigit():
            return cls(marker=path, epoch=int(epoch))
        return cls(marker=raw)


@dataclass
class TrainResult:
    """What :func:`train_classifier` produced.

    Attributes:
        out: the checkpoint directory (load with :func:`chexseg_dist.checkpoint.load_classifier`).
        history: one metrics dict per epoch index 0..epochs-1 (over all attempts and resumptions).
        best_epoch: index of the epoch with the highest mean task AUROC (the weights in ``out``).
        best_metrics: that epoch's metrics.
        start_epoch: the epoch index this invocation started at (0 for a fresh run, > 0 when it resumed).
        starts: every epoch index a training attempt started at, over the run's whole life (a retried failure or
            a resumption adds one).
        wall_time_s: seconds this invocation spent in ``fit``.
        storage_path, run_name: where Ray Train keeps the run (re-run with the same two to resume).
    """

    out: str
    history: list[dict[str, Any]]
    best_epoch: int
    best_metrics: dict[str, Any]
    start_epoch: int
    starts: list[int]
    wall_time_s: float
    storage_path: str
    run_name: str
    files: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ the train loop


def _rank0_print(rank: int, message: str) -> None:
    if rank == 0:
        # Straight to the process's stdout: Ray Train's patched print() would emit every line twice.
        print(f"[train-classifier] {message}", file=sys.__stdout__, flush=True)


def _lr_factor(tc: TrainClassifierConfig, step: int, total_steps: int) -> float:
    if tc.lr_schedule == "constant" or total_steps <= 0:
        return 1.0
    progress = min(step / total_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _allreduce_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def _load_state(checkpoint: Any) -> dict[str, Any]:
    with checkpoint.as_directory() as directory, open(os.path.join(directory, STATE_FILE), "rb") as f:
        return dict(torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True))


def _evaluate(model: nn.Module, shard: Any, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Score the whole valid split on this worker: AUROC per observation, mean task AUROC, loss."""
    model.eval()
    probs, targets, masks = [], [], []
    loss_sum, cells, skipped = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=BATCH_DTYPES, device=device):
            ok = batch["ok"]
            skipped += int((~ok).sum())
            if not bool(ok.any()):
                continue
            x = batch["image"][ok].unsqueeze(1).float().div_(255.0)
            logits = model(x)
            t, m = batch["targets"][ok], batch["mask"][ok]
            loss_sum += float((F.binary_cross_entropy_with_logits(logits, t, reduction="none") * m).sum())
            cells += float(m.sum())
            probs.append(torch.sigmoid(logits).cpu().numpy())
            targets.append(t.cpu().numpy())
            masks.append(m.cpu().numpy())
    k = len(OBSERVATIONS)
    p = np.concatenate(probs) if probs else np.zeros((0, k))
    per_obs = per_class_auroc(p, np.concatenate(targets) if targets else p, np.concatenate(masks) if masks else p)
    metrics: dict[str, Any] = {
        "valid_loss": loss_sum / cells if cells else float("nan"),
        "valid_images": int(p.shape[0]),
        "skipped_valid": skipped,
        "mean_task_auroc": mean_task_auroc(per_obs),
        "mean_auroc": float(np.nanmean(per_obs)) if np.isfinite(per_obs).any() else float("nan"),
    }
    metrics.update({f"auroc/{name}": float(v) for name, v in zip(OBSERVATIONS, per_obs)})
    return metrics


def train_loop(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (one process per worker). See the module docstring for the design."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(loop_config["config"])
    tc, cc = cfg.train_classifier, cfg.classifier
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    torch.manual_seed(tc.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    generator = torch.Generator().manual_seed(tc.seed * 1000 + rank)

    from chexseg_dist.models import create_classifier

    model = create_classifier(cc.arch, num_classes=len(OBSERVATIONS))
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = max(1, math.ceil((loop_config["n_train"] // world) / tc.batch_size))
    total_steps = tc.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(tc, s, total_steps))

    start_epoch, history, starts = 0, [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = _load_state(checkpoint)
        if (state["arch"], state["image_size"]) != (cc.arch, cc.image_size):
            raise ValueError(
                f"run {loop_config['run']} holds a {state['arch']} at {state['image_size']} px; this config asks for "
                f"{cc.arch} at {cc.image_size} px: set train_classifier.run_name (or --out) to start a new run"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, starts = int(state["epoch"]) + 1, list(state["history"]), list(state["starts"])
        # Fresh augmentation draws for the remaining epochs, still a function of (seed, rank, epoch).
        generator.manual_seed(tc.seed * 1000 + rank + 7919 * start_epoch)
        _rank0_print(rank, f"resuming {loop_config['run']} at epoch {start_epoch + 1}/{tc.epochs}")
    starts.append({"invocation": loop_config["invocation"], "epoch": start_epoch})
    model = ray.train.torch.prepare_model(model)
    bare: nn.Module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    fault = loop_config.get("fault")

    for epoch in range(start_epoch, tc.epochs):
        if fault and rank == 0 and epoch == fault["epoch"] and not os.path.exists(fault["marker"]):
            with open(fault["marker"], "w") as f:
                f.write(f"injected failure at epoch index {epoch}\n")
            raise RuntimeError(f"injected failure at epoch index {epoch} (FaultInjection marker {fault['marker']})")
        t0 = time.perf_counter()
        model.train()
        loss_sum, seen, skipped = 0.0, 0, 0
        batches = train_shard.iter_torch_batches(batch_size=tc.batch_size, dtypes=BATCH_DTYPES, device=device)
        for step, batch in enumerate(batches, start=1):
            ok = batch["ok"]
            mask = batch["mask"] * ok.unsqueeze(1)
            # Keep failed rows out of the forward pass when possible; a batch of only failures still steps (with a
            # zero loss) so that every rank makes the same number of DDP all-reduces.
            keep = ok if bool(ok.any()) else torch.ones_like(ok)
            x = batch["image"][keep].unsqueeze(1).float().div_(255.0)
            if tc.augment:
                x = augment_batch(x, tc, generator)
            logits = model(x)
            loss = masked_bce_with_logits(logits, batch["targets"][keep], mask[keep])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            n_ok = int(ok.sum())
            loss_sum += float(loss.detach()) * n_ok
            seen += n_ok
            skipped += int(ok.numel()) - n_ok
            if tc.log_every_steps and step % tc.log_every_steps == 0:
                rate = seen * world / (time.perf_counter() - t0)
                _rank0_print(
                    rank,
                    f"epoch {epoch + 1}/{tc.epochs} step {step}/~{steps_per_epoch} loss {float(loss.detach()):.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.1f} img/s",
                )
        loss_sum, n_seen, n_skipped = _allreduce_sum([loss_sum, seen, skipped], world, device)
        seen, skipped = int(n_seen), int(n_skipped)
        if seen == 0:
            raise ValueError(
                f"epoch {epoch + 1}: none of the {skipped} train images could be read or decoded (the warnings name "
                "them); check the manifest's paths and the storage credentials"
            )
        train_time = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum / seen if seen else float("nan"),
            "train_images": int(seen),
            "skipped_train": int(skipped),
            "lr": float(scheduler.get_last_lr()[0]),
            "train_time_s": train_time,
            "train_images_per_s": seen / train_time if train_time > 0 else float("nan"),
        }
        if rank == 0:
            metrics.update(_evaluate(bare, valid_shard, 2 * tc.batch_size, device))
            if metrics["valid_images"] == 0:
                raise ValueError(f"none of the {metrics['skipped_valid']} valid images could be read or decoded")
            metrics["epoch_time_s"] = time.perf_counter() - t0
            metrics["score"] = metrics["mean_task_auroc"] if math.isfinite(metrics["mean_task_auroc"]) else -1.0
            history.append(metrics)
            if skipped or metrics["skipped_valid"]:
                _rank0_print(
                    rank,
                    f"epoch {epoch + 1}: skipped {int(skipped)} train / {metrics['skipped_valid']} valid "
                    "images that could not be read or decoded (see the warnings naming them)",
                )
            _rank0_print(
                rank,
                f"epoch {epoch + 1}/{tc.epochs} train_loss {metrics['train_loss']:.4f} valid_loss "
                f"{metrics['valid_loss']:.4f} mean_task_auroc {metrics['mean_task_auroc']:.4f} "
                f"({metrics['epoch_time_s']:.1f} s, {metrics['train_images_per_s']:.1f} img/s)",
            )
            state = {
                "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "history": history,
                "starts": starts,
                "arch": cc.arch,
                "image_size": cc.image_size,
            }
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(state, os.path.join(tmp, STATE_FILE))
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"epoch_{epoch:04d}",
                )
        else:
            ray.train.report(metrics, checkpoint=None)


# ------------------------------------------------------------------------------------------------- the driver


def build_datasets(cfg: Config, train_manifest: str, valid_manifest: str) -> tuple[Any, Any, int, int]:
    """The Ray datasets the trainer streams: ``(train, valid, n_train_rows, n_valid_rows)``.

    Both are ``path + labels`` blocks -> (train only: per-epoch shuffle) -> decode stage (:func:`decode_batch`).
    """
    import ray.data

    tc = cfg.train_classifier
    datasets: list[Any] = []
    counts = []
    for manifest, what in ((train_manifest, "train"), (valid_manifest, "valid")):
        table = read_label_table(manifest, tc, what)
        counts.append(table.num_rows)
        blocks = [table.slice(i, ROWS_PER_BLOCK) for i in range(0, table.num_rows, ROWS_PER_BLOCK)]
        ds: Any = ray.data.from_arrow(blocks)
        if what == "train":
            # Metadata only: a full shuffle per epoch costs almost nothing before the pixels exist.
            ds = ds.random_shuffle()
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={
                "image_size": cfg.classifier.image_size,
                "uncertain_policy": tc.uncertain_policy if what == "train" else "ignore",
                "blank_policy": tc.blank_policy,
            },
            batch_format="numpy",
            batch_size=DECODE_BATCH,
            num_cpus=tc.decode_cpus,
        )
        datasets.append(ds)
    return datasets[0], datasets[1], counts[0], counts[1]


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

    Ray must already be initialised (``ray.init()``; the command and job do it). Re-running with the same
    ``out`` (or the same ``train_classifier.run_name`` and ``storage_path``) resumes the run at its next epoch;
    a run that already finished all epochs only re-exports ``out``.

    Args:
        cfg: the resolved configuration (``classifier`` and ``train_classifier`` sections are used).
        train_manifest, valid_manifest: Parquet manifests (``chexseg manifest``), local or URIs.
        out: the output checkpoint directory (local or URI).
        fault: deliberately fail one attempt (testing ``FailureConfig``); default from :data:`FAIL_ONCE_ENV`.
        verbose: print the final summary table.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError / KeyError: bad manifests or labels, naming the file and row.
        RuntimeError: training failed after ``max_failures`` retries (the Ray error is chained).
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    tc = cfg.train_classifier
    fault = fault or FaultInjection.from_env()
    storage, run_name = resolve_run(cfg, out)
    invocation = uuid.uuid4().hex
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_ds, valid_ds, n_train, n_valid = build_datasets(cfg, train_manifest, valid_manifest)
    if verbose:
        print(
            f"[train-classifier] {n_train} train / {n_valid} valid radiographs; {cfg.classifier.arch} at "
            f"{cfg.classifier.image_size} px; {tc.num_workers} worker(s) ({'GPU' if tc.use_gpu else 'CPU'}); "
            f"run {run_name!r} in {storage}",
            flush=True,
        )
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "n_train": n_train,
            "run": f"{storage}/{run_name}",
            "invocation": invocation,
            "fault": None if fault is None else {"marker": fault.marker, "epoch": fault.epoch},
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources
        ),
        datasets={"train": train_ds, "valid": valid_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=tc.num_to_keep, checkpoint_score_attribute="score", checkpoint_score_order="max"
            ),
        ),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as err:
        raise RuntimeError(f"training run {storage}/{run_name} failed: {err}") from err
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training run {storage}/{run_name} finished without a checkpoint")
    latest = _load_state(result.checkpoint)
    history: list[dict[str, Any]] = list(latest["history"])
    best = max(history, key=lambda m: (m["score"], -m["epoch"]))
    best_state = latest
    if best["epoch"] != latest["epoch"]:
        candidates = [c for c, m in (result.best_checkpoints or []) if m.get("epoch") == best["epoch"]]
        if not candidates:
            raise RuntimeError(
                f"training run {storage}/{run_name}: the checkpoint of the best epoch {best['epoch']} is gone; "
                "raise train_classifier.num_to_keep"
            )
        best_state = _load_state(candidates[0])
    starts = [dict(s) for s in latest["starts"]]
    mine = [int(s["epoch"]) for s in starts if s["invocation"] == invocation]
    # No attempt of this invocation reported anything: the run was already complete.
    start_epoch = min(mine) if mine else len(history)
    files = export(cfg, best_state, best, history, out, extra={"run": f"{storage}/{run_name}", "wall_time_s": wall})
    res = TrainResult(
        out=out,
        history=history,
        best_epoch=int(best["epoch"]),
        best_metrics=best,
        start_epoch=start_epoch,
        starts=[int(s["epoch"]) for s in starts],
        wall_time_s=wall,
        storage_path=storage,
        run_name=run_name,
        files=files,
    )
    if verbose:
        print(format_summary(res), flush=True)
    return res


def export(
    cfg: Config,
    state: dict[str, Any],
    best: dict[str, Any],
    history: list[dict[str, Any]],
    out: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write the pipeline checkpoint (best epoch) plus ``metrics.json``, ``metrics.csv`` and ``config.yaml``.

    Returns:
        ``{"checkpoint", "metrics_json", "metrics_csv", "config"}`` paths.
    """
    from chexseg_dist.checkpoint import save_checkpoint
    from chexseg_dist.models import create_classifier

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
    metrics_json = fsio.join(out, METRICS_JSON)
    with fsio.open_file(metrics_json, "w") as f:
        json.dump({"best_epoch": best["epoch"], "best": metrics, "epochs": history}, f, indent=2)
    metrics_csv = fsio.join(out, METRICS_CSV)
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with fsio.open_file(metrics_csv, "w") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    config_path = save_config(cfg, out, extra=extra)
    return {"checkpoint": out, "metrics_json": metrics_json, "metrics_csv": metrics_csv, "config": config_path}


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
        f"Wall time {res.wall_time_s:.1f} s (this invocation; started at epoch {res.start_epoch + 1}).",
        f"Checkpoint {res.out}; metrics {res.files.get('metrics_json', '')}; Ray run {res.storage_path}/{res.run_name}",
    ]
    return "\n".join(lines)
