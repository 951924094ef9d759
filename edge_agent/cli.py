"""The ``edge-agent`` command line.

Known errors print one line and exit 1; usage errors exit 2; nothing prints
a traceback. Each subcommand lives in ``edge_agent.commands.<name>``.
"""

import argparse
import importlib
import os
import sys
import traceback
from typing import List, Optional

from edge_agent import __version__
from edge_agent.commands import EXIT_ERROR
from edge_agent.errors import EdgeAgentError, IdentityError
from edge_agent.tpm_provider import prepare_process

# Order of the subcommands in --help.
COMMANDS = ("run", "config", "identity", "pin", "keygen", "diagnose", "console")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Telemetry agent for IoT edge gateways: IEEE 802.1AR identity, SPKI-pinned mutual TLS to MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"edge_agent.commands.{name}").register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    # First, before any module imports ssl: OpenSSL reads its configuration once,
    # and a TPM-held key needs the agent's own (see edge_agent.tpm_provider).
    prepare_process(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except IdentityError as exc:
        # Name the configuration that pointed at the identity files, unless they came from the command line.
        source = getattr(args, "config", None)
        where = f"{source}: [identity]: " if source is not None else ""
        print(f"edge-agent: error: {where}{exc}", file=sys.stderr)
        return EXIT_ERROR
    except EdgeAgentError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: one line, never a bare traceback
        if os.environ.get("EDGE_AGENT_DEBUG"):
            traceback.print_exc()
        print(
            f"edge-agent: internal error: {type(exc).__name__}: {exc}; this is a bug, please report it "
            "(set EDGE_AGENT_DEBUG=1 to print the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR
