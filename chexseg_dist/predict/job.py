"""``chexseg segment``: a trained student over a manifest -> CheXlocalize segmentation JSON at original size.

The pipeline (the shape of pseudo-labelling's):

1. The driver reads the manifest, keeps frontal views under the one view rule and hands Ray Data ``row``,
   ``image_id`` and ``path`` in blocks of ``segment.images_per_decode_task`` rows.
2. CPU tasks run the one read-and-decode stage at the student's frame size; a fixed pool of
   :class:`~chexseg_dist.predict.predictor.SegmentationPredictor` actors (GPU where configured) computes the
   sigmoid outputs in the frame.
3. CPU tasks (:func:`encode_predictions`) take each image's probabilities back to its original size through the one
   :class:`~chexseg_dist.core.geometry.Letterbox` (bilinear, the exact inverse of the letterbox), one pathology at a
   time (ten float32 maps at 2,800 x 2,300 are 260 MB), threshold them with the checkpoint's per-pathology output
   thresholds (``p > t``, the rule they were chosen with) and encode COCO RLEs.
4. The driver streams the entries into the output JSON (published atomically when complete): memory stays flat in
   the manifest's size. Images that cannot be read or decoded are left out and listed, with their reason, in
   ``<out>.failures.csv``; the rest is written.

Probabilities travel between the actors and the encoding tasks as float16 (half the object-store traffic); a
pixel within ~5e-4 of its threshold may therefore fall on the other side of it.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from chexseg_dist.config import Config, SegmentConfig, save_config
from chexseg_dist.core import fsio
from chexseg_dist.core.console import format_seconds, say
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import TASKS
from chexseg_dist.core.ray_env import actor_gpus, cluster_resources, pool_problem, ray_can_grow, ray_session
from chexseg_dist.data.chexlocalize import encode_mask
from chexseg_dist.data.frames import with_decode_stage
from chexseg_dist.data.manifest import read_manifest, select_views
from chexseg_dist.errors import InputError
from chexseg_dist.models.segmentation import load_segmentation
from chexseg_dist.predict.predictor import SegmentationPredictor

FAILURES_SUFFIX = ".failures.csv"
CONFIG_SUFFIX = ".config.yaml"


@dataclass
class SegmentSummary:
    """What a ``chexseg segment`` run did.

    Attributes:
        out: the written segmentation JSON.
        images: images written; failed: images left out (listed in ``failures``).
        positives: per pathology, the images with a non-empty mask.
        seconds, images_per_s: the pipeline's wall time and throughput.
        gpus_per_actor: the GPUs each actor had (``segment.gpus_per_actor``, ``auto`` resolved on the cluster).
    """

    out: str
    images: int = 0
    failed: int = 0
    positives: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    failures: str | None = None
    gpus_per_actor: float = 0.0

    def line(self) -> str:
        share = ", ".join(f"{t} {self.positives.get(t, 0)}" for t in TASKS)
        left = f"; {self.failed} unreadable image(s) left out, listed in {self.failures}" if self.failed else ""
        return (
            f"segment: wrote {self.images} images to {self.out} in {self.seconds:.1f} s ({self.images_per_s:.1f} "
            f"images/s){left}\nsegment: images with a non-empty mask per pathology: {share}"
        )


def encode_predictions(batch: dict[str, np.ndarray], thresholds: Sequence[float]) -> dict[str, np.ndarray]:
    """Ray Data stage (CPU tasks): probabilities in the frame -> CheXlocalize RLEs at the original size.

    Args:
        batch: ``probs`` ``[n, 10, S, S]``, ``letterbox`` ``[n, 7]``, ``image_id``, ``row``, ``path``, ``stage``,
            ``error`` (from :class:`SegmentationPredictor`).
        thresholds: ``[10]`` output thresholds (TASKS order): a pixel is foreground when ``p > t``.

    Returns:
        ``image_id``, ``row``, ``path``, ``stage``, ``error``, ``segmentation`` (the image's ``{pathology: rle}``
        as JSON; empty for a failed row) and ``positive`` ``[n, 10]`` (whether each mask is non-empty).
    """
    t = np.asarray(thresholds, dtype=np.float32)
    n = len(batch["image_id"])
    out = np.full(n, "", dtype=object)
    positive = np.zeros((n, len(TASKS)), dtype=np.uint8)
    for i in range(n):
        if str(batch["stage"][i]):
            continue
        p = [int(v) for v in batch["letterbox"][i]]
        box = Letterbox(p[0], p[1], p[2])
        entry = {}
        for c, task in enumerate(TASKS):  # one pathology at a time: bounded memory at any original size
            mask = box.frame_to_original(np.asarray(batch["probs"][i, c], dtype=np.float32)) > t[c]
            entry[task] = encode_mask(mask)
            positive[i, c] = mask.any()
        out[i] = json.dumps(entry)
    keep = ("image_id", "row", "path", "stage", "error")
    result = {k: np.asarray(batch[k]) for k in keep}
    result["segmentation"] = out.astype(str)
    result["positive"] = positive
    return result


def build_dataset(images: pa.Table, sc: SegmentConfig, checkpoint: str, image_size: int, thresholds: Any) -> Any:
    """The Ray Data pipeline: decode -> student actors -> encoding tasks (rows of :func:`encode_predictions`)."""
    import ray.data

    per_block = sc.images_per_decode_task
    blocks = [images.slice(i, per_block) for i in range(0, images.num_rows, per_block)]
    # The memory request also keeps this stage from fusing into the actors.
    ds = with_decode_stage(ray.data.from_arrow(blocks), image_size, sc.decode_cpus, memory_mb=sc.decode_memory_mb)
    ds = ds.map_batches(
        SegmentationPredictor,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "use_gpu": float(sc.gpus_per_actor) > 0,
            "threads": sc.torch_threads or max(1, int(sc.cpus_per_actor)),
            "amp": sc.amp,
        },
        compute=ray.data.ActorPoolStrategy(size=sc.num_actors),
        batch_size=sc.batch_size,
        batch_format="numpy",
        num_cpus=sc.cpus_per_actor,
        num_gpus=float(sc.gpus_per_actor),
    )
    return ds.map_batches(
        encode_predictions,
        fn_kwargs={"thresholds": [float(v) for v in thresholds]},
        batch_size=sc.batch_size,
        batch_format="numpy",
        num_cpus=sc.decode_cpus,
    )


def run_segment(cfg: Config, checkpoint: str, manifest: str, out: str) -> SegmentSummary:
    """Segment every (frontal) image of a manifest with a trained student into a CheXlocalize JSON ``out``.

    Starts a local Ray unless Ray runs (or attaches to the cluster under ``ray job submit``). Writes ``out``
    (every image that could be read, all 10 pathologies), ``<out>.config.yaml`` and, when images failed,
    ``<out>.failures.csv``.

    Raises:
        CheckpointError: not a segmentation checkpoint, or its weights are damaged or replaced.
        ManifestError / InputError: the manifest, or a pool the local Ray can never schedule.
    """
    sc = cfg.segment
    # The weights are read and checked against their fingerprint here, on the driver: a truncated or swapped
    # model.pt is one line now, not an actor's traceback once Ray has started.
    meta = load_segmentation(checkpoint).meta
    thresholds = [float(meta["thresholds"][t]) for t in TASKS]
    image_size = int(meta["image_size"])
    views = select_views(read_manifest(manifest, ["row", "image_id", "path", "frontal"]), sc.frontal_only)
    if note := views.note(f"segment: manifest {manifest}"):
        say(note)
    images = views.table.select(["row", "image_id", "path"])
    if images.num_rows == 0:
        raise InputError(f"manifest {manifest}: no image to segment")
    say(
        f"segment: {images.num_rows} images with {meta['arch']}/{meta['encoder']} at {image_size} px "
        f"({checkpoint}); {sc.num_actors} actor(s), batch {sc.batch_size}"
    )
    summary = SegmentSummary(out=out, positives={t: 0 for t in TASKS})
    failures: list[dict[str, Any]] = []
    can_grow = ray_can_grow()
    with ray_session():
        resources = cluster_resources()
        # "auto" resolved for this run only: the config keeps what the user asked for, the summary what ran.
        sc = replace(sc, gpus_per_actor=actor_gpus("segment", sc.num_actors, sc.gpus_per_actor, resources))
        summary.gpus_per_actor = float(sc.gpus_per_actor)
        problem = pool_problem(
            "segment", sc.num_actors, sc.cpus_per_actor, float(sc.gpus_per_actor), sc.decode_cpus, resources
        )
        if problem and not can_grow:
            raise InputError(problem)
        if problem:
            say(f"segment: warning: {problem} (it will wait for the cluster to grow)")
        start = last = time.time()
        ds = build_dataset(images, sc, checkpoint, image_size, thresholds)
        with fsio.open_file(out, "w") as f:
            f.write("{")
            first = True
            for batch in ds.iter_batches(batch_size=sc.batch_size, batch_format="numpy"):
                for i in range(len(batch["image_id"])):
                    if str(batch["stage"][i]):
                        failures.append({k: batch[k][i] for k in ("image_id", "row", "path", "stage", "error")})
                        continue
                    entry = str(batch["segmentation"][i])
                    f.write(("" if first else ",") + "\n" + json.dumps(str(batch["image_id"][i])) + ": " + entry)
                    first = False
                    summary.images += 1
                    for c, task in enumerate(TASKS):
                        summary.positives[task] += int(batch["positive"][i][c])
                now = time.time()
                if now - last >= sc.progress_interval_s:
                    done = summary.images + len(failures)
                    rate = done / max(now - start, 1e-9)
                    eta = format_seconds((images.num_rows - done) / max(rate, 1e-9))
                    say(f"segment: {done}/{images.num_rows} images, {rate:.1f} images/s, ETA {eta}")
                    last = now
            f.write("\n}\n")
        summary.seconds = time.time() - start
    summary.failed = len(failures)
    summary.images_per_s = (summary.images + summary.failed) / max(summary.seconds, 1e-9)
    if failures:
        summary.failures = out + FAILURES_SUFFIX
        with fsio.open_file(summary.failures, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image_id", "row", "path", "stage", "error"])
            writer.writeheader()
            writer.writerows({k: (int(v) if k == "row" else str(v)) for k, v in r.items()} for r in failures)
    save_config(
        cfg,
        fsio.parent(out),
        filename=f"{fsio.basename(out)}{CONFIG_SUFFIX}",
        extra={"checkpoint": checkpoint, "manifest": manifest, "out": out, "seconds": round(summary.seconds, 2)},
    )
    return summary
