"""Writing the map store from many parallel tasks without two writers ever touching one chunk.

Protocol (docs/store-format.md explains why it is safe):

1. Each parallel writer stages its rows as ONE immutable *fragment* in ``<store>.sidecar/staging/``: an ``.npz``
   holding slots and the encoded rows (:class:`~chexseg_dist.store.EncodedRows`) plus the failure records of its
   failed rows. A fragment appears atomically: locally it is written under a ``.tmp-`` name and renamed, on S3 it
   is a single PUT (objects are never visible half-written). Writers never touch the Zarr arrays.
2. One *committer* (the job's driver; :func:`commit_fragments`) lists complete fragments, merges their rows by
   chunk and read-modify-writes each chunk exactly once per round, one thread per chunk, so every chunk has one
   owner at a time. Failure records go to the failures table; then the committed fragments are deleted.
   A crash at any point leaves either the fragment (committed again next time: idempotent, same bytes) or the
   committed rows; ``done`` is written last in every chunk.
3. One job per store at a time: :class:`StoreLock` (``<store>.sidecar/lock.json`` with owner and heartbeat). A
   second job refuses with a message; a lock whose heartbeat is older than the stale timeout (a killed job) is
   taken over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from chexseg_dist import fsio
from chexseg_dist.store import EncodedRows, MapStore, normalise_uri, sidecar_path, split_by_chunk

log = logging.getLogger(__name__)

STAGING_DIR = "staging"
FAILURES_DIR = "failures"
LOCK_FILE = "lock.json"
CONFIG_FILE = "config.yaml"
FRAGMENT_SUFFIX = ".npz"
TMP_PREFIX = ".tmp-"
FAILURE_COLUMNS: tuple[str, ...] = ("image_id", "path", "row", "slot", "stage", "error", "run_id", "time")


def staging_path(store_uri: str) -> str:
    return fsio.join(sidecar_path(store_uri), STAGING_DIR)


def failures_path(store_uri: str) -> str:
    return fsio.join(sidecar_path(store_uri), FAILURES_DIR)


def lock_path(store_uri: str) -> str:
    return fsio.join(sidecar_path(store_uri), LOCK_FILE)


# ---------------------------------------------------------------------------------------------------- fragments


@dataclass
class Failure:
    """Failure records of some rows: what could not be processed and why.

    Attributes:
        slots, rows: ``[m]`` int64 store slots and manifest rows.
        image_id, path, stage, error: ``[m]`` str; ``stage`` is ``read`` (fetching the bytes), ``decode``
            (decoding / letterboxing) or ``model`` (non-finite classifier output).
        time: ``[m]`` str, UTC ISO-8601 time of the failure.
    """

    slots: np.ndarray
    rows: np.ndarray
    image_id: np.ndarray
    path: np.ndarray
    stage: np.ndarray
    error: np.ndarray
    time: np.ndarray

    @staticmethod
    def empty() -> Failure:
        z = np.zeros(0, dtype=np.int64)
        s = np.zeros(0, dtype=str)
        return Failure(z, z.copy(), s, s.copy(), s.copy(), s.copy(), s.copy())

    def __len__(self) -> int:
        return int(self.slots.shape[0])

    @staticmethod
    def concat(parts: Sequence[Failure]) -> Failure:
        if not parts:
            return Failure.empty()
        return Failure(
            **{k: np.concatenate([getattr(p, k) for p in parts]) for k in Failure.__dataclass_fields__}  # type: ignore[arg-type]
        )

    def to_table(self, run_id: str) -> pa.Table:
        return pa.table(
            {
                "image_id": pa.array(self.image_id.astype(str).tolist(), pa.string()),
                "path": pa.array(self.path.astype(str).tolist(), pa.string()),
                "row": pa.array(self.rows.astype(np.int64)),
                "slot": pa.array(self.slots.astype(np.int64)),
                "stage": pa.array(self.stage.astype(str).tolist(), pa.string()),
                "error": pa.array(self.error.astype(str).tolist(), pa.string()),
                "run_id": pa.array([run_id] * len(self), pa.string()),
                "time": pa.array(self.time.astype(str).tolist(), pa.string()),
            }
        )


@dataclass
class Fragment:
    """One staged write: encoded rows (successes and failures) and the failure records."""

    rows: EncodedRows
    failures: Failure
    run_id: str

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        payload: dict[str, np.ndarray] = {f"rows_{k}": getattr(self.rows, k) for k in self.rows.__dataclass_fields__}
        payload.update({f"fail_{k}": getattr(self.failures, k) for k in self.failures.__dataclass_fields__})
        payload["run_id"] = np.asarray(self.run_id)
        np.savez(buf, **payload)  # type: ignore[arg-type]
        return buf.getvalue()

    @staticmethod
    def from_bytes(data: bytes, source: str) -> Fragment:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                rows = EncodedRows(**{k: z[f"rows_{k}"] for k in EncodedRows.__dataclass_fields__})
                failures = Failure(**{k: z[f"fail_{k}"] for k in Failure.__dataclass_fields__})
                return Fragment(rows=rows, failures=failures, run_id=str(z["run_id"]))
        except Exception as exc:
            raise ValueError(f"staging fragment {source} is unreadable ({type(exc).__name__}: {exc})") from None


def fragment_name(run_id: str, n_rows: int) -> str:
    """``f-<run>-<uuid>-n<rows>.npz``: unique, and the row count is readable from a listing (progress)."""
    return f"f-{run_id}-{uuid.uuid4().hex[:12]}-n{n_rows}{FRAGMENT_SUFFIX}"


def write_fragment(store_uri: str, fragment: Fragment) -> str:
    """Stage one fragment atomically; returns its path. Called by parallel writers (no store access)."""
    directory = staging_path(store_uri)
    name = fragment_name(fragment.run_id, len(fragment.rows))
    target = fsio.join(directory, name)
    data = fragment.to_bytes()
    if fsio.is_uri(target):
        # One PUT (or one completed multipart upload): the object is visible only when complete.
        with fsio.open_file(target, "wb") as f:
            f.write(data)
    else:
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, TMP_PREFIX + name)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    return target


def list_fragments(store_uri: str) -> list[tuple[str, int]]:
    """Complete staged fragments as ``(path, n_rows)``, oldest name first (temporary files are ignored)."""
    directory = staging_path(store_uri)
    fs, inner = fsio.filesystem(directory)
    try:
        entries = fs.ls(inner, detail=False, refresh=True) if fsio.is_uri(directory) else fs.ls(inner, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for entry in sorted(str(e) for e in entries):
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        if not base.endswith(FRAGMENT_SUFFIX) or base.startswith(TMP_PREFIX):
            continue
        try:
            n_rows = int(base[: -len(FRAGMENT_SUFFIX)].rsplit("-n", 1)[1])
        except (IndexError, ValueError):
            n_rows = 0
        out.append((fsio.join(directory, base), n_rows))
    return out


def remove_temporaries(store_uri: str) -> int:
    """Delete half-written local ``.tmp-`` fragments left by killed writers (call with the lock held)."""
    directory = staging_path(store_uri)
    if fsio.is_uri(directory) or not os.path.isdir(directory):
        return 0
    removed = 0
    for name in os.listdir(directory):
        if name.startswith(TMP_PREFIX):
            os.remove(os.path.join(directory, name))
            removed += 1
    return removed


def read_fragment(path: str) -> Fragment:
    return Fragment.from_bytes(fsio.read_bytes(path), path)


def _delete(paths: Iterable[str]) -> None:
    for path in paths:
        fs, inner = fsio.filesystem(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(inner)


@dataclass
class CommitStats:
    """What one :func:`commit_fragments` call did."""

    fragments: int = 0
    rows: int = 0
    failed: int = 0
    chunks: int = 0


def commit_fragments(
    store: MapStore,
    run_id: str,
    max_workers: int = 8,
    max_rows_per_round: int | None = None,
    lock: StoreLock | None = None,
    paths: Sequence[str] | None = None,
) -> CommitStats:
    """Merge staged fragments into the store, one owner per chunk, then delete them.

    Runs in rounds of at most ``max_rows_per_round`` rows (memory stays bounded whatever the backlog). In a round,
    fragments are read, rows grouped by chunk (a slot staged twice keeps its newest row), failure records appended
    to the failures table, and each touched chunk read-modify-written by exactly one thread.

    Args:
        store: the store, open for writing; only this committer may write it.
        run_id: recorded with the failures.
        max_workers: chunks written concurrently (each by one thread).
        max_rows_per_round: default ``max(4 * images_per_chunk, 16384)``.
        lock: if given, checked before every round; a lost lock stops the commit (another job took over).
        paths: commit these fragments only; default: every complete fragment listed now.

    Returns:
        Counts of fragments, rows, failed rows and chunk writes.
    """
    cap = max_rows_per_round or max(4 * store.images_per_chunk, 16384)
    listed = [(p, 0) for p in paths] if paths is not None else list_fragments(store.uri)
    stats = CommitStats()
    pos = 0
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        while pos < len(listed):
            batch: list[str] = []
            total = 0
            while pos < len(listed) and (not batch or total + listed[pos][1] <= cap):
                batch.append(listed[pos][0])
                total += listed[pos][1]
                pos += 1
            if lock is not None:
                lock.check()
            frags = list(pool.map(read_fragment, batch))
            rows = EncodedRows.concat([f.rows for f in frags])
            failures = Failure.concat([f.failures for f in frags])
            if len(failures):
                append_failures(store.uri, failures, run_id)
            parts = split_by_chunk(rows, store.images_per_chunk)
            futures = [pool.submit(store.write_chunk, c, part) for c, part in parts.items()]
            for fut in futures:
                fut.result()
            _delete(batch)
            stats.fragments += len(batch)
            stats.rows += len(rows)
            stats.failed += int((rows.failed == 1).sum())
            stats.chunks += len(parts)
    return stats


# ---------------------------------------------------------------------------------------------------- failures


def append_failures(store_uri: str, failures: Failure, run_id: str) -> str:
    """Write failure records as one new Parquet file in ``<store>.sidecar/failures/``; returns its path."""
    directory = failures_path(store_uri)
    fsio.makedirs(directory)
    target = fsio.join(directory, f"{run_id}-{uuid.uuid4().hex[:12]}.parquet")
    with fsio.open_file(target, "wb") as f:
        pq.write_table(failures.to_table(run_id), f)
    return target


def read_failures(store_uri: str, current_only: bool = True) -> pa.Table:
    """The failures table (columns image_id, path, row, slot, stage, error, run_id, time).

    Args:
        store_uri: the map store.
        current_only: keep only the latest record per image, and only images still failed in the store (a retry
            that succeeded removes them); False returns every record ever written.
    """
    directory = failures_path(store_uri)
    fs, inner = fsio.filesystem(directory)
    try:
        listing = fs.ls(inner, detail=False, refresh=True) if fsio.is_uri(directory) else fs.ls(inner, detail=False)
        files = sorted(str(p) for p in listing if str(p).endswith(".parquet"))
    except FileNotFoundError:
        files = []
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    if not tables:
        empty = Failure.empty().to_table("")
        return empty
    table = pa.concat_tables(tables)
    if not current_only or table.num_rows == 0:
        return table
    store = MapStore.open(store_uri)
    still = store.failed()
    order = np.lexsort((np.asarray(table["time"].to_pylist(), dtype=str), np.asarray(table["slot"])))
    slots = np.asarray(table["slot"])[order]
    last = np.r_[slots[1:] != slots[:-1], True]
    keep = order[last]
    keep = keep[still[np.asarray(table["slot"])[keep]]]
    return table.take(pa.array(np.sort(keep)))


# ---------------------------------------------------------------------------------------------------- lock


class StoreLockedError(RuntimeError):
    """Another live job holds the store's lock."""


class StoreLock:
    """One job per store: ``<store>.sidecar/lock.json`` with an owner id and a heartbeat.

    ``acquire`` refuses while another owner's heartbeat is fresher than ``stale_after_s`` and takes over an older
    (stale) lock, e.g. one left by a SIGKILLed job. A background thread refreshes the heartbeat every
    ``stale_after_s / 4`` seconds. Exclusive creation is atomic locally (``O_EXCL``); on object stores acquisition is
    write-then-verify (two jobs starting within the same second could both pass; document: start one job per store).
    Heartbeats compare wall clocks: hosts sharing a store need roughly synchronised clocks (NTP).
    """

    def __init__(self, store_uri: str, stale_after_s: float = 120.0, run_id: str | None = None) -> None:
        self.store_uri = normalise_uri(store_uri)
        self.path = lock_path(self.store_uri)
        self.stale_after_s = float(stale_after_s)
        self.owner = run_id or uuid.uuid4().hex[:12]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self.took_over: dict[str, Any] | None = None

    def _record(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat": time.time(),
            "heartbeat_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    def read(self) -> dict[str, Any] | None:
        """The current lock record, or None if there is none (an unreadable record counts as stale)."""
        try:
            data = json.loads(fsio.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"owner": "?", "heartbeat": 0.0}
        return data if isinstance(data, dict) else {"owner": "?", "heartbeat": 0.0}

    def _write(self) -> None:
        data = json.dumps(self._record()).encode()
        if fsio.is_uri(self.path):
            with fsio.open_file(self.path, "wb") as f:
                f.write(data)
        else:
            tmp = f"{self.path}.{self.owner}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)

    def _create_exclusive(self) -> bool:
        """Local only: create the lock file if absent, atomically. False if it exists."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(self._record()).encode())
        return True

    def acquire(self) -> None:
        """Take the lock and start the heartbeat.

        Raises:
            StoreLockedError: a live job holds it (naming the owner, host, pid, heartbeat age and what to do).
        """
        if not fsio.is_uri(self.path) and self._create_exclusive():
            self._start()
            return
        current = self.read()
        if current is not None and current.get("owner") != self.owner:
            age = time.time() - float(current.get("heartbeat", 0.0))
            if age < self.stale_after_s:
                raise StoreLockedError(
                    f"store {self.store_uri} is in use by job {current.get('owner')} (host {current.get('host')}, "
                    f"pid {current.get('pid')}, last heartbeat {age:.0f} s ago). Wait for it to finish; if that job "
                    f"is dead, its lock goes stale {self.stale_after_s - age:.0f} s from now (or delete {self.path})."
                )
            self.took_over = current
            log.warning("taking over stale lock of job %s (heartbeat %.0f s ago)", current.get("owner"), age)
        self._write()
        if fsio.is_uri(self.path):
            # Write-then-verify: if another job wrote after us, it wins and we refuse.
            time.sleep(0.2)
            again = self.read()
            if again is None or again.get("owner") != self.owner:
                raise StoreLockedError(f"store {self.store_uri}: another job took the lock at the same time; retry")
        self._start()

    def _start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="store-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(0.05, self.stale_after_s / 4)
        while not self._stop.wait(interval):
            try:
                current = self.read()
                if current is not None and current.get("owner") != self.owner:
                    self._lost = f"job {current.get('owner')} on {current.get('host')} took over the lock"
                    return
                self._write()
            except Exception as exc:  # A transient storage error must not kill the job; the next beat retries.
                log.warning("lock heartbeat failed: %s", exc)

    def check(self) -> None:
        """Raise if the lock was lost (another job took over after our heartbeat went stale)."""
        if self._lost:
            raise StoreLockedError(f"store {self.store_uri}: lost the lock ({self._lost}); stopping without writing")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        current = self.read()
        if current is not None and current.get("owner") == self.owner:
            _delete([self.path])

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def now_utc() -> str:
    """The current UTC time, ISO-8601 with milliseconds (failure records)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
