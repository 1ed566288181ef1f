"""``pseudolabel.max_queued_frames``: decoded frames waiting for the classifier actors stay within the cap.

A real local Ray (the ``ray_cluster`` fixture) runs the job's pipeline shape, a task stage decoding fast into a
fixed pool of one slow actor that also starts slowly, with the job's own cap (:func:`cap_queued_frames`). Each
stage appends ``time +frames`` (decoded, at the end of a decode task) or ``time -frames`` (consumed, at the end of
a model batch) to a file; replayed in time order, the running sum is the number of decoded, unconsumed frames.
Frames count as decoded early and consumed late relative to Ray's own bookkeeping, so the sum can only overstate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from chexseg_dist.config import load_config
from chexseg_dist.pseudolabel.job import (
    ACTOR_START_WAIT_S,
    FRAME_CAP_KEY,
    QueuedFrameCap,
    build_dataset,
    cap_queued_frames,
    effective_frame_cap,
)

ROWS, PER_TASK, BATCH = 192, 8, 8


def _run(log: Path, max_frames: int) -> tuple[int, float, Any]:
    """Fast decode -> slow actor, capped at ``max_frames`` (0 = no cap); returns rows out, peak queued, the context."""
    import ray.data

    def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["i"])
        frames = np.zeros((n, 32, 32), np.uint8)
        with open(log, "a") as f:
            f.write(f"{time.time()} {n}\n")
        return {"i": batch["i"], "frame": frames}

    class SlowModel:
        def __init__(self) -> None:
            time.sleep(2.0)  # a model's start-up: decoding must not run ahead meanwhile

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            time.sleep(0.04)
            with open(log, "a") as f:
                f.write(f"{time.time()} {-len(batch['i'])}\n")
            return {"i": batch["i"]}

    blocks = [pa.table({"i": np.arange(k, k + PER_TASK)}) for k in range(0, ROWS, PER_TASK)]
    ds = ray.data.from_arrow(blocks).map_batches(
        decode, batch_size=None, batch_format="numpy", num_cpus=0.5, memory=1024 * 1024
    )
    ds = ds.map_batches(
        SlowModel, compute=ray.data.ActorPoolStrategy(size=1), batch_size=BATCH, batch_format="numpy", num_cpus=1
    )
    cap_queued_frames(ds, max_frames, PER_TASK)
    rows = sum(len(b["i"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    events = sorted((float(t), int(d)) for t, d in (line.split() for line in log.read_text().splitlines()))
    queued = np.cumsum([d for _, d in events])
    return rows, float(queued.max()), ds.context


@pytest.mark.cluster
def test_decoded_frames_waiting_for_the_actors_never_exceed_the_cap(ray_cluster: None, tmp_path: Path) -> None:
    # Asked for 1 frame: raised to one batch plus one decode task, the least that always completes a batch.
    pl = load_config(
        "tiny",
        None,
        [
            f"pseudolabel.batch_size={BATCH}",
            f"pseudolabel.images_per_decode_task={PER_TASK}",
            "pseudolabel.max_queued_frames=1",
        ],
    ).pseudolabel
    cap = effective_frame_cap(pl)
    assert cap == BATCH + PER_TASK
    rows, peak, _ = _run(tmp_path / "capped.log", cap)
    assert rows == ROWS  # no deadlock at the smallest cap
    assert peak <= cap

    roomier = 5 * PER_TASK
    rows, peak, _ = _run(tmp_path / "roomier.log", roomier)
    assert rows == ROWS
    assert PER_TASK < peak <= roomier  # decoding runs ahead of the slow model, up to the cap and no further


@pytest.mark.cluster
def test_without_a_cap_decoding_runs_ahead_and_the_pipeline_is_left_as_ray_data_builds_it(
    ray_cluster: None, tmp_path: Path
) -> None:
    rows, peak, ctx = _run(tmp_path / "uncapped.log", 0)
    assert rows == ROWS
    # What the cap prevents: while the model starts and works, most of the dataset is decoded and waiting.
    assert peak > 5 * PER_TASK
    assert ctx.get_config(FRAME_CAP_KEY, None) is None
    assert ctx.wait_for_min_actors_s < ACTOR_START_WAIT_S


@pytest.mark.cluster
def test_the_jobs_dataset_carries_the_configured_cap(ray_cluster: None, tmp_path: Path) -> None:
    todo = pa.table(
        {
            "slot": pa.array(np.arange(4), pa.int64()),
            "row": pa.array(np.arange(4), pa.int64()),
            "image_id": [f"p{i}_study1_view1_frontal" for i in range(4)],
            "path": [str(tmp_path / f"{i}.jpg") for i in range(4)],
        }
    )
    sets = ["pseudolabel.batch_size=4", "pseudolabel.images_per_decode_task=2"]
    capped = load_config("tiny", None, [*sets, "pseudolabel.max_queued_frames=100"]).pseudolabel
    ds = build_dataset(todo, capped, ["unused"], 32, (4, 4))  # built, never executed
    assert ds.context.get_config(FRAME_CAP_KEY) == {"max_frames": 100, "frames_per_task": 2}
    from ray.data._internal.execution.backpressure_policy import ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY

    assert QueuedFrameCap in ds.context.get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY)
    plain = build_dataset(todo, load_config("tiny", None, sets).pseudolabel, ["unused"], 32, (4, 4))
    assert plain.context.get_config(FRAME_CAP_KEY, None) is None


def test_a_negative_cap_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"pseudolabel\.max_queued_frames"):
        load_config("tiny", None, ["pseudolabel.max_queued_frames=-1"])
    assert effective_frame_cap(load_config("tiny").pseudolabel) == 0  # the default: Ray Data's own budget
    big = load_config("tiny", None, ["pseudolabel.max_queued_frames=5000"]).pseudolabel
    assert effective_frame_cap(big) == 5000
