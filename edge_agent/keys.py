"""Private key generation, private key files and CSRs.

Key files are created with ``O_EXCL`` and their final mode in one step, so
an existing file is never overwritten and a new key is never readable by
others, not even for a moment.
"""

import ipaddress
import os
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# Key types that keygen offers, as ``<algorithm>-<size or curve>``.
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")


def new_key(kind: str = "ec-p256"):
    """Generate a private key: ``ec-p256``, ``ec-p384`` or ``rsa-<bits>``.

    Tests also ask for RSA sizes outside ``KEY_TYPES`` (a 1024-bit key to see
    it rejected), so only keygen's option choices are limited to that list.
    """
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[4:]))
    raise ValueError(f"unknown key kind {kind!r}; use ec-p256, ec-p384, rsa-2048, rsa-3072 or rsa-4096")


def write_private_key(path: Path, key, passphrase: Optional[bytes] = None, mode: int = 0o600) -> Path:
    """Write a PKCS#8 PEM key with ``mode``; an existing file is never overwritten."""
    encryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    # O_EXCL: refuse to overwrite; the mode applies at creation, so the key is never briefly readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)
    return path


def parse_subject(text: str) -> x509.Name:
    """Parse an RFC 4514 subject such as ``CN=broker.example.net,O=Example``; raise ``ValueError`` with the fix."""
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        reason = f" ({exc})" if str(exc) else ""
        raise ValueError(f"invalid subject {text!r}{reason}; write it as CN=broker.example.net,O=Example") from None
    if not list(name):
        raise ValueError(f"invalid subject {text!r}: it is empty; write it as CN=broker.example.net")
    return name


def build_csr(key, subject: x509.Name, dns_names: Sequence[str] = ()) -> x509.CertificateSigningRequest:
    """Build a CSR signed with ``key``; ``dns_names`` (DNS names or IP addresses) become the SAN."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([san_entry(n) for n in dns_names]), critical=False)
    return builder.sign(key, hashes.SHA256())


def san_entry(name: str) -> x509.GeneralName:
    """Return an IP address SAN entry for an address, else a DNS name entry."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
