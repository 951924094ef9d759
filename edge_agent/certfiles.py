"""Reading device certificates, trust anchors and private keys from PEM and DER files.

A certificate file is a PEM bundle (LF or CRLF line ends, any text between
the blocks) or one or more DER certificates back to back. Secure elements
and flash stores that hand out fixed-size slots pad DER with 0xFF or 0x00
bytes, so each DER element is cut at the length its outer SEQUENCE declares
and trailing padding is dropped. Keys may be PKCS#1, SEC1 or PKCS#8 (also
encrypted) in PEM or DER. The passphrase of an encrypted key comes from a file
or a systemd credential, never from a terminal prompt, because a headless
service would wait for it forever.
"""

import base64
import binascii
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import cryptography
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from edge_agent.asn1 import DerError, der_length
from edge_agent.config import secret_file_mode_problem
from edge_agent.errors import IdentityError

logger = logging.getLogger(__name__)

CERTIFICATE_LABELS = ("CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE")
CREDENTIALS_DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END ([A-Z0-9 ]+)-----", re.DOTALL)
_PADDING_BYTES = frozenset(b"\x00\xff")
_SEQUENCE_TAG = 0x30


@dataclass(frozen=True)
class PemBlock:
    """One ``-----BEGIN label-----`` ... ``-----END label-----`` block as found in a file."""

    label: str
    text: bytes

    def der(self) -> bytes:
        """Decode the base64 body; header lines such as ``Proc-Type:`` are skipped."""
        body = self.text.split(b"-----", 2)[2].rsplit(b"-----END", 1)[0]
        lines = [line.strip() for line in body.splitlines() if b":" not in line]
        return base64.b64decode(b"".join(lines), validate=True)


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{path}: {what} not found; fix identity settings in the configuration", str(path)) from None
    except PermissionError:
        raise IdentityError(f"{path}: {what} is not readable by this user; fix its owner or mode", str(path)) from None
    except IsADirectoryError:
        raise IdentityError(f"{path}: {what} is a directory, expected a file", str(path)) from None


def pem_blocks(data: bytes) -> List[PemBlock]:
    """Return the PEM blocks of ``data`` in order; raise ``ValueError`` for a block without its END line."""
    blocks = []
    for match in _PEM_BLOCK.finditer(data):
        label = match.group(1).decode("ascii")
        if match.group(3) != match.group(1):
            raise ValueError(f"PEM block '{label}' ends with '-----END {match.group(3).decode('ascii')}-----'")
        blocks.append(PemBlock(label, match.group(0)))
    if data.count(b"-----BEGIN ") != len(blocks):
        raise ValueError("a PEM block has no matching END line")
    return blocks


def split_der(data: bytes) -> List[bytes]:
    """Split concatenated DER elements, dropping trailing 0xFF or 0x00 padding.

    Raises ``DerError`` when bytes other than padding follow the last element.
    """
    elements = []
    offset = 0
    while offset < len(data) and not set(data[offset:]) <= _PADDING_BYTES:
        if data[offset] != _SEQUENCE_TAG:
            raise DerError(f"byte {offset} is 0x{data[offset]:02x}, not the start of a DER SEQUENCE or padding")
        end = offset + der_length(data[offset:])
        elements.append(data[offset:end])
        offset = end
    if offset < len(data):
        logger.debug("dropped %d bytes of padding after the DER data", len(data) - offset)
    return elements


def load_certificates(path: Path, what: str = "certificate file") -> "list[x509.Certificate]":
    """Load every certificate of a PEM bundle or of concatenated, possibly padded, DER certificates."""
    data = read_file(path, what)
    try:
        if b"-----BEGIN" in data:
            ders = _certificate_ders_from_pem(path, data, what)
        else:
            ders = split_der(data)
    except (ValueError, binascii.Error) as exc:
        raise IdentityError(f"{path}: cannot parse the {what} as PEM or DER: {exc}", str(path), "certificate") from None

    if not ders:
        raise IdentityError(f"{path}: the {what} contains no certificate", str(path), "certificate")
    return [parse_certificate(der, path, what, index) for index, der in enumerate(ders, start=1)]


def _certificate_ders_from_pem(path: Path, data: bytes, what: str) -> List[bytes]:
    ders = []
    for block in pem_blocks(data):
        if block.label.endswith("PRIVATE KEY"):
            raise IdentityError(
                f"{path}: the {what} contains a private key ({block.label}); keep the key in its own file "
                "with mode 0600 and point the key setting at it",
                str(path),
                "certificate",
            )
        if block.label not in CERTIFICATE_LABELS:
            raise IdentityError(
                f"{path}: the {what} contains a '{block.label}' PEM block, which is not a certificate; remove it",
                str(path),
                "certificate",
            )
        der = block.der()
        # A TRUSTED CERTIFICATE block appends OpenSSL trust settings after the certificate.
        ders.append(der[:der_length(der)])
    return ders


def parse_certificate(der: bytes, path: Path, what: str, index: int = 1) -> x509.Certificate:
    """Parse one DER certificate, turning every parser complaint into an ``IdentityError``."""
    where = f"{path}: certificate {index} of the {what}"
    try:
        certificate = x509.load_der_x509_certificate(der)
        # Extensions are decoded lazily; decode them now so that a malformed one fails here.
        certificate.extensions
    except ValueError as exc:
        raise IdentityError(f"{where} is not valid X.509: {_describe_parse_error(exc)}", str(path), "certificate") from None
    return certificate


def _describe_parse_error(exc: ValueError) -> str:
    text = str(exc)
    match = re.search(r"AttributeValue::(\w+)", text)
    if match:
        return (
            f"a name attribute contains characters that its ASN.1 type {match.group(1)} does not allow, and "
            f"cryptography {cryptography.__version__} rejects such names (OpenSSL may still accept them); "
            "ask the manufacturer for a corrected certificate"
        )
    return text


def read_passphrase(
    path: Optional[Path], credential: Optional[str] = None, setting: str = "identity"
) -> Optional[bytes]:
    """Read a key passphrase from a file or a systemd credential; one trailing newline is not part of it.

    ``setting`` is the configuration section named in error messages.
    """
    if path is not None and credential is not None:
        raise IdentityError(
            f"{setting}.key_passphrase_file and {setting}.key_passphrase_credential are both set; keep one of them",
            str(path),
            "key-load",
        )
    if credential is not None:
        return _read_credential(credential, setting)
    if path is None:
        return None

    problem = secret_file_mode_problem(path) if path.exists() else None
    if problem:
        raise IdentityError(problem, str(path), "key-permissions")
    return _strip_passphrase(read_file(path, "key passphrase file"), path)


def _read_credential(name: str, setting: str) -> bytes:
    directory = os.environ.get(CREDENTIALS_DIRECTORY_ENV)
    if not directory:
        raise IdentityError(
            f"{setting}.key_passphrase_credential is {name!r} but ${CREDENTIALS_DIRECTORY_ENV} is not set; run the "
            f"agent from a systemd unit with LoadCredential={name}:/path/to/passphrase, or use "
            f"{setting}.key_passphrase_file",
            check="key-load",
        )
    path = Path(directory) / name
    if not path.is_file():
        raise IdentityError(
            f"credential {name!r} not found in ${CREDENTIALS_DIRECTORY_ENV} ({directory}); add "
            f"LoadCredential={name}:/path/to/passphrase to the unit or fix {setting}.key_passphrase_credential",
            str(path),
            "key-load",
        )
    # systemd creates credential files readable by the service user only, so no mode check applies.
    return _strip_passphrase(read_file(path, f"credential {name!r}"), path)


def _strip_passphrase(data: bytes, path: Path) -> bytes:
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise IdentityError(f"{path}: the key passphrase is empty; write the passphrase into it", str(path), "key-load")
    return data


def load_private_key(path: Path, passphrase: Optional[bytes] = None, setting: str = "identity"):
    """Load a PEM or DER private key, refusing a file that others can read.

    ``setting`` is the configuration section named in error messages.
    """
    problem = secret_file_mode_problem(path) if path.exists() else None
    if problem:
        raise IdentityError(problem, str(path), "key-permissions")

    data = read_file(path, "private key")
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(_private_key_block(path, data).text, password=passphrase)
        ders = split_der(data)
        if len(ders) != 1:
            raise ValueError(f"expected one DER private key, found {len(ders)} DER elements")
        return serialization.load_der_private_key(ders[0], password=passphrase)
    except TypeError as exc:
        raise _passphrase_mismatch(path, passphrase, setting, exc) from None
    except ValueError as exc:
        # The cryptography message describes the parse state; the passphrase itself never reaches it.
        hint = "the passphrase is wrong or " if passphrase is not None else ""
        raise IdentityError(
            f"{path}: cannot load the private key: {hint}the file is not a PEM or DER private key ({exc})",
            str(path),
            "key-load",
        ) from None
    except UnsupportedAlgorithm as exc:
        raise IdentityError(f"{path}: unsupported private key algorithm: {exc}", str(path), "key-load") from None


def _private_key_block(path: Path, data: bytes) -> PemBlock:
    blocks = pem_blocks(data)
    keys = [block for block in blocks if block.label.endswith("PRIVATE KEY")]
    if len(keys) != 1:
        found = ", ".join(block.label for block in blocks) or "no complete PEM block"
        raise IdentityError(
            f"{path}: expected exactly one private key block, found {found}; keep one private key in this file",
            str(path),
            "key-load",
        )
    return keys[0]


def _passphrase_mismatch(path: Path, passphrase: Optional[bytes], setting: str, exc: TypeError) -> IdentityError:
    if passphrase is None:
        return IdentityError(
            f"{path}: the private key is encrypted and no passphrase is configured; set "
            f"{setting}.key_passphrase_file or {setting}.key_passphrase_credential",
            str(path),
            "key-load",
        )
    return IdentityError(
        f"{path}: the private key is not encrypted but a passphrase is configured ({exc}); remove the passphrase "
        "setting or encrypt the key",
        str(path),
        "key-load",
    )
