"""``edge-agent config check``: validate and print the effective configuration."""

import argparse
import json

from edge_agent.commands import EXIT_OK, add_config_option, load_config_from_args


def check(args: argparse.Namespace) -> int:
    from edge_agent.identity import load_identity

    config = load_config_from_args(args)
    identity = load_identity(config.identity, config.device_id)
    effective = config.to_dict()
    effective["device_id"] = config.device_id or identity.device_id

    if args.json:
        print(json.dumps(effective, indent=2, sort_keys=True))
        return EXIT_OK

    print(f"configuration {config.source} is valid (profile {config.profile} from {config.profile_path})")
    _print_settings(effective)
    return EXIT_OK


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
    checker.set_defaults(handler=check)
