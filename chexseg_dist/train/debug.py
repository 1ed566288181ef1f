"""A debug task on the shared loop: one linear layer fitted to an in-memory regression set.

torchtitan keeps tiny debug model configs so that end-to-end tests of its trainer are cheap; this is ours. It proves
the loop's own properties (resume by re-running, the identity refusal, the fault drill and the retry from the latest
checkpoint, best-epoch export, a non-finite loss stopping the run) in seconds, on real Ray Train workers, so the
classifier, the student and the affinity network are left to test what is theirs (AUROC, the expert ratio per
batch, failures tables).

The data are ``n_rows`` rows ``x ~ N(0, 1)^features``, ``y = x @ w_true`` (seeded), as Ray datasets from memory; the
model is ``nn.Linear(features, 1)`` trained with SGD on the mean squared error; an epoch's score is minus the
validation MSE, or ``scores[epoch]`` when the config lists scores (to put the best epoch where a test wants it).
The export is a directory: ``model.pt`` (the best epoch's state dict), ``metrics.json`` and ``metrics.csv``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from chexseg_dist.config.sections import TrainRunFields
from chexseg_dist.core import fsio
from chexseg_dist.train._loop import StepResult, TrainResult, TrainTask, WorkerContext, fit, write_history

DEBUG_WEIGHTS = "model.pt"


@dataclass
class DebugLoopConfig(TrainRunFields):
    """The loop's settings (the training sections' shared :class:`~chexseg_dist.config.sections.TrainRunFields`,
    with small defaults) and the debug task's own."""

    SECTION: ClassVar[str] = "train_debug"

    epochs: int = 2
    cpus_per_worker: float = 0.5
    torch_threads: int = 1
    max_failures: int = 0
    log_every_steps: int = 0
    features: int = 4
    n_rows: int = 64
    batch_size: int = 8
    lr: float = 0.05
    scores: list[float] = field(default_factory=list)
    """Each epoch's score instead of minus the validation MSE (empty: the MSE)."""

    def validate(self) -> None:
        self.validate_run()


class DebugTask(TrainTask):
    """One linear layer on an in-memory dataset (see the module docstring)."""

    name = "train-debug"

    def __init__(self, loop: DebugLoopConfig) -> None:
        self.loop = self.cfg = loop

    def _rows(self, n: int, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        w = np.random.default_rng(1234).normal(size=self.cfg.features).astype(np.float32)
        x = rng.normal(size=(n, self.cfg.features)).astype(np.float32)
        y = x @ w
        return [{"x": x[i], "y": np.float32(y[i]), "image_id": f"row{i:04d}"} for i in range(n)]

    # ---------------------------------------------------------------- driver
    def prepare(self) -> None:
        pass

    def datasets(self) -> dict[str, Any]:
        import ray.data

        return {
            "train": ray.data.from_items(self._rows(self.cfg.n_rows, self.cfg.seed)),
            "valid": ray.data.from_items(self._rows(16, self.cfg.seed + 1)),
        }

    def identity(self) -> dict[str, Any]:
        return {"task": "debug", "features": self.cfg.features}

    def export(
        self, state: Mapping[str, Any], best: Mapping[str, Any], history: list[dict[str, Any]], out: str, extra: dict
    ) -> dict[str, str]:
        fsio.makedirs(out)
        weights = fsio.join(out, DEBUG_WEIGHTS)
        with fsio.open_file(weights, "wb") as f:
            torch.save(dict(state["model"]), f)
        return {"weights": weights, **write_history(out, best, history)}

    # ---------------------------------------------------------------- worker
    def steps_per_epoch(self, world: int) -> int:
        return max(1, self.cfg.n_rows // world // self.cfg.batch_size)

    def build(self, steps_per_epoch: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        model = nn.Linear(self.cfg.features, 1)
        return model, torch.optim.SGD(model.parameters(), lr=self.cfg.lr), None

    def train_batches(self, shards: Mapping[str, Any], ctx: WorkerContext) -> Iterator[Any]:
        return iter(shards["train"].iter_batches(batch_size=self.cfg.batch_size, batch_format="numpy"))

    def train_step(self, model: nn.Module, batch: Any, ctx: WorkerContext) -> StepResult:
        x = torch.from_numpy(np.asarray(batch["x"], dtype=np.float32)).to(ctx.device)
        y = torch.from_numpy(np.asarray(batch["y"], dtype=np.float32)).to(ctx.device)
        loss = nn.functional.mse_loss(model(x).squeeze(1), y)
        return StepResult(loss=loss, images=int(x.shape[0]), ids=[str(i) for i in batch["image_id"]])

    def validate(self, model: nn.Module, shards: Mapping[str, Any], ctx: WorkerContext) -> dict[str, Any]:
        if ctx.rank != 0:
            return {}
        parts = list(shards["valid"].iter_batches(batch_size=1024, batch_format="numpy"))
        x = torch.from_numpy(np.concatenate([p["x"] for p in parts]).astype(np.float32)).to(ctx.device)
        y = torch.from_numpy(np.concatenate([p["y"] for p in parts]).astype(np.float32)).to(ctx.device)
        model.eval()
        with torch.no_grad():
            mse = float(nn.functional.mse_loss(model(x).squeeze(1), y))
        scores = self.cfg.scores
        return {"valid_mse": mse, "score": float(scores[ctx.epoch]) if ctx.epoch < len(scores) else -mse}


def train_debug(loop: DebugLoopConfig, out: str, **kwargs: Any) -> TrainResult:
    """Train the debug task into ``out`` (``fit``'s keyword arguments: ``fault``)."""
    return fit(DebugTask(loop), os.fspath(out), default_name="debug", **kwargs)
