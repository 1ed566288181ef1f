"""The map store: layout, encoding, reading, and the one write protocol every store-writing job uses.

Readers need only :class:`MapStore` (or plain ``zarr``; docs/store-format.md). Writers go through
:class:`StoreWriter`: lock, open-or-resume with an identity check, ``--overwrite``, recovery of staged fragments,
the Ray Data sink, commit and the failures table.
"""

from chexseg_dist.store.codec import EncodedRows, decode_cams, encode_cams, encode_rows, select_tasks
from chexseg_dist.store.failures import Failure, append_failures, read_failures
from chexseg_dist.store.layout import (
    LETTERBOX_FIELDS,
    ROW_ARRAYS,
    SCHEMA_VERSION,
    STORE_FORMAT,
    failures_path,
    lock_path,
    normalise_uri,
    sidecar_path,
    staging_path,
)
from chexseg_dist.store.lock import StoreLock
from chexseg_dist.store.mapstore import MapBatch, MapStore, check_location, split_by_chunk
from chexseg_dist.store.staging import (
    CommitStats,
    Fragment,
    commit_fragments,
    list_fragments,
    read_fragment,
    remove_temporaries,
    write_fragment,
)
from chexseg_dist.store.writer import StoreSpec, StoreWriter, WriterSettings

__all__ = [
    "LETTERBOX_FIELDS",
    "ROW_ARRAYS",
    "SCHEMA_VERSION",
    "STORE_FORMAT",
    "CommitStats",
    "EncodedRows",
    "Failure",
    "Fragment",
    "MapBatch",
    "MapStore",
    "StoreLock",
    "StoreSpec",
    "StoreWriter",
    "WriterSettings",
    "append_failures",
    "check_location",
    "commit_fragments",
    "decode_cams",
    "encode_cams",
    "encode_rows",
    "failures_path",
    "list_fragments",
    "lock_path",
    "normalise_uri",
    "read_failures",
    "read_fragment",
    "remove_temporaries",
    "select_tasks",
    "sidecar_path",
    "split_by_chunk",
    "staging_path",
    "write_fragment",
]
