"""Helpers for the identity tests: write certificates and keys in every accepted form, run the checks."""

import datetime
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_agent.asn1 import _tlv, read_tlv
from edge_agent.devpki import Issued
from edge_agent.identity import CredentialFiles, IdentityPolicy, validate_credentials
from edge_agent.identity_report import CredentialReport

UTC = datetime.timezone.utc
# A validation time after the agent's build date, so that the clock counts as trustworthy.
NOW = datetime.datetime(2027, 6, 1, 12, 0, tzinfo=UTC)


def pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def key_bytes(key, encoding=serialization.Encoding.PEM, fmt=serialization.PrivateFormat.PKCS8, passphrase: Optional[bytes] = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    return key.private_bytes(encoding, fmt, encryption)


def write_key(path: Path, key, **options) -> Path:
    return write_bytes(path, key_bytes(key, **options), mode=0o600)


def files_for(
    folder: Path,
    leaf: Issued,
    anchors: Iterable[x509.Certificate] = (),
    intermediates: Sequence[x509.Certificate] = (),
    key=None,
    name: str = "device",
    **options,
) -> CredentialFiles:
    """Write ``leaf`` (with ``intermediates``), its key and the trust anchors; return the credential's files."""
    cert_path = write_bytes(folder / f"{name}.pem", pem(leaf.certificate, *intermediates))
    key_path = write_key(folder / f"{name}.key", key if key is not None else leaf.key)
    anchor_paths = []
    for index, anchor in enumerate(anchors):
        anchor_paths.append(write_bytes(folder / f"{name}-anchor-{index}.pem", pem(anchor)))
    return CredentialFiles("IDevID", "identity", cert_path, key_path, tuple(anchor_paths), **options)


def check(files: CredentialFiles, now: datetime.datetime = NOW, **policy) -> CredentialReport:
    """Validate one credential at ``now`` and return its report."""
    return validate_credentials([files], IdentityPolicy(**policy), now).credentials[0]


def result(report: CredentialReport, check_id: str):
    return next(c for c in report.checks if c.id == check_id)


def retag_printable_string(certificate_der: bytes, text: str, signer) -> bytes:
    """Re-encode the UTF8String ``text`` in a name as a PrintableString and re-sign the certificate.

    PrintableString forbids characters such as '_' and '@', and the builder
    refuses to write them, so the certificate is assembled from its parts:
    OpenSSL accepts the result while newer cryptography versions reject it.
    """
    _, body, _ = read_tlv(certificate_der)
    _, tbs_body, after_tbs = read_tlv(body)
    tbs = body[:after_tbs]
    _, _, after_algorithm = read_tlv(body, after_tbs)
    algorithm = body[after_tbs:after_algorithm]

    utf8 = _tlv(0x0C, text.encode("utf-8"))
    if utf8 not in tbs:
        raise ValueError(f"{text!r} is not a UTF8String in the certificate")
    new_tbs = tbs.replace(utf8, _tlv(0x13, text.encode("ascii")))

    signature = signer.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    return _tlv(0x30, new_tbs + algorithm + _tlv(0x03, b"\x00" + signature))
