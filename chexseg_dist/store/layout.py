"""The map store's layout: one Zarr v3 group holding every radiograph's probabilities and all-task Grad-CAM maps.

This module is the one definition of the layout (docs/store-format.md describes it for readers who only have
``zarr``). Every array is indexed by a *slot* ``0..N-1`` (the image axis) and chunked only along it, with
``images_per_chunk`` images per chunk:

=============  ====================  =========  ==================================================================
array          shape                 dtype      meaning
=============  ====================  =========  ==================================================================
``image_id``   ``[N]``               string     CheXlocalize image id (vlen-utf8)
``row``        ``[N]``               int64      the image's row in the manifest
``probs``      ``[N, 14]``           float32    sigmoid probabilities of the 14 OBSERVATIONS (NaN until written)
``cams``       ``[N, 10, gh, gw]``   float16    raw Grad-CAM of the 10 TASKS divided by its per-map max, in [0, 1]
``cam_max``    ``[N, 10]``           float32    that per-map max (raw = cams * cam_max; NaN until written)
``orig_size``  ``[N, 2]``            int32      original (height, width)
``letterbox``  ``[N, 7]``            int32      :meth:`Letterbox.params` (height, width, S, new_h, new_w, top, left)
``failed``     ``[N]``               uint8      1 = the latest attempt failed (details in the failures table)
``done``       ``[N]``               uint8      1 = the row is written (the one flag readers must check)
=============  ====================  =========  ==================================================================

Storing the maps divided by their max keeps float16 in range whatever the raw scale (raw Grad-CAM values of a
trained DenseNet reach thousands; float16 overflows at 65504) at a relative precision of 2**-11, and costs 40 bytes
per image for ``cam_max``. Chunks are compressed (Blosc-zstd with byte shuffle for floats, zstd for the rest); there
is no sharding codec (a partial shard write is a read-modify-write that loses data under concurrent writers) and
every array is written with ``write_empty_chunks=True`` (zarr's default deletes a chunk equal to the fill value, so
an all-zero chunk of maps would vanish, and on S3 become a DELETE).

Writing is single-writer per chunk: :meth:`MapStore.write_chunk` read-modify-writes one whole chunk, writing
``done`` last, so a crash mid-write leaves ``done = 0`` for every row whose data may be incomplete. Parallel jobs
never write the arrays directly; they stage immutable fragments that one committer merges
(:mod:`chexseg_dist.store.staging`, driven by :class:`chexseg_dist.store.writer.StoreWriter`).

Non-Zarr files (config, lock, staging fragments, failures table) live in the sidecar directory ``<store>.sidecar``
next to the group, never inside it.
"""

from __future__ import annotations

import os
from typing import Any

from zarr.codecs import BloscCodec, ZstdCodec

from chexseg_dist.core import fsio
from chexseg_dist.core.pathologies import N_OBSERVATIONS, N_TASKS

#: Bumped whenever the layout changes; a store of another version is refused with the fix.
SCHEMA_VERSION = 1
STORE_FORMAT = "chexseg-maps"
SIDECAR_SUFFIX = ".sidecar"
#: The columns of the ``letterbox`` array (:meth:`Letterbox.params`).
LETTERBOX_FIELDS: tuple[str, ...] = ("height", "width", "size", "new_height", "new_width", "pad_top", "pad_left")


#: Arrays written per row by :meth:`MapStore.write_chunk`, in write order (``done`` last: it commits the row).
ROW_ARRAYS: tuple[str, ...] = ("probs", "cams", "cam_max", "orig_size", "letterbox", "failed", "done")


def sidecar_path(store_uri: str) -> str:
    """The sidecar directory next to the store: ``<store>.sidecar`` (config, lock, staging, failures)."""
    return normalise_uri(store_uri) + SIDECAR_SUFFIX


def normalise_uri(uri: str) -> str:
    """A store URI without a trailing slash; local paths are made absolute (Ray workers have other cwds)."""
    uri = str(uri).rstrip("/")
    if not fsio.is_uri(uri):
        uri = os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)
    return uri


def _compressors(dtype: str) -> list[Any]:
    if dtype.startswith("float"):
        return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")]
    return [ZstdCodec(level=3)]


def _array_specs(n: int, grid_shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], str, Any]]:
    gh, gw = grid_shape
    return {
        "row": ((n,), "int64", -1),
        "probs": ((n, N_OBSERVATIONS), "float32", float("nan")),
        "cams": ((n, N_TASKS, gh, gw), "float16", 0.0),
        "cam_max": ((n, N_TASKS), "float32", float("nan")),
        "orig_size": ((n, 2), "int32", 0),
        "letterbox": ((n, 7), "int32", 0),
        "failed": ((n,), "uint8", 0),
        "done": ((n,), "uint8", 0),
    }


#: The sidecar ``<store>.sidecar/`` beside the group holds everything that is not Zarr:
STAGING_DIR = "staging"  # fragments between a write task and the commit
FAILURES_DIR = "failures"  # the failures table (Parquet files)
LOCK_FILE = "lock.json"  # the running job's lock
CONFIG_FILE = "config.yaml"  # the resolved config of the latest run
FRAGMENT_SUFFIX = ".npz"
TMP_PREFIX = ".tmp-"  # half-written local fragments (removed with the lock held)


def staging_path(store_uri: str) -> str:
    """``<store>.sidecar/staging``."""
    return fsio.join(sidecar_path(store_uri), STAGING_DIR)


def failures_path(store_uri: str) -> str:
    """``<store>.sidecar/failures``."""
    return fsio.join(sidecar_path(store_uri), FAILURES_DIR)


def lock_path(store_uri: str) -> str:
    """``<store>.sidecar/lock.json``."""
    return fsio.join(sidecar_path(store_uri), LOCK_FILE)


# ---------------------------------------------------------------------------------------------------- refined masks
#: Refined pseudo-masks live in the store's group ``refined/<key>`` (``chexseg refine``), one subgroup per refinement
#: recipe: ``key`` is a hash of everything that decides the masks (:func:`chexseg_dist.masks.recipe.refine_spec`),
#: so changing the refiner's config makes a new subgroup and never mixes two recipes' masks.
REFINED_GROUP = "refined"
REFINED_FORMAT = "chexseg-refined-masks"
REFINED_VERSION = 1


def refined_specs(n: int, frame: int) -> dict[str, tuple[tuple[int, ...], str, Any]]:
    """The arrays of one refined subgroup: ``masks`` ``[N, 10, F, ceil(F/8)]`` uint8 (the ``F x F`` masks in the
    student's frame, bit-packed along rows with ``numpy.packbits``), ``failed`` and ``done`` ``[N]`` uint8."""
    return {
        "masks": ((n, N_TASKS, frame, -(-frame // 8)), "uint8", 0),
        "failed": ((n,), "uint8", 0),
        "done": ((n,), "uint8", 0),
    }


#: Arrays of a refined subgroup in write order (``done`` last: it commits the row).
REFINED_ARRAYS: tuple[str, ...] = ("masks", "failed", "done")


def refined_failures_path(store_uri: str, key: str) -> str:
    """``<store>.sidecar/refined-<key>/failures``: the refine job's failure records for one recipe."""
    return fsio.join(sidecar_path(store_uri), f"{REFINED_GROUP}-{key}", FAILURES_DIR)
