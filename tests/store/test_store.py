"""The map store (Zarr layout, reader, single-chunk writer) and its staging protocol (fragments, commit, lock).

No Ray here: the store and the commit path must work and be correct on their own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import OBSERVATIONS, TASK_OBSERVATION_INDEX, TASKS
from chexseg_dist.store.codec import EncodedRows, decode_cams, encode_cams, encode_rows
from chexseg_dist.store.failures import Failure, read_failures
from chexseg_dist.store.layout import lock_path, sidecar_path, staging_path
from chexseg_dist.store.lock import StoreLock, StoreLockedError
from chexseg_dist.store.mapstore import MapStore, StoreError
from chexseg_dist.store.staging import Fragment, commit_fragments, list_fragments, remove_temporaries, write_fragment

GRID = (3, 4)


def _ids(n: int) -> list[str]:
    return [f"patient{i:05d}_study1_view1_frontal" for i in range(n)]


def _rows_for(slots: np.ndarray, seed: int = 0, grid: tuple[int, int] = GRID) -> dict[str, np.ndarray]:
    """Raw model outputs for some slots: maps at very different scales (incl. > float16 max) and one all-zero map."""
    rng = np.random.default_rng(seed)
    n = len(slots)
    cams = rng.random((n, len(TASKS), *grid)).astype(np.float32)
    cams *= 10.0 ** rng.integers(-3, 7, size=(n, len(TASKS), 1, 1))  # up to 1e6: float16 would overflow raw
    cams[0, 0] = 0.0
    sizes = rng.integers(1, 3000, size=(n, 2))
    boxes = np.asarray([Letterbox(int(h), int(w), 64).params() for h, w in sizes], dtype=np.int32)
    return {
        "slots": np.asarray(slots, dtype=np.int64),
        "probs": rng.random((n, len(OBSERVATIONS))).astype(np.float32),
        "cams_raw": cams,
        "orig_size": sizes.astype(np.int32),
        "letterbox": boxes,
    }


def _create(tmp_path, n: int = 10, ipc: int = 4, **kw) -> MapStore:  # type: ignore[no-untyped-def]
    return MapStore.create(
        str(tmp_path / "maps.zarr"),
        _ids(n),
        np.arange(n) * 10 + 3,
        GRID,
        attrs={"model_fingerprint": "abc"},
        images_per_chunk=ipc,
        **kw,
    )


def _assert_maps_close(got: np.ndarray, want: np.ndarray) -> None:
    """float16 storage of raw / max: error <= 2**-11 of each map's max (plus float32 rounding)."""
    scale = np.abs(want).max(axis=(2, 3), keepdims=True)
    assert np.all(np.abs(got - want) <= scale * 2.0**-11 + 1e-30)


def test_roundtrip_write_then_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _create(tmp_path)
    data = _rows_for(np.array([1, 2, 5, 9]))
    store.write_rows(data["slots"], data["probs"], data["cams_raw"], data["orig_size"], data["letterbox"])

    again = MapStore.open(store.uri)
    batch = again.read(np.array([9, 1, 5, 2]))
    order = [3, 0, 2, 1]
    np.testing.assert_array_equal(batch.image_id, np.array(_ids(10))[[9, 1, 5, 2]])
    np.testing.assert_array_equal(batch.row, np.array([93, 13, 53, 23]))
    np.testing.assert_array_equal(batch.probs, data["probs"][order])
    _assert_maps_close(batch.cams, data["cams_raw"][order])
    assert batch.cams.dtype == np.float32 and np.all(np.isfinite(batch.cams))
    np.testing.assert_array_equal(batch.orig_size, data["orig_size"][order])
    assert [b.params() for b in batch.letterboxes] == [tuple(p) for p in data["letterbox"][order]]  # type: ignore[union-attr]
    assert batch.done.all() and not batch.failed.any()

    done = again.done()
    assert done.tolist() == [i in (1, 2, 5, 9) for i in range(10)]
    pending = again.read(np.array([0, 3]))
    assert not pending.done.any() and np.isnan(pending.probs).all() and pending.letterboxes == [None, None]


def test_write_rows_reduces_observation_maps_to_tasks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _create(tmp_path)
    rng = np.random.default_rng(1)
    cams14 = rng.random((2, len(OBSERVATIONS), *GRID)).astype(np.float32)
    data = _rows_for(np.array([0, 1]))
    store.write_rows([0, 1], data["probs"], cams14, data["orig_size"], data["letterbox"])
    _assert_maps_close(store.read([0, 1]).cams, cams14[:, list(TASK_OBSERVATION_INDEX)])


def test_plain_zarr_reads_the_documented_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _create(tmp_path, n=10, ipc=4)
    data = _rows_for(np.arange(10))
    store.write_rows(data["slots"], data["probs"], data["cams_raw"], data["orig_size"], data["letterbox"])

    group = zarr.open_group(store.uri, mode="r")
    assert group.attrs["tasks"] == list(TASKS) and group.attrs["observations"] == list(OBSERVATIONS)
    assert group.attrs["model_fingerprint"] == "abc" and group.attrs["grid_shape"] == list(GRID)
    assert [str(x) for x in group["image_id"][:]] == _ids(10)
    for name in ("row", "probs", "cams", "cam_max", "orig_size", "letterbox", "done", "failed", "image_id"):
        arr = group[name]
        assert arr.chunks[0] == 4 and arr.chunks[1:] == arr.shape[1:], name  # chunked along images only
        assert arr.shards is None, name
    assert group["cams"].dtype == np.float16 and group["cams"].shape == (10, len(TASKS), *GRID)
    raw = group["cams"][:].astype(np.float32) * group["cam_max"][:][:, :, None, None]
    _assert_maps_close(raw, data["cams_raw"])
    assert (group["done"][:] == 1).all()


def test_all_zero_maps_are_stored_as_chunks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """write_empty_chunks: an all-zero chunk must exist as an object, not be skipped (or deleted) as fill value."""
    store = _create(tmp_path, n=8, ipc=4)
    zeros = {
        "probs": np.zeros((4, len(OBSERVATIONS)), np.float32),
        "cams_raw": np.zeros((4, len(TASKS), *GRID), np.float32),
        "orig_size": np.full((4, 2), 64, np.int32),
        "letterbox": np.asarray([Letterbox(64, 64, 64).params()] * 4, np.int32),
    }
    store.write_rows(np.arange(4), **zeros)
    for name in ("cams", "cam_max", "probs"):
        chunk_dir = os.path.join(store.uri, name, "c", "0")
        assert os.path.exists(chunk_dir), f"{name}: chunk 0 was not written"
    assert not os.path.exists(os.path.join(store.uri, "cams", "c", "1"))  # untouched chunk: nothing written
    batch = MapStore.open(store.uri).read(slice(0, 4))
    assert batch.done.all() and (batch.cams == 0).all()


def test_encode_decode_keeps_float16_in_range() -> None:
    raw = np.array([[[[1e6, 5e5], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]], dtype=np.float32)
    cams, cam_max = encode_cams(raw)
    assert cams.dtype == np.float16 and np.isfinite(cams).all() and np.abs(cams).max() <= 1.0
    np.testing.assert_array_equal(cam_max, [[1e6, 0.0]])
    _assert_maps_close(decode_cams(cams, cam_max), raw)


def test_index_of_and_missing_ids(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _create(tmp_path)
    ids = _ids(10)
    np.testing.assert_array_equal(store.index_of([ids[7], ids[2]]), [7, 2])
    with pytest.raises(StoreError, match=r"of --gt g\.json not in map store .*not_an_id"):
        store.index_of([ids[0], "not_an_id"], wanted_by="--gt g.json")


def test_create_refuses_existing_store_and_duplicate_ids(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _create(tmp_path)
    with pytest.raises(StoreError, match="already exists"):
        _create(tmp_path)
    replaced = _create(tmp_path, n=6, overwrite=True)
    assert MapStore.open(replaced.uri).n == 6
    with pytest.raises(StoreError, match="unique"):
        MapStore.create(str(tmp_path / "dup.zarr"), ["a", "b", "a"], [0, 1, 2], GRID)
    with pytest.raises(StoreError, match="no map store"):
        MapStore.open(str(tmp_path / "missing.zarr"))


def test_write_chunk_checks_ownership_and_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _create(tmp_path, n=10, ipc=4)
    data = _rows_for(np.array([3, 4]))
    rows = encode_rows(data["slots"], data["probs"], data["cams_raw"], data["orig_size"], data["letterbox"])
    with pytest.raises(StoreError, match=r"chunk 0 must have slots in \[0, 4\)"):
        store.write_chunk(0, rows)
    with pytest.raises(StoreError, match="read-only"):
        MapStore.open(store.uri, mode="r").write_chunk(0, rows.take(np.array([0])))


def test_iter_batches_only_done(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _create(tmp_path, n=10, ipc=4)
    data = _rows_for(np.array([0, 5, 6, 9]))
    store.write_rows(data["slots"], data["probs"], data["cams_raw"], data["orig_size"], data["letterbox"])
    seen = np.concatenate([b.slots for b in store.iter_batches(batch_size=4)])
    np.testing.assert_array_equal(seen, [0, 5, 6, 9])
    assert sum(len(b) for b in store.iter_batches(batch_size=3, only_done=False)) == 10


# ---------------------------------------------------------------------------------------------------- staging


def _fragment(slots: list[int], seed: int, failed: list[int] = (), run: str = "r1") -> Fragment:  # type: ignore[assignment]
    data = _rows_for(np.asarray(slots), seed=seed)
    rows = encode_rows(data["slots"], data["probs"], data["cams_raw"], data["orig_size"], data["letterbox"])
    bad = np.isin(rows.slots, np.asarray(failed, dtype=np.int64))
    if bad.any():
        rows.failed[bad] = 1
        rows.probs[bad] = np.nan
    idx = np.flatnonzero(bad)
    failures = Failure(
        slots=rows.slots[idx],
        rows=rows.slots[idx] * 10 + 3,
        image_id=np.asarray(_ids(100), dtype=str)[rows.slots[idx]],
        path=np.asarray([f"/data/{s}.jpg" for s in rows.slots[idx]], dtype=str),
        stage=np.asarray(["decode"] * len(idx), dtype=str),
        error=np.asarray(["not a decodable image"] * len(idx), dtype=str),
        time=np.asarray(["2026-01-01T00:00:00.000+00:00"] * len(idx), dtype=str),
    )
    return Fragment(rows=rows, failures=failures, run_id=run)


def test_commit_merges_fragments_by_chunk_and_cleans_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _create(tmp_path, n=10, ipc=4)
    frags = [_fragment([0, 5, 9], seed=1), _fragment([1, 4, 6], seed=2, failed=[6]), _fragment([2, 3, 7, 8], seed=3)]
    for frag in frags:
        write_fragment(store.uri, frag)
    assert sorted(n for _, n in list_fragments(store.uri)) == [3, 3, 4]

    stats = commit_fragments(store, "r1", max_workers=4)
    assert (stats.fragments, stats.rows, stats.failed) == (3, 10, 1)
    assert list_fragments(store.uri) == []

    batch = MapStore.open(store.uri).read(slice(None))
    expected_done = [s != 6 for s in range(10)]
    assert batch.done.tolist() == expected_done and batch.failed.tolist() == [s == 6 for s in range(10)]
    for frag in frags:
        ok = frag.rows.failed == 0
        np.testing.assert_array_equal(batch.probs[frag.rows.slots[ok]], frag.rows.probs[ok])
        np.testing.assert_array_equal(
            batch.cams[frag.rows.slots[ok]], decode_cams(frag.rows.cams[ok], frag.rows.cam_max[ok])
        )
    failures = read_failures(store.uri)
    assert failures.column("image_id").to_pylist() == [_ids(10)[6]]
    assert failures.column("stage").to_pylist() == ["decode"] and failures.column("row").to_pylist() == [63]
    assert failures.column("run_id").to_pylist() == ["r1"]


def test_commit_twice_is_idempotent_and_newest_row_wins(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A crash between writing chunks and deleting fragments re-commits them: the store must not change."""
    store = _create(tmp_path, n=10, ipc=4)
    frag = _fragment([0, 1, 2, 3, 4], seed=4)
    write_fragment(store.uri, frag)
    commit_fragments(store, "r1")
    before = {k: np.asarray(zarr.open_array(os.path.join(store.uri, k))[:]) for k in ("probs", "cams", "done")}
    write_fragment(store.uri, frag)  # as if the first commit died before deleting it
    commit_fragments(store, "r2")
    for name, arr in before.items():
        np.testing.assert_array_equal(np.asarray(zarr.open_array(os.path.join(store.uri, name))[:]), arr)

    # A later success for a previously failed slot clears its failure.
    write_fragment(store.uri, _fragment([7], seed=5, failed=[7]))
    commit_fragments(store, "r3")
    assert store.failed()[7] and read_failures(store.uri).num_rows == 1
    write_fragment(store.uri, _fragment([7], seed=6))
    commit_fragments(store, "r4")
    assert store.done()[7] and not store.failed()[7]
    assert read_failures(store.uri).num_rows == 0 and read_failures(store.uri, current_only=False).num_rows == 1


def test_half_written_fragments_are_ignored_and_removed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _create(tmp_path)
    os.makedirs(staging_path(store.uri), exist_ok=True)
    with open(os.path.join(staging_path(store.uri), ".tmp-f-x-n3.npz"), "wb") as f:
        f.write(b"partial")
    assert list_fragments(store.uri) == []
    assert commit_fragments(store, "r").rows == 0
    assert remove_temporaries(store.uri) == 1
    assert os.listdir(staging_path(store.uri)) == []


def test_sidecar_is_outside_the_group(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _create(tmp_path)
    write_fragment(store.uri, _fragment([0], seed=0))
    assert sidecar_path(store.uri) == store.uri + ".sidecar"
    assert set(zarr.open_group(store.uri, mode="r").keys()) == {
        "image_id", "row", "probs", "cams", "cam_max", "orig_size", "letterbox", "failed", "done",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------- lock


def test_second_job_is_refused_while_the_first_holds_the_lock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    uri = str(tmp_path / "maps.zarr")
    first = StoreLock(uri, stale_after_s=30, run_id="job-one")
    first.acquire()
    try:
        with pytest.raises(StoreLockedError, match=r"in use by job job-one .*last heartbeat"):
            StoreLock(uri, stale_after_s=30, run_id="job-two").acquire()
    finally:
        first.release()
    assert not os.path.exists(lock_path(uri))
    with StoreLock(uri, run_id="job-two"):  # free again
        assert json.loads(Path(lock_path(uri)).read_text())["owner"] == "job-two"


def test_stale_lock_of_a_killed_job_is_taken_over(tmp_path) -> None:  # type: ignore[no-untyped-def]
    uri = str(tmp_path / "maps.zarr")
    os.makedirs(sidecar_path(uri))
    with open(lock_path(uri), "w") as f:
        json.dump({"owner": "dead-job", "host": "h", "pid": 1, "heartbeat": time.time() - 100}, f)
    lock = StoreLock(uri, stale_after_s=60, run_id="new-job")
    lock.acquire()
    try:
        assert lock.took_over is not None and lock.took_over["owner"] == "dead-job"
        assert json.loads(Path(lock_path(uri)).read_text())["owner"] == "new-job"
    finally:
        lock.release()


def test_heartbeat_keeps_a_long_job_fresh(tmp_path) -> None:  # type: ignore[no-untyped-def]
    uri = str(tmp_path / "maps.zarr")
    lock = StoreLock(uri, stale_after_s=0.4, run_id="long-job")
    lock.acquire()
    try:
        time.sleep(1.0)  # 2.5 stale periods: without heartbeats the lock would be stale
        with pytest.raises(StoreLockedError, match="long-job"):
            StoreLock(uri, stale_after_s=0.4, run_id="other").acquire()
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------- S3


@pytest.mark.s3
def test_store_and_staging_on_s3(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/runs/maps.zarr"
    store = MapStore.create(uri, _ids(6), np.arange(6), GRID, images_per_chunk=4)
    write_fragment(uri, _fragment([0, 1, 4], seed=7))
    write_fragment(uri, _fragment([2, 5], seed=8, failed=[5]))
    assert len(list_fragments(uri)) == 2
    with StoreLock(uri, run_id="s3-job") as lock:
        commit_fragments(store, "s3-job", lock=lock)
    assert list_fragments(uri) == []
    group = zarr.open_group(uri, mode="r")
    assert group["done"][:].tolist() == [1, 1, 1, 0, 1, 0]
    batch = MapStore.open(uri).read([0, 1, 4])
    assert batch.done.all() and np.isfinite(batch.cams).all()
    assert read_failures(uri).column("image_id").to_pylist() == [_ids(6)[5]]


def test_encoded_rows_failures_helper() -> None:
    rows = EncodedRows.failures(np.array([3, 4]), GRID)
    assert rows.failed.tolist() == [1, 1] and np.isnan(rows.probs).all() and rows.cams.shape == (2, len(TASKS), *GRID)
