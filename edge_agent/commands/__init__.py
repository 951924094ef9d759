"""Subcommands of ``edge-agent``, one module each.

Each module defines ``register(subparsers)``, which adds its parser and sets
``handler``. Modules import only ``argparse`` and light helpers at import
time; the handlers import what they need, so ``edge-agent --help`` stays fast.
"""

import argparse
from pathlib import Path

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", type=Path, default=None, metavar="FILE",
        help="agent configuration file (default: /etc/edge-agent/agent.toml)",
    )


def load_config_from_args(args: argparse.Namespace):
    from edge_agent.config import DEFAULT_CONFIG_PATH, load_config

    return load_config(args.config or DEFAULT_CONFIG_PATH)
