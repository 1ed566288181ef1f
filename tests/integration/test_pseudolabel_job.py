"""The Ray Data pseudo-labelling job: correctness, concurrent writers, resume, failures, S3.

Tiny random-weight classifier (no training), small images, a real local Ray (the ``ray_cluster`` fixture) or
real subprocess jobs; nothing is mocked.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from job_helpers import job_env, kill_session_processes
from maps_helpers import assert_stores_identical
from PIL import Image

from chexseg_dist.cli import main as cli_main
from chexseg_dist.config import load_config
from chexseg_dist.core.pathologies import TASK_OBSERVATION_INDEX, TASKS
from chexseg_dist.data import frame_from_bytes, manifest_from_listing, read_manifest, write_manifest
from chexseg_dist.errors import InputError, StoreError, StoreLockedError
from chexseg_dist.models import create_classifier, save_checkpoint
from chexseg_dist.pseudolabel import resource_problem, run_pseudolabel
from chexseg_dist.saliency import load_classifier, predict_with_cams
from chexseg_dist.store import MapStore, StoreLock, list_fragments, read_failures, sidecar_path
from chexseg_dist.store.sink import FragmentSink

REPO = Path(__file__).resolve().parents[2]
SIZE = 64


def make_checkpoint(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = create_classifier("tiny_cnn", widths=(8, 16, 32))  # grid 64 / 8 = 8 x 8
    return save_checkpoint(str(path), model, arch="tiny_cnn", image_size=SIZE, config={})


def write_corpus(root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` grayscale JPEG radiograph stand-ins in the CheXpert layout, of varied sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = root / "train" / f"patient{i:05d}" / "study1"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(40, 160, size=2))
        yy, xx = np.mgrid[0:h, 0:w]
        img = 128 + 80 * np.sin(xx / (3 + i % 7)) * np.cos(yy / (4 + i % 5)) + rng.normal(0, 10, (h, w))
        path = folder / "view1_frontal.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def make_manifest(root: Path, out: Path) -> str:
    write_manifest(manifest_from_listing(str(root)), str(out))
    return str(out)


def tiny_cfg(*extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        "tiny",
        None,
        [
            "pseudolabel.batch_size=4",
            "pseudolabel.images_per_chunk=4",
            "pseudolabel.images_per_decode_task=8",
            "pseudolabel.commit_interval_s=0.5",
            "pseudolabel.progress_interval_s=2",
            "pseudolabel.decode_cpus=0.5",
            "pseudolabel.cpus_per_actor=1",
            *extra,
        ],
    )


def expected_outputs(manifest: str, checkpoint: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Single-process reference: image_id -> (probs [14], raw task maps [10, gh, gw])."""
    loaded = load_classifier(checkpoint)
    table = read_manifest(manifest, ["image_id", "path"])
    out = {}
    for image_id, path in zip(table.column("image_id").to_pylist(), table.column("path").to_pylist()):
        with open(path, "rb") as f:
            frame, _ = frame_from_bytes(f.read(), SIZE, path)
        probs, cams = predict_with_cams(loaded, torch.from_numpy(frame)[None, None].float() / 255.0)
        out[image_id] = (probs[0].numpy(), cams[0, list(TASK_OBSERVATION_INDEX)].numpy())
    return out


def test_a_pool_that_leaves_no_cpu_for_decoding_or_lacks_gpus_is_named_before_it_can_hang() -> None:
    # What Ray Data would otherwise wait on forever: actors holding every CPU, or asking for GPUs the cluster lacks.
    fits = load_config("tiny", None, ["pseudolabel.num_actors=1"])
    assert resource_problem(fits.pseudolabel, {"CPU": 2.0}) is None
    too_many = load_config("tiny", None, ["pseudolabel.num_actors=2"])
    msg = resource_problem(too_many.pseudolabel, {"CPU": 2.0})
    assert msg is not None and "num_actors=2" in msg and "decode_cpus" in msg
    gpu = load_config("paper", None, ["pseudolabel.gpus_per_actor=1", "pseudolabel.num_actors=2"])
    msg = resource_problem(gpu.pseudolabel, {"CPU": 16.0, "GPU": 1.0})
    assert msg is not None and "need 2 GPU(s)" in msg and "has 1" in msg
    assert resource_problem(gpu.pseudolabel, {"CPU": 16.0, "GPU": 2.0}) is None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("corpus")
    write_corpus(base / "images", 24)
    return {
        "manifest": make_manifest(base / "images", base / "manifest.parquet"),
        "checkpoint": make_checkpoint(base / "ckpt", seed=0),
        "other_checkpoint": make_checkpoint(base / "ckpt2", seed=1),
        "base": str(base),
    }


# ---------------------------------------------------------------------------------------------------- in-process


@pytest.mark.cluster
def test_store_matches_the_model_and_decode_is_not_fused(ray_cluster: None, corpus: dict, tmp_path: Path) -> None:
    store = str(tmp_path / "maps.zarr")
    summary = run_pseudolabel(tiny_cfg(), corpus["manifest"], corpus["checkpoint"], store)
    assert (summary.processed, summary.skipped, summary.failed, summary.exit_code) == (24, 0, 0, 0)
    # Decoding ran as its own task stage, not inside the classifier actors.
    assert "MapBatches(decode_frames)" in summary.operators
    assert "MapBatches(ClassifierPredictor)" in summary.operators
    assert not any("->" in op for op in summary.operators), summary.operators
    # The bottleneck report: both stages did measurable work, and the actors' share of the run is a fraction.
    assert summary.busy_s["MapBatches(decode_frames)"] > 0
    assert summary.busy_s["MapBatches(ClassifierPredictor)"] > 0
    util = summary.actor_utilisation()
    assert util is not None and 0 < util <= 1
    assert "decode_frames" in summary.stage_line() and "classifier actors busy" in summary.stage_line()

    ms = MapStore.open(store)
    assert ms.done().all() and ms.grid_shape == (8, 8)
    batch = ms.read(slice(None))
    ref = expected_outputs(corpus["manifest"], corpus["checkpoint"])
    for i, image_id in enumerate(batch.image_id):
        probs, cams = ref[image_id]
        np.testing.assert_allclose(batch.probs[i], probs, atol=1e-5)
        scale = np.abs(cams).max(axis=(1, 2), keepdims=True)
        assert np.all(np.abs(batch.cams[i] - cams) <= 1e-3 * scale + 1e-6), image_id
    # Slots follow the manifest's row order; attrs and the sidecar config record what made the store.
    assert np.all(np.diff(ms.rows) > 0)
    assert ms.attrs["tasks"] == list(TASKS) and ms.attrs["image_size"] == SIZE
    assert ms.attrs["model_fingerprint"] == load_classifier(corpus["checkpoint"]).fingerprint
    assert os.path.exists(os.path.join(sidecar_path(store), "config.yaml"))
    assert list_fragments(store) == []


@pytest.mark.cluster
def test_second_run_does_no_model_work(ray_cluster: None, corpus: dict, tmp_path: Path) -> None:
    import ray._private.state as ray_state

    store = str(tmp_path / "maps.zarr")
    run_pseudolabel(tiny_cfg(), corpus["manifest"], corpus["checkpoint"], store)

    def classifier_actors() -> int:
        return sum("ClassifierPredictor" in str(a.get("ActorClassName")) for a in ray_state.actors().values())

    chunk = Path(store) / "cams" / "c" / "0" / "0" / "0" / "0"
    mtime, actors = chunk.stat().st_mtime_ns, classifier_actors()
    summary = run_pseudolabel(tiny_cfg(), corpus["manifest"], corpus["checkpoint"], store)
    assert (summary.processed, summary.skipped, summary.failed) == (0, 24, 0)
    assert not summary.model_started and summary.exit_code == 0
    assert classifier_actors() == actors  # no new actor pool
    assert chunk.stat().st_mtime_ns == mtime  # nothing rewritten


@pytest.mark.cluster
def test_a_bf16_store_is_close_to_fp32_records_its_precision_and_resumes_only_at_it(
    ray_cluster: None, corpus: dict, tmp_path: Path
) -> None:
    fp32, bf16 = str(tmp_path / "fp32.zarr"), str(tmp_path / "bf16.zarr")
    run_pseudolabel(tiny_cfg(), corpus["manifest"], corpus["checkpoint"], fp32)
    cfg16 = tiny_cfg("pseudolabel.precision=bf16")
    assert run_pseudolabel(cfg16, corpus["manifest"], corpus["checkpoint"], bf16).processed == 24
    a, b = MapStore.open(fp32), MapStore.open(bf16)
    assert a.attrs.get("precision") == "fp32" and b.attrs["precision"] == "bf16"
    ra, rb = a.read(slice(None)), b.read(b.index_of(a.read(slice(None)).image_id))
    np.testing.assert_allclose(ra.probs, rb.probs, atol=0.02)
    corr = [
        np.corrcoef(ra.cams[i, t].ravel(), rb.cams[i, t].ravel())[0, 1]
        for i in range(len(ra))
        for t in range(ra.cams.shape[1])
        if ra.cams[i, t].std() > 0 and rb.cams[i, t].std() > 0
    ]
    assert len(corr) > 100 and np.median(corr) > 0.999 and min(corr) > 0.98, (np.median(corr), min(corr))
    # Each resumes at its own precision (nothing left to do) and refuses the other one before any work.
    again = run_pseudolabel(cfg16, corpus["manifest"], corpus["checkpoint"], bf16)
    assert (again.processed, again.skipped) == (0, 24)
    with pytest.raises(StoreError, match=r"store holds bf16 maps; pseudolabel.precision=fp32"):
        run_pseudolabel(tiny_cfg(), corpus["manifest"], corpus["checkpoint"], bf16)
    with pytest.raises(StoreError, match=r"store holds fp32 maps; pseudolabel.precision=bf16"):
        run_pseudolabel(cfg16, corpus["manifest"], corpus["checkpoint"], fp32)


def test_resume_refuses_another_model_or_manifest(corpus: dict, tmp_path: Path) -> None:
    """Checked before Ray starts: a store's slots and maps belong to one manifest and one model."""
    store = str(tmp_path / "maps.zarr")
    table = read_manifest(corpus["manifest"], ["image_id", "row"])
    MapStore.create(
        store,
        table.column("image_id").to_pylist(),
        table.column("row").to_pylist(),
        (8, 8),
        attrs={"manifest_fingerprint": "something-else", "model_fingerprint": "x"},
    )
    with pytest.raises(StoreError, match=r"another manifest.*--overwrite"):
        run_pseudolabel(tiny_cfg(), corpus["manifest"], corpus["checkpoint"], store)

    from chexseg_dist.pseudolabel.inputs import manifest_fingerprint, select_images

    fp = manifest_fingerprint(select_images(read_manifest(corpus["manifest"]), True)[0])
    MapStore.open(store, "r+").update_attrs(manifest_fingerprint=fp)
    with pytest.raises(StoreError, match=r"mix two models.*--overwrite"):
        run_pseudolabel(tiny_cfg(), corpus["manifest"], corpus["checkpoint"], store)


def test_second_job_on_the_same_store_is_refused(
    corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(tmp_path / "maps.zarr")
    with StoreLock(store, run_id="running-job"), pytest.raises(StoreLockedError, match="running-job"):
        run_pseudolabel(tiny_cfg(), corpus["manifest"], corpus["checkpoint"], store)
    # The command line, with valid inputs: the lock is what refuses it (one line naming the owner, exit status 2).
    argv = ["pseudolabel", "--manifest", corpus["manifest"], "--checkpoint", corpus["checkpoint"], "--store", store]
    capsys.readouterr()
    with StoreLock(store, run_id="other-job"):
        assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by job other-job" in err[0], err
    assert not MapStore.exists(store)  # nothing was created for the refused job


@pytest.mark.cluster
def test_four_concurrent_writers_land_every_row(ray_cluster: None, tmp_path: Path) -> None:
    """>= 4 write tasks stage fragments at the same time; the commit lands every row exactly as written."""
    import ray.data

    n, grid = 64, (2, 3)
    store = MapStore.create(
        str(tmp_path / "maps.zarr"), [f"id{i}" for i in range(n)], np.arange(n), grid, images_per_chunk=8
    )
    rng = np.random.default_rng(0)
    slots = rng.permutation(n)  # rows arrive in no particular order: fragments straddle chunks
    cols = {
        "slot": slots.astype(np.int64),
        "row": slots.astype(np.int64),
        "image_id": np.asarray([f"id{s}" for s in slots]),
        "path": np.asarray([f"/x/{s}.jpg" for s in slots]),
        "probs": rng.random((n, 14)).astype(np.float32),
        "cams": rng.random((n, len(TASKS), *grid)).astype(np.float16),
        "cam_max": rng.random((n, len(TASKS))).astype(np.float32) + 0.5,
        "letterbox": np.tile(np.asarray([[64, 64, 64, 64, 64, 0, 0]], np.int32), (n, 1)),
        "failed": (slots % 13 == 0).astype(np.uint8),
        "stage": np.asarray(["decode" if s % 13 == 0 else "" for s in slots]),
        "error": np.asarray(["bad" if s % 13 == 0 else "" for s in slots]),
        "time": np.asarray(["t" if s % 13 == 0 else "" for s in slots]),
    }

    class SlowSink(FragmentSink):
        def write(self, blocks, ctx):  # type: ignore[no-untyped-def]
            start = time.time()
            time.sleep(3.0)  # hold each task open long enough for the others to overlap it on a busy machine
            result = super().write(blocks, ctx)
            return {**result, "start": start}

    ds = ray.data.from_items([{k: v[i] for k, v in cols.items()} for i in range(n)]).repartition(8)
    sink = SlowSink(store.uri, "conc", rows_per_write=1)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.1})
    spans = [(r["start"], r["end"]) for r in sink.write_returns if r["fragment"]]
    peak = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert len(spans) >= 8 and peak >= 4, (len(spans), peak)

    from chexseg_dist.store.staging import commit_fragments

    commit_fragments(store, "conc", max_workers=4)
    batch = MapStore.open(store.uri).read(slots)
    bad = cols["failed"] == 1
    np.testing.assert_array_equal(batch.done, ~bad)
    np.testing.assert_array_equal(batch.failed, bad)
    np.testing.assert_array_equal(batch.probs[~bad], cols["probs"][~bad])
    raw = cols["cams"].astype(np.float32) * cols["cam_max"][:, :, None, None]
    np.testing.assert_array_equal(batch.cams[~bad], raw[~bad])
    assert sorted(read_failures(store.uri).column("slot").to_pylist()) == sorted(slots[bad].tolist())


# ---------------------------------------------------------------------------------------------------- bad inputs


def _odd_corpus(root: Path) -> dict[str, str]:
    """One image per case; returns case -> file path. 'missing' is deleted after the manifest is built."""
    rng = np.random.default_rng(3)

    def folder(i: int) -> Path:
        d = root / "train" / f"patient{i:05d}" / "study1"
        d.mkdir(parents=True, exist_ok=True)
        return d

    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (300, 200), dtype=np.uint8)).save(good, format="JPEG")
    cases: dict[str, tuple[str, bytes | Image.Image]] = {
        "ok_gray_jpeg": ("jpg", good.getvalue()),
        "missing": ("jpg", good.getvalue()),
        "zero_byte": ("jpg", b""),
        "truncated_jpeg": ("jpg", good.getvalue()[: len(good.getvalue()) // 2]),
        "random_bytes": ("jpg", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()),
        "text_file": ("png", b"this is not an image\n" * 20),
        "png_16bit": ("png", Image.fromarray(rng.integers(0, 4096, (120, 90), dtype=np.uint16))),
        "rgb_jpeg": ("jpg", Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8), "RGB")),
        "rgba_png": ("png", Image.fromarray(rng.integers(0, 255, (70, 70, 4), dtype=np.uint8), "RGBA")),
        "one_pixel": ("png", Image.fromarray(np.full((1, 1), 200, np.uint8))),
        "huge_aspect": ("png", Image.fromarray(rng.integers(0, 255, (3, 2000), dtype=np.uint8))),
    }
    out = {}
    for i, (case, (ext, content)) in enumerate(cases.items()):
        path = folder(i) / f"view1_frontal.{ext}"
        if isinstance(content, Image.Image):
            content.save(path)
        else:
            path.write_bytes(content)
        out[case] = str(path)
    return out


@pytest.mark.cluster
def test_corrupt_and_odd_images_are_recorded_and_the_rest_completes(
    ray_cluster: None, corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _odd_corpus(tmp_path / "odd")
    manifest = make_manifest(tmp_path / "odd", tmp_path / "odd.parquet")
    os.remove(files["missing"])
    store = str(tmp_path / "maps.zarr")
    argv = ["pseudolabel", "--manifest", manifest, "--checkpoint", corpus["checkpoint"], "--store", store]
    argv += ["--set", "pseudolabel.batch_size=4", "--set", "pseudolabel.images_per_chunk=4"]
    assert cli_main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("pseudolabel: processed 6, skipped 0 (already done), failed 5"), last

    ms = MapStore.open(store)
    table = read_manifest(manifest, ["image_id", "path"])
    by_path = dict(zip(table.column("path").to_pylist(), table.column("image_id").to_pylist()))
    done = dict(zip(ms.image_ids.tolist(), ms.done().tolist()))
    decodable = ["ok_gray_jpeg", "png_16bit", "rgb_jpeg", "rgba_png", "one_pixel", "huge_aspect"]
    for case in decodable:
        assert done[by_path[files[case]]], case
    batch = ms.read(ms.index_of([by_path[files["huge_aspect"]]]))
    assert batch.letterboxes[0].height == 3 and batch.letterboxes[0].width == 2000  # type: ignore[union-attr]

    failures = read_failures(store)
    got = {p: (s, e) for p, s, e in zip(*(failures.column(c).to_pylist() for c in ("path", "stage", "error")))}
    expected = {
        "missing": ("read", "no such file"),
        "zero_byte": ("decode", "empty file"),
        "truncated_jpeg": ("decode", "truncated"),
        "random_bytes": ("decode", "not a decodable image"),
        "text_file": ("decode", "not a decodable image"),
    }
    assert set(got) == {files[c] for c in expected}
    for case, (stage, text) in expected.items():
        assert got[files[case]][0] == stage and text in got[files[case]][1], (case, got[files[case]])
    assert set(failures.column_names) >= {"image_id", "path", "stage", "error", "run_id", "time"}

    # Failed images are not retried by default; with retry_failed they are (and fail again, exit 0).
    again = run_pseudolabel(tiny_cfg(), manifest, corpus["checkpoint"], store)
    assert (again.processed, again.skipped, again.failed_before, again.model_started) == (0, 6, 5, False)
    retry = run_pseudolabel(tiny_cfg("pseudolabel.retry_failed=true"), manifest, corpus["checkpoint"], store)
    assert (retry.processed, retry.failed, retry.exit_code) == (0, 5, 1)


# ---------------------------------------------------------------------------------------------------- S3


@pytest.mark.cluster
@pytest.mark.s3
def test_s3_images_and_s3_store(ray_cluster: None, corpus: dict, s3_bucket: str, tmp_path: Path) -> None:
    import fsspec

    local = tmp_path / "images"
    write_corpus(local, 10, seed=5)
    fs = fsspec.filesystem("s3")
    fs.put(str(local / "train"), f"{s3_bucket}/cxr/train", recursive=True)
    manifest = f"{s3_bucket}/cxr/manifest.parquet"
    write_manifest(manifest_from_listing(f"{s3_bucket}/cxr"), manifest)
    missing = f"{s3_bucket}/cxr/train/patient00003/study1/view1_frontal.jpg"
    fs.rm(missing)  # the manifest is older than the bucket: one object has gone
    store = f"{s3_bucket}/out/maps.zarr"
    summary = run_pseudolabel(tiny_cfg(), manifest, corpus["checkpoint"], store)
    assert (summary.processed, summary.failed, summary.exit_code) == (9, 1, 0)
    failures = read_failures(store)
    assert failures.column("path").to_pylist() == [missing] and failures.column("stage").to_pylist() == ["read"]
    ms = MapStore.open(store)
    assert ms.done().sum() == 9 and np.isfinite(ms.read(ms.done()).cams).all()
    assert fs.exists(f"{s3_bucket}/out/maps.zarr.sidecar/config.yaml")
    assert list_fragments(store) == []


# ---------------------------------------------------------------------------------------------------- jobs


@pytest.mark.cluster
def test_an_impossible_pool_on_a_ray_started_in_this_process_is_refused(
    ray_cluster: None, corpus: dict, tmp_path: Path
) -> None:
    from chexseg_dist.core.ray_env import ray_can_grow

    assert ray_can_grow() is False  # the fixture's ray.init(num_cpus=2) is a single node started here
    # Twice: the first refusal released the store's lock, so the same message comes back, not "locked".
    for _ in range(2):
        with pytest.raises(InputError, match=r"num_actors=10000 .* decode_cpus"):
            run_pseudolabel(
                tiny_cfg("pseudolabel.num_actors=10000"),
                corpus["manifest"],
                corpus["checkpoint"],
                str(tmp_path / "m.zarr"),
            )


@pytest.mark.cluster
def test_a_local_job_whose_actors_leave_no_cpu_for_decoding_stops_with_a_message_instead_of_hanging(
    corpus: dict, tmp_path: Path
) -> None:
    ray_tmp = Path(f"/tmp/rn{os.getpid()}_")  # short: Ray's socket paths must stay under 107 bytes
    store = str(tmp_path / "maps.zarr")
    cmd = [sys.executable, str(REPO / "jobs" / "pseudolabel.py"), "--manifest", corpus["manifest"]]
    cmd += ["--checkpoint", corpus["checkpoint"], "--store", store, "--set", "pseudolabel.num_actors=10000"]
    try:
        out = subprocess.run(cmd, env=job_env(ray_tmp), capture_output=True, text=True, timeout=240)
    finally:
        kill_session_processes(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # The job's own Ray: exit status 2 and one line (the lock's release is checked in-process, above).
    assert out.returncode == 2, out.stderr[-3000:]
    message = out.stderr.strip().splitlines()[-1]
    assert "num_actors=10000" in message and "decode_cpus" in message, message
    assert not MapStore.open(store).done().any()


@pytest.mark.slow
@pytest.mark.cluster
def test_killed_job_resumes_to_the_same_store(
    ray_cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL a running job (its own process and Ray) after some rows are committed; the rerun, started at once in
    this process, takes over the dead job's lock (same host, process gone; its heartbeat is still fresh), finishes
    only the rest, and the store equals an uninterrupted run's store image by image."""
    write_corpus(tmp_path / "images", 160, seed=11)
    manifest = make_manifest(tmp_path / "images", tmp_path / "m.parquet")
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=3)
    sets = [
        "pseudolabel.batch_size=4",
        "pseudolabel.images_per_chunk=8",
        "pseudolabel.images_per_decode_task=8",
        "pseudolabel.commit_interval_s=0.2",
        "pseudolabel.decode_cpus=0.5",
    ]
    cfg_args = [a for s in sets for a in ("--set", s)]
    store = str(tmp_path / "resumed.zarr")
    ray_tmp = Path(f"/tmp/rk{os.getpid()}_")
    ray_tmp.mkdir(exist_ok=True)
    cmd = [sys.executable, str(REPO / "jobs" / "pseudolabel.py"), "--manifest", manifest, "--checkpoint", ckpt]
    job_log = tmp_path / "job.log"
    proc = subprocess.Popen(
        [*cmd, "--store", store, *cfg_args],
        env=job_env(ray_tmp),
        stdout=job_log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        committed = 0
        while time.time() < deadline and proc.poll() is None:
            if MapStore.exists(store):
                try:
                    committed = int(MapStore.open(store).done().sum())
                except Exception:
                    committed = 0
                if committed >= 16:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, (
            f"the job ended (status {proc.returncode}) before it could be killed: {job_log.read_text()[-3000:]}"
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_session_processes(str(ray_tmp))
    at_kill = MapStore.open(store).done()
    assert 16 <= at_kill.sum() < 160

    shutil.rmtree(ray_tmp, ignore_errors=True)

    capsys.readouterr()
    cfg = load_config("tiny", None, sets)
    resumed = run_pseudolabel(cfg, manifest, ckpt, store)
    console = capsys.readouterr().out
    assert "taking over the lock of job" in console and "its process on this host is gone" in console
    processed, skipped = resumed.processed, resumed.skipped
    assert processed + skipped == 160 and skipped >= at_kill.sum() and processed <= 160 - at_kill.sum()
    assert MapStore.open(store).done().all() and list_fragments(store) == []

    reference = str(tmp_path / "reference.zarr")
    run_pseudolabel(cfg, manifest, ckpt, reference)
    assert_stores_identical(store, reference)


@pytest.mark.slow
@pytest.mark.cluster
def test_ray_job_submit_with_token_auth(corpus: dict, tmp_path: Path) -> None:
    """``ray job submit --working-dir <repo> -- python jobs/pseudolabel.py`` against a token-authenticated cluster."""
    import secrets
    import socket
    import urllib.error
    import urllib.request

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    bin_dir = Path(sys.executable).parent
    ray_exe = shutil.which("ray", path=str(bin_dir)) or "ray"
    temp = Path(f"/tmp/rj{os.getpid()}_")
    temp.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(tmp_path / "home"),  # keep ~/.ray/auth_token of the user untouched
    )
    dash = free_port()
    head = subprocess.Popen(
        [
            ray_exe, "start", "--head", "--block", "--num-cpus=2", "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1", f"--port={free_port()}", f"--dashboard-port={dash}",
            f"--ray-client-server-port={free_port()}", f"--temp-dir={temp}", "--include-dashboard=true",
            # Other Ray instances on this machine (the ray_cluster fixture, other jobs) hold the default agent and
            # metrics ports; a second agent that cannot bind leaves the job server with "No available agent".
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=1)
                break
            except urllib.error.HTTPError:  # 401 without a token: the server is up (and wants authentication)
                break
            except Exception:
                assert time.time() < deadline and head.poll() is None, "ray start --head did not come up"
                time.sleep(0.5)
        store = str(tmp_path / "maps.zarr")
        runtime_env = '{"excludes": [".git", ".helper", "outputs", "benchmarks/out", "*.egg-info"]}'
        submit = [ray_exe, "job", "submit", "--address", address, "--working-dir", str(REPO)]
        submit += ["--runtime-env-json", runtime_env, "--", "python", "jobs/pseudolabel.py"]
        submit += ["--manifest", corpus["manifest"], "--checkpoint", corpus["checkpoint"], "--store", store]
        submit += ["--set", "pseudolabel.batch_size=8", "--set", "pseudolabel.images_per_chunk=8"]

        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
        refused = subprocess.run(submit, env=no_token, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0  # authentication really is on
        assert "auth" in (refused.stdout + refused.stderr).lower(), (refused.stdout + refused.stderr)[-2000:]

        for _ in range(15):
            out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
            # The job agent registers a few seconds after the dashboard answers; nothing was submitted yet.
            if "No available agent" not in out.stderr:
                break
            time.sleep(2)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert "pseudolabel: processed 24, skipped 0 (already done), failed 0" in out.stdout
        assert MapStore.open(store).done().all()
    finally:
        head.terminate()  # `ray start --block` stops its cluster on SIGTERM (never `ray stop`: it kills every Ray)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        kill_session_processes(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
