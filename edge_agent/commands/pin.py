"""``edge-agent pin``: compute SPKI pins of certificates, keys and CSRs."""

import argparse
from pathlib import Path

from edge_agent.commands import EXIT_OK, add_config_option


def pin(args: argparse.Namespace) -> int:
    from edge_agent.pinfiles import describe_pins

    for line in describe_pins(args.files):
        print(line)
    return EXIT_OK


def register(subparsers) -> None:
    parser = subparsers.add_parser("pin", help="compute SPKI pins (sha256//...) of certificates and keys")
    add_config_option(parser)
    parser.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="PEM or DER certificate, public key, private key or CSR"
    )
    parser.set_defaults(handler=pin)
