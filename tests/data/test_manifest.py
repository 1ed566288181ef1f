"""The Parquet manifest: CheXpert CSV parsing, label mapping, path remapping, listings, checks and the command."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chexseg_dist.cli.main import main as chexseg
from chexseg_dist.core import fsio
from chexseg_dist.core.pathologies import CSV_HEADER, OBSERVATIONS
from chexseg_dist.data.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    manifest_metadata,
    manifest_schema,
    read_manifest,
)
from chexseg_dist.data.sources import manifest_from_csv, manifest_from_listing

PREFIX = "CheXpert-v1.0-small"


def _labels(**cells: str) -> str:
    return ",".join(cells.get(name.replace(" ", "_"), "") for name in OBSERVATIONS)


def _line(path: str, sex: str = "Female", age: str = "68", fl: str = "Frontal", ap: str = "AP", **cells: str) -> str:
    return f"{path},{sex},{age},{fl},{ap},{_labels(**cells)}"


ROWS = [
    _line(f"{PREFIX}/train/patient00001/study1/view1_frontal.jpg", No_Finding="1.0", Edema="1.0"),
    _line(f"{PREFIX}/train/patient00002/study2/view1_frontal.jpg", age="", Edema="0.0", Cardiomegaly="-1.0"),
    _line(f"{PREFIX}/train/patient00002/study1/view2_lateral.jpg", sex="Male", fl="Lateral", ap="", Edema="-1.0"),
    _line(f"{PREFIX}/train/patient00003/study1/view1_frontal.jpg", ap="PA", Edema=""),
    _line(f"{PREFIX}/train/patient00004/study1/view1_frontal.jpg", Edema="1", Lung_Opacity="0"),
    _line(f"{PREFIX}/train/patient00005/study1/view1_frontal.jpg", Edema="-1", Support_Devices="1.0"),
]


def _write_csv(path: Path, rows: list[str], header: str = ",".join(CSV_HEADER)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


@pytest.fixture()
def release_csv(tmp_path: Path) -> str:
    """A train.csv inside the dataset folder, as in the CheXpert release."""
    return _write_csv(tmp_path / PREFIX / "train.csv", ROWS)


def _jpeg(h: int = 6, w: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- CSV parsing
def test_labels_keep_positive_negative_uncertain_and_blank_distinct(release_csv: str) -> None:
    table = manifest_from_csv(release_csv)
    # Rows: 1.0, 0.0, -1.0, blank, "1", "-1" spellings. Mapping -1 to blank or 0 (or blank to 0) breaks this.
    assert table.column("Edema").to_pylist() == [1.0, 0.0, -1.0, None, 1.0, -1.0]
    assert table.column("Cardiomegaly").to_pylist() == [None, -1.0, None, None, None, None]
    assert table.column("Lung Opacity").to_pylist() == [None, None, None, None, 0.0, None]
    assert table.column("No Finding").to_pylist()[0] == 1.0


def test_schema_ids_and_metadata_columns(release_csv: str) -> None:
    table = manifest_from_csv(release_csv)
    assert table.schema == manifest_schema()
    assert tuple(table.column_names) == MANIFEST_COLUMNS
    assert all(table.schema.field(name).type == pa.float32() for name in OBSERVATIONS)
    assert table.column("row").to_pylist() == list(range(6))
    assert table.column("image_id").to_pylist()[:3] == [
        "patient00001_study1_view1_frontal",
        "patient00002_study2_view1_frontal",
        "patient00002_study1_view2_lateral",
    ]
    assert table.column("patient_id").to_pylist()[2] == "patient00002"
    assert table.column("study").to_pylist()[2] == "study1"
    assert table.column("view").to_pylist()[2] == "view2_lateral"
    assert table.column("frontal").to_pylist() == [True, True, False, True, True, True]
    assert table.column("ap_pa").to_pylist()[:4] == ["AP", "AP", None, "PA"]
    assert table.column("sex").to_pylist()[:3] == ["Female", "Female", "Male"]
    assert table.column("age").to_pylist()[:2] == [68, None]
    assert set(table.column("split").to_pylist()) == {"train"}


def test_split_override_and_test_set_paths_without_prefix(tmp_path: Path) -> None:
    csv_path = _write_csv(
        tmp_path / "chexlocalize" / "test_labels.csv", [_line("test/patient64741/study1/view1_frontal.jpg")]
    )
    table = manifest_from_csv(csv_path)
    assert table.column("path").to_pylist() == [
        str(tmp_path / "chexlocalize/test/patient64741/study1/view1_frontal.jpg")
    ]
    assert table.column("split").to_pylist() == ["test"]
    assert manifest_from_csv(csv_path, split="holdout").column("split").to_pylist() == ["holdout"]


# ---------------------------------------------------------------------------------------------------- path remap
def test_paths_resolve_in_the_real_release_layout(release_csv: str, tmp_path: Path) -> None:
    # train.csv sits in CheXpert-v1.0-small/ and its paths start with CheXpert-v1.0-small/.
    paths = manifest_from_csv(release_csv).column("path").to_pylist()
    assert paths[0] == str(tmp_path / PREFIX / "train/patient00001/study1/view1_frontal.jpg")


def test_paths_resolve_in_a_moved_and_renamed_dataset(tmp_path: Path) -> None:
    csv_path = _write_csv(tmp_path / "elsewhere" / "cxp" / "train.csv", ROWS[:1])
    assert manifest_from_csv(csv_path).column("path").to_pylist() == [
        str(tmp_path / "elsewhere/cxp/train/patient00001/study1/view1_frontal.jpg")
    ]


def test_paths_resolve_when_the_csv_sits_beside_the_dataset_folder(tmp_path: Path) -> None:
    # DIR/train.csv next to DIR/CheXpert-v1.0-small/ (Kaggle copies, chexseg synth): paths are relative to DIR.
    csv_path = _write_csv(tmp_path / "train.csv", ROWS[:1])
    (tmp_path / PREFIX / "train").mkdir(parents=True)
    assert manifest_from_csv(csv_path).column("path").to_pylist() == [
        str(tmp_path / PREFIX / "train/patient00001/study1/view1_frontal.jpg")
    ]


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("/data/chexpert", "/data/chexpert/train/patient00001/study1/view1_frontal.jpg"),
        ("/data/chexpert/", "/data/chexpert/train/patient00001/study1/view1_frontal.jpg"),
    ],
)
def test_root_replaces_the_dataset_prefix(release_csv: str, root: str, expected: str) -> None:
    assert manifest_from_csv(release_csv, root=root).column("path").to_pylist()[0] == expected


@pytest.mark.s3
def test_s3_root_is_the_dataset_folder_or_the_folder_holding_it(
    release_csv: str, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An upload of DIR (holding CheXpert-v1.0-small/) to s3://bucket/DIR: --root s3://bucket/DIR and --root
    s3://bucket/DIR/CheXpert-v1.0-small give the same paths, which exist; a wrong root is refused naming a path."""
    rel = "train/patient00001/study1/view1_frontal.jpg"
    with fsio.open_file(f"{s3_bucket}/up/{PREFIX}/{rel}", "wb") as f:
        f.write(_jpeg())
    want = f"{s3_bucket}/up/{PREFIX}/{rel}"
    for root in (f"{s3_bucket}/up", f"{s3_bucket}/up/{PREFIX}"):
        assert manifest_from_csv(release_csv, root=root).column("path").to_pylist()[0] == want
        out = tmp_path / "m.parquet"
        assert chexseg(["manifest", "--csv", release_csv, "--root", root, "--out", str(out)]) == 0
        assert read_manifest(str(out)).column("path").to_pylist()[0] == want
    assert chexseg(["manifest", "--csv", release_csv, "--root", f"{s3_bucket}/nothing", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{s3_bucket}/nothing/train/patient00001" in err and "--root" in err and "--no-check" in err


def test_local_root_one_level_up_and_the_probe(
    release_csv: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """chexseg synth and Kaggle copies: DIR/train.csv beside DIR/CheXpert-v1.0-small/. --root DIR works like --root
    DIR/CheXpert-v1.0-small; a root under which no sampled image exists fails with the path and the fix, and
    --no-check builds it anyway (before an upload)."""
    data = tmp_path / "copy"
    rel = "train/patient00001/study1/view1_frontal.jpg"
    (data / PREFIX / rel).parent.mkdir(parents=True)
    (data / PREFIX / rel).write_bytes(_jpeg())
    out = tmp_path / "m.parquet"
    for root in (data, data / PREFIX):
        assert chexseg(["manifest", "--csv", release_csv, "--root", str(root), "--out", str(out)]) == 0
        assert read_manifest(str(out)).column("path").to_pylist()[0] == str(data / PREFIX / rel)
    out.unlink()
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    assert chexseg(["manifest", "--csv", release_csv, "--root", str(wrong), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(wrong / rel) in err and "--root" in err and not out.exists()
    assert chexseg(["manifest", "--csv", release_csv, "--root", str(wrong), "--out", str(out), "--no-check"]) == 0


def test_relative_root_is_made_absolute(release_csv: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = manifest_from_csv(release_csv, root="imgs").column("path").to_pylist()[0]
    assert path == str(tmp_path / "imgs/train/patient00001/study1/view1_frontal.jpg")


def test_absolute_csv_paths_kept_without_root(tmp_path: Path) -> None:
    rows = [_line("/mnt/x/CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg")]
    csv_path = _write_csv(tmp_path / "valid.csv", rows)
    assert manifest_from_csv(csv_path).column("path").to_pylist() == [
        "/mnt/x/CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg"
    ]
    assert manifest_from_csv(csv_path, root="/d").column("path").to_pylist() == [
        "/d/valid/patient64541/study1/view1_frontal.jpg"
    ]


# ---------------------------------------------------------------------------------------------------- malformed CSVs
def _run_expect_error(tmp_path: Path, csv_path: str, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    out = tmp_path / "out" / "m.parquet"
    rc = chexseg(["manifest", "--csv", csv_path, "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert not out.exists()
    assert not out.parent.exists() or os.listdir(out.parent) == []  # no temp file left behind either
    return err


def test_missing_columns_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = ",".join(c for c in CSV_HEADER if c not in ("Edema", "AP/PA"))
    csv_path = _write_csv(tmp_path / "bad.csv", ["x"], header=header)
    err = _run_expect_error(tmp_path, csv_path, capsys)
    assert csv_path in err and "'AP/PA'" in err and "'Edema'" in err and "line 1" in err


@pytest.mark.parametrize("value", ["2.0", "yes", "1.5", "nan"])
def test_bad_label_names_line_column_and_value(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    rows = list(ROWS)
    rows[3] = _line(f"{PREFIX}/train/patient00003/study1/view1_frontal.jpg", Pneumothorax=value)
    err = _run_expect_error(tmp_path, _write_csv(tmp_path / "bad.csv", rows), capsys)
    assert "line 5" in err and "'Pneumothorax'" in err and repr(value) in err


def test_duplicate_image_id_names_both_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [*ROWS, ROWS[1].replace("Female", "Male")]
    err = _run_expect_error(tmp_path, _write_csv(tmp_path / "dup.csv", rows), capsys)
    assert "patient00002_study2_view1_frontal" in err and "lines 3 and 8" in err


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (_line(""), "empty Path"),
        (_line(f"{PREFIX}/train/img0001.jpg"), "not a CheXpert image path"),
        (_line(f"{PREFIX}/train/patient00009/study1/view1_frontal.jpg", age="sixty"), "Age 'sixty'"),
        (_line(f"{PREFIX}/train/patient00009/study1/view1_frontal.jpg", fl="PA"), "Frontal/Lateral is 'PA'"),
        (f"{PREFIX}/train/patient00009/study1/view1_frontal.jpg,Female,68", "malformed CSV row"),
    ],
)
def test_bad_rows_named_by_line(tmp_path: Path, row: str, match: str) -> None:
    csv_path = _write_csv(tmp_path / "bad.csv", [*ROWS[:2], row, *ROWS[2:]])
    with pytest.raises(ManifestError, match=match) as info:
        manifest_from_csv(csv_path)
    assert "line 4" in str(info.value) and csv_path in str(info.value)


def test_blank_line_inside_is_an_error_trailing_blank_lines_are_not(tmp_path: Path) -> None:
    csv_path = tmp_path / "blank.csv"
    csv_path.write_text("\n".join([",".join(CSV_HEADER), ROWS[0], "", ROWS[1]]) + "\n")
    with pytest.raises(ManifestError, match="line 3: empty Path"):
        manifest_from_csv(str(csv_path))
    csv_path.write_text("\n".join([",".join(CSV_HEADER), ROWS[0], ROWS[1]]) + "\n\n\n")
    assert manifest_from_csv(str(csv_path)).num_rows == 2


def test_extra_columns_and_reordered_columns_are_accepted(tmp_path: Path) -> None:
    header = ["Extra", *reversed(CSV_HEADER)]
    row = {name: "" for name in header}
    row.update({"Path": f"{PREFIX}/valid/patient64541/study1/view1_frontal.jpg", "Edema": "-1.0", "Extra": "zz"})
    row.update({"Frontal/Lateral": "Frontal", "Age": "73"})
    csv_path = _write_csv(tmp_path / "valid.csv", [",".join(row[h] for h in header)], header=",".join(header))
    table = manifest_from_csv(csv_path)
    assert table.column("Edema").to_pylist() == [-1.0] and table.column("age").to_pylist() == [73]
    assert "Extra" not in table.column_names


def test_failed_run_keeps_the_previous_manifest(release_csv: str, tmp_path: Path) -> None:
    out = tmp_path / "m.parquet"
    assert chexseg(["manifest", "--csv", release_csv, "--out", str(out), "--no-check"]) == 0
    before = out.read_bytes()
    bad = _write_csv(tmp_path / "bad.csv", [*ROWS, ROWS[0]])
    assert chexseg(["manifest", "--csv", bad, "--out", str(out), "--no-check"]) == 2
    assert out.read_bytes() == before


# ---------------------------------------------------------------------------------------------------- command
def test_command_writes_parquet_with_provenance(
    release_csv: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "outputs" / "train.parquet"
    assert chexseg(["manifest", "--csv", release_csv, "--out", str(out), "--no-check"]) == 0
    assert "6 radiographs (5 frontal" in capsys.readouterr().out
    table = pq.read_table(out)  # plain pyarrow, no project code
    assert table.schema.field("Edema").type == pa.float32()
    assert table.schema.field("age").type == pa.int32()
    assert table.schema.field("frontal").type == pa.bool_()
    assert table.column("Edema").to_pylist() == [1.0, 0.0, -1.0, None, 1.0, -1.0]
    meta = manifest_metadata(str(out))
    assert meta["source"] == release_csv and meta["root"] == str(tmp_path / PREFIX) and meta["rows"] == 6
    assert meta["created_by"].startswith("chexseg_dist ")
    assert read_manifest(str(out), columns=["image_id", "path"]).column_names == ["image_id", "path"]


def test_read_manifest_rejects_other_parquet(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": [1]}), tmp_path / "x.parquet")
    with pytest.raises(ManifestError, match="not a chexseg manifest"):
        read_manifest(str(tmp_path / "x.parquet"))


def test_check_files_reports_missing_and_corrupt_by_line(
    release_csv: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = manifest_from_csv(release_csv)
    for i, path in enumerate(table.column("path").to_pylist()):
        if i == 1:
            continue  # missing: line 3
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"not an image" if i == 4 else _jpeg())  # corrupt: line 6
    err = _run_expect_error(tmp_path, release_csv, capsys, "--check-files", "--workers", "2")
    assert "2 of 6" in err and "line 3" in err and "missing" in err and "line 6" in err and "unreadable" in err
    Path(table.column("path").to_pylist()[4]).write_bytes(_jpeg())
    Path(table.column("path").to_pylist()[1]).parent.mkdir(parents=True)
    Path(table.column("path").to_pylist()[1]).write_bytes(_jpeg())
    assert chexseg(["manifest", "--csv", release_csv, "--out", str(tmp_path / "m.parquet"), "--check-files"]) == 0


def test_manifest_never_opens_images_without_check_files(release_csv: str, tmp_path: Path) -> None:
    # No image exists at all: building the manifest must still succeed.
    assert chexseg(["manifest", "--csv", release_csv, "--out", str(tmp_path / "m.parquet"), "--no-check"]) == 0


# ---------------------------------------------------------------------------------------------------- listings
def _tree(root: Path) -> None:
    for rel in (
        "train/patient00001/study1/view1_frontal.jpg",
        "train/patient00001/study1/view2_lateral.jpg",
        "valid/patient64541/study1/view1_frontal.png",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_jpeg())
    (root / "train.csv").write_text("ignored")


def test_manifest_from_directory(tmp_path: Path) -> None:
    _tree(tmp_path / "ds")
    table = manifest_from_listing(str(tmp_path / "ds"))
    assert table.schema == manifest_schema()
    assert table.column("image_id").to_pylist() == [
        "patient00001_study1_view1_frontal",
        "patient00001_study1_view2_lateral",
        "patient64541_study1_view1_frontal",
    ]
    assert table.column("path").to_pylist()[2] == str(tmp_path / "ds/valid/patient64541/study1/view1_frontal.png")
    assert table.column("split").to_pylist() == ["train", "train", "valid"]
    assert table.column("frontal").to_pylist() == [True, False, True]
    assert table.column("Edema").null_count == 3


def test_directory_with_foreign_images_is_refused(tmp_path: Path) -> None:
    _tree(tmp_path / "ds")
    (tmp_path / "ds" / "overlay.png").write_bytes(_jpeg())
    with pytest.raises(ManifestError, match=r"overlay\.png"):
        manifest_from_listing(str(tmp_path / "ds"))
    with pytest.raises(FileNotFoundError):
        manifest_from_listing(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------- S3
@pytest.mark.s3
def test_csv_from_s3_to_manifest_on_s3(s3_bucket: str) -> None:
    csv_uri = f"{s3_bucket}/{PREFIX}/train.csv"
    with fsio.open_file(csv_uri, "wb") as f:
        f.write(("\n".join([",".join(CSV_HEADER), *ROWS]) + "\n").encode())
    out = f"{s3_bucket}/manifests/train.parquet"
    assert chexseg(["manifest", "--csv", csv_uri, "--out", out, "--no-check"]) == 0
    table = read_manifest(out)
    assert table.column("path").to_pylist()[0] == f"{s3_bucket}/{PREFIX}/train/patient00001/study1/view1_frontal.jpg"
    assert table.column("Edema").to_pylist() == [1.0, 0.0, -1.0, None, 1.0, -1.0]
    assert manifest_metadata(out)["source"] == csv_uri


@pytest.mark.s3
def test_prefix_listing_on_s3_with_check_files(s3_bucket: str, tmp_path: Path) -> None:
    for rel in ("train/patient00001/study1/view1_frontal.jpg", "train/patient00002/study3/view1_frontal.jpg"):
        with fsio.open_file(f"{s3_bucket}/cxr/{rel}", "wb") as f:
            f.write(_jpeg())
    out = tmp_path / "m.parquet"
    assert chexseg(["manifest", "--prefix", f"{s3_bucket}/cxr", "--out", str(out), "--check-files"]) == 0
    table = read_manifest(str(out))
    assert table.column("path").to_pylist() == [
        f"{s3_bucket}/cxr/train/patient00001/study1/view1_frontal.jpg",
        f"{s3_bucket}/cxr/train/patient00002/study3/view1_frontal.jpg",
    ]
    assert table.column("image_id").to_pylist()[1] == "patient00002_study3_view1_frontal"


def test_provenance_records_the_root_the_paths_were_resolved_against(tmp_path: Path) -> None:
    import json

    import pyarrow.parquet as pq

    from chexseg_dist.cli.main import main
    from chexseg_dist.data.manifest import METADATA_KEY

    csv_path = _write_csv(tmp_path / "train.csv", ROWS[:1])
    (tmp_path / PREFIX / "train").mkdir(parents=True)
    out = tmp_path / "m.parquet"
    assert main(["manifest", "--csv", csv_path, "--out", str(out), "--no-check"]) == 0
    meta = json.loads(pq.read_schema(out).metadata[METADATA_KEY])
    assert meta["root"] == str(tmp_path / PREFIX)
    assert meta["kind"] == "csv" and meta["rows"] == 1
    assert pq.read_table(out).column("path")[0].as_py().startswith(meta["root"] + "/train/")
