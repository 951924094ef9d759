"""``edge-agent run``: the service's main job."""

import argparse

from edge_agent.commands import EXIT_OK, add_config_option, load_config_from_args


def run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent, install_signal_handlers
    from edge_agent.logsetup import configure_logging

    config = load_config_from_args(args)
    configure_logging(args.log_level or config.log_level, args.log_format)
    agent = Agent(config)
    install_signal_handlers(agent)
    agent.run(duration_s=args.duration)
    return EXIT_OK


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="run the agent: sample telemetry and publish it to the broker")
    add_config_option(parser)
    parser.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS",
        help="stop after this many seconds (default: run until SIGTERM)",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default=None,
        help="log level (default: from the configuration, else info)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log line format (default: text)"
    )
    parser.set_defaults(handler=run)
