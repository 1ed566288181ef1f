"""What a pseudo-labelling run did: the summary line, the exit status and where the time went."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from chexseg_dist.core.console import say


@dataclass
class PseudolabelSummary:
    """Outcome of one :func:`run_pseudolabel` call.

    Attributes:
        store: the map store URI.
        total: images in the store.
        processed: rows written by this run.
        skipped: rows already done before this run's model stage (never recomputed), including rows recovered
            from fragments an interrupted run left.
        recovered: of ``skipped``, rows committed from an interrupted run's fragments.
        failed: rows that failed in this run (see the failures table).
        failed_before: rows that failed in an earlier run and were not retried (``pseudolabel.retry_failed``).
        seconds: wall time of the pipeline, from building the dataset to the last commit (actor start-up
            included, ``ray.init`` not; 0 when there was nothing to do).
        images_per_s: ``(processed + failed) / seconds``.
        model_started: whether the classifier actors were started.
        operators: executed Ray Data operators (from ``Dataset.stats()``), empty when nothing ran.
        run_id: this run's id.
        busy_s: seconds each operator's tasks or actors spent working, summed over them (from
            ``Dataset.stats()``; empty when nothing ran). See :meth:`stage_line`.
        num_actors: the classifier actor pool's size.
        gpus_per_actor: the GPUs each actor had (``pseudolabel.gpus_per_actor``, ``auto`` resolved on the cluster).
    """

    store: str
    total: int
    processed: int
    skipped: int
    recovered: int
    failed: int
    failed_before: int
    seconds: float
    images_per_s: float
    model_started: bool
    operators: list[str]
    run_id: str
    busy_s: dict[str, float] = field(default_factory=dict)
    num_actors: int = 1
    gpus_per_actor: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 unless there was work and none of it succeeded."""
        todo = self.total - self.skipped - self.failed_before
        return 1 if todo > 0 and self.processed == 0 else 0

    def line(self) -> str:
        extra = f", {self.failed_before} failed earlier (not retried)" if self.failed_before else ""
        return (
            f"pseudolabel: processed {self.processed}, skipped {self.skipped} (already done), failed {self.failed}"
            f"{extra}, {self.images_per_s:.1f} images/s; store {self.store}"
        )

    def actor_utilisation(self) -> float | None:
        """Share of the run the classifier actors spent on batches (start-up counts as idle); None if unknown.

        Near 1: the model stage is the bottleneck (add actors or GPUs). Well below 1 on a long run: the actors waited
        for decoded frames (add decode CPUs) or for their own start-up (short runs).
        """
        busy = next((v for k, v in self.busy_s.items() if "ClassifierPredictor" in k), None)
        if busy is None or self.seconds <= 0:
            return None
        return busy / (self.seconds * max(1, self.num_actors))

    def stage_line(self) -> str:
        """Where the time went, e.g. ``decode_frames 1.9 s, ClassifierPredictor 5.0 s (actors busy 43% of the run)``."""
        parts = []
        for op, busy in self.busy_s.items():
            if op.startswith("FromArrow"):  # handing the manifest slice to Ray: no work
                continue
            name = op.removeprefix("MapBatches(").removesuffix(")")
            parts.append(f"{name} {busy:.1f} s" if busy >= 1 else f"{name} {busy:.2f} s")
        util = self.actor_utilisation()
        tail = "" if util is None else f"; classifier actors busy {100 * util:.0f}% of the {self.seconds:.1f} s run"
        return f"pseudolabel: busy time per stage (summed over tasks): {', '.join(parts)}{tail}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TOTAL = re.compile(r"([0-9.]+)(us|ms|s) total")


_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def operator_busy_seconds(stats: str) -> dict[str, float]:
    """Each operator's summed remote wall time (``* Remote wall time: ... X total``) from ``Dataset.stats()`` text."""
    busy: dict[str, float] = {}
    current = None
    for line in stats.splitlines():
        line = line.strip()
        names = pipeline_operators(line)
        if names:
            current = names[0]
        elif current is not None and line.startswith("* Remote wall time:"):
            match = _TOTAL.search(line)
            if match:
                busy[current] = busy.get(current, 0.0) + float(match.group(1)) * _UNIT_S[match.group(2)]
    return busy


def pipeline_operators(stats: str) -> list[str]:
    """Operator names from ``Dataset.stats()`` text, e.g. ``["MapBatches(decode_frames)", ...]``.

    A fused stage shows as one name joined by ``->``; the pseudo-labelling pipeline must list ``decode_frames`` and
    ``ClassifierPredictor`` as separate operators.
    """
    names = []
    for line in stats.splitlines():
        line = line.strip()
        if line.startswith("Operator ") and ":" in line:
            head = line.split(":", 1)[0]
            parts = head.split(" ", 2)
            if len(parts) == 3:
                names.append(parts[2])
    return names


def main_summary(summary: PseudolabelSummary) -> int:
    """Print the one-line summary and return the exit status."""
    say(summary.line())
    return summary.exit_code
