"""The Ray Data side of the write protocol: a Datasink whose tasks stage fragments, and the driver's committer.

Imports Ray Data at import time: :class:`~chexseg_dist.store.writer.StoreWriter` imports this module only when a
pipeline is written, so reading or creating a store never needs Ray.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from ray.data import Datasink

from chexseg_dist.core.console import rate_eta, say
from chexseg_dist.store.lock import StoreLock
from chexseg_dist.store.mapstore import MapStore
from chexseg_dist.store.staging import Fragment, commit_fragments, list_fragments, write_fragment

log = logging.getLogger(__name__)


class Committer:
    """Driver-side: commits staged fragments every ``interval_s`` and prints a progress line.

    One committer per job, and commits are serialised by a mutex, so each chunk has exactly one writer.

    Args:
        store: the store, open for writing.
        lock: the job's lock, checked before every commit round (a lost lock stops the job before it writes).
        run_id: recorded with the failures.
        todo: images this run processes (for the progress line).
        interval_s, progress_interval_s: seconds between commits and between progress lines.
        label: the progress line's prefix (the command).
    """

    def __init__(
        self,
        store: MapStore,
        lock: StoreLock | None,
        run_id: str,
        todo: int,
        interval_s: float,
        progress_interval_s: float,
        label: str = "pseudolabel",
    ) -> None:
        self.store = store
        self.lock = lock
        self.run_id = run_id
        self.todo = todo
        self.interval_s = interval_s
        self.progress_interval_s = progress_interval_s
        self.label = label
        self.committed = 0
        self.failed = 0
        self.commits = 0
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()
        self.error: BaseException | None = None

    def start(self) -> None:
        self._started = time.time()
        self._thread = threading.Thread(target=self._loop, name=f"{self.label}-committer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_commit = time.time() + self.interval_s
        next_progress = time.time() + self.progress_interval_s
        tick = max(0.05, min(self.interval_s, self.progress_interval_s) / 4)
        while not self._stop.wait(tick):
            now = time.time()
            try:
                if now >= next_commit:
                    self.commit()
                    next_commit = now + self.interval_s
                if now >= next_progress:
                    self.report()
                    next_progress = now + self.progress_interval_s
            except Exception as exc:  # Recorded; the final commit on the driver raises it.
                self.error = exc
                log.exception("periodic commit failed")
                return

    def commit(self) -> None:
        """Commit every complete staged fragment now (serialised with other commits)."""
        with self._mutex:
            stats = commit_fragments(self.store, self.run_id, lock=self.lock)
            self.committed += stats.rows - stats.failed
            self.failed += stats.failed
            self.commits += int(stats.fragments > 0)

    def report(self) -> None:
        staged = sum(n for _, n in list_fragments(self.store.uri))
        elapsed = max(time.time() - self._started, 1e-9)
        finished = self.committed + self.failed + staged
        say(
            f"{self.label}: {finished}/{self.todo} images ({self.committed} committed, {staged} staged, "
            f"{self.failed} failed), {rate_eta(finished, self.todo, elapsed)}"
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class FragmentSink(Datasink):
    """Ray Data Datasink: each write task stages its rows as one fragment; the driver commits them per chunk.

    Lifecycle: ``on_write_start`` (driver) creates the staging area; ``write`` (parallel tasks) writes one immutable
    fragment per task from rows in the sink's input contract (:meth:`Fragment.from_columns`) and never touches the
    Zarr arrays; ``on_write_complete`` (driver) commits every staged fragment (one owner per chunk) through the
    :class:`Committer`; ``on_write_failed`` (driver) commits what was staged, so finished work survives, and leaves the
    rest for the next run.

    Args:
        store_uri: the map store.
        run_id: this run's id (fragment names, failure records).
        rows_per_write: minimum rows per write task (Ray buffers smaller blocks), i.e. fragment size.
        committer: driver-side committer (not shipped to write tasks); None = commit without one.
    """

    def __init__(self, store_uri: str, run_id: str, rows_per_write: int, committer: Committer | None = None) -> None:
        from chexseg_dist.store.layout import normalise_uri

        self.store_uri = normalise_uri(store_uri)
        self.run_id = run_id
        self.rows_per_write = int(rows_per_write)
        self._committer = committer
        self.write_returns: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_committer"] = None  # Threads, zarr handles and the lock stay on the driver.
        return state

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    def get_name(self) -> str:
        return "MapStoreFragments"

    def on_write_start(self, schema: Any = None) -> None:
        from chexseg_dist.core import fsio
        from chexseg_dist.store.layout import staging_path

        fsio.makedirs(staging_path(self.store_uri))

    def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
        """Stage the rows of this task's blocks as one fragment. Empty blocks (no columns) are skipped."""
        from ray.data.block import BlockAccessor

        parts: list[dict[str, np.ndarray]] = []
        for block in blocks:
            acc = BlockAccessor.for_block(block)
            if acc.num_rows() == 0:
                continue
            columns: Any = acc.to_batch_format("numpy")
            parts.append({str(k): np.asarray(v) for k, v in columns.items()})
        if not parts:
            return {"fragment": None, "rows": 0, "failed": 0, "start": time.time(), "end": time.time()}
        start = time.time()
        columns = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
        fragment = Fragment.from_columns(columns, self.run_id)
        path = write_fragment(self.store_uri, fragment)
        return {
            "fragment": path,
            "rows": len(fragment.rows),
            "failed": int(fragment.rows.failed.sum()),
            "start": start,
            "end": time.time(),
        }

    def on_write_complete(self, write_result: Any) -> None:
        self.write_returns = list(write_result.write_returns)
        if self._committer is not None:
            self._committer.commit()

    def on_write_failed(self, error: Exception) -> None:
        log.error("pipeline failed (%s); committing what was staged", error)
        if self._committer is not None:
            try:
                self._committer.commit()
            except Exception:
                log.exception("commit after failure failed; staged fragments stay for the next run")
