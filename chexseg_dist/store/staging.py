"""Writing the map store from many parallel tasks without two writers ever touching one chunk.

Protocol (docs/store-format.md explains why it is safe):

1. Each parallel writer stages its rows as ONE immutable *fragment* in ``<store>.sidecar/staging/``: an ``.npz``
   holding slots and the encoded rows (:class:`~chexseg_dist.store.codec.EncodedRows`) plus the failure records of its
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

import io
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from chexseg_dist.core import fsio
from chexseg_dist.errors import StoreError
from chexseg_dist.store.codec import EncodedRows
from chexseg_dist.store.failures import Failure, append_failures
from chexseg_dist.store.layout import FRAGMENT_SUFFIX, TMP_PREFIX, staging_path
from chexseg_dist.store.lock import StoreLock
from chexseg_dist.store.mapstore import MapStore, split_by_chunk

log = logging.getLogger(__name__)


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
    def from_columns(columns: dict[str, np.ndarray], run_id: str) -> Fragment:
        """The sink's input contract -> a fragment: one row per image, in the store's encoding.

        Columns: ``slot``, ``row``, ``image_id``, ``path`` (where each row goes and what it is), ``probs``, ``cams``,
        ``cam_max``, ``letterbox`` (:class:`EncodedRows`; ``orig_size`` is the letterbox's first two values),
        ``failed`` (1 for a failed image) and the failure record's ``stage``, ``error``, ``time``.
        """
        failed = np.asarray(columns["failed"], dtype=np.uint8)
        boxes = np.asarray(columns["letterbox"], dtype=np.int32).reshape(-1, 7)
        rows = EncodedRows(
            slots=np.asarray(columns["slot"], dtype=np.int64),
            probs=np.asarray(columns["probs"], dtype=np.float32),
            cams=np.asarray(columns["cams"], dtype=np.float16),
            cam_max=np.asarray(columns["cam_max"], dtype=np.float32),
            orig_size=np.ascontiguousarray(boxes[:, :2]),
            letterbox=boxes,
            failed=failed,
        )
        bad = np.flatnonzero(failed == 1)
        failures = Failure(
            slots=rows.slots[bad],
            rows=np.asarray(columns["row"], dtype=np.int64)[bad],
            **{k: np.asarray(columns[k], dtype=str)[bad] for k in ("image_id", "path", "stage", "error", "time")},
        )
        return Fragment(rows=rows, failures=failures, run_id=run_id)

    @staticmethod
    def from_bytes(data: bytes, source: str) -> Fragment:
        for attempt in range(3):
            try:
                with np.load(io.BytesIO(data), allow_pickle=False) as z:
                    rows = EncodedRows(**{k: z[f"rows_{k}"] for k in EncodedRows.__dataclass_fields__})
                    failures = Failure(**{k: z[f"fail_{k}"] for k in Failure.__dataclass_fields__})
                    return Fragment(rows=rows, failures=failures, run_id=str(z["run_id"]))
            except SystemError as exc:
                # numpy parses each .npy header with ast.literal_eval, and CPython 3.11 can raise a spurious
                # "AST constructor recursion depth mismatch" when another thread builds an AST at the same time
                # (python/cpython#106905; seen here while Ray's threads ran): the same bytes parse on a retry.
                if "recursion depth mismatch" not in str(exc) or attempt == 2:
                    raise _unreadable(source, exc) from None
            except Exception as exc:
                raise _unreadable(source, exc) from None
        raise AssertionError("unreachable")


def _unreadable(source: str, exc: BaseException) -> StoreError:
    return StoreError(
        f"staging fragment {source} is unreadable ({type(exc).__name__}: {exc}); delete it and re-run (its rows are "
        "computed again)"
    )


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
        fsio.remove(path)


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
