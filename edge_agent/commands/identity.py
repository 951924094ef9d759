"""``edge-agent identity show`` and ``edge-agent identity verify``: the device identity and its checks.

Both read the identity from the configuration, or, without one, from
``--cert``, ``--key`` and ``--trust-anchor`` files. ``verify`` exits 0 when no
check failed, 1 when one did, and 2 on usage errors.
"""

import argparse
import json
from pathlib import Path
from typing import Callable

from edge_agent.commands import EXIT_ERROR, EXIT_OK, add_config_option, load_config_from_args


def _report(args: argparse.Namespace, usage_error: Callable[[str], None]):
    from edge_agent.config import DEVICE_ID_SOURCES, KEY_TYPES
    from edge_agent.identity import CredentialFiles, IdentityPolicy, validate_credentials, validate_identity

    if args.cert is None:
        for option in ("key", "trust_anchor", "key_passphrase_file", "key_passphrase_credential"):
            if getattr(args, option):
                usage_error(f"--{option.replace('_', '-')} needs --cert")
        config = load_config_from_args(args)
        return validate_identity(config.identity, device_id=config.device_id)

    if args.config is not None:
        usage_error("use either --config or --cert, not both")
    if args.require_trust_anchor and not args.trust_anchor:
        usage_error("--cert needs at least one --trust-anchor FILE to verify the chain")
    for key_type in args.key_type:
        if key_type not in KEY_TYPES:
            usage_error(f"--key-type: invalid value {key_type!r}; use one of {', '.join(KEY_TYPES)}")
    if args.device_id_source not in DEVICE_ID_SOURCES:
        usage_error(f"--device-id-source: invalid value {args.device_id_source!r}; use one of {', '.join(DEVICE_ID_SOURCES)}")
    files = CredentialFiles(
        role="IDevID",
        setting="identity",
        cert=args.cert,
        key=args.key,
        trust_anchors=tuple(args.trust_anchor),
        key_passphrase_file=args.key_passphrase_file,
        key_passphrase_credential=args.key_passphrase_credential,
    )
    defaults = IdentityPolicy()
    policy = IdentityPolicy(
        key_types=tuple(args.key_type) or defaults.key_types,
        strict_time=args.strict_time,
        device_id_source=args.device_id_source,
    )
    return validate_credentials([files], policy)


def show(args: argparse.Namespace) -> int:
    report = _report(args, args.usage_error)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for line in format_report(report):
            print(line)
    return EXIT_OK if any(c.certificate is not None for c in report.credentials) else EXIT_ERROR


def verify(args: argparse.Namespace) -> int:
    report = _report(args, args.usage_error)
    for check in report.checks:
        print(f"{check.status:<8} {check.credential:<7} {check.id:<12} {check.message}")
    verdict = "passed" if report.ok else "failed"
    print(f"identity verification {verdict}: {len(report.errors)} error(s)")
    return EXIT_OK if report.ok else EXIT_ERROR


def format_report(report) -> "list[str]":
    """Render the report of ``identity show`` as text lines."""
    lines = []
    for credential in report.credentials:
        data = credential.to_dict()
        in_use = " (the TLS client certificate)" if credential.role == report.selected_role else ""
        lines.append(f"{credential.role} {data['cert_path']}{in_use}")
        lines.extend(_describe(data))
        lines.append("  checks:")
        lines.extend(f"    {c['status']:<8} {c['id']:<12} {c['message']}" for c in data["checks"])
        lines.append("")
    selection = report.selection
    lines.append(f"{selection.status}: {selection.message}")
    return lines


def _describe(data: dict) -> "list[str]":
    if "subject" not in data:
        return []
    rows = [
        ("subject", data["subject"]),
        ("issuer", data["issuer"]),
        ("serial number", data["serial_number"]),
        ("device id", f"{data['device_id']} (from {data['device_id_source']})" if data["device_id"] else "none"),
    ]
    candidates = data["serial_candidates"]
    rows.append(("subject serialNumber", candidates["subject_serial_number"] or "none"))
    hardware = data["hardware_module_name"]
    if hardware:
        rows.append(("HardwareModuleName", f"hwType {hardware['hw_type']}, hwSerialNum {hardware['hw_serial']}"))
    else:
        rows.append(("HardwareModuleName", "none"))
    rows.append(("MASA URL", data["masa_url"] or "none"))
    rows.append(("key type", data["key_type"]))
    rows.append(("not before", data["not_before"]))
    rows.append(("not after", data["not_after"] + (" (no expiration)" if data["no_expiration"] else "")))
    rows.append(("fingerprint", f"SHA256 {data['fingerprint_sha256']}"))
    rows.append(("pin", data["pin"] or "none"))
    for index, hop in enumerate(data["chain"]):
        rows.append(("chain" if index == 0 else "", f"{hop['subject']} ({hop['role']})"))
    for note in data["notes"]:
        rows.append(("note", note))
    return [f"  {label:<21} {value}" for label, value in rows]


def _add_source_options(parser: argparse.ArgumentParser, require_trust_anchor: bool) -> None:
    add_config_option(parser)
    files = parser.add_argument_group("without a configuration")
    files.add_argument("--cert", type=Path, metavar="FILE", help="device certificate (PEM or DER), used instead of --config")
    files.add_argument("--key", type=Path, metavar="FILE", help="private key of --cert (PEM or DER)")
    files.add_argument(
        "--trust-anchor", type=Path, action="append", default=[], metavar="FILE",
        help="trust anchor certificate file; repeat for several",
    )
    files.add_argument("--key-passphrase-file", type=Path, metavar="FILE", help="file that contains the key passphrase")
    files.add_argument(
        "--key-passphrase-credential", metavar="NAME", help="systemd credential in $CREDENTIALS_DIRECTORY that contains the passphrase",
    )
    files.add_argument("--strict-time", action="store_true", help="treat expired or not yet valid certificates as errors")
    files.add_argument(
        "--key-type", action="append", default=[], metavar="TYPE",
        help="allowed key type such as ec-p256 or rsa-2048; repeat for several (default: ec-p256, ec-p384, rsa-2048)",
    )
    files.add_argument(
        "--device-id-source", default="auto", metavar="SOURCE",
        help="certificate field that becomes the device id: auto, subject-serial, hardware-module-name "
        "or common-name (default: auto)",
    )
    parser.set_defaults(require_trust_anchor=require_trust_anchor, usage_error=parser.error)


def register(subparsers) -> None:
    parser = subparsers.add_parser("identity", help="show or verify the device identity (IDevID and LDevID)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    shower = actions.add_parser("show", help="print the identity, its chain and each check's result")
    _add_source_options(shower, require_trust_anchor=False)
    shower.add_argument("--json", action="store_true", help="print the report as JSON")
    shower.set_defaults(handler=show)

    verifier = actions.add_parser("verify", help="run the identity checks; exit 0 when none failed, 1 otherwise")
    _add_source_options(verifier, require_trust_anchor=True)
    verifier.set_defaults(handler=verify)
