"""The ``chexseg`` console script: one subcommand per stage, each a small module under ``chexseg_dist.commands``.

Subcommands are imported lazily, so ``chexseg --help`` is fast and a command that needs neither torch nor Ray
does not import them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: name -> (module under chexseg_dist.commands, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "generate phantom radiographs with exact masks (CheXpert CSVs + CheXlocalize ground truth)"),
    "manifest": ("manifest", "turn a CheXpert CSV, a directory tree or an object-store prefix into a Parquet manifest"),
    "train-classifier": ("train_classifier", "train the saliency classifier with Ray Train; writes a checkpoint"),
    "pseudolabel": ("pseudolabel", "Ray Data job: all-class Grad-CAM for every radiograph into a resumable Zarr store"),
    "tune-thresholds": ("tune_thresholds", "tune per-pathology map thresholds and probability cutoffs on expert masks"),
    "export-masks": ("export_masks", "binarise stored maps into CheXlocalize segmentation JSON at original size"),
    "evaluate": ("evaluate", "CheXlocalize evaluation: mIoU, hit rate, bootstrap CIs, report"),
    "overlay": ("overlay", "PNG overlays of maps, predicted and ground-truth contours"),
    "demo": ("demo", "the whole pipeline end to end on generated phantom data (the README's first command)"),
    "config": ("config", "print the resolved configuration for a preset, file and overrides"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The configuration options every config-driven subcommand takes."""
    from chexseg_dist.config import PRESETS

    parser.add_argument(
        "--preset", default="tiny", choices=sorted(PRESETS), help="configuration preset (default: tiny)"
    )
    parser.add_argument("--config", default=None, help="YAML config file (e.g. a saved config.yaml) over the preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set pseudolabel.batch_size=32 (repeatable)",
    )


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chexseg",
        description="Distributed pseudo-labelling and semi-supervised segmentation of chest radiographs.",
        epilog="Run 'chexseg COMMAND --help' for what a command reads and writes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def build_command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one subcommand (imports only that command's module)."""
    module, summary = COMMANDS[name]
    mod = importlib.import_module(f"chexseg_dist.commands.{module}")
    parser = argparse.ArgumentParser(
        prog=f"chexseg {name}",
        description=(mod.__doc__ or summary).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run, command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``chexseg``; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        # Top level: list the commands (or let argparse report the unknown one).
        top = _top_parser()
        top.parse_args(argv[:1] or ["--help"])
        return 2
    args = build_command_parser(argv[0]).parse_args(argv[1:])
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # Bad input: one clear line naming what is wrong, no traceback.
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"chexseg {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
