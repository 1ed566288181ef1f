"""Data in: manifests (and the one view rule), CheXlocalize annotation formats, image decoding, labels, and the one
Ray Data read-and-decode stage with its per-image failure records."""

from chexseg_dist.data.chexlocalize import (
    decode_mask,
    encode_mask,
    image_id_from_path,
    mask_to_polygons,
    polygons_json_to_segmentations,
    polygons_to_mask,
    polygons_to_segmentations,
    read_points,
    read_polygons,
    read_segmentations,
    write_points,
    write_polygons,
    write_segmentations,
)
from chexseg_dist.data.failures import FAILURE_COLUMNS, failure_table, latest_per_image, read_failure_tables
from chexseg_dist.data.frames import decode_frames
from chexseg_dist.data.images import decode_image, frame_from_bytes, load_frame, read_image
from chexseg_dist.data.labels import label_column, labels_and_mask
from chexseg_dist.data.manifest import (
    MANIFEST_COLUMNS,
    UNKNOWN_VIEW_IS_FRONTAL,
    ViewSelection,
    manifest_metadata,
    manifest_schema,
    read_manifest,
    select_views,
    write_manifest,
)
from chexseg_dist.data.sources import check_files, list_images, manifest_from_csv, manifest_from_listing, resolve_root

__all__ = [
    "FAILURE_COLUMNS",
    "MANIFEST_COLUMNS",
    "UNKNOWN_VIEW_IS_FRONTAL",
    "ViewSelection",
    "check_files",
    "decode_frames",
    "decode_image",
    "decode_mask",
    "encode_mask",
    "failure_table",
    "frame_from_bytes",
    "image_id_from_path",
    "label_column",
    "labels_and_mask",
    "latest_per_image",
    "list_images",
    "load_frame",
    "manifest_from_csv",
    "manifest_from_listing",
    "manifest_metadata",
    "manifest_schema",
    "mask_to_polygons",
    "polygons_json_to_segmentations",
    "polygons_to_mask",
    "polygons_to_segmentations",
    "read_failure_tables",
    "read_image",
    "read_manifest",
    "read_points",
    "read_polygons",
    "read_segmentations",
    "resolve_root",
    "select_views",
    "write_manifest",
    "write_points",
    "write_polygons",
    "write_segmentations",
]
