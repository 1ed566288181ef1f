"""No command writes over a user's work: an output may not be another command's artifact, lie inside an input or
hold one, and the files a config names (a distillation teacher, an encoder's classifier) are inputs too. Each case
runs the real command on a miniature world: exit status 2, one line naming the path and the fix, and the bytes of
what was there unchanged. (The reverse, an earlier output of the same command, is resumed: the loop tests.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cli_helpers import refused, snapshot

from chexseg_dist.cli._args import load_command_config
from chexseg_dist.cli.main import build_command_parser
from chexseg_dist.models.checkpoint import save_checkpoint
from chexseg_dist.models.classifiers import create_classifier


def _classifier(path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(
        str(path), create_classifier("tiny_cnn", widths=(8, 16, 32)), arch="tiny_cnn", image_size=64, config={}
    )
    return path


def _student(world: dict[str, str], out: Path, *extra: str) -> list[str]:
    return ["train-segmentation", "--mode", "full", "--expert-manifest", world["valid"], "--expert-annotations",
            world["expert"], "--out", str(out), *extra]  # fmt: skip


def test_a_student_is_not_written_over_a_classifier_checkpoint(
    student_world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _classifier(tmp_path / "classifier")
    before = snapshot(ckpt)
    refused(
        _student(student_world, ckpt),
        capsys,
        f"--out {ckpt}",
        "a classifier checkpoint (checkpoint.json, written by chexseg train-classifier)",
        "choose another --out",
    )
    assert snapshot(ckpt) == before


def test_a_teacher_named_in_the_config_is_an_input(
    student_world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.pt").write_bytes(b"the teacher's weights")
    before = snapshot(teacher)
    argv = _student(student_world, teacher, "--set", f"train_segmentation.teacher={teacher}")
    refused(argv, capsys, "would overwrite the input train_segmentation.teacher", "choose another --out")
    assert snapshot(teacher) == before
    # Inside it, too (a --config file naming it counts the same as --set).
    config = tmp_path / "distill.yaml"
    config.write_text(f"train_segmentation:\n  teacher: {teacher}\n")
    refused(_student(student_world, teacher / "student", "--config", str(config)), capsys,
            "lies inside the input train_segmentation.teacher")  # fmt: skip
    assert snapshot(teacher) == before


def test_a_student_is_not_written_inside_the_store_it_reads(
    student_world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Path(student_world["store"])
    before = snapshot(store)
    argv = ["train-segmentation", "--mode", "semi", "--expert-manifest", student_world["valid"],
            "--expert-annotations", student_world["expert"], "--pseudo-store", str(store), "--pseudo-manifest",
            student_world["train"], "--out", str(store / "student")]  # fmt: skip
    refused(argv, capsys, f"--out {store / 'student'} lies inside the input --pseudo-store", "outside it")
    assert snapshot(store) == before
    # Nor in a folder that holds its inputs (the student's files would mix with them).
    refused(_student(student_world, Path(student_world["valid"]).parent), capsys, "holds the input --expert-manifest")


def test_the_demo_refuses_a_folder_of_someone_elses_files_unless_told_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "my_project"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's notes")
    (mine / "thresholds.json").write_text('{"mine": true}')  # a name the demo writes
    before = snapshot(mine)
    refused(["demo", "--out", str(mine)], capsys, f"--out {mine} is a folder with files that chexseg demo did not",
            "--overwrite")  # fmt: skip
    assert snapshot(mine) == before
    # An earlier demo's folder (its log is there) and an empty one are the demo's to resume or fill: not refused at
    # the check (which is all this test runs: a config error stops the demo before any stage).
    for folder in (tmp_path / "empty", tmp_path / "earlier"):
        folder.mkdir()
    (tmp_path / "earlier" / "demo.log").write_text("an earlier demo\n")
    for folder in (tmp_path / "empty", tmp_path / "earlier", mine):
        extra = ["--overwrite"] if folder == mine else []
        line = refused(["demo", "--out", str(folder), *extra, "--set", "synth.n_train=x"], capsys, "n_train")
        assert "did not write" not in line


def test_relative_paths_in_config_fields_are_made_absolute_on_the_driver(tmp_path: Path) -> None:
    # A Ray Train worker's working directory is its own: a relative teacher or encoder would be "not found" there
    # a minute into the run. The driver resolves them against its own working directory once.
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        args = build_command_parser("train-segmentation").parse_args(
            ["--expert-manifest", "m.parquet", "--expert-annotations", "a.json", "--out", "s", "--set",
             "train_segmentation.teacher=runs/full", "--set", "segmentation.encoder_init=../classifier"]
        )  # fmt: skip
        cfg = load_command_config("train-segmentation", args)
    finally:
        os.chdir(cwd)
    assert cfg.train_segmentation.teacher == str(tmp_path / "runs" / "full")
    assert cfg.segmentation.encoder_init == str(tmp_path.parent / "classifier")
    uri = build_command_parser("train-segmentation").parse_args(
        [
            "--expert-manifest",
            "m",
            "--expert-annotations",
            "a",
            "--out",
            "s",
            "--set",
            "train_segmentation.teacher=s3://b/t",
        ]
    )
    assert load_command_config("train-segmentation", uri).train_segmentation.teacher == "s3://b/t"


def test_segment_checks_the_students_weights_before_ray_starts(
    student_world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from chexseg_dist.core.pathologies import N_TASKS
    from chexseg_dist.models.segmentation import create_segmentation, save_segmentation

    model = tmp_path / "student"
    save_segmentation(str(model), create_segmentation("unet", "resnet18"), image_size=64,
                      thresholds=[0.5] * N_TASKS, config={})  # fmt: skip
    weights = model / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a copy that stopped
    out = tmp_path / "pred.json"
    argv = ["segment", "--model", str(model), "--manifest", student_world["test"], "--out", str(out)]
    refused(argv, capsys, f"checkpoint {weights}: cannot read the weights", "save it again")
    assert not out.exists()
