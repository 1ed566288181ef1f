"""The store's write protocol as one object (no Ray): open or resume with the identity check, --overwrite, refusals
that leave nothing behind, recovery of staged fragments, and a lost lock stopping the job before it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chexseg_dist.core.pathologies import OBSERVATIONS, TASKS
from chexseg_dist.errors import StoreError, StoreLockedError
from chexseg_dist.store import (
    EncodedRows,
    Failure,
    Fragment,
    MapStore,
    StoreSpec,
    StoreWriter,
    WriterSettings,
    commit_fragments,
    list_fragments,
    lock_path,
    read_failures,
    sidecar_path,
    write_fragment,
)

GRID = (2, 3)


def _spec(n: int = 6, identity: str = "manifest-A") -> StoreSpec:
    return StoreSpec(
        image_ids=[f"id{i}" for i in range(n)],
        rows=np.arange(n),
        identity={"manifest_fingerprint": identity},
        grid_shape=GRID,
        images_per_chunk=4,
        attrs={"note": "test"},
    )


def _fragment(slots: list[int], failed: tuple[int, ...] = ()) -> Fragment:
    n = len(slots)
    rng = np.random.default_rng(n)
    rows = EncodedRows(
        slots=np.asarray(slots, dtype=np.int64),
        probs=rng.random((n, len(OBSERVATIONS))).astype(np.float32),
        cams=rng.random((n, len(TASKS), *GRID)).astype(np.float16),
        cam_max=np.ones((n, len(TASKS)), dtype=np.float32),
        orig_size=np.full((n, 2), 40, dtype=np.int32),
        letterbox=np.tile(np.asarray([[40, 40, 32, 32, 32, 0, 0]], np.int32), (n, 1)),
        failed=np.asarray([s in failed for s in slots], dtype=np.uint8),
    )
    bad = np.flatnonzero(rows.failed)
    failures = Failure(
        slots=rows.slots[bad],
        rows=rows.slots[bad],
        image_id=np.asarray([f"id{s}" for s in rows.slots[bad]]),
        path=np.asarray([f"/x/{s}.jpg" for s in rows.slots[bad]]),
        stage=np.asarray(["decode"] * len(bad)),
        error=np.asarray(["bad"] * len(bad)),
        time=np.asarray(["t"] * len(bad)),
    )
    return Fragment(rows=rows, failures=failures, run_id="old-run")


def _writer(uri: str, run_id: str = "run") -> StoreWriter:
    return StoreWriter(uri, run_id, WriterSettings(lock_stale_s=30, commit_interval_s=1, progress_interval_s=1))


def test_create_then_resume_checks_identity_and_recovers_staged_fragments(tmp_path: Path) -> None:
    uri = str(tmp_path / "maps.zarr")
    with _writer(uri) as w:
        store = w.open(_spec())
        assert w.created and store.n == 6 and store.attrs["note"] == "test" and store.grid_shape == GRID
    assert not Path(lock_path(uri)).exists()  # closed: lock released
    # An interrupted run left a fragment behind: the next open commits it before anything else.
    write_fragment(uri, _fragment([0, 1, 5], failed=(5,)))
    with _writer(uri, "run2") as w:
        store = w.open(_spec())
        assert not w.created  # resumed
        assert w.recovered.rows == 3 and w.recovered.failed == 1
        assert store.done().tolist() == [True, True, False, False, False, False]
        assert w.pending().tolist() == [False, False, True, True, True, False]  # the failed one is not retried
        assert w.pending(retry_failed=True)[5]
    assert list_fragments(uri) == []
    # Another identity: refused, naming the key, the store untouched.
    with _writer(uri, "run3") as w, pytest.raises(StoreError, match="manifest_fingerprint"):
        w.open(_spec(identity="manifest-B"))
    assert MapStore.open(uri).done().sum() == 2


def test_overwrite_replaces_the_store_its_fragments_and_failures(tmp_path: Path) -> None:
    uri = str(tmp_path / "maps.zarr")
    with _writer(uri) as w:
        store = w.open(_spec())
        write_fragment(uri, _fragment([0, 2], failed=(2,)))
        commit_fragments(store, "run")
    write_fragment(uri, _fragment([3]))  # staged, not committed
    assert read_failures(uri).num_rows == 1
    with _writer(uri, "run2") as w:
        store = w.open(_spec(n=9, identity="manifest-B"), overwrite=True)
        assert w.created and store.n == 9 and w.recovered.rows == 0
    assert not MapStore.open(uri).done().any()
    assert list_fragments(uri) == [] and read_failures(uri).num_rows == 0


def test_a_refused_open_leaves_the_disk_as_it_found_it(tmp_path: Path) -> None:
    uri = str(tmp_path / "maps.zarr")
    spec = _spec()
    spec.image_ids = ["same", "same"]  # refused while the store is created (duplicate ids), after the lock is taken
    spec.rows = np.arange(2)
    with _writer(uri) as w, pytest.raises(StoreError, match="unique"):
        w.open(spec)
    assert list(tmp_path.iterdir()) == []  # no store, no sidecar, no lock

    # A path that holds something else is refused before the lock is even taken.
    notes = tmp_path / "notes.zarr"
    notes.write_text("not a store")
    with _writer(str(notes)) as w, pytest.raises(StoreError, match="is a file, not a map store"):
        w.open(_spec())
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"meow")
    with _writer(str(folder)) as w, pytest.raises(StoreError, match="other files in it"):
        w.open(_spec())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.zarr", "photos"]


def test_a_job_that_lost_its_lock_stops_before_it_commits(tmp_path: Path) -> None:
    """A job whose heartbeat went stale and whose lock another job took over must not write the store."""
    uri = str(tmp_path / "maps.zarr")
    with _writer(uri) as w:
        w.lock.stale_after_s = 0.2  # beat every 0.05 s
        store = w.open(_spec())
        write_fragment(uri, _fragment([0, 1]))
        # Another job takes over (as it would after our heartbeat went stale): it rewrites the lock file.
        record = {"owner": "usurper", "host": "elsewhere", "pid": 1, "heartbeat": 1e12}
        Path(lock_path(uri)).write_text(json.dumps(record))
        import time

        deadline = time.time() + 5
        while w.lock._lost is None and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(StoreLockedError, match=r"lost the lock .*usurper"):
            commit_fragments(store, "run", lock=w.lock)
    assert not MapStore.open(uri).done().any()  # nothing was written
    assert [n for _, n in list_fragments(uri)] == [2]  # the staged rows wait for the next run
    assert json.loads(Path(lock_path(uri)).read_text())["owner"] == "usurper"  # and its lock was left alone
    assert Path(sidecar_path(uri)).is_dir()
