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

    def paths(self, value: str) -> list[str]:
        """Every path this output writes for the argument ``value``."""
        if self.kind == "folder":
            return [value, *(fsio.join(value, name) for name in self.writes)]
        return [value, *(value + suffix for suffix in self.writes)]


def check_paths(args: argparse.Namespace, inputs: Sequence[str], outputs: Sequence[Output]) -> None:
    """Refuse, before any work, outputs that would overwrite an input or a path of another kind.

    Args:
        args: the parsed arguments.
        inputs: ``dest`` names of input arguments (comma-separated lists are split).
        outputs: the output arguments.

    Raises:
        OutputError: naming the flag, the path and the fix.
    """
    given_inputs = [
        (dest, path) for dest in inputs for path in _paths(getattr(args, dest, None)) if path and not path.isspace()
    ]
    for out in outputs:
        path = getattr(args, out.dest, None)
        if not path:
            continue
        flag = "--" + out.dest.replace("_", "-")
        for written in out.paths(path):
            for dest, source in given_inputs:
                if fsio.same_location(written, source):
                    what = path if written == path else f"{path} (it writes {written})"
                    raise OutputError(
                        f"{flag} {what} would overwrite the input --{dest.replace('_', '-')}; choose another {flag}, "
                        "or copy the input elsewhere first"
                    )
        if out.kind == "file":
            if out.suffixes and not path.lower().endswith(out.suffixes):
                raise OutputError(f"{flag} {path}: expected a {' or '.join(out.suffixes)} file name")
            if fsio.isdir(path):
                raise OutputError(f"{flag} {path} is an existing folder; give a file name inside it or elsewhere")
        elif out.kind == "folder" and fsio.isfile(path):
            raise OutputError(f"{flag} {path} is an existing file, not a folder; choose another {flag}")


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
