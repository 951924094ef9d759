"""``edge-agent keygen``: generate the spare broker key behind a backup pin.

The key goes to a new file with mode 0400 (an existing file is never
overwritten) and the command prints its pin for ``broker.pins``. With
``--csr`` it also writes a certificate signing request, so the CA can issue
the broker's next certificate before the key is ever used.
"""

import argparse
import json
import os
from pathlib import Path

from edge_agent.commands import EXIT_OK

KEY_MODE = 0o400
CSR_MODE = 0o644
# The choices of --type; equal to edge_agent.keys.KEY_TYPES, which --help must not import.
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")


def keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from edge_agent.errors import EdgeAgentError
    from edge_agent.certfiles import read_passphrase
    from edge_agent.keys import build_csr, new_key, parse_subject, write_private_key
    from edge_agent.pinfiles import describe_key_type
    from edge_agent.pinning import pin_from_public_key

    if (args.subject or args.san) and not args.csr:
        args.keygen_parser.error("--subject and --san need --csr FILE")
    if args.csr and not args.subject:
        args.keygen_parser.error("--csr needs --subject, such as --subject CN=broker.example.net")
    subject = None
    if args.subject:
        try:
            subject = parse_subject(args.subject)
        except ValueError as exc:
            raise EdgeAgentError(f"--subject: {exc}") from None

    for path, description in ((args.key_file, "key file"), (args.csr, "CSR file")):
        _check_new_file(path, description)
    # read_passphrase rejects an empty passphrase, which would leave the key unencrypted.
    passphrase = read_passphrase(args.passphrase_file)

    key = new_key(args.type)
    try:
        write_private_key(args.key_file, key, passphrase=passphrase, mode=KEY_MODE)
    except OSError as exc:
        raise EdgeAgentError(f"{args.key_file}: cannot write the key file: {exc.strerror}") from None
    if args.csr is not None:
        csr = build_csr(key, subject, args.san)
        _write_new_file(args.csr, csr.public_bytes(Encoding.PEM), CSR_MODE)

    pin = pin_from_public_key(key.public_key())
    key_type = describe_key_type(key.public_key())
    if args.format == "json":
        document = {"key_file": str(args.key_file), "key_type": key_type, "pin": str(pin), "sha256_hex": pin.hex}
        document["csr_file"] = None if args.csr is None else str(args.csr)
        print(json.dumps(document, indent=2))
    else:
        pin_text = pin.hex if args.format == "hex" else str(pin)
        print(f"{pin_text}  {args.key_file}: spare {key_type} private key (mode {KEY_MODE:04o})")
        if args.csr is not None:
            print(f"{pin_text}  {args.csr}: CSR {subject.rfc4514_string()}")
    return EXIT_OK


def _check_new_file(path, description: str) -> None:
    from edge_agent.errors import EdgeAgentError

    if path is None:
        return
    if path.exists() or path.is_symlink():
        raise EdgeAgentError(f"{path}: the {description} already exists; keygen never overwrites a file, so choose a new path")
    if not path.parent.is_dir():
        raise EdgeAgentError(f"{path}: the folder {path.parent} does not exist; create it first")


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    from edge_agent.errors import EdgeAgentError

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise EdgeAgentError(f"{path}: cannot create the file: {exc.strerror}; the key file was written") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "keygen",
        help="generate a spare broker key for a backup pin (and optionally its CSR)",
        description=(
            "Generate the spare key whose pin goes into broker.pins as the backup. The key file is created with "
            "mode 0400 and never overwrites an existing file; keep it offline until the broker switches to it."
        ),
    )
    parser.add_argument("key_file", type=Path, metavar="KEY_FILE", help="new PEM file for the private key")
    parser.add_argument(
        "--type", choices=KEY_TYPES, default="ec-p256", help="key algorithm and size (default: ec-p256)"
    )
    parser.add_argument("--csr", type=Path, default=None, metavar="FILE", help="also write a PEM CSR to this new file")
    parser.add_argument(
        "--subject", default=None, metavar="DN",
        help="CSR subject as an RFC 4514 string, such as CN=broker.example.net,O=Example",
    )
    parser.add_argument(
        "--san", action="append", default=[], metavar="NAME",
        help="DNS name or IP address for the CSR's subjectAltName (repeatable)",
    )
    parser.add_argument(
        "--passphrase-file", type=Path, default=None, metavar="FILE",
        help="encrypt the key with the passphrase in this file (mode 0600 or stricter)",
    )
    parser.add_argument(
        "--format", choices=("curl", "hex", "json"), default="curl", help="how to print the pin (default: curl)"
    )
    parser.set_defaults(handler=keygen, keygen_parser=parser)
