from pathlib import Path

import pytest
import yaml

from chexseg_dist.cli.main import main
from chexseg_dist.config.presets import PRESETS
from chexseg_dist.config.resolve import load_config, save_config
from chexseg_dist.config.sections import Config


def test_presets_resolve_to_the_documented_settings() -> None:
    tiny = load_config("tiny")
    assert tiny.classifier.arch == "tiny_cnn" and tiny.pseudolabel.gpus_per_actor == 0
    paper = load_config("paper")
    assert (paper.classifier.arch, paper.classifier.image_size) == ("densenet121", 320)
    assert (paper.train_classifier.lr, paper.train_classifier.batch_size, paper.train_classifier.epochs) == (
        1e-4,
        16,
        3,
    )
    seg, ts = paper.segmentation, paper.train_segmentation
    assert (seg.arch, seg.encoder, seg.image_size) == ("deeplabv3plus", "resnet18", 320)  # the paper's student
    assert (ts.batch_size, ts.lr, ts.epochs, ts.loss, ts.expert_ratio, ts.mixing) == (
        8,
        1e-4,
        20,
        "dice",
        0.9,
        "bernoulli",
    )


def test_file_then_overrides_win_over_the_preset(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("pseudolabel:\n  batch_size: 7\n  num_actors: 3\n")
    cfg = load_config("paper", f, ["pseudolabel.num_actors=5", "masks.label_gating=false"])
    assert cfg.pseudolabel.batch_size == 7 and cfg.pseudolabel.num_actors == 5
    assert cfg.masks.label_gating is False
    assert cfg.classifier.arch == "densenet121"  # preset value untouched


@pytest.mark.parametrize("raw", ["False", "false", "no", "0"])
def test_false_strings_are_false(raw: str) -> None:
    # The original CheXseg code parsed the flag "False" as True.
    assert load_config("tiny", None, [f"train_classifier.augment={raw}"]).train_classifier.augment is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train_classifier.augment=maybe", "expected a boolean"),
        ("train_classifier.epochs=two", "expected int"),
        ("train_classifier.uncertain_policy=sometimes", "uncertain_policy"),
        ("nosuch.field=1", "unknown section"),
        ("pseudolabel.nosuch=1", "unknown field"),
        ("pseudolabel.batch_size=0", "batch_size"),
        ("epochs=3", "section.field=value"),
    ],
)
def test_bad_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config("tiny", None, [override])


def test_saved_config_reloads_identically(tmp_path: Path) -> None:
    cfg = load_config("paper", None, ["pseudolabel.batch_size=3"])
    path = save_config(cfg, tmp_path / "out", extra={"command": "test"})
    data = yaml.safe_load(Path(path).read_text())
    assert data["run"] == {"command": "test"}
    again = load_config("tiny", path)  # the file names its preset: paper wins over the default
    assert again == cfg and isinstance(again, Config)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="paper"):
        load_config("huge")
    assert set(PRESETS) == {"tiny", "paper"}


def test_cli_config_prints_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--preset", "paper", "--set", "pseudolabel.batch_size=8"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["pseudolabel"]["batch_size"] == 8 and data["classifier"]["arch"] == "densenet121"


def test_cli_bad_override_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "masks.strategy=magic"]) == 2
    err = capsys.readouterr().err
    assert "masks.strategy" in err and "otsu" in err and "Traceback" not in err


def test_cli_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("synth", "manifest", "train-classifier", "pseudolabel", "evaluate", "demo"):
        assert name in out


def test_torch_threads_default_follows_the_cpu_request_and_tiny_uses_both_cores() -> None:
    assert load_config("paper").pseudolabel.torch_threads == 0  # 0 = int(cpus_per_actor) threads per actor
    assert load_config("tiny").pseudolabel.torch_threads == 2
    with pytest.raises(ValueError, match="torch_threads"):
        load_config("tiny", None, ["pseudolabel.torch_threads=-1"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_and_a_resolved_config_of_release_0_1_0_load_unchanged(preset: str, tmp_path: Path) -> None:
    # The sections share bases now (Ray Train run fields, augmentation, actor pools): the YAML keys and every value
    # stay as they were, and a config.yaml written by 0.1.0 (with its run record) loads to the same settings.
    old = Path(__file__).parent / "data" / f"resolved-{preset}-0.1.0.yaml"
    expected = yaml.safe_load(old.read_text())
    assert load_config(preset).to_dict() == expected
    saved = tmp_path / "config.yaml"
    saved.write_text(old.read_text() + "run:\n  run: /runs/classifier\n  wall_time_s: 12.5\n")
    assert load_config(preset, saved).to_dict() == expected
