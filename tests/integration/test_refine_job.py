"""chexseg refine: refined masks in the store equal the student's on-the-fly masks, resume after SIGKILL to the
same result, record failures, and never mix two recipes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from job_helpers import job_env, kill_session_processes
from maps_helpers import image_ids, make_manifest, make_store, write_png

from chexseg_dist.config import load_config
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_TASKS, OBSERVATIONS, TASKS
from chexseg_dist.data.chexlocalize import encode_mask, write_segmentations
from chexseg_dist.data.failures import read_failure_tables
from chexseg_dist.data.images import load_frame
from chexseg_dist.masks.gating import manifest_labels
from chexseg_dist.masks.recipe import student_maker
from chexseg_dist.masks.refine_job import run_refine
from chexseg_dist.store import MapStore
from chexseg_dist.store.layout import refined_failures_path
from chexseg_dist.store.refined import RefinedMasks
from chexseg_dist.train.pseudo_set import pseudo_targets, read_chunk

REPO = Path(__file__).resolve().parents[2]
SETS = [
    "masks.refiner=crf",
    "masks.crf_stride=2",
    "segmentation.image_size=64",
    "pseudolabel.lock_stale_s=3",
    "pseudolabel.progress_interval_s=0.5",
]


def make_inputs(tmp: Path, n: int, seed: int = 0) -> tuple[str, str, list[str]]:
    """n images (a bright finding in each), a store of blurry maps pointing at it, a manifest with labels."""
    rng = np.random.default_rng(seed)
    h, w, frame = 48, 64, 64
    cams = np.zeros((n, N_TASKS, 8, 8), dtype=np.float32)
    labels = np.full((n, len(OBSERVATIONS)), np.nan)
    paths = []
    gt = {}
    for i, image_id in enumerate(image_ids(n)):
        top, left = int(rng.integers(4, 20)), int(rng.integers(4, 30))
        truth = np.zeros((h, w), dtype=bool)
        truth[top : top + 20, left : left + 24] = True
        paths.append(write_png(str(tmp / "img" / f"{image_id}.png"), np.where(truth, 0.8, 0.25)))
        grid = Letterbox(h, w, frame).mask_to_frame(truth).astype(np.float32)[::8, ::8]
        cams[i, :3] = grid + 0.3 * np.roll(grid, 1, axis=1)
        labels[i, OBSERVATIONS.index(TASKS[0])] = 1.0
        labels[i, OBSERVATIONS.index(TASKS[2])] = 1.0
        labels[i, OBSERVATIONS.index(TASKS[1])] = 0.0  # gated off: its refined mask must be empty
        gt[image_id] = {t: encode_mask(truth if k == 0 else np.zeros((h, w), bool)) for k, t in enumerate(TASKS)}
    write_segmentations(str(tmp / "gt.json"), gt)
    store = str(tmp / "maps.zarr")
    make_store(store, cams, [(h, w)] * n, frame)
    manifest = str(tmp / "m.parquet")
    make_manifest(manifest, image_ids(n), labels, image_paths=paths)
    return store, manifest, paths


@pytest.mark.cluster
def test_refined_masks_equal_the_students_and_rerun_skips(ray_cluster: None, tmp_path: Path) -> None:
    store, manifest, paths = make_inputs(tmp_path, 10)
    os.remove(paths[3])  # one image gone: recorded, the rest refined
    cfg = load_config("tiny", None, SETS)
    summary = run_refine(cfg, store, manifest)
    assert (summary.refined, summary.failed) == (9, 1)
    ms = MapStore.open(store)
    refined = RefinedMasks.open(ms, summary.key)
    masks, done = refined.read(np.arange(10))
    assert done.tolist() == [i != 3 for i in range(10)]
    maker = student_maker(cfg, None)
    batch = ms.read(slice(None))
    labels = manifest_labels(manifest, list(image_ids(10)))
    for i in range(10):
        if i == 3:
            continue
        frame, _ = load_frame(paths[i], 64)
        expected = maker.masks(batch.cams[i], Letterbox(48, 64, 64), batch.probs[i], labels[i], "model", frame)
        np.testing.assert_array_equal(masks[i], expected)
        assert masks[i, 0].any() and not masks[i, 1].any() and masks[i, 2].any()
    failures = read_failure_tables(refined_failures_path(store, summary.key))
    assert failures is not None and failures.column("slot").to_pylist() == [3]
    assert "no such file" in failures.column("error")[0].as_py()

    # The student's reading path gives the same masks as making them on the fly.
    rows = {"slot": np.arange(4), "image_id": np.asarray(image_ids(4)), "path": np.asarray(paths[:4])}
    rows.update({name: labels[:4, k] for k, name in enumerate(OBSERVATIONS)})
    frames = np.stack(
        [load_frame(p, 64)[0] if i != 3 else np.zeros((64, 64), np.uint8) for i, p in enumerate(paths[:4])]
    )
    keep = np.array([0, 1, 2])
    read = read_chunk({k: v[keep] for k, v in rows.items()}, store, refined_key=summary.key)
    read.update(frame=frames[keep], letterbox=np.asarray([Letterbox(48, 64, 64).params()] * 3))
    from_store = pseudo_targets(read, None, ignore_uncertain=False)["masks"]
    on_the_fly = pseudo_targets({k: v for k, v in read.items() if k != "refined"}, maker, False)["masks"]
    np.testing.assert_array_equal(from_store, on_the_fly)

    # Re-running does nothing; another recipe writes another subgroup and leaves this one as it was.
    again = run_refine(cfg, store, manifest)
    assert (again.refined, again.skipped, again.failed) == (0, 9, 0)
    other = run_refine(load_config("tiny", None, [*SETS, "masks.crf_iterations=3"]), store, manifest)
    assert other.key != summary.key and other.refined == 9
    np.testing.assert_array_equal(RefinedMasks.open(MapStore.open(store), summary.key).read(np.arange(10))[0], masks)


@pytest.mark.slow
@pytest.mark.cluster
def test_killed_refine_job_resumes_to_the_same_masks(ray_cluster: None, tmp_path: Path) -> None:
    store, manifest, _ = make_inputs(tmp_path, 120, seed=1)
    reference = str(tmp_path / "reference.zarr")
    shutil.copytree(store, reference)
    big = [*SETS, "segmentation.image_size=128", "masks.crf_stride=4"]
    sets = [a for s in big for a in ("--set", s)]
    cmd = [sys.executable, str(REPO / "jobs" / "refine.py"), "--store", store, "--manifest", manifest, *sets]
    ray_tmp = Path(f"/tmp/rf{os.getpid()}_")
    ray_tmp.mkdir(exist_ok=True)
    log = tmp_path / "job.log"
    cfg = load_config("tiny", None, big)
    proc = subprocess.Popen(
        cmd, env=job_env(ray_tmp), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    key = None
    try:
        deadline, written = time.time() + 240, 0
        while time.time() < deadline and proc.poll() is None:
            ms = MapStore.open(store)
            keys = RefinedMasks.keys(ms)
            if keys:
                key = keys[0]
                try:
                    written = int(RefinedMasks.open(ms, key).done().sum())
                except Exception:
                    written = 0
                if written >= 8:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, (
            f"the job ended (status {proc.returncode}) before it could be killed: {log.read_text()[-3000:]}"
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_session_processes(str(ray_tmp))
    assert key is not None
    at_kill = int(RefinedMasks.open(MapStore.open(store), key).done().sum())
    assert 8 <= at_kill < 120
    shutil.rmtree(ray_tmp, ignore_errors=True)
    # The re-run, at once and in this process: the dead job's lock is taken over (same host, process gone).
    again = run_refine(cfg, store, manifest)
    # Chunks a task finished between the poll and the kill count as done too; nothing done is recomputed.
    assert again.refined + again.skipped == 120 and again.skipped >= at_kill and again.failed == 0, again.line()
    resumed = RefinedMasks.open(MapStore.open(store), key)
    assert resumed.done().all()
    summary = run_refine(cfg, reference, manifest)
    assert summary.key == key and summary.refined == 120
    a = resumed.read(np.arange(120))[0]
    b = RefinedMasks.open(MapStore.open(reference), key).read(np.arange(120))[0]
    np.testing.assert_array_equal(a, b)
    assert a[:, 0].any(axis=(1, 2)).all()


def test_affinity_loss_prefers_a_boundary_on_the_seed_edge() -> None:
    import torch

    from chexseg_dist.masks.refine import IGNORE
    from chexseg_dist.train.affinity import affinity_loss

    seeds = torch.full((1, N_TASKS, 12, 16), IGNORE, dtype=torch.uint8)
    seeds[0, 0] = 0
    seeds[0, 0, :, :8] = 1  # foreground left of column 8
    on_edge = torch.zeros(1, 12, 16)
    on_edge[0, :, 7:9] = 0.99
    elsewhere = torch.zeros(1, 12, 16)
    elsewhere[0, :, 2] = 0.99
    flat = torch.full((1, 12, 16), 0.01)
    losses = {
        k: float(affinity_loss(b, seeds, 3)[0]) for k, b in [("edge", on_edge), ("else", elsewhere), ("flat", flat)]
    }
    assert losses["edge"] < losses["flat"] < losses["else"]
    no_pairs = torch.full((1, N_TASKS, 12, 16), IGNORE, dtype=torch.uint8)
    assert float(affinity_loss(on_edge, no_pairs, 3)[0]) == 0.0


@pytest.mark.cluster
def test_train_affinity_then_refine_with_it(
    ray_cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from chexseg_dist.cli.main import main

    store, manifest, _ = make_inputs(tmp_path, 48, seed=2)
    ckpt = str(tmp_path / "affinity")
    sets = [
        "segmentation.image_size=64",
        "train_affinity.epochs=2",
        "train_affinity.width=8",
        "train_affinity.batch_size=8",
    ]
    sets += ["train_affinity.valid_fraction=0.2", "masks.crf_stride=2"]
    argv = ["train-affinity", "--store", store, "--manifest", manifest, "--out", ckpt]
    assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "best epoch" in out and (tmp_path / "affinity" / "affinity.json").exists()
    import json

    with open(tmp_path / "affinity" / "metrics.json") as f:
        history = json.load(f)["epochs"]
    assert len(history) == 2 and all(np.isfinite(h["valid_loss"]) for h in history)

    refine = ["--set", "masks.refiner=affinity", "--set", f"masks.affinity_checkpoint={ckpt}"]
    pred = str(tmp_path / "pred.json")
    base = ["export-masks", "--store", store, "--images", manifest, "--out", pred, "--workers", "1"]
    assert main([*base, *refine]) == 0  # the store's frame is 64 px, as the network's
    from chexseg_dist.data.chexlocalize import decode_mask, read_segmentations

    masks = read_segmentations(pred)
    assert any(decode_mask(m[TASKS[0]]).any() for m in masks.values())

    # tune-thresholds also chooses the walk's foreground fraction per pathology on the expert masks.
    tuned = str(tmp_path / "t.json")
    argv = [
        "tune-thresholds",
        "--store",
        store,
        "--gt",
        str(tmp_path / "gt.json"),
        "--images",
        manifest,
        "--out",
        tuned,
    ]
    assert main([*argv, *refine, "--workers", "1"]) == 0
    with open(tuned) as f:
        fractions = json.load(f)["fg_fractions"]
    assert set(fractions) == set(TASKS) and 0 < fractions[TASKS[0]] < 1
    assert fractions[TASKS[5]] == 0.6  # no expert positive: the configured fraction
    assert main([*base, *refine, "--thresholds", tuned]) == 0

    # The network refines only in its own frame; no checkpoint, or not an affinity checkpoint: one line, exit 2.
    assert (
        main(["refine", "--store", store, "--manifest", manifest, *refine, "--set", "segmentation.image_size=96"]) == 2
    )
    assert "trained on 64 px frames" in capsys.readouterr().err
    assert main([*base, "--set", "masks.refiner=affinity"]) == 2
    assert "chexseg train-affinity" in capsys.readouterr().err
    # (A folder apart from --out: an --out inside the named network's folder is refused before it is opened.)
    not_affinity = tmp_path / "not_affinity"
    not_affinity.mkdir()
    assert main([*base, "--set", "masks.refiner=affinity", "--set", f"masks.affinity_checkpoint={not_affinity}"]) == 2
    err = capsys.readouterr().err
    assert "affinity.json not found" in err and err.count("\n") == 1
    assert main([*base, "--set", "masks.refiner=affinity", "--set", f"masks.affinity_checkpoint={tmp_path}"]) == 2
    assert "lies inside the input masks.affinity_checkpoint" in capsys.readouterr().err
