"""Print the resolved configuration (preset <- --config file <- --set overrides) as YAML.

Reads: the optional --config YAML file. Writes: nothing (stdout only).
"""

from __future__ import annotations

import argparse

import yaml

from chexseg_dist.cli._args import add_config_arguments
from chexseg_dist.core.console import say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chexseg_dist.config import load_config

    cfg = load_config(args.preset, args.config, args.overrides)
    say(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip("\n"))
    return 0
