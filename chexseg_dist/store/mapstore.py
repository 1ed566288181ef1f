"""Reading and single-writer access to a map store (:class:`MapStore`); its layout: :mod:`.layout`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from chexseg_dist.core import fsio
from chexseg_dist.core.geometry import Letterbox
from chexseg_dist.core.pathologies import N_OBSERVATIONS, N_TASKS, OBSERVATIONS, TASKS
from chexseg_dist.errors import StoreError
from chexseg_dist.store.codec import EncodedRows, decode_cams, encode_rows
from chexseg_dist.store.layout import (
    LETTERBOX_FIELDS,
    ROW_ARRAYS,
    SCHEMA_VERSION,
    STORE_FORMAT,
    _array_specs,
    _compressors,
    normalise_uri,
)


@dataclass
class MapBatch:
    """Rows read from the store, decoded.

    Attributes:
        slots: ``[n]`` int64 slot indices.
        image_id: ``[n]`` str image ids.
        row: ``[n]`` int64 manifest rows.
        probs: ``[n, 14]`` float32 probabilities of the 14 OBSERVATIONS (NaN where not done).
        cams: ``[n, 10, gh, gw]`` float32 raw Grad-CAM maps of the 10 TASKS (``>= 0``; not normalised, not upsampled).
        orig_size: ``[n, 2]`` int32 original (height, width).
        letterboxes: the :class:`Letterbox` of each row (``None`` where the row is not done).
        done: ``[n]`` bool, True where the row holds a result.
        failed: ``[n]`` bool, True where the latest attempt failed (see the failures table).
    """

    slots: np.ndarray
    image_id: np.ndarray
    row: np.ndarray
    probs: np.ndarray
    cams: np.ndarray
    orig_size: np.ndarray
    letterboxes: list[Letterbox | None]
    done: np.ndarray
    failed: np.ndarray

    def __len__(self) -> int:
        return int(self.slots.shape[0])


class MapStore:
    """Reader and single-writer for the map store (layout in the module docstring).

    Open with :meth:`open` (existing store) or :meth:`create` (new store). Readers need nothing but this class or
    plain ``zarr``; writers must own the chunks they write (one writer per chunk, e.g. through
    :func:`chexseg_dist.store.staging.commit_fragments`).
    """

    def __init__(self, group: zarr.Group, uri: str, mode: str) -> None:
        self.uri = uri
        self.mode = mode
        self._group = group
        attrs = dict(group.attrs)
        if attrs.get("format") != STORE_FORMAT:
            raise StoreError(
                f"{uri} is a Zarr group but not a chexseg map store (attribute format != {STORE_FORMAT!r})"
            )
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{uri}: schema_version={attrs.get('schema_version')!r}, this version of chexseg_dist reads "
                f"{SCHEMA_VERSION}; write a new store (or --overwrite)"
            )
        self.attrs: dict[str, Any] = attrs
        meta: dict[str, Any] = attrs
        self.n = int(meta["n_images"])
        self.grid_shape: tuple[int, int] = (int(meta["grid_shape"][0]), int(meta["grid_shape"][1]))
        self.images_per_chunk = int(meta["images_per_chunk"])
        self._arrays: dict[str, zarr.Array] = {}
        self._image_ids: np.ndarray | None = None
        self._rows: np.ndarray | None = None
        self._index: dict[str, int] | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        uri: str,
        image_ids: Sequence[str] | np.ndarray,
        rows: Sequence[int] | np.ndarray,
        grid_shape: tuple[int, int],
        attrs: dict[str, Any] | None = None,
        images_per_chunk: int = 256,
        overwrite: bool = False,
    ) -> MapStore:
        """Create an empty store (every row pending) for ``N = len(image_ids)`` images.

        Args:
            uri: local directory or ``s3://...`` (any fsspec URI).
            image_ids: ``[N]`` unique image ids, in slot order.
            rows: ``[N]`` manifest rows, in slot order.
            grid_shape: ``(gh, gw)`` of the saliency maps.
            attrs: extra group attributes (JSON-serialisable): fingerprints, config, geometry.
            images_per_chunk: images per chunk along the image axis.
            overwrite: replace an existing store at ``uri``; otherwise an existing store is an error.

        Raises:
            StoreError: the store exists and ``overwrite`` is False; duplicate ids; mismatched lengths.
        """
        uri = normalise_uri(uri)
        ids = np.asarray(list(image_ids), dtype=str)
        row_arr = np.asarray(rows, dtype=np.int64)
        n = len(ids)
        if n == 0:
            raise StoreError(f"{uri}: cannot create a store for 0 images (is the manifest empty or all filtered out?)")
        if row_arr.shape != (n,):
            raise StoreError(f"{uri}: {n} image ids but rows has shape {row_arr.shape}")
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != n:
            dups = uniq[counts > 1][:5].tolist()
            raise StoreError(f"{uri}: image ids must be unique; duplicated: {dups}")
        if images_per_chunk < 1:
            raise StoreError(f"{uri}: images_per_chunk must be >= 1, got {images_per_chunk}")
        gh, gw = int(grid_shape[0]), int(grid_shape[1])
        check_location(uri)
        if not overwrite and cls.exists(uri):
            raise StoreError(f"{uri} already exists; open it, choose a new store path or pass overwrite (--overwrite)")
        meta: dict[str, Any] = dict(attrs or {})
        meta.update(
            format=STORE_FORMAT,
            schema_version=SCHEMA_VERSION,
            tasks=list(TASKS),
            observations=list(OBSERVATIONS),
            n_images=n,
            grid_shape=[gh, gw],
            images_per_chunk=int(images_per_chunk),
            cams_encoding="raw = cams * cam_max[..., None, None]; cams float16 in [0, 1] (raw / per-map max)",
            letterbox_fields=list(LETTERBOX_FIELDS),
        )
        group = zarr.open_group(uri, mode="w" if overwrite else "w-", attributes=meta)
        ipc = int(images_per_chunk)
        cfg: Any = {"write_empty_chunks": True}
        id_arr = group.create_array(
            "image_id", shape=(n,), chunks=(ipc,), dtype=str, compressors=[ZstdCodec(level=3)], config=cfg
        )
        id_arr[:] = ids
        for name, (shape, dtype, fill) in _array_specs(n, (gh, gw)).items():
            arr = group.create_array(
                name,
                shape=shape,
                chunks=(ipc, *shape[1:]),
                dtype=dtype,
                fill_value=fill,
                compressors=_compressors(dtype),
                config=cfg,
            )
            if name == "row":
                arr[:] = row_arr
        store = cls(group, uri, "r+")
        store._image_ids, store._rows = ids, row_arr
        return store

    @classmethod
    def open(cls, uri: str, mode: str = "r") -> MapStore:
        """Open an existing store (``mode`` "r" or "r+").

        Raises:
            StoreError: no store at ``uri``, or not a chexseg map store, or an unsupported schema version.
        """
        if mode not in ("r", "r+"):
            raise ValueError(f"MapStore.open: mode must be 'r' or 'r+', got {mode!r}")
        uri = normalise_uri(uri)
        check_location(uri)
        try:
            group = zarr.open_group(uri, mode="r" if mode == "r" else "r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
            raise StoreError(f"no map store at {uri}; run 'chexseg pseudolabel' to create it") from None
        return cls(group, uri, mode)

    @staticmethod
    def exists(uri: str) -> bool:
        """True if a Zarr group exists at ``uri``."""
        return fsio.exists(fsio.join(normalise_uri(uri), "zarr.json"))

    # ------------------------------------------------------------------ metadata
    @property
    def group(self) -> zarr.Group:
        """The store's Zarr group (its subgroups, e.g. ``refined/<key>``, are opened through it)."""
        return self._group

    def array(self, name: str) -> zarr.Array:
        """One of the store's Zarr arrays (opened once; writes keep empty chunks)."""
        if name not in self._arrays:
            arr = self._group[name]
            assert isinstance(arr, zarr.Array)
            self._arrays[name] = arr.with_config({"write_empty_chunks": True}) if self.mode != "r" else arr
        return self._arrays[name]

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.images_per_chunk)

    @property
    def image_ids(self) -> np.ndarray:
        """``[N]`` str image ids in slot order."""
        if self._image_ids is None:
            # zarr returns numpy StringDType; plain fixed-width str keeps the API numpy-1 style.
            self._image_ids = np.asarray(self.array("image_id")[:]).astype(object).astype(str)
        return self._image_ids

    @property
    def rows(self) -> np.ndarray:
        """``[N]`` int64 manifest rows in slot order."""
        if self._rows is None:
            self._rows = np.asarray(self.array("row")[:], dtype=np.int64)
        return self._rows

    def chunk_range(self, chunk_index: int) -> tuple[int, int]:
        """``(start, stop)`` slots of one chunk."""
        if not 0 <= chunk_index < self.n_chunks:
            raise IndexError(f"{self.uri}: chunk {chunk_index} out of range [0, {self.n_chunks})")
        start = chunk_index * self.images_per_chunk
        return start, min(start + self.images_per_chunk, self.n)

    def index_of(self, ids: Sequence[str] | np.ndarray | str, wanted_by: str = "") -> np.ndarray:
        """Slots of the given image ids (``[len(ids)]`` int64).

        Args:
            ids: image ids.
            wanted_by: where the ids come from (e.g. ``"--gt gt.json"``), named in the error.

        Raises:
            StoreError: naming up to five ids that are not in the store (and ``wanted_by``).
        """
        if self._index is None:
            self._index = {str(k): i for i, k in enumerate(self.image_ids)}
        items = [ids] if isinstance(ids, str) else list(ids)
        out = np.empty(len(items), dtype=np.int64)
        missing = []
        for i, key in enumerate(items):
            slot = self._index.get(str(key))
            if slot is None:
                missing.append(str(key))
            else:
                out[i] = slot
        if missing:
            source = f" of {wanted_by}" if wanted_by else ""
            raise StoreError(
                f"{len(missing)} image id(s){source} not in map store {self.uri}, e.g. {missing[:5]}; pass the store "
                "made for those images"
            )
        return out

    def done(self) -> np.ndarray:
        """``[N]`` bool: rows that hold a result."""
        return np.asarray(self.array("done")[:]) == 1

    def failed(self) -> np.ndarray:
        """``[N]`` bool: rows whose latest attempt failed."""
        return np.asarray(self.array("failed")[:]) == 1

    def update_attrs(self, **values: Any) -> None:
        """Add or replace group attributes (driver only)."""
        self._group.attrs.update(values)
        self.attrs.update(values)

    # ------------------------------------------------------------------ reading
    def _slots(self, sel: slice | int | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(sel, slice):
            return np.arange(self.n, dtype=np.int64)[sel]
        arr = np.asarray(sel)
        if arr.dtype == bool:
            if arr.shape != (self.n,):
                raise IndexError(f"{self.uri}: boolean selection must have shape ({self.n},), got {arr.shape}")
            return np.flatnonzero(arr).astype(np.int64)
        slots = arr.astype(np.int64).reshape(-1)
        if slots.size and (slots.min() < -self.n or slots.max() >= self.n):
            raise IndexError(f"{self.uri}: slot out of range [0, {self.n})")
        return np.where(slots < 0, slots + self.n, slots)

    def read(self, sel: slice | int | Sequence[int] | np.ndarray) -> MapBatch:
        """Read and decode rows.

        Args:
            sel: a slice, one slot, an int array of slots (any order, repeats allowed) or a ``[N]`` bool mask.

        Returns:
            A :class:`MapBatch` in the order of ``sel`` (raw maps, i.e. ``cams * cam_max``).
        """
        slots = self._slots(sel)
        if slots.size == 0:
            return self._empty_batch()
        uniq, inverse = np.unique(slots, return_inverse=True)
        data = {name: self._gather(name, uniq)[inverse] for name in ROW_ARRAYS}
        done = data["done"] == 1
        boxes = [Letterbox(int(p[0]), int(p[1]), int(p[2])) if ok else None for p, ok in zip(data["letterbox"], done)]
        return MapBatch(
            slots=slots,
            image_id=self.image_ids[slots],
            row=self.rows[slots],
            probs=data["probs"].astype(np.float32),
            cams=decode_cams(data["cams"], data["cam_max"]),
            orig_size=data["orig_size"].astype(np.int32),
            letterboxes=boxes,
            done=done,
            failed=data["failed"] == 1,
        )

    def _gather(self, name: str, uniq: np.ndarray) -> np.ndarray:
        """Rows ``uniq`` (sorted, unique) of one array; only the chunks that hold them are read."""
        arr = self.array(name)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo == len(uniq):
            return np.asarray(arr[lo:hi])
        return np.asarray(arr.get_orthogonal_selection((uniq, *([slice(None)] * (arr.ndim - 1)))))

    def _empty_batch(self) -> MapBatch:
        gh, gw = self.grid_shape
        return MapBatch(
            slots=np.zeros(0, np.int64),
            image_id=np.zeros(0, dtype=str),
            row=np.zeros(0, np.int64),
            probs=np.zeros((0, N_OBSERVATIONS), np.float32),
            cams=np.zeros((0, N_TASKS, gh, gw), np.float32),
            orig_size=np.zeros((0, 2), np.int32),
            letterboxes=[],
            done=np.zeros(0, bool),
            failed=np.zeros(0, bool),
        )

    def iter_batches(self, batch_size: int = 256, only_done: bool = True) -> Iterator[MapBatch]:
        """Iterate over the store in slot order.

        Args:
            batch_size: slots read per step (a multiple of ``images_per_chunk`` reads each chunk once).
            only_done: drop rows that are not done (batches may then be shorter; empty ones are skipped).
        """
        if batch_size < 1:
            raise ValueError(f"iter_batches: batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.n, batch_size):
            batch = self.read(slice(start, min(start + batch_size, self.n)))
            if only_done:
                if not batch.done.any():
                    continue
                if not batch.done.all():
                    batch = _subset(batch, batch.done)
            yield batch

    # ------------------------------------------------------------------ writing (one writer per chunk)
    def write_rows(
        self,
        slots: Sequence[int] | np.ndarray,
        probs: np.ndarray,
        cams_raw: np.ndarray,
        orig_size: np.ndarray,
        letterbox: np.ndarray,
    ) -> None:
        """Write successful rows (any slots; grouped by chunk). The caller must be the only writer of those chunks.

        Args:
            slots: ``[n]`` slot indices.
            probs: ``[n, 14]`` probabilities.
            cams_raw: ``[n, 14 or 10, gh, gw]`` raw maps (14 observations are reduced to the 10 TASKS).
            orig_size: ``[n, 2]`` (height, width).
            letterbox: ``[n, 7]`` :meth:`Letterbox.params`.
        """
        self.write_encoded(encode_rows(np.asarray(slots), probs, cams_raw, orig_size, letterbox))

    def write_encoded(self, rows: EncodedRows) -> None:
        """Write encoded rows chunk by chunk, sequentially (the staging committer parallelises over chunks)."""
        for chunk, part in split_by_chunk(rows, self.images_per_chunk).items():
            self.write_chunk(chunk, part)

    def write_chunk(self, chunk_index: int, rows: EncodedRows) -> None:
        """Read-modify-write one chunk: set ``rows`` (all inside the chunk), then mark them done.

        Data arrays are written before ``done``, so an interrupted write leaves those rows not done. Rows that
        failed get ``done = 0, failed = 1``; successful rows ``done = 1, failed = 0``.

        Raises:
            StoreError: read-only store, rows outside the chunk, or arrays of the wrong shape.
        """
        if self.mode == "r":
            raise StoreError(f"{self.uri} is open read-only; open it with mode='r+' to write")
        start, stop = self.chunk_range(chunk_index)
        slots = np.asarray(rows.slots, dtype=np.int64)
        if len(slots) == 0:
            return
        if slots.min() < start or slots.max() >= stop:
            raise StoreError(f"{self.uri}: rows for chunk {chunk_index} must have slots in [{start}, {stop})")
        gh, gw = self.grid_shape
        if rows.cams.shape[1:] != (N_TASKS, gh, gw):
            raise StoreError(
                f"{self.uri}: maps of shape {rows.cams.shape[1:]} do not fit the store's [{N_TASKS}, {gh}, {gw}] grid"
            )
        local = slots - start
        full = len(np.unique(local)) == stop - start
        ok = rows.failed == 0
        values: dict[str, np.ndarray] = {
            "probs": rows.probs,
            "cams": rows.cams,
            "cam_max": rows.cam_max,
            "orig_size": rows.orig_size,
            "letterbox": rows.letterbox,
            "failed": (~ok).astype(np.uint8),
            "done": ok.astype(np.uint8),
        }
        for name in ROW_ARRAYS:
            arr = self.array(name)
            if full:
                buf = np.empty((stop - start, *arr.shape[1:]), dtype=arr.dtype)
            else:
                buf = np.asarray(arr[start:stop]).copy()
            buf[local] = values[name]
            arr[start:stop] = buf


def split_by_chunk(rows: EncodedRows, images_per_chunk: int) -> dict[int, EncodedRows]:
    """Group rows by the chunk their slot falls in (``slot // images_per_chunk``); later duplicates win."""
    if len(rows) == 0:
        return {}
    # Keep the last occurrence of a slot (a re-staged row supersedes an older one).
    _, last = np.unique(rows.slots[::-1], return_index=True)
    keep = np.sort(len(rows) - 1 - last)
    rows = rows.take(keep)
    chunks = rows.slots // images_per_chunk
    return {int(c): rows.take(np.flatnonzero(chunks == c)) for c in np.unique(chunks)}


def _subset(batch: MapBatch, mask: np.ndarray) -> MapBatch:
    idx = np.flatnonzero(mask)
    return MapBatch(
        slots=batch.slots[idx],
        image_id=batch.image_id[idx],
        row=batch.row[idx],
        probs=batch.probs[idx],
        cams=batch.cams[idx],
        orig_size=batch.orig_size[idx],
        letterboxes=[batch.letterboxes[i] for i in idx],
        done=batch.done[idx],
        failed=batch.failed[idx],
    )


def check_location(uri: str) -> None:
    """Refuse a store path that holds something else: a regular file, or a folder that is not a map store.

    Raises:
        StoreError: naming the path and what is there.
    """
    uri = normalise_uri(uri)
    if fsio.isfile(uri):
        raise StoreError(f"{uri} is a file, not a map store (a Zarr folder); choose another --store path")
    if fsio.isdir(uri) and not MapStore.exists(uri):
        fs, inner = fsio.filesystem(uri)
        if fs.ls(inner, detail=False):
            raise StoreError(
                f"{uri} is a folder with other files in it, not a map store; choose a new or empty --store path"
            )
