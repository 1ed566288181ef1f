"""Print the resolved configuration (preset <- --config file <- --set overrides) as YAML.

Reads: the optional --config YAML file. Writes: nothing (stdout only).
"""

from __future__ import annotations

import argparse

import yaml

from chexseg_dist.cli import add_config_arguments
from chexseg_dist.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
