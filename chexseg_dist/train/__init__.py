"""Training on Ray Train: one shared loop (resume, checkpoints, retries, fault drill, progress) and the tasks that
plug into it (the saliency classifier and the segmentation student)."""

from chexseg_dist.train._loop import (
    FAIL_ONCE_ENV,
    FaultInjection,
    StepResult,
    TrainResult,
    TrainTask,
    WorkerContext,
    fit,
    resolve_run,
)
from chexseg_dist.train.augment import augment_batch
from chexseg_dist.train.classifier import ClassifierTask, export_classifier, format_summary, train_classifier
from chexseg_dist.train.schedules import create_scheduler

__all__ = [
    "FAIL_ONCE_ENV",
    "ClassifierTask",
    "FaultInjection",
    "StepResult",
    "TrainResult",
    "TrainTask",
    "WorkerContext",
    "augment_batch",
    "create_scheduler",
    "export_classifier",
    "fit",
    "format_summary",
    "resolve_run",
    "train_classifier",
]
