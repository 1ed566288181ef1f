from pathlib import Path

import pytest

from chexseg_dist.core.fsio import exists, join, open_file, parent, read_bytes


def test_local_write_creates_parents(tmp_path: Path) -> None:
    target = join(str(tmp_path), "a", "b", "c.txt")
    with open_file(target, "w") as f:
        f.write("x")
    assert read_bytes(target) == b"x" and exists(target)
    assert parent(target) == str(tmp_path / "a" / "b")


def test_uri_join_keeps_the_scheme() -> None:
    assert join("s3://bucket/prefix", "x", "y.zarr") == "s3://bucket/prefix/x/y.zarr"
    assert parent("s3://bucket/prefix/x.json") == "s3://bucket/prefix"


@pytest.mark.s3
def test_s3_round_trip_through_the_standard_environment(s3_bucket: str) -> None:
    uri = join(s3_bucket, "dir", "blob.bin")
    with open_file(uri, "wb") as f:
        f.write(b"\x00\x01radiograph")
    assert exists(uri) and read_bytes(uri) == b"\x00\x01radiograph"
    assert not exists(join(s3_bucket, "dir", "missing.bin"))
