"""Resolving a configuration: dataclass defaults <- preset <- YAML file <- ``--set section.field=value``.

The resolved config is written next to every output (:func:`save_config`); a saved ``config.yaml`` can be passed back
with ``--config`` to repeat a run. Every problem is a :class:`~chexseg_dist.errors.ConfigError` naming the file,
section, field or value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from chexseg_dist.config.presets import PRESETS
from chexseg_dist.config.sections import Config
from chexseg_dist.core import fsio
from chexseg_dist.errors import ConfigError

CONFIG_FILENAME = "config.yaml"


def load_config(preset: str = "tiny", path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Resolve a :class:`Config` from a preset, an optional YAML file and ``section.field=value`` overrides.

    Raises:
        ConfigError: unknown preset, section or field, or a value of the wrong type, naming it.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    merged: dict[str, Any] = {"preset": preset}
    _merge(merged, PRESETS[preset])
    if path:
        data = read_config_file(str(path))
        data.pop("run", None)  # run facts written by save_config(extra=...) are a record, not settings
        if "preset" in data and data["preset"] != preset:
            # A saved config names its preset; honour it unless the caller overrides on the command line.
            merged = {"preset": data["preset"]}
            _merge(merged, PRESETS[_valid_preset(data["preset"], path)])
        _merge(merged, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. train_classifier.epochs=3")
        section, name = key.split(".", 1)
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise ConfigError(f"override {item!r}: {section!r} is not a config section")
        merged[section][name] = _parse_override(section, name, raw)
    return absolute_paths(from_dict(merged))


#: Config fields that name a file or folder a command reads (``section.field``): every command treats them as its
#: inputs (an output may not overwrite or enter them), and a relative local path is made absolute here, on the
#: driver, before any Ray worker (whose working directory is its own) sees it.
PATH_FIELDS = (
    "masks.thresholds",
    "masks.affinity_checkpoint",
    "segmentation.encoder_init",
    "train_segmentation.teacher",
)


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with every non-empty local path of :data:`PATH_FIELDS` made absolute (URIs are left as they are)."""
    for key in PATH_FIELDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and not fsio.is_uri(value):
            setattr(getattr(cfg, section), name, os.path.abspath(os.path.expanduser(value)))
    return cfg


def config_inputs(cfg: Config) -> list[tuple[str, str]]:
    """``(section.field, path)`` of every input a config names (:data:`PATH_FIELDS` that are set)."""
    out = []
    for key in PATH_FIELDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value:
            out.append((key, value))
    return out


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML config file (local or URI); every way it can be unusable is a one-line ConfigError."""
    try:
        text = fsio.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except (IsADirectoryError, PermissionError, NotADirectoryError) as exc:
        raise ConfigError(f"config file {path}: cannot be read ({type(exc).__name__}); pass a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start}); pass a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"config file {path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _valid_preset(name: Any, source: object) -> str:
    if name not in PRESETS:
        raise ConfigError(f"{source}: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return str(name)


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        elif isinstance(value, dict):
            dst[key] = {}
            _merge(dst[key], value)
        else:
            dst[key] = value


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "preset"}


def _parse_override(section: str, name: str, raw: str) -> Any:
    sections = _section_types()
    if section not in sections:
        raise ConfigError(f"override {section}.{name}: unknown section {section!r}; sections are {sorted(sections)}")
    hints = typing.get_type_hints(sections[section])
    if name not in hints:
        raise ConfigError(f"override {section}.{name}: unknown field {name!r}; fields are {sorted(hints)}")
    return parse_value(hints[name], raw, f"{section}.{name}")


def parse_value(tp: Any, raw: str, where: str) -> Any:
    """Parse a command-line string into a field's type. Booleans accept only true/false/yes/no/1/0.

    (The original CheXseg code treated the string "False" as true; here it is an error or False, never True.)
    """
    if isinstance(tp, types.UnionType) and str in tp.__args__:  # a number or flag that also takes "auto"
        if raw.strip().lower() == "auto":
            return "auto"
        (other,) = (a for a in tp.__args__ if a is not str)
        try:
            return parse_value(other, raw, where)
        except ConfigError:
            raise ConfigError(f"config {where}={raw!r}: expected {other.__name__} or auto") from None
    if tp is bool:
        low = raw.strip().lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"config {where}={raw!r}: expected a boolean (true/false, yes/no, 1/0)")
    if tp not in (int, float):
        return raw
    try:
        value = tp(raw)
    except ValueError:
        raise ConfigError(f"config {where}={raw!r}: expected {tp.__name__}") from None
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"config {where}={raw!r}: expected a finite number")
    return value


def from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a nested dict, rejecting unknown keys and wrong types by name."""
    sections = _section_types()
    unknown = set(data) - set(sections) - {"preset"}
    if unknown:
        raise ConfigError(f"config: unknown section(s) {sorted(unknown)}; sections are {sorted(sections)}")
    kwargs: dict[str, Any] = {"preset": _valid_preset(data.get("preset", "tiny"), "config")}
    for name, cls in sections.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r}: expected a mapping, got {values!r}")
        hints = typing.get_type_hints(cls)
        bad = set(values) - set(hints)
        if bad:
            raise ConfigError(f"config section {name!r}: unknown field(s) {sorted(bad)}; fields are {sorted(hints)}")
        kwargs[name] = cls(**{k: _coerce(hints[k], v, f"{name}.{k}") for k, v in values.items()})
    return Config(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if isinstance(value, str) and tp is not str:
        return parse_value(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = tp if isinstance(tp, type) else None
    if isinstance(tp, types.UnionType):
        expected = None
    if expected is not None and not isinstance(value, expected):
        raise ConfigError(f"config {where}={value!r}: expected {expected.__name__}, got {type(value).__name__}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"config {where}={value!r}: expected int, got bool")
    return value


def save_config(
    cfg: Config, directory: str | Path, filename: str = CONFIG_FILENAME, extra: dict[str, Any] | None = None
) -> str:
    """Write the resolved config (plus optional ``extra`` run facts) as YAML next to an output.

    ``directory`` may be a local path or an fsspec URI (s3://...). Returns the written path.
    """
    payload = cfg.to_dict()
    if extra:
        payload["run"] = json.loads(json.dumps(extra, default=str))
    target = fsio.join(str(directory), filename)
    with fsio.open_file(target, "w") as f:
        yaml.safe_dump(payload, f, sort_keys=False)
    return target
