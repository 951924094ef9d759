"""``edge-agent config check``: validate and print the effective configuration."""

import argparse
import json

from edge_agent.commands import EXIT_ERROR, EXIT_OK, add_config_option, load_config_from_args


def check(args: argparse.Namespace) -> int:
    from edge_agent.chainprobe import probe_broker
    from edge_agent.entropy import EntropyGate
    from edge_agent.identity import load_identity
    from edge_agent.pinformat import format_probe
    from edge_agent.tls import create_client_context

    config = load_config_from_args(args)
    identity = load_identity(config.identity, config.device_id)
    # Building the TLS context proves OpenSSL accepts the CA bundle, certificate and key as a run would.
    create_client_context(config.broker, identity)
    effective = config.to_dict()
    effective["device_id"] = config.device_id or identity.device_id
    pin_set_status = config.broker.pin_set.status()
    probe = None
    if args.connect:
        probe = probe_broker(config.broker, identity, EntropyGate(config.entropy), config.broker.pin_set)
    exit_code = EXIT_OK if probe is None or probe.accepted else EXIT_ERROR

    if args.json:
        effective["pin_set_status"] = pin_set_status.to_dict()
        if probe is not None:
            effective["live_chain"] = probe.to_dict()
        print(json.dumps(effective, indent=2, sort_keys=True))
        return exit_code

    print(f"configuration {config.source} is valid (profile {config.profile} from {config.profile_path})")
    _print_settings(effective)
    if probe is not None:
        print()
        print(format_probe(probe, "curl"))
        return exit_code
    if pin_set_status.message:
        print(f"warning: {pin_set_status.message}")
    print("note: broker.pins were not compared with the live broker chain; add --connect to check for a backup pin")
    return exit_code


def _print_settings(settings: dict, prefix: str = "") -> None:
    for key in sorted(settings):
        value = settings[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _print_settings(value, f"{name}.")
        else:
            print(f"  {name} = {json.dumps(value)}")


def register(subparsers) -> None:
    parser = subparsers.add_parser("config", help="validate and show the configuration")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    checker = actions.add_parser(
        "check", help="validate the configuration, profile and identity files and print the effective settings"
    )
    add_config_option(checker)
    checker.add_argument("--json", action="store_true", help="print the effective settings as JSON")
    checker.add_argument(
        "--connect", action="store_true",
        help="also make a TLS handshake with the broker (no MQTT) and check broker.pins against its chain, "
        "including whether a backup pin remains",
    )
    checker.set_defaults(handler=check)
