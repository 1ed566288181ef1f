"""What every command shares: config options, the flag -> ``--set`` table, and the rule that protects the disk.

**Flags as overrides.** Command-line conveniences (``--strategy tuned``, ``--full``, ``--workers 4``) are config
overrides in disguise; :data:`FLAG_OVERRIDES` says, once, which ``section.field`` each one sets, so that the
resolved config saved beside an output records them like any ``--set``.

**Inputs and outputs.** Each command declares which arguments it reads and which it writes, and what kind of thing
each output is (:class:`Output`). Before any work, :func:`check_paths` refuses (one line, exit status 2, nothing
touched) an output that is also one of the command's inputs, an output file that is an existing folder, an output
folder that is an existing file, and a file output without its expected suffix. Every output file is published
atomically (:func:`chexseg_dist.core.fsio.open_file`), so a failed command never leaves half a file either.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from chexseg_dist.core import fsio
from chexseg_dist.errors import OutputError


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


# ---------------------------------------------------------------------------------------------------- flags
@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets a config field: ``dest`` (argparse) -> ``field`` (``section.field``).

    ``value`` turns the parsed argument into the override's value (default: the argument itself); a flag whose
    argument is None or False sets nothing.
    """

    dest: str
    field: str
    value: Callable[[Any], Any] | None = None


#: command -> the flags that are config overrides.
FLAG_OVERRIDES: dict[str, tuple[Flag, ...]] = {
    "synth": tuple(Flag(dest, f"synth.{dest}") for dest in ("seed", "n_train", "n_valid", "n_test", "size", "workers")),
    "tune-thresholds": (
        Flag("manifest", "masks.label_gating", lambda _: True),
        Flag("workers", "masks.workers"),
    ),
    "export-masks": (
        Flag("strategy", "masks.strategy"),
        Flag("thresholds", "masks.thresholds"),
        Flag("prob_cutoff", "masks.prob_cutoff"),
        Flag("manifest", "masks.label_gating", lambda _: True),
        Flag("workers", "masks.workers"),
    ),
    "refine": (Flag("thresholds", "masks.strategy", lambda _: "tuned"),),
    "train-segmentation": (
        Flag("mode", "train_segmentation.mode"),
        # Tuned thresholds given: the pseudo-masks are made with them.
        Flag("thresholds", "masks.strategy", lambda _: "tuned"),
    ),
    "evaluate": (
        Flag("full", "evaluate.full"),
        Flag("allow_missing", "evaluate.allow_missing"),
        Flag("n_bootstrap", "evaluate.n_bootstrap"),
        Flag("seed", "evaluate.seed"),
    ),
    "overlay": (
        Flag("thresholds", "masks.strategy", lambda _: "tuned"),
        Flag("thresholds", "masks.thresholds"),
        Flag("label_gating", "masks.label_gating"),
    ),
}


def overrides(command: str, args: argparse.Namespace) -> list[str]:
    """The user's ``--set`` items, then those of the flags of ``command`` that were given (an explicit flag wins)."""
    items = []
    for flag in FLAG_OVERRIDES.get(command, ()):
        raw = getattr(args, flag.dest, None)
        if raw is None or raw is False:
            continue
        value = flag.value(raw) if flag.value is not None else raw
        items.append(f"{flag.field}={str(value).lower() if isinstance(value, bool) else value}")
    return [*getattr(args, "overrides", []), *items]


def load_command_config(command: str, args: argparse.Namespace) -> Any:
    """The resolved config of a command: preset <- ``--config`` <- flag overrides <- ``--set``."""
    from chexseg_dist.config import load_config

    return load_config(args.preset, args.config, overrides(command, args))


# ---------------------------------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class Output:
    """An output argument: ``dest`` holds a ``file`` (with one of ``suffixes``, if given) or a ``folder``.

    ``writes`` names what else the command writes there: files inside a folder output (``"config.yaml"``), or
    siblings of a file output, by the suffix added to its path (``".config.yaml"``). None of them may be an input.
    """

    dest: str
    kind: str = "file"
    suffixes: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    #: The file that marks this command's own finished output in a folder (e.g. ``segmentation.json``): a folder
    #: holding another command's marker (:data:`ARTIFACTS`) is refused rather than written over.
    marker: str = ""
    #: A folder the command fills on its own (``chexseg demo``): refused when it already holds files but not the
    #: marker of an earlier run of the command, unless ``--overwrite`` is given.
    fresh: bool = False

    def paths(self, value: str) -> list[str]:
        """Every path this output writes for the argument ``value``."""
        if self.kind == "folder":
            return [value, *(fsio.join(value, name) for name in self.writes)]
        return [value, *(value + suffix for suffix in self.writes)]


#: The files that mark a finished artifact of a command inside a folder, and what they are: an output folder holding
#: one that is not the command's own (:attr:`Output.marker`) is refused, so no command writes over another's work.
ARTIFACTS = {
    "checkpoint.json": ("a classifier checkpoint", "chexseg train-classifier"),
    "segmentation.json": ("a segmentation checkpoint", "chexseg train-segmentation"),
    "affinity.json": ("an affinity network", "chexseg train-affinity"),
    "zarr.json": ("a Zarr store", "chexseg pseudolabel"),
}


def check_paths(args: argparse.Namespace, inputs: Sequence[str], outputs: Sequence[Output]) -> None:
    """Refuse, before any work, outputs that would overwrite an input, lie inside one or hold one, write over
    another command's artifact, or are a path of another kind.

    Inputs are the command's input arguments and the files its config names (``--config`` and ``--set``:
    :data:`chexseg_dist.config.resolve.PATH_FIELDS`, e.g. a distillation teacher or an encoder's classifier).

    Args:
        args: the parsed arguments.
        inputs: ``dest`` names of input arguments (comma-separated lists are split).
        outputs: the output arguments.

    Raises:
        OutputError: naming the flag, the path and the fix.
        ConfigError: the config itself cannot be resolved (checked here, before any work, too).
    """
    given_inputs = [
        ("--" + dest.replace("_", "-"), path)
        for dest in inputs
        for path in _paths(getattr(args, dest, None))
        if path and not path.isspace()
    ]
    given_inputs += _config_inputs(args)
    for out in outputs:
        path = getattr(args, out.dest, None)
        if not path:
            continue
        flag = "--" + out.dest.replace("_", "-")
        for written in out.paths(path):
            for name, source in given_inputs:
                if fsio.same_location(written, source):
                    what = path if written == path else f"{path} (it writes {written})"
                    raise OutputError(
                        f"{flag} {what} would overwrite the input {name}; choose another {flag}, or copy the input "
                        "elsewhere first"
                    )
        for name, source in given_inputs:
            if fsio.within(path, source):
                raise OutputError(f"{flag} {path} lies inside the input {name} {source}; choose an {flag} outside it")
            if out.kind == "folder" and fsio.within(source, path):
                raise OutputError(
                    f"{flag} {path} holds the input {name} {source}; choose an {flag} that holds no input"
                )
        if out.fresh and fsio.isdir(path) and not getattr(args, "overwrite", False):
            fs, inner = fsio.filesystem(path)
            if fs.ls(inner, detail=False) and not fsio.exists(fsio.join(path, out.marker)):
                raise OutputError(
                    f"{flag} {path} is a folder with files that chexseg {getattr(args, 'command', '')} did not write "
                    f"(no {out.marker}); choose a new or empty {flag}, or pass --overwrite to write into it"
                )
        if out.kind == "folder" and fsio.isdir(path):
            for marker, (what, by) in ARTIFACTS.items():
                if marker != out.marker and fsio.isfile(fsio.join(path, marker)):
                    raise OutputError(
                        f"{flag} {path} holds {what} ({marker}, written by {by}); writing here would replace it: "
                        f"choose another {flag}"
                    )
        if out.kind == "file":
            if out.suffixes and not path.lower().endswith(out.suffixes):
                raise OutputError(f"{flag} {path}: expected a {' or '.join(out.suffixes)} file name")
            if fsio.isdir(path):
                raise OutputError(f"{flag} {path} is an existing folder; give a file name inside it or elsewhere")
        elif out.kind == "folder" and fsio.isfile(path):
            raise OutputError(f"{flag} {path} is an existing file, not a folder; choose another {flag}")


def _config_inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The inputs a command's config names (``section.field``, path), when it takes config arguments."""
    if not hasattr(args, "preset") or not hasattr(args, "command"):
        return []
    from chexseg_dist.config.resolve import config_inputs

    return config_inputs(load_command_config(args.command, args))


def _paths(value: Any) -> list[str]:
    if not value:
        return []
    return [p.strip() for p in str(value).split(",")]


def log_beside(output: str, name: str) -> str:
    """A local log file for a command whose main output is ``output``: ``<output>/<name>`` for a local folder
    output, ``<output>.<name>`` beside a local file, and a temporary folder when the output is on object storage
    (a log must be a local file: it receives the process's own output)."""
    import os
    import tempfile

    if fsio.is_uri(output):
        return os.path.join(tempfile.gettempdir(), "chexseg-logs", f"{fsio.basename(output)}-{name}")
    return os.path.join(os.path.abspath(output), name)
