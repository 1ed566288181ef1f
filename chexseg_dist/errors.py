"""The errors a user can fix: one hierarchy, printed by the CLI as one line with exit status 2.

Every stage raises a :class:`ChexsegError` subclass for bad input (a file, row, id or field that is wrong) and bad
state (a store written for another manifest, a locked store, a run of another model). The message names the
offending input and says what would fix it. Anything else that escapes a command is a bug and keeps its traceback:
the CLI never turns a plain ``ValueError`` or ``KeyError`` into "bad input".

Subclasses also derive from the built-in exception a caller would expect (``ValueError`` for a bad value,
``FileNotFoundError`` for a missing input), so library code may catch either.
"""

from __future__ import annotations


class ChexsegError(Exception):
    """Bad input or bad state, described for the user (file, row, id or field, and the fix)."""

    def __str__(self) -> str:
        # KeyError-derived errors would otherwise print their message in quotes.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(ChexsegError, ValueError):
    """A configuration file, preset, section, field or value that is not allowed."""


class InputError(ChexsegError, ValueError):
    """An input file or argument whose content cannot be used."""


class InputNotFoundError(ChexsegError, FileNotFoundError):
    """A named input (file, object, directory or prefix) does not exist."""


class OutputError(ChexsegError, ValueError):
    """An output that cannot be written where asked: it would replace an input, or a path of the wrong kind."""


class ManifestError(InputError):
    """A CSV, listing or manifest that cannot be used; the message names the file and line (or path)."""


class AnnotationError(InputError):
    """A malformed CheXlocalize annotation file or entry; the message names the file, image id and pathology."""


class ImageDecodeError(InputError):
    """An image could not be decoded. ``source`` names the file or URI; ``reason`` says why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses process boundaries (Ray tasks, process pools)
        return (type(self), (self.source, self.reason))


class CheckpointError(InputError):
    """A checkpoint directory that cannot be loaded or saved; the message names the path and field."""


class StoreError(InputError):
    """A map store that is missing, malformed or incompatible with the request; the message names it and the fix."""


class StoreLockedError(StoreError):
    """Another live job holds the store's lock (or took it over from this one)."""


class EvaluationError(InputError):
    """Predictions and ground truth that cannot be scored together (missing images or pathologies, other sizes)."""


class TrainingError(ChexsegError, RuntimeError):
    """A training run that cannot start or continue: a run of another model, nothing readable to train on."""
