"""Refined pseudo-masks inside a map store: one subgroup ``refined/<key>`` per refinement recipe (layout in
:mod:`.layout`). Written chunk by chunk, each chunk by exactly one task of the refine job, ``done`` last."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from chexseg_dist.data.failures import append_failure_table
from chexseg_dist.errors import StoreError
from chexseg_dist.store.layout import (
    REFINED_ARRAYS,
    REFINED_FORMAT,
    REFINED_GROUP,
    REFINED_VERSION,
    _compressors,
    refined_failures_path,
    refined_specs,
)
from chexseg_dist.store.lock import StoreLock
from chexseg_dist.store.mapstore import MapStore


class RefinedMasks:
    """One recipe's refined masks in a map store (``store.uri/refined/<key>``).

    Args:
        store: the map store (its image axis and chunking are shared).
        key: the recipe's key.
        group: the opened Zarr subgroup.
    """

    def __init__(self, store: MapStore, key: str, group: zarr.Group) -> None:
        self.store = store
        self.key = key
        self._group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        if self.attrs.get("format") != REFINED_FORMAT or self.attrs.get("version") != REFINED_VERSION:
            raise StoreError(
                f"{store.uri}/{REFINED_GROUP}/{key} is not a version-{REFINED_VERSION} refined-mask group; delete it "
                "and run chexseg refine again"
            )
        self.frame = int(self.attrs["frame"])
        self._arrays: dict[str, zarr.Array] = {}

    @staticmethod
    def path(key: str) -> str:
        return f"{REFINED_GROUP}/{key}"

    @staticmethod
    def keys(store: MapStore) -> list[str]:
        """The recipes with refined masks in the store."""
        try:
            group = store.group[REFINED_GROUP]
        except KeyError:
            return []
        assert isinstance(group, zarr.Group)
        return sorted(group.group_keys())

    @classmethod
    def exists(cls, store: MapStore, key: str) -> bool:
        try:
            store.group[cls.path(key)]
        except KeyError:
            return False
        return True

    @classmethod
    def open(cls, store: MapStore, key: str) -> RefinedMasks:
        """Open an existing recipe's subgroup.

        Raises:
            StoreError: there is none (naming the command that makes it).
        """
        try:
            group = store.group[cls.path(key)]
        except KeyError:
            raise StoreError(
                f"{store.uri} has no refined masks of this recipe ({REFINED_GROUP}/{key}); run chexseg refine"
            ) from None
        assert isinstance(group, zarr.Group)
        return cls(store, key, group)

    @classmethod
    def create(cls, store: MapStore, key: str, frame: int, spec: Mapping[str, Any]) -> RefinedMasks:
        """Create the subgroup (every row pending); ``spec`` (the recipe) is recorded as its attributes."""
        if store.mode == "r":
            raise StoreError(f"{store.uri} is open read-only; open it with mode='r+' to add refined masks")
        attrs = {"format": REFINED_FORMAT, "version": REFINED_VERSION, "frame": int(frame), "spec": dict(spec)}
        group = store.group.require_group(REFINED_GROUP).create_group(key, attributes=attrs)
        ipc = store.images_per_chunk
        for name, (shape, dtype, fill) in refined_specs(store.n, frame).items():
            group.create_array(
                name,
                shape=shape,
                chunks=(ipc, *shape[1:]),
                dtype=dtype,
                fill_value=fill,
                compressors=_compressors(dtype),
                config={"write_empty_chunks": True},
            )
        return cls(store, key, group)

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            arr = self._group[name]
            assert isinstance(arr, zarr.Array)
            self._arrays[name] = arr.with_config({"write_empty_chunks": True})
        return self._arrays[name]

    def done(self) -> np.ndarray:
        """``[N]`` bool: rows whose refined masks are written."""
        return np.asarray(self.array("done")[:]) == 1

    def failed(self) -> np.ndarray:
        """``[N]`` bool: rows whose latest refinement failed (records in the recipe's failures table)."""
        return np.asarray(self.array("failed")[:]) == 1

    def read(self, slots: np.ndarray, packed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(masks, done [n] bool)`` of the given slots: masks ``[n, 10, F, F]`` bool, or as stored
        (``[n, 10, F, ceil(F/8)]`` uint8 bit-packed) with ``packed``."""
        slots = np.asarray(slots, dtype=np.int64)
        uniq, inverse = np.unique(slots, return_inverse=True)
        if slots.size == 0:
            bits = np.zeros((0, 10, self.frame, -(-self.frame // 8)), np.uint8)
            done = np.zeros(0, bool)
        else:
            lo, hi = int(uniq[0]), int(uniq[-1]) + 1
            bits = np.asarray(self.array("masks")[lo:hi])[uniq - lo][inverse]
            done = (np.asarray(self.array("done")[lo:hi])[uniq - lo][inverse]) == 1
        if packed:
            return bits, done
        return np.unpackbits(bits, axis=-1, count=self.frame).astype(bool), done

    def write_chunk(self, chunk_index: int, slots: np.ndarray, packed: np.ndarray, failed: np.ndarray) -> None:
        """Read-modify-write one chunk (the caller owns it): set the rows, ``done`` last.

        Args:
            chunk_index: the store chunk.
            slots: ``[n]`` slots inside it.
            packed: ``[n, 10, F, ceil(F/8)]`` uint8 bit-packed masks (zeros for failed rows).
            failed: ``[n]`` bool.
        """
        start, stop = self.store.chunk_range(chunk_index)
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return
        if slots.min() < start or slots.max() >= stop:
            raise StoreError(
                f"{self.store.uri}: refined rows for chunk {chunk_index} must have slots in [{start}, {stop})"
            )
        local = slots - start
        ok = ~np.asarray(failed, dtype=bool)
        values = {"masks": packed, "failed": (~ok).astype(np.uint8), "done": ok.astype(np.uint8)}
        for name in REFINED_ARRAYS:
            arr = self.array(name)
            buf = np.asarray(arr[start:stop]).copy()
            buf[local] = values[name]
            arr[start:stop] = buf


class RefinedWriter:
    """The refine job's side of the store protocol: start (take the store's lock, open the recipe's subgroup or
    create it, refusing one of another recipe), check the lock while tasks write their chunks, record failures, and
    release the lock at the end whatever happened (a context manager). The job never touches the lock itself.

    Args:
        store: the map store, opened ``r+``.
        key, spec: the recipe (:func:`chexseg_dist.masks.recipe.student_recipe`).
        frame: the masks' frame size.
        run_id: recorded as the lock's owner and with the failures.
        stale_after_s: the lock's staleness (``pseudolabel.lock_stale_s``).
    """

    def __init__(
        self, store: MapStore, key: str, spec: Mapping[str, Any], frame: int, run_id: str, stale_after_s: float
    ) -> None:
        self.store, self.key, self.spec, self.frame, self.run_id = store, key, dict(spec), int(frame), run_id
        self.lock = StoreLock(store.uri, stale_after_s=stale_after_s, run_id=run_id)
        self.refined: RefinedMasks | None = None
        self.created = False

    def __enter__(self) -> RefinedWriter:
        self.lock.acquire()
        try:
            if RefinedMasks.exists(self.store, self.key):
                refined = RefinedMasks.open(self.store, self.key)
                if refined.attrs.get("spec") != self.spec:
                    raise StoreError(
                        f"{self.store.uri}/{REFINED_GROUP}/{self.key} holds masks of another recipe "
                        f"({refined.attrs.get('spec')}); delete that subgroup and run chexseg refine again"
                    )
            else:
                refined = RefinedMasks.create(self.store, self.key, self.frame, self.spec)
                self.created = True
        except BaseException:
            self.lock.release()
            raise
        self.refined = refined
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()

    def check(self) -> None:
        """Raise when the lock was lost (another job took it over): stop before writing more."""
        self.lock.check()

    def record_failures(self, table: Any) -> str:
        """Append a failures table (``failure_table`` rows plus ``slot``) to the recipe's failures."""
        return append_failure_table(refined_failures_path(self.store.uri, self.key), table)
