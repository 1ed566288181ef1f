"""The store's write protocol in one object: every job that writes a map store goes through a :class:`StoreWriter`.

A job describes what it writes (:class:`StoreSpec`: the images, the identity a resumed store must match, how to
create the store) and hands the writer a Ray dataset of rows in the sink's input contract
(:meth:`~chexseg_dist.store.staging.Fragment.from_columns`). The writer owns the rest:

1. **open** (:meth:`StoreWriter.open`): refuse a path that holds something else; take the lock (one job per store,
   heartbeat, stale take-over); resume an existing store after checking its identity, or with ``overwrite`` clear
   it (staged fragments, failures) and create it anew; save the resolved config in the sidecar; delete temporaries
   and commit fragments an interrupted run left. If opening fails before the store exists, everything it created
   (the sidecar with the lock) is removed again: a refused command leaves the disk as it found it.
2. **write** (:meth:`StoreWriter.write`): Ray Data write tasks stage one immutable fragment each
   (:class:`~chexseg_dist.store.sink.FragmentSink`); the driver's :class:`~chexseg_dist.store.sink.Committer`
   merges them chunk by chunk (one writer per chunk), prints progress, and stops if the lock was lost; a failed
   pipeline still commits what was staged.
3. **close**: release the lock.

Usage::

    with StoreWriter(uri, run_id, settings) as writer:
        store = writer.open(spec, overwrite=False, config=cfg, run_facts={...})
        todo = writer.pending(retry_failed=False)
        writer.write(dataset_of_rows, todo=int(todo.sum()))
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chexseg_dist.config import Config, save_config
from chexseg_dist.core import fsio
from chexseg_dist.core.console import say
from chexseg_dist.core.serialize import now_utc
from chexseg_dist.errors import StoreError
from chexseg_dist.store.layout import CONFIG_FILE, failures_path, normalise_uri, sidecar_path, staging_path
from chexseg_dist.store.lock import StoreLock
from chexseg_dist.store.mapstore import MapStore, check_location
from chexseg_dist.store.staging import CommitStats, commit_fragments, remove_temporaries

log = logging.getLogger(__name__)

#: CPUs reserved per write task: staging a fragment is a little encoding and one PUT.
WRITE_TASK_CPUS = 0.25


@dataclass
class StoreSpec:
    """What a job writes.

    Attributes:
        image_ids, rows: the store's slots (image ids and manifest rows, in slot order).
        identity: attributes a resumed store must hold unchanged (fingerprints of the inputs that decide what a
            slot means and what was computed for it); recorded at creation.
        attrs: further attributes recorded at creation (descriptive).
        grid_shape: ``(gh, gw)`` of the maps (a new store's shape; a resumed store keeps its own).
        images_per_chunk: chunk size along the image axis.
        mismatch: ``(key, stored, wanted, store attrs) -> message`` explaining an identity mismatch and its fix.
        identity_defaults: what an identity key means in a store written before the key existed (e.g. a store
            without ``precision`` was written in fp32).
    """

    image_ids: Sequence[str]
    rows: np.ndarray
    identity: Mapping[str, Any]
    grid_shape: tuple[int, int]
    images_per_chunk: int
    attrs: Mapping[str, Any] = field(default_factory=dict)
    mismatch: Callable[[str, Any, Any, Mapping[str, Any]], str] | None = None
    identity_defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class WriterSettings:
    """How a writer paces itself (the ``pseudolabel`` config section holds these for the pseudo-labelling job)."""

    lock_stale_s: float = 120.0
    commit_interval_s: float = 30.0
    progress_interval_s: float = 10.0
    write_concurrency: int = 2


class StoreWriter:
    """Opens (or resumes) one map store for one run of a job, writes a Ray dataset into it, and commits.

    Args:
        uri: the store (local directory or ``s3://...``).
        run_id: this run's id (lock owner, fragment names, failure records).
        settings: pacing (lock staleness, commit and progress intervals, write concurrency).
        label: the job's name in progress lines.
    """

    def __init__(self, uri: str, run_id: str, settings: WriterSettings, label: str = "pseudolabel") -> None:
        self.uri = normalise_uri(uri)
        self.run_id = run_id
        self.settings = settings
        self.label = label
        self.lock = StoreLock(self.uri, stale_after_s=settings.lock_stale_s, run_id=run_id)
        self.store: MapStore | None = None
        self.recovered = CommitStats()
        self.created = False
        self._locked = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(
        self,
        spec: StoreSpec,
        overwrite: bool = False,
        config: Config | None = None,
        run_facts: Mapping[str, Any] | None = None,
    ) -> MapStore:
        """Take the lock and open the store for this run (see the module docstring, step 1).

        Raises:
            StoreError: the path holds something else, or the store was written for other inputs (naming them and
                the fix: a new store, or ``--overwrite``).
            StoreLockedError: another live job writes the store.
        """
        check_location(self.uri)
        sidecar = sidecar_path(self.uri)
        had_sidecar = fsio.exists(sidecar)
        existed = MapStore.exists(self.uri)
        self.lock.acquire()
        self._locked = True
        try:
            store = self._open_or_create(spec, overwrite, existed)
            facts = {"run_id": self.run_id, "store": self.uri, "started": now_utc(), **(run_facts or {})}
            if config is not None:
                save_config(config, sidecar, CONFIG_FILE, extra=facts)
                store.update_attrs(last_run={**facts, "config": config.to_dict()})
            remove_temporaries(self.uri)
            self.recovered = commit_fragments(store, self.run_id, lock=self.lock)
        except BaseException:
            self.close()
            if not had_sidecar and not self.created and not existed:
                fsio.remove(sidecar, recursive=True)
            raise
        self.store = store
        if self.recovered.fragments:
            say(
                f"{self.label}: committed {self.recovered.rows} rows from {self.recovered.fragments} fragment(s) "
                "left by an interrupted run"
            )
        return store

    def _open_or_create(self, spec: StoreSpec, overwrite: bool, existed: bool) -> MapStore:
        if existed and not overwrite:
            store = MapStore.open(self.uri, mode="r+")
            for key, wanted in spec.identity.items():
                stored = store.attrs.get(key, spec.identity_defaults.get(key))
                if stored != wanted:
                    explain = spec.mismatch or _default_mismatch
                    raise StoreError(f"{self.uri}: {explain(key, stored, wanted, store.attrs)}")
            return store
        if overwrite:
            for path in (staging_path(self.uri), failures_path(self.uri)):
                fsio.remove(path, recursive=True)
        grid = spec.grid_shape
        store = MapStore.create(
            self.uri,
            spec.image_ids,
            spec.rows,
            grid,
            attrs={**spec.attrs, **spec.identity},
            images_per_chunk=spec.images_per_chunk,
            overwrite=overwrite,
        )
        self.created = True
        say(f"{self.label}: created store {self.uri} ({store.n} images, grid {grid[0]}x{grid[1]})")
        return store

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self._locked:
            self.lock.release()
            self._locked = False

    # ------------------------------------------------------------------ work
    def pending(self, retry_failed: bool = False) -> np.ndarray:
        """``[N]`` bool: the slots this run must compute (not done; failed ones only with ``retry_failed``)."""
        store = self._open_store()
        done, failed = store.done(), store.failed()
        return ~done & (~failed | retry_failed)

    def write(self, dataset: Any, todo: int) -> None:
        """Write a Ray dataset of rows (the sink's input contract) into the store and commit everything.

        Args:
            dataset: a ``ray.data.Dataset`` whose rows follow :meth:`Fragment.from_columns`.
            todo: how many rows it holds (the progress line's total).

        Raises:
            StoreLockedError: the lock was lost to another job (nothing more is written).
            Whatever the pipeline raised, after committing what had been staged.
        """
        from chexseg_dist.store.sink import Committer, FragmentSink

        store = self._open_store()
        s = self.settings
        committer = Committer(
            store, self.lock, self.run_id, todo, s.commit_interval_s, s.progress_interval_s, label=self.label
        )
        sink = FragmentSink(self.uri, self.run_id, rows_per_write=store.images_per_chunk, committer=committer)
        committer.start()
        try:
            dataset.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS}, concurrency=s.write_concurrency)
        finally:
            committer.stop()
        committer.commit()  # Anything staged after on_write_complete (nothing, normally).
        if committer.error is not None:
            raise committer.error

    def _open_store(self) -> MapStore:
        if self.store is None:
            raise RuntimeError("StoreWriter: call open() first")
        return self.store


def _default_mismatch(key: str, stored: Any, wanted: Any, attrs: Mapping[str, Any]) -> str:
    return f"the store was written with {key}={stored!r}, this run has {wanted!r}; choose a new store or overwrite it"
