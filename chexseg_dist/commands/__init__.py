"""Subcommands of the chexseg console script: each module has add_arguments(parser) and run(args) -> int."""
