"""The ``chexseg`` console script: one subcommand per stage, each a small module of this package.

A command module has ``add_arguments(parser)`` and ``run(args) -> int`` (parse, build, run, report: nothing else),
and may declare ``INPUTS`` (argument names it reads), ``OUTPUTS`` (:class:`~chexseg_dist.cli._args.Output` s it
writes; checked before anything runs) and ``log_path(args)`` (commands that start Ray: where Ray's and the
libraries' output goes while the console shows only the command's own lines; ``-v`` shows everything).

Errors: a :class:`~chexseg_dist.errors.ChexsegError` (bad input, bad state) and an object-store failure the user
can fix (access denied, no such bucket or object, an unreachable endpoint, no credentials:
:mod:`~chexseg_dist.core.storage_errors`) are printed as one line ``chexseg CMD: error: ...`` with exit status 2;
any other exception is a bug and keeps its traceback.

Subcommands are imported lazily, so ``chexseg --help`` is fast and a command that needs neither torch nor Ray does
not import them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from chexseg_dist.cli._args import check_paths
from chexseg_dist.core import storage_errors
from chexseg_dist.core.console import quiet_session, say_error
from chexseg_dist.errors import ChexsegError

#: name -> (module under chexseg_dist.cli, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "generate phantom radiographs with exact masks (CheXpert CSVs + CheXlocalize ground truth)"),
    "manifest": ("manifest", "turn a CheXpert CSV, a directory tree or an object-store prefix into a Parquet manifest"),
    "train-classifier": ("train_classifier", "train the saliency classifier with Ray Train; writes a checkpoint"),
    "pseudolabel": ("pseudolabel", "Ray Data job: all-class Grad-CAM for every radiograph into a resumable Zarr store"),
    "tune-thresholds": ("tune_thresholds", "tune per-pathology map thresholds and probability cutoffs on expert masks"),
    "train-affinity": ("train_affinity", "train the inter-pixel affinity network (IRNet) on CRF seeds with Ray Train"),
    "refine": ("refine", "Ray Data job: refined pseudo-masks (CRF or affinity) into the map store for the student"),
    "export-masks": ("export_masks", "binarise stored maps into CheXlocalize segmentation JSON at original size"),
    "expert-split": ("expert_split", "split an expert set, patient-disjoint, into expert-train and expert-select"),
    "train-segmentation": (
        "train_segmentation",
        "train the segmentation student (weak / full / semi / distill) with Ray Train; writes a checkpoint",
    ),
    "segment": ("segment", "Ray Data job: a trained student over a manifest -> CheXlocalize segmentation JSON"),
    "evaluate": ("evaluate", "CheXlocalize evaluation: mIoU, hit rate, bootstrap CIs, report"),
    "overlay": ("overlay", "PNG overlays of maps, predicted and ground-truth contours"),
    "experiment": ("experiment", "CheXseg's weak / full / semi / distill comparison on a phantom dataset"),
    "demo": ("demo", "the whole pipeline end to end on generated phantom data (the README's first command)"),
    "config": ("config", "print the resolved configuration for a preset, file and overrides"),
}


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


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"chexseg_dist.cli.{COMMANDS[name][0]}")


def accepts_verbose(name: str) -> bool:
    """Whether a command takes ``-v`` (it starts Ray and logs Ray's output by default)."""
    return hasattr(_module(name), "log_path")


def build_command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one subcommand (imports only that command's module)."""
    mod = _module(name)
    parser = argparse.ArgumentParser(
        prog=f"chexseg {name}",
        description=(mod.__doc__ or COMMANDS[name][1]).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mod.add_arguments(parser)
    if hasattr(mod, "log_path"):
        parser.add_argument(
            "-v", "--verbose", action="store_true", help="show Ray's and the libraries' output instead of logging it"
        )
    parser.set_defaults(_module=mod, command=name)
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
    mod: ModuleType = args._module
    try:
        check_paths(args, getattr(mod, "INPUTS", ()), getattr(mod, "OUTPUTS", ()))
        with quiet_session(_log_path(mod, args)):
            return int(mod.run(args) or 0)
    except ChexsegError as exc:
        # Bad input or state: one clear line naming what is wrong, no traceback. Anything else keeps its traceback.
        say_error(f"chexseg {args.command}: error: {exc}")
        return 2
    except Exception as exc:
        line = storage_errors.describe(exc, _uri_arguments(args))
        if line is None:
            raise
        say_error(f"chexseg {args.command}: error: {line}")
        return 2


def _uri_arguments(args: argparse.Namespace) -> list[str]:
    """The object-store URIs among a command's arguments (and its ``--set`` values), in order."""
    found: list[str] = []
    for value in vars(args).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and "://" in item:
                for part in item.split(","):
                    uri = part.split("=", 1)[1] if "=" in part.split("://")[0] else part
                    if "://" in uri and uri.strip() not in found:
                        found.append(uri.strip())
    return found


def _log_path(mod: ModuleType, args: argparse.Namespace) -> str | None:
    """Where a command that starts Ray logs Ray's output; None keeps it on the console.

    Under ``ray job submit`` the job's own log is the place users read (``ray job logs``, the dashboard), and a file
    on the head node would be lost with it: everything stays there, as with ``-v``.
    """
    if not hasattr(mod, "log_path") or args.verbose or os.environ.get("RAY_JOB_SUBMISSION_ID"):
        return None
    return str(mod.log_path(args))


if __name__ == "__main__":
    sys.exit(main())
