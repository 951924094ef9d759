"""``edge-agent console``: the read-only maintenance prompt on a serial port."""

import argparse
import logging
import sys

from edge_agent.commands import EXIT_OK, add_config_option

logger = logging.getLogger(__name__)


def console(args: argparse.Namespace) -> int:
    from edge_agent.config import DEFAULT_CONFIG_PATH, SerialConfig, load_config
    from edge_agent.console import ConsoleCommands, SerialConsole
    from edge_agent.errors import EdgeAgentError
    from edge_agent.logsetup import configure_logging

    configure_logging(args.log_level)
    config_path = args.config or DEFAULT_CONFIG_PATH
    try:
        serial_settings = load_config(config_path, check_files=False).serial
    except EdgeAgentError as exc:
        # The console exists to diagnose a broken gateway, so a bad configuration must not stop it.
        serial_settings = SerialConfig()
        first_problem = str(exc).splitlines()[0]
        logger.warning("configuration not usable (%s); serial defaults %s at %d baud", first_problem,
                       serial_settings.port, serial_settings.baud)

    port = args.port or serial_settings.port
    baud = args.baud or serial_settings.baud
    print(f"edge-agent console on {port} at {baud} baud 8N1; stop with Ctrl-C", file=sys.stderr)
    SerialConsole(port, baud, ConsoleCommands(config_path)).serve(fail_fast=True)
    return EXIT_OK


def baud_rate(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid baud rate {text!r}; give a number such as 115200") from None
    if not 300 <= value <= 4_000_000:
        raise argparse.ArgumentTypeError(f"baud rate {value} is out of range; use 300 to 4000000")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "console",
        help="serve the read-only maintenance console on a serial port",
        description=(
            "Serve a read-only prompt (diagnose, status, identity, pins, thermal, help, exit) on a serial port, "
            "8N1. The port and baud rate default to [serial] in the firmware profile and the configuration."
        ),
    )
    add_config_option(parser)
    parser.add_argument("--port", default=None, metavar="DEVICE", help="serial device (default: serial.port)")
    parser.add_argument("--baud", type=baud_rate, default=None, metavar="N", help="baud rate (default: serial.baud)")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="warning",
        help="log level on stderr (default: warning)",
    )
    parser.set_defaults(handler=console)
