"""``edge-agent pin``: compute, check and rotate SPKI pins.

Three forms share the command:

- ``edge-agent pin FILE...`` prints the pin of every certificate, key or CSR;
- ``edge-agent pin --connect HOST:PORT`` lists the chain a broker presents;
- ``edge-agent pin rotate --add FILE`` prints the pin list for the next key.
"""

import argparse
import datetime
import sys
from pathlib import Path

from edge_agent.commands import EXIT_ERROR, EXIT_OK, add_config_option

ROTATE = "rotate"
USAGE = """edge-agent pin [--format FORMAT] FILE...
       edge-agent pin --connect [HOST:PORT] [--servername NAME] [--ca-file FILE] [--config FILE] [--format FORMAT]
       edge-agent pin rotate (--config FILE | --current PINS) [--add FILE_OR_PIN]... [--drop PIN]... [--json]"""


def pin(args: argparse.Namespace) -> int:
    if args.json:
        args.format = "json"
    rotating = bool(args.files) and str(args.files[0]) == ROTATE
    _check_mode_options(args, rotating)

    if rotating:
        return rotate(args)
    if args.connect is not None:
        return connect(args)
    return pins_of_files(args)


def _check_mode_options(args: argparse.Namespace, rotating: bool) -> None:
    usage_error = args.pin_parser.error
    if rotating and args.connect is not None:
        usage_error("'rotate' and --connect cannot be combined")
    if not rotating and (args.add or args.drop or args.current):
        usage_error("--add, --drop and --current belong to 'edge-agent pin rotate'")
    if args.connect is None and (args.servername or args.ca_file):
        usage_error("--servername and --ca-file belong to 'edge-agent pin --connect'")
    if args.connect is not None and args.files:
        usage_error("give either FILE arguments or --connect, not both")
    if not rotating and args.connect is None and not args.files:
        usage_error("give a FILE, --connect HOST:PORT or 'rotate'")
    if rotating and len(args.files) > 1:
        usage_error(f"'rotate' takes no FILE arguments, got {' '.join(map(str, args.files[1:]))}; use --add FILE")
    if rotating and not (args.add or args.drop):
        usage_error("'rotate' needs --add FILE_OR_PIN or --drop PIN")
    if rotating and (args.config is None) == (args.current is None):
        usage_error("'rotate' reads the current pins from exactly one of --config FILE or --current PINS")


def pins_of_files(args: argparse.Namespace) -> int:
    from edge_agent.pinfiles import read_all_pin_sources
    from edge_agent.pinformat import format_sources

    sources = read_all_pin_sources(args.files)
    fmt = args.format or "curl"
    expires = args.expires
    if fmt == "android" and expires is None and args.config is not None:
        from edge_agent.commands import load_config_from_args

        expires = load_config_from_args(args).broker.pins_expire
    print(format_sources(sources, fmt, expires))
    return EXIT_OK


def connect(args: argparse.Namespace) -> int:
    from edge_agent.chainprobe import parse_host_port, probe_broker, probe_settings
    from edge_agent.config import EntropyConfig
    from edge_agent.entropy import EntropyGate
    from edge_agent.pinformat import format_probe

    config = identity = pin_set = None
    if args.config is not None:
        from edge_agent.commands import load_config_from_args
        from edge_agent.identity import load_identity

        config = load_config_from_args(args)
        identity = load_identity(config.identity, config.device_id)

    if args.connect:
        host, port = parse_host_port(args.connect)
    elif config is not None:
        host, port = config.broker.host, config.broker.port
    else:
        args.pin_parser.error("--connect needs HOST:PORT unless --config names the broker")

    broker = probe_settings(host, port, args.ca_file, args.servername, config.broker if config else None)
    if config is not None:
        pin_set = broker.pin_set
    gate = EntropyGate(config.entropy if config else EntropyConfig())
    result = probe_broker(broker, identity, gate, pin_set)
    print(format_probe(result, args.format or "curl", args.expires))
    return EXIT_OK if result.accepted else EXIT_ERROR


def rotate(args: argparse.Namespace) -> int:
    from edge_agent.pinformat import android_pin_set, toml_pin_list
    from edge_agent.pinning import parse_pin, parse_pin_list
    from edge_agent.pinrotate import pin_to_add, read_configured_pins, rotate_pins

    current = read_configured_pins(args.config) if args.config else parse_pin_list(args.current)
    additions = [pin_to_add(spec) for spec in args.add]
    drops = [parse_pin(text) for text in args.drop]
    rotation = rotate_pins(current, additions, drops)

    fmt = args.format or "toml"
    if fmt == "json":
        import json

        print(json.dumps(rotation.to_dict(), indent=2))
    elif fmt == "android":
        print(android_pin_set(((p, "") for p in rotation.pins), args.expires))
    elif fmt == "toml":
        print(toml_pin_list(rotation.pins))
    elif fmt == "hex":
        print("\n".join(p.hex for p in rotation.pins))
    else:
        print(";".join(str(p) for p in rotation.pins))
    print(f"edge-agent pin rotate: {rotation.summary()}", file=sys.stderr)
    return EXIT_OK


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date {text!r}; write it as YYYY-MM-DD, such as 2027-06-30") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pin",
        help="compute SPKI pins (sha256//...) of files or a live broker, and rotate the pin list",
        description=(
            "Compute SPKI pins of certificates, keys and CSRs (PEM or DER), list and check the chain a broker "
            "presents (--connect), or print the pin list for a key rotation ('rotate')."
        ),
        usage=USAGE,
    )
    add_config_option(parser)
    parser.add_argument(
        "files", nargs="*", type=Path, metavar="FILE",
        help="PEM or DER certificate (every one of a bundle), public key, private key or CSR; "
        "or the word 'rotate' (write ./rotate for a file of that name)",
    )
    parser.add_argument(
        "--format", choices=("curl", "hex", "json", "android", "toml"), default=None,
        help="output format: curl (sha256//base64, the default), hex, json, android (network_security_config "
        "<pin-set>) or toml (a broker.pins line; the default of 'rotate')",
    )
    parser.add_argument("--json", action="store_true", help="same as --format json")
    parser.add_argument(
        "--expires", type=_date, default=None, metavar="YYYY-MM-DD",
        help="expiration date of the Android <pin-set> (default: broker.pins_expire from --config)",
    )

    probe = parser.add_argument_group("checking a live broker")
    probe.add_argument(
        "--connect", nargs="?", const="", default=None, metavar="HOST:PORT",
        help="make a TLS handshake (no MQTT) and list every certificate presented; "
        "without HOST:PORT the broker from --config",
    )
    probe.add_argument("--servername", default=None, metavar="NAME", help="TLS server name to send and check")
    probe.add_argument(
        "--ca-file", type=Path, default=None, metavar="FILE",
        help="CA bundle to verify the chain against (default: broker.ca_file from --config)",
    )

    rotation = parser.add_argument_group("rotating pins ('edge-agent pin rotate')")
    rotation.add_argument(
        "--add", action="append", default=[], metavar="FILE_OR_PIN",
        help="certificate, key or CSR of the next broker key, or its sha256// pin (repeatable)",
    )
    rotation.add_argument("--drop", action="append", default=[], metavar="PIN", help="pin to remove (repeatable)")
    rotation.add_argument(
        "--current", default=None, metavar="PINS",
        help="current pins as curl's ';'-separated list, instead of reading broker.pins from --config",
    )
    parser.set_defaults(handler=pin, pin_parser=parser)
