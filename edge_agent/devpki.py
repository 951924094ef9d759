"""A development PKI for the demo and the tests: never for production devices.

It creates a manufacturer CA and an IDevID in the IEEE 802.1AR shape
(subject serialNumber, a HardwareModuleName SAN, notAfter 99991231235959Z).
For the broker it creates a CA, a certificate for localhost, 127.0.0.1 and
::1, and a spare key whose pin serves as the backup pin. Private keys are written
with mode 0600 and never overwrite an existing file.
"""

import argparse
import datetime
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.asn1 import MASA_URL_OID, drop_ecdsa_null_parameters, encode_ia5_string, hardware_module_name_san
from edge_agent.identity import NO_EXPIRATION
from edge_agent.keys import new_key, san_entry, write_private_key
from edge_agent.pinning import Pin, pin_from_public_key

# A private enterprise arc for example hardware types in the development PKI.
DEV_HW_TYPE = "1.3.6.1.4.1.32473.1.1"

UTC = datetime.timezone.utc


@dataclass(frozen=True)
class Issued:
    """A certificate together with its private key."""

    certificate: x509.Certificate
    key: object

    @property
    def pin(self) -> Pin:
        return pin_from_public_key(self.certificate.public_key())


def _name(
    common_name: str,
    serial_number: Optional[str] = None,
    organization: str = "edge-agent development",
    serial_type: Optional[_ASN1Type] = None,
) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)]
    if serial_number is not None:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number, _type=serial_type))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _now() -> datetime.datetime:
    return datetime.datetime.now(UTC).replace(microsecond=0)


def make_ca(
    common_name: str,
    key=None,
    not_before: Optional[datetime.datetime] = None,
    not_after: Optional[datetime.datetime] = None,
    issuer: Optional[Issued] = None,
    basic_constraints_critical: bool = True,
    key_identifiers: bool = True,
    path_length: Optional[int] = None,
) -> Issued:
    """Create a CA certificate, self-signed unless ``issuer`` is given.

    The defaults follow RFC 5280: critical basicConstraints and keyUsage and
    both key identifiers. Published manufacturer CAs often lack the last two
    or mark basicConstraints non-critical, which the options reproduce.
    """
    key = key or new_key()
    not_before = not_before or _now() - datetime.timedelta(days=1)
    not_after = not_after or not_before + datetime.timedelta(days=3650)
    subject = _name(common_name)
    public_key = key.public_key()
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=basic_constraints_critical)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )
    if key_identifiers:
        authority = issuer.key.public_key() if issuer else public_key
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority), critical=False)
    return Issued(builder.sign(signer_key, hashes.SHA256()), key)


def issue_server_cert(
    ca: Issued,
    names: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    key=None,
    not_before: Optional[datetime.datetime] = None,
    not_after: Optional[datetime.datetime] = None,
) -> Issued:
    """Issue a TLS server certificate for ``names`` (DNS names or IP addresses)."""
    key = key or new_key()
    not_before = not_before or _now() - datetime.timedelta(days=1)
    not_after = not_after or not_before + datetime.timedelta(days=825)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0] if names else "broker"))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([san_entry(n) for n in names]), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


DIGITAL_SIGNATURE_ONLY = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
)


def masa_url_extension(url: str) -> x509.UnrecognizedExtension:
    """Return the BRSKI MASA URL extension (an IA5String, usually host[:port])."""
    return x509.UnrecognizedExtension(MASA_URL_OID, encode_ia5_string(url))


def issue_idevid(
    ca: Issued,
    serial_number: str,
    key=None,
    hw_type: str = DEV_HW_TYPE,
    hw_serial: Optional[bytes] = None,
    not_after: datetime.datetime = NO_EXPIRATION,
    not_before: Optional[datetime.datetime] = None,
    common_name: Optional[str] = None,
    subject: Optional[x509.Name] = None,
    serial_string_type: Optional[_ASN1Type] = None,
    san_critical: bool = False,
    authority_key_id: bool = True,
    key_usage: Optional[x509.KeyUsage] = DIGITAL_SIGNATURE_ONLY,
    extended_key_usage: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    masa_url: Optional[str] = None,
    extra_extensions: Sequence[Tuple[x509.ExtensionType, bool]] = (),
    public_key=None,
) -> Issued:
    """Issue an IDevID: subject serialNumber, HardwareModuleName SAN, no expiration by default.

    The options produce the variants that published IDevIDs show: a serial
    in another string type (``serial_string_type``), an empty ``subject``
    with a critical SAN, no authorityKeyIdentifier, no keyUsage
    (``key_usage=None``), a MASA URL, and extra ``(extension, critical)`` pairs.
    With ``public_key`` (for a key held elsewhere, such as in a TPM) no key
    is generated and ``Issued.key`` is None.
    """
    if public_key is None:
        key = key or new_key()
        public_key = key.public_key()
    not_before = not_before or _now() - datetime.timedelta(days=1)
    hw_serial = serial_number.encode("ascii") if hw_serial is None else hw_serial
    if subject is None:
        subject = _name(common_name or serial_number, serial_number=serial_number, serial_type=serial_string_type)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([hardware_module_name_san(hw_type, hw_serial)]), critical=san_critical)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if extended_key_usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False)
    if authority_key_id:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    if masa_url is not None:
        builder = builder.add_extension(masa_url_extension(masa_url), critical=False)
    for extension, critical in extra_extensions:
        builder = builder.add_extension(extension, critical=critical)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def issue_idevid_from_csr(ca: Issued, csr_der: bytes, serial_number: str, **options) -> x509.Certificate:
    """Issue an IDevID for the key of a DER CSR whose self-signature proves possession of the key.

    The subject comes from ``serial_number``, not from the CSR, as a
    manufacturer assigns it. ``options`` go to ``issue_idevid``.
    """
    csr = x509.load_der_x509_csr(drop_ecdsa_null_parameters(csr_der))
    if not csr.is_signature_valid:
        raise ValueError("the CSR's signature does not verify with its own public key")
    return issue_idevid(ca, serial_number, public_key=csr.public_key(), **options).certificate


def write_certificates(path: Path, certificates: Iterable[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


@dataclass(frozen=True)
class DevPki:
    """Paths and pins of a generated development PKI."""

    folder: Path
    manufacturer_ca: Path
    idevid_cert: Path
    idevid_key: Path
    broker_ca: Path
    broker_cert: Path
    broker_key: Path
    spare_broker_key: Path
    broker_pin: Pin
    spare_pin: Pin
    device_serial: str
    observer_cert: Path
    observer_key: Path


def create_dev_pki(
    folder: Path, device_serial: str = "GW-0001", key_kind: str = "ec-p256", manufacturer: Optional[Issued] = None
) -> DevPki:
    """Create the demo PKI in ``folder`` (created with mode 0700 when missing).

    It also issues ``observer.pem``, a client certificate from the same
    manufacturer CA for the subscriber that shows what the broker receives.
    A caller that issues more IDevIDs later passes its own ``manufacturer``
    CA, whose key is otherwise never written.
    """
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    manufacturer = manufacturer or make_ca("edge-agent development manufacturer CA")
    idevid = issue_idevid(manufacturer, device_serial, key=new_key(key_kind))
    broker_ca = make_ca("edge-agent development broker CA")
    broker = issue_server_cert(broker_ca)
    spare = new_key()
    # The demo's subscriber also needs a client certificate the broker accepts.
    observer = issue_idevid(manufacturer, "cloud-observer")

    pki = DevPki(
        folder=folder,
        manufacturer_ca=write_certificates(folder / "manufacturer-ca.pem", [manufacturer.certificate]),
        idevid_cert=write_certificates(folder / "idevid.pem", [idevid.certificate]),
        idevid_key=write_private_key(folder / "idevid.key", idevid.key),
        broker_ca=write_certificates(folder / "broker-ca.pem", [broker_ca.certificate]),
        broker_cert=write_certificates(folder / "broker.pem", [broker.certificate]),
        broker_key=write_private_key(folder / "broker.key", broker.key),
        spare_broker_key=write_private_key(folder / "broker-spare.key", spare),
        broker_pin=broker.pin,
        spare_pin=pin_from_public_key(spare.public_key()),
        device_serial=device_serial,
        observer_cert=write_certificates(folder / "observer.pem", [observer.certificate]),
        observer_key=write_private_key(folder / "observer.key", observer.key),
    )
    # The broker CA's key is not written: the demo never issues another broker certificate.
    return pki


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.devpki",
        description="Create a development PKI (manufacturer CA, IDevID, broker CA and certificate, spare key).",
    )
    parser.add_argument("folder", type=Path, help="folder to write into; existing key files are never overwritten")
    parser.add_argument("--serial", default="GW-0001", help="device serial number for the IDevID (default: GW-0001)")
    args = parser.parse_args(argv)
    try:
        pki = create_dev_pki(args.folder, args.serial)
    except FileExistsError as exc:
        print(f"error: {exc.filename} already exists; choose an empty folder", file=sys.stderr)
        return 1
    print(f"development PKI written to {pki.folder}")
    print(f"broker pin: {pki.broker_pin}")
    print(f"backup pin: {pki.spare_pin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
