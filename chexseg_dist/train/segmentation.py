"""The segmentation student (CheXseg) as a training task on the shared loop (``chexseg train-segmentation``).

Modes (``train_segmentation.mode``), the paper's supervision levels:

- ``weak``: pseudo-labelled images only (masks derived from the classifier's stored Grad-CAM grids).
- ``full``: expert-train only.
- ``semi``: both, ``round(w * B)`` (``exact``) or Bernoulli(w) (``bernoulli``) expert rows per batch per worker.
- ``distill``: the pseudo set's images with a trained ``full`` teacher's soft outputs as targets: sigmoid
  cross-entropy of ``student / T`` against ``sigmoid(teacher / T)``; the teacher runs on the worker, nothing is stored.

How the data reach a worker:

1. The driver reads the expert set (:func:`~chexseg_dist.data.expert.load_expert_set`: manifest + CheXlocalize JSON,
   split patient-disjoint into expert-train and expert-select), the pseudo set
   (:func:`~chexseg_dist.train.pseudo_set.load_pseudo_set`: the map store's done rows joined to their manifest) and
   refuses any patient shared between expert-train, expert-select, pseudo and the held-out test manifest.
2. ``expert_train`` and ``expert_select`` reach every worker whole (the one decode stage, then the masks to the
   student's frame through the one :class:`~chexseg_dist.core.geometry.Letterbox`); a worker keeps expert-train in
   memory as an :class:`~chexseg_dist.train.mixing.ExpertPool`. The pseudo set is dealt out by store chunk, one
   dataset per worker (``pseudo_<r>``), read one task per chunk, masks made on the fly by
   :class:`~chexseg_dist.masks.MaskMaker` in the student's frame, drawn as a :class:`~chexseg_dist.train.mixing.
   RowStream` that persists across epochs (an epoch is a number of steps, not a pass).
3. Every step on every worker takes its expert rows from the pool and the rest from its stream (per-row loss
   weights: the source weight, times 0 for a channel left out by ``ignore_uncertain``).

Each epoch rank 0 predicts expert-select and chooses, per pathology, the output threshold on the sigmoid that
maximises the **full-mode** mIoU in the student's frame (pairs where exactly one mask is empty count 0; never
tp-only, which rewards emptying hard predictions) over ``t = k / threshold_steps``, with the shared tuning tables
(:class:`~chexseg_dist.masks.tuning.TuningTable`) and evaluator conventions. The epoch's score is the mean of those
per-pathology mIoUs over the pathologies with an expert-select positive; the best epoch is exported with its
thresholds (:func:`~chexseg_dist.models.segmentation.save_segmentation`) plus ``metrics.json``, ``metrics.csv``,
``config.yaml`` and ``failures.csv`` when images were left out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from chexseg_dist.config import Config, save_config
from chexseg_dist.core import fsio
from chexseg_dist.core.console import say
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_TASKS, TASKS
from chexseg_dist.core.registry import MIXING_POLICIES, SEGMENTATION_LOSSES
from chexseg_dist.core.runs import new_run_id
from chexseg_dist.data.expert import ExpertSet, check_mask_sizes, load_expert_set
from chexseg_dist.data.manifest import read_manifest
from chexseg_dist.errors import CheckpointError, ConfigError, InputError, TrainingError
from chexseg_dist.masks.maker import MaskMaker
from chexseg_dist.masks.recipe import check_store, student_maker
from chexseg_dist.masks.tuning import choose_output_thresholds
from chexseg_dist.metrics.sweep import ThresholdSweep
from chexseg_dist.models.checkpoint import read_meta
from chexseg_dist.models.segmentation import (
    autocast,
    create_segmentation,
    init_encoder_from_classifier,
    load_segmentation,
    predict_probs,
    read_segmentation_meta,
    save_segmentation,
)
from chexseg_dist.train._loop import (
    FaultInjection,
    StepResult,
    TrainResult,
    TrainTask,
    WorkerContext,
    fit,
    read_run_failures,
    resolve_run,
    write_failures,
    write_history,
)
from chexseg_dist.train.augment import augment_pair
from chexseg_dist.train.losses import distillation_loss
from chexseg_dist.train.mixing import ExpertPool, RowStream
from chexseg_dist.train.pseudo_set import PseudoSet, check_disjoint, load_pseudo_set
from chexseg_dist.train.student_data import (
    collect_shard,
    expert_dataset,
    pseudo_dataset,
    refined_key_for,
    step_batch,
)
from chexseg_dist.train.student_report import effective_ratio, format_summary

#: Which sources a mode draws training rows from: (expert-train, pseudo-labelled).
SOURCES: dict[str, tuple[bool, bool]] = {
    "weak": (False, True),
    "full": (True, False),
    "semi": (True, True),
    "distill": (False, True),
}
#: Where decode failures are recorded, one table per manifest-and-role (``<run>/failures/<split>``).
FAILURE_SPLITS = ("expert_train", "expert_select", "pseudo")
#: Rows per batch a worker pulls from its pseudo stream, and its local shuffle buffer.
STREAM_BATCH = 32
SHUFFLE_BUFFER = 256
#: Metric prefix of the per-epoch histogram of expert rows per batch (``experts_per_batch/<k>``: batches).
HISTOGRAM = "experts_per_batch/"


@dataclass
class StudentInputs:
    """What the student trains on (paths local or URIs).

    Attributes:
        expert_manifest: the expert images' Parquet manifest (phantom data: the valid split).
        expert_annotations: their expert masks (CheXlocalize segmentation or polygon JSON).
        pseudo_store: the pseudo-labelled images' map store (weak, semi, distill).
        pseudo_manifest: the manifest that store was written for.
        thresholds: tuned thresholds (``chexseg tune-thresholds`` on expert-train) for ``masks.strategy=tuned``.
        holdout_manifest: a manifest whose patients must not appear in training (the test split).
        expert_limit: keep only this many expert-train images (the expert-set-size curve; same selection split).
    """

    expert_manifest: str
    expert_annotations: str
    pseudo_store: str = ""
    pseudo_manifest: str = ""
    thresholds: str = ""
    holdout_manifest: str = ""
    expert_limit: int | None = None


def _patients(table: pa.Table) -> set[str]:
    return {str(p) for p in table.column("patient_id").to_pylist()}


class SegmentationTask(TrainTask):
    """The student on the shared loop (see the module docstring).

    Args:
        cfg: the resolved config (``segmentation``, ``train_segmentation`` and ``masks`` sections are used).
        inputs: the expert set, pseudo set and held-out manifest.
        failures_dir: where the decode stages record the images they leave out (shared storage on a cluster).
        run_id: recorded with those failures.
    """

    name = "train-segmentation"
    split_datasets: tuple[str, ...] = ()

    def __init__(self, cfg: Config, inputs: StudentInputs, failures_dir: str, run_id: str) -> None:
        self.cfg = cfg
        self.ts = cfg.train_segmentation
        self.loop = self.ts
        self.model_cfg = cfg.segmentation
        self.inputs = inputs
        self.failures_dir, self.run_id = failures_dir, run_id
        self.uses_expert, self.uses_pseudo = SOURCES[self.ts.mode]
        self.n_expert_train = self.n_select = self.n_pseudo = 0
        self.pseudo_failed = self.pseudo_pending = 0
        self.maker: MaskMaker | None = None
        self.refined_key: str | None = None  # read the pseudo-masks from the store's refined/<key> (chexseg refine)
        self._expert: ExpertSet | None = None
        self._pseudo: PseudoSet | None = None
        # Worker state (never pickled): built on first use inside the worker.
        self._pool: ExpertPool | None = None
        self._stream: RowStream | None = None
        self._select: dict[str, np.ndarray] | None = None
        self._teacher: nn.Module | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_expert", "_pseudo", "_pool", "_stream", "_select", "_teacher"):
            state[name] = None  # the data travel as Ray datasets; worker state is rebuilt in the worker
        return state

    # ---------------------------------------------------------------- driver
    def prepare(self) -> None:
        """Check every input before Ray starts: a refused run leaves nothing behind.

        Raises:
            ConfigError: inputs the mode needs are missing, exact mixing cannot hold the ratio, tuned masks without
                thresholds.
            CheckpointError: a teacher or ``encoder_init`` of another architecture or size.
            AnnotationError, StoreError, InputError: the expert set, the pseudo set, or a patient in two sets.
        """
        ts, inputs = self.ts, self.inputs
        if ts.mode == "semi":
            self.mixing_policy(rank=0)  # refuses round(w * B) in {0, B} for exact mixing
        if ts.mode == "distill":
            self._check_teacher()
        if self.model_cfg.encoder_init:
            self._check_encoder_init()
        if self.uses_pseudo and not (inputs.pseudo_store and inputs.pseudo_manifest):
            raise ConfigError(
                f"train_segmentation.mode={ts.mode} trains on the pseudo-labelled set: pass --pseudo-store S.zarr and "
                "--pseudo-manifest M.parquet (the store chexseg pseudolabel wrote and its manifest)"
            )
        if ts.mode in ("weak", "semi"):
            self.maker = student_maker(self.cfg, inputs.thresholds or None)
        expert = load_expert_set(
            inputs.expert_manifest,
            inputs.expert_annotations,
            ts.select_fraction,
            ts.seed,
            frontal_only=True,
            limit_train=inputs.expert_limit,
        )
        check_mask_sizes(expert.train, expert.source)
        check_mask_sizes(expert.select, expert.source)
        if expert.select.num_rows == 0:
            raise InputError(
                f"{inputs.expert_manifest}: train_segmentation.select_fraction={ts.select_fraction} leaves no "
                "expert-select image to choose the epoch and the output thresholds on; raise it"
            )
        groups = {"expert-train": _patients(expert.train), "expert-select": _patients(expert.select)}
        if self.uses_pseudo:
            self._pseudo = load_pseudo_set(inputs.pseudo_store, inputs.pseudo_manifest)
            if self.maker is not None:
                from chexseg_dist.store.mapstore import MapStore

                store = MapStore.open(self._pseudo.store)
                check_store(self.cfg, inputs.thresholds or None, store)
                if self.maker.refines:
                    slots = np.asarray(self._pseudo.rows.column("slot"), dtype=np.int64)
                    self.refined_key = refined_key_for(self.cfg, inputs.thresholds or None, store, slots, self.name)
            groups["pseudo"] = _patients(self._pseudo.rows)
            self.n_pseudo = len(self._pseudo)
            self.pseudo_failed, self.pseudo_pending = self._pseudo.failed, self._pseudo.pending
        if inputs.holdout_manifest:
            groups["test"] = _patients(read_manifest(inputs.holdout_manifest))
        check_disjoint(groups)
        self._expert = expert
        self.n_expert_train = expert.train.num_rows if self.uses_expert else 0
        self.n_select = expert.select.num_rows

    def _check_teacher(self) -> None:
        teacher = self.ts.teacher
        if not teacher:
            raise ConfigError(
                "train_segmentation.mode=distill needs a teacher: --set train_segmentation.teacher=CKPT (a trained "
                "full-mode segmentation checkpoint)"
            )
        meta = read_segmentation_meta(teacher)
        mine = (self.model_cfg.arch, self.model_cfg.encoder, self.model_cfg.image_size)
        theirs = (meta["arch"], meta["encoder"], int(meta["image_size"]))
        if mine != theirs:
            raise CheckpointError(
                f"train_segmentation.teacher={teacher} is {theirs[0]}/{theirs[1]} at {theirs[2]} px but the student is "
                f"{mine[0]}/{mine[1]} at {mine[2]} px; distil into the teacher's architecture and size"
            )

    def _check_encoder_init(self) -> None:
        path = self.model_cfg.encoder_init
        arch = read_meta(path)["arch"]
        if arch != self.model_cfg.encoder:
            raise CheckpointError(
                f"segmentation.encoder_init={path} is a {arch} classifier; it cannot initialise a "
                f"{self.model_cfg.encoder} encoder: train a {self.model_cfg.encoder} classifier or set "
                f"segmentation.encoder={arch}"
            )

    def mixing_policy(self, rank: int) -> Any:
        """The configured mixing policy for one worker (semi)."""
        ts = self.ts
        return MIXING_POLICIES.get(ts.mixing, "train_segmentation.mixing")(
            ts.expert_ratio, ts.batch_size, ts.seed, rank
        )

    def datasets(self) -> dict[str, Any]:
        assert self._expert is not None, "prepare() first"
        out: dict[str, Any] = {}
        if self.uses_expert:
            out["expert_train"] = self._expert_dataset(self._expert.train, "expert_train")
        out["expert_select"] = self._expert_dataset(self._expert.select, "expert_select")
        if self.uses_pseudo:
            assert self._pseudo is not None
            for rank, share in enumerate(self._pseudo.shares(self.ts.num_workers)):
                out[f"pseudo_{rank}"] = self._pseudo_dataset(share)
        return out

    def _expert_dataset(self, table: pa.Table, split: str) -> Any:
        return expert_dataset(
            table, self.model_cfg.image_size, self.ts.decode_cpus, fsio.join(self.failures_dir, split), self.run_id
        )

    def _pseudo_dataset(self, share: list[pa.Table]) -> Any:
        assert self._pseudo is not None
        return pseudo_dataset(
            share,
            self._pseudo.store,
            self.refined_key,
            self.maker,
            self.ts.ignore_uncertain,
            self.model_cfg.image_size,
            self.ts.decode_cpus,
            fsio.join(self.failures_dir, "pseudo"),
            self.run_id,
        )

    def identity(self) -> dict[str, Any]:
        m = self.model_cfg
        return {
            "task": self.name,
            "mode": self.ts.mode,
            "arch": m.arch,
            "encoder": m.encoder,
            "image_size": m.image_size,
        }

    def describe(self) -> str:
        ts, m = self.ts, self.model_cfg
        parts = [f"mode {ts.mode}"]
        if self.uses_expert:
            parts.append(f"{self.n_expert_train} expert-train image(s)")
        parts.append(f"{self.n_select} expert-select image(s)")
        if self.uses_pseudo:
            left = f"; {self.pseudo_failed} failed and {self.pseudo_pending} pending rows left out"
            parts.append(
                f"{self.n_pseudo} pseudo-labelled image(s){left if self.pseudo_failed or self.pseudo_pending else ''}"
            )
        if ts.mode == "semi":
            parts.append(f"w = {ts.expert_ratio} ({ts.mixing})")
        device = "GPU" if self.use_gpu else "CPU"
        parts.append(
            f"{m.arch}/{m.encoder} at {m.image_size} px, batch {ts.batch_size}, {self.steps_per_epoch(ts.num_workers)} "
            f"steps x {ts.epochs} epochs on {ts.num_workers} worker(s) ({device})"
        )
        return "; ".join(parts)

    def export(
        self, state: Mapping[str, Any], best: Mapping[str, Any], history: list[dict[str, Any]], out: str, extra: dict
    ) -> dict[str, str]:
        m = self.model_cfg
        kw = {}
        if m.encoder_init:  # the copied backbone came with its classifier's normalisation
            norm = read_meta(m.encoder_init)["normalisation"]
            kw = {"mean": norm["mean"], "std": norm["std"]}
        model = create_segmentation(m.arch, m.encoder, **kw)
        model.load_state_dict(state["model"])
        metrics = dict(best)
        metrics["mode"] = self.ts.mode
        metrics["expert_ratio_effective"] = effective_ratio(history)
        thresholds = [best[f"threshold/{t}"] for t in TASKS]
        files = {"checkpoint": out, **write_history(out, metrics, history)}
        failures = write_failures(out, self.failures_dir, FAILURE_SPLITS)
        if failures:
            files["failures"] = failures
        files["config"] = save_config(self.cfg, out, extra=extra)
        # Last: segmentation.json marks a finished export (chexseg experiment reuses a student when it exists).
        save_segmentation(
            out, model, image_size=m.image_size, thresholds=thresholds, config=self.cfg.to_dict(), metrics=metrics
        )
        return files

    # ---------------------------------------------------------------- worker
    def steps_per_epoch(self, world: int) -> int:
        ts = self.ts
        if ts.steps_per_epoch:
            return ts.steps_per_epoch
        rows = self.n_expert_train + (self.n_pseudo if self.uses_pseudo else 0)
        return max(1, math.ceil(rows / world / ts.batch_size))

    def build(self, steps_per_epoch: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        m = self.model_cfg
        model = create_segmentation(m.arch, m.encoder)
        if m.encoder_init:
            init_encoder_from_classifier(model, m.encoder_init)
        return model, torch.optim.Adam(model.parameters(), lr=self.ts.lr), None

    def _experts_in(self, policy: Any, step: int) -> int:
        if self.ts.mode == "full":
            return self.ts.batch_size
        if self.ts.mode == "semi":
            return int(policy.experts(step))
        return 0

    def _sources(self, shards: Mapping[str, Any], ctx: WorkerContext) -> None:
        """Build this worker's expert pool and pseudo stream on first use (they persist across epochs)."""
        if self.uses_expert and self._pool is None:
            rows = collect_shard(shards["expert_train"])
            if not rows:
                raise TrainingError(
                    "no expert-train image could be read or decoded (the failures table names them); check the "
                    "expert manifest's paths"
                )
            self._pool = ExpertPool(rows, self.ts.seed, ctx.rank)
        if self.uses_pseudo and self._stream is None:
            shard = shards[f"pseudo_{ctx.rank}"]
            seed = self.ts.seed * 1000 + ctx.rank

            def restart() -> Iterator[Mapping[str, np.ndarray]]:
                return iter(
                    shard.iter_batches(
                        batch_size=STREAM_BATCH,
                        batch_format="numpy",
                        local_shuffle_buffer_size=SHUFFLE_BUFFER,
                        local_shuffle_seed=seed + (self._stream.passes if self._stream else 0),
                    )
                )

            self._stream = RowStream(restart, f"pseudo-labelled share of worker {ctx.rank}")

    def train_batches(self, shards: Mapping[str, Any], ctx: WorkerContext) -> Iterator[Any]:
        self._sources(shards, ctx)
        ts = self.ts
        policy = self.mixing_policy(ctx.rank) if ts.mode == "semi" else None
        steps = self.steps_per_epoch(ctx.world)
        for step in range(steps):
            k = self._experts_in(policy, ctx.epoch * steps + step)
            parts = []
            if k:
                assert self._pool is not None
                rows = self._pool.take(k)
                weights = np.full((k, N_TASKS), ts.expert_weight, dtype=np.float32)
                parts.append(
                    {"image_id": rows["image_id"], "frame": rows["frame"], "masks": rows["masks"], "weights": weights}
                )
            if ts.batch_size - k:
                assert self._stream is not None
                rows = self._stream.take(ts.batch_size - k)
                part = {"image_id": rows["image_id"], "frame": rows["frame"]}
                part["weights"] = np.asarray(rows["weights"], dtype=np.float32) * np.float32(ts.pseudo_weight)
                if "masks" in rows:
                    part["masks"] = rows["masks"]
                parts.append(part)
            yield step_batch(parts, k, ctx.device)

    def _teacher_on(self, device: torch.device) -> nn.Module:
        if self._teacher is None:
            self._teacher = load_segmentation(self.ts.teacher, device).model
        return self._teacher

    def train_step(self, model: nn.Module, batch: Any, ctx: WorkerContext) -> StepResult:
        ts = self.ts
        x = batch["image"].unsqueeze(1).float().div_(255.0)
        masks = batch.get("masks")
        if ts.augment:
            x, masks = augment_pair(x, masks, ts, ctx.generator)
        n, k = int(x.shape[0]), int(batch["experts"])
        with autocast(ctx.device, ts.amp):
            logits = model(x)
        if ts.mode == "distill":
            with torch.no_grad(), autocast(ctx.device, ts.amp):
                teacher_logits = self._teacher_on(ctx.device)(x)
            loss = distillation_loss(logits, teacher_logits, ts.distill_temperature)
            parts = {"expert_rows": 0.0, "pseudo_rows": float(n), "pseudo_loss_sum": float(loss.detach()) * n}
            return StepResult(loss=loss, images=n, parts=parts, ids=batch["ids"])
        assert masks is not None
        loss_fn = SEGMENTATION_LOSSES.get(ts.loss, "train_segmentation.loss")
        weights = batch["weights"]
        loss = loss_fn(logits, masks, weights)
        parts = {"expert_rows": float(k), "pseudo_rows": float(n - k), f"{HISTOGRAM}{k}": 1.0}
        with torch.no_grad():  # the loss of each source alone, for the progress line
            if k:
                parts["expert_loss_sum"] = float(loss_fn(logits[:k], masks[:k], weights[:k])) * k
            if n - k:
                parts["pseudo_loss_sum"] = float(loss_fn(logits[k:], masks[k:], weights[k:])) * (n - k)
        return StepResult(loss=loss, images=n, parts=parts, ids=batch["ids"])

    def part_keys(self) -> list[str]:
        sources = ["expert_rows", "pseudo_rows", "expert_loss_sum", "pseudo_loss_sum"]
        return sources + [f"{HISTOGRAM}{k}" for k in range(self.ts.batch_size + 1)]

    def part_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        images = sums.get("images", 0.0)
        e, p = sums.get("expert_rows", 0.0), sums.get("pseudo_rows", 0.0)
        out = {"expert_share": e / images if images else float("nan")}
        out["train_loss_expert"] = sums.get("expert_loss_sum", 0.0) / e if e else float("nan")
        out["train_loss_pseudo"] = sums.get("pseudo_loss_sum", 0.0) / p if p else float("nan")
        out["train_expert_rows"], out["train_pseudo_rows"] = e, p
        # Batches by their number of expert rows, over all workers: one bar under exact mixing.
        out.update({k: v for k, v in sums.items() if k.startswith(HISTOGRAM) and v})
        return out

    def progress(self, sums: Mapping[str, float]) -> str:
        m = self.part_metrics(sums)
        words = []
        if sums.get("expert_rows"):
            words.append(f"expert {m['train_loss_expert']:.4f}")
        if sums.get("pseudo_rows"):
            words.append(f"{'teacher' if self.ts.mode == 'distill' else 'pseudo'} {m['train_loss_pseudo']:.4f}")
        if self.ts.mode == "semi":
            words.append(f"expert share {m['expert_share']:.3f}")
        return "(" + ", ".join(words) + ")" if words else ""

    def validate(self, model: nn.Module, shards: Mapping[str, Any], ctx: WorkerContext) -> dict[str, Any]:
        if ctx.rank != 0:
            return {}
        if self._select is None:
            self._select = collect_shard(shards["expert_select"])
            if not self._select:
                raise TrainingError("no expert-select image could be read or decoded (the failures table names them)")
        sel = self._select
        t0 = time.perf_counter()
        probs = predict_probs(model, sel["frame"], 2 * self.ts.batch_size, ctx.device, self.ts.amp)
        sweep = ThresholdSweep(self.ts.threshold_steps)
        sweep.process([str(i) for i in sel["image_id"]], probs, sel["masks"], Letterbox.content_masks(sel["letterbox"]))
        chosen = choose_output_thresholds(sweep.evaluate())
        metrics: dict[str, Any] = {
            "score": chosen["score"],
            "select_miou_full": chosen["score"],
            "select_miou_tp": float(np.nanmean(chosen["miou_tp"])) if np.isfinite(chosen["miou_tp"]).any() else 0.0,
            "select_images": len(sel["image_id"]),
            "select_time_s": time.perf_counter() - t0,
        }
        for k, task in enumerate(TASKS):
            metrics[f"threshold/{task}"] = float(chosen["thresholds"][k])
            metrics[f"select_iou/{task}"] = _num(chosen["miou_full"][k])
            metrics[f"select_positives/{task}"] = int(chosen["positives"][k])
        metrics["failed_images"] = len(read_run_failures(self.failures_dir, FAILURE_SPLITS))
        return metrics

    def epoch_line(self, epoch: int, metrics: Mapping[str, Any]) -> str:
        ts = self.ts
        sources = []
        if metrics.get("train_expert_rows"):
            sources.append(f"expert {metrics['train_loss_expert']:.4f}")
        if metrics.get("train_pseudo_rows"):
            sources.append(f"{'teacher' if ts.mode == 'distill' else 'pseudo'} {metrics['train_loss_pseudo']:.4f}")
        share = f" expert share {metrics['expert_share']:.3f}" if ts.mode == "semi" else ""
        skipped = f", {metrics['failed_images']} unreadable image(s) left out" if metrics.get("failed_images") else ""
        return (
            f"epoch {epoch + 1}/{ts.epochs} train_loss {metrics['train_loss']:.4f} ({', '.join(sources)}){share} "
            f"select mIoU full {metrics['select_miou_full']:.4f} tp-only {metrics['select_miou_tp']:.4f} "
            f"({metrics['epoch_time_s']:.1f} s, {metrics['train_images_per_s']:.1f} img/s{skipped})"
        )


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def train_segmentation(
    cfg: Config, inputs: StudentInputs, out: str, *, fault: FaultInjection | None = None, verbose: bool = True
) -> TrainResult:
    """Train the student with Ray Train and write the best epoch as a segmentation checkpoint into ``out``.

    Starts a local Ray (or attaches to the cluster, under ``ray job submit``) unless Ray is running, once every
    input has been checked. Re-running with the same ``out`` (or ``train_segmentation.run_name`` and
    ``storage_path``) resumes the run at its next epoch; a run of another mode, architecture, encoder or size is
    refused.

    Raises:
        ChexsegError: bad input (naming the file, row, id or field) or a resumed run of another identity.
        RuntimeError: training failed after ``max_failures`` retries (the Ray error is chained).
    """
    storage, run_name = resolve_run(cfg.train_segmentation, out, "segmentation")
    run_id = new_run_id()
    task = SegmentationTask(cfg, inputs, fsio.join(storage, run_name, "failures"), run_id)
    result = fit(task, out, fault=fault, default_name="segmentation")
    if verbose:
        say(format_summary(result, cfg.train_segmentation.mode))
    return result
