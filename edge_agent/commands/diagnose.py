"""``edge-agent diagnose``: check the gateway step by step and show what to fix."""

import argparse
import sys

from edge_agent.commands import add_config_option

MIN_TIMEOUT_S = 0.5
MAX_TIMEOUT_S = 120.0


def diagnose(args: argparse.Namespace) -> int:
    from edge_agent.config import DEFAULT_CONFIG_PATH
    from edge_agent.diagnose.render import render_json, render_text, supports_colour
    from edge_agent.diagnose.runner import run_diagnosis

    report = run_diagnosis(args.config or DEFAULT_CONFIG_PATH, offline=args.offline, timeout_s=args.timeout)
    if args.json:
        sys.stdout.write(render_json(report))
    else:
        sys.stdout.write(render_text(report, colour=supports_colour(sys.stdout)))
    sys.stdout.flush()
    return report.exit_code


def timeout_seconds(text: str) -> float:
    """Parse --timeout; argparse turns the ValueError into a usage error (exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{text} s is out of range; use {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g} seconds")
    return value


def register(subparsers) -> None:
    from edge_agent.diagnose.model import DEFAULT_TIMEOUT_S

    parser = subparsers.add_parser(
        "diagnose",
        help="check configuration, identity, clock, hardware, broker, pins, spool and service; show what to fix",
        description=(
            "Run every check and print one line per check with its result (ok, warning, error, skipped), "
            "the finding and, when not ok, the fix. Exit status: 0 when nothing is worse than a warning, "
            "1 on any error, 2 on a usage error. Private keys and passphrases are never printed."
        ),
    )
    add_config_option(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--offline", action="store_true", help="skip the checks that need the network")
    parser.add_argument(
        "--timeout", type=timeout_seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help=f"time limit of each network step in seconds (default: {DEFAULT_TIMEOUT_S:g})",
    )
    parser.set_defaults(handler=diagnose)
