"""The device identifiers in a certificate: serial candidates, HardwareModuleName, MASA URL.

IEEE 802.1AR puts the device serial into the subject ``serialNumber``
attribute (2.5.4.5) and RFC 4108 into a SAN otherName HardwareModuleName
(1.3.6.1.5.5.7.8.4). BRSKI (RFC 8995) adds the MASA URL extension
(1.3.6.1.5.5.7.1.32). Published IDevIDs carry any subset of these, sometimes
with serials that disagree, so all of them are read and compared here.
"""

import re
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from edge_agent.asn1 import (
    HARDWARE_MODULE_NAME_OID,
    MASA_URL_OID,
    DerError,
    HardwareModuleName,
    decode_hardware_module_name,
    decode_text,
)

# Device id sources, as named in identity.device_id_source, and the label each one reports.
SOURCE_LABELS = {
    "subject-serial": "subject serialNumber",
    "hardware-module-name": "HardwareModuleName hwSerialNum",
    "common-name": "subject CN",
}
AUTO_ORDER = ("subject-serial", "hardware-module-name", "common-name")

_LENGTH_WARNING = re.compile(r"length must be >= (\d+) and <= (\d+), but it was (\d+)")

# RFC 4514 has no short name for serialNumber; without this it prints as 2.5.4.5.
_ATTRIBUTE_NAMES = {NameOID.SERIAL_NUMBER: "serialNumber"}

# Characters that cannot appear in an MQTT topic level or client id.
_TOPIC_UNSAFE = "+#/\0"


@dataclass(frozen=True)
class IdentityFields:
    """The identifiers found in one certificate.

    A ``*_problem`` explains a value that could not be decoded; ``notes``
    describe encodings that deviate from the specification but were decoded.
    """

    subject_serial: Optional[str]
    common_name: Optional[str]
    hardware_module_name: Optional[HardwareModuleName]
    hardware_module_name_problem: Optional[str]
    masa_url: Optional[str]
    masa_url_problem: Optional[str]
    fingerprint: str
    notes: Tuple[str, ...] = ()

    def candidate(self, source: str) -> Optional[str]:
        """Return the device id that ``source`` yields, or None when the certificate lacks it."""
        if source == "subject-serial":
            return self.subject_serial
        if source == "common-name":
            return self.common_name
        if source == "hardware-module-name" and self.hardware_module_name is not None:
            return self.hardware_module_name.serial_text or None
        return None

    def serial_disagreement(self) -> Optional[str]:
        """Describe how the subject serialNumber and the HardwareModuleName serial differ, if both exist."""
        subject = self.subject_serial
        hardware = self.candidate("hardware-module-name")
        if subject is None or hardware is None or subject == hardware:
            return None
        how = "only in letter case" if subject.casefold() == hardware.casefold() else "in value"
        return f"subject serialNumber {subject!r} and HardwareModuleName serial {hardware!r} differ {how}"


def read_name(certificate: x509.Certificate, which: str) -> Tuple[x509.Name, List[str]]:
    """Return the subject or issuer name and the complaints cryptography raised while decoding it.

    cryptography warns (``UserWarning``) about attribute lengths that X.520
    forbids, such as a country name of more than two letters, when a name is
    first decoded. Published IDevIDs contain such names, so the warnings
    become notes for the report instead of noise on stderr.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        name = certificate.subject if which == "subject" else certificate.issuer
    return name, [_describe_name_warning(which, str(warning.message)) for warning in caught]


def _describe_name_warning(which: str, text: str) -> str:
    match = _LENGTH_WARNING.search(text)
    if match is None:
        return f"the {which} name: {text}"
    low, high, found = match.groups()
    allowed = low if low == high else f"{low} to {high}"
    return f"the {which} name contains an attribute value of {found} bytes where X.520 allows {allowed}"


def name_text(certificate: x509.Certificate, which: str) -> str:
    """Return the subject or issuer as an RFC 4514 string, ``(empty)`` for an empty name."""
    name, _ = read_name(certificate, which)
    return name.rfc4514_string(_ATTRIBUTE_NAMES) or "(empty)"


def name_notes(certificate: x509.Certificate) -> List[str]:
    """List what cryptography found wrong in the subject and issuer names.

    The certificate object caches its names after the first access, which
    warns only once, so a fresh copy is decoded here.
    """
    fresh = x509.load_der_x509_certificate(certificate.public_bytes(Encoding.DER))
    return read_name(fresh, "subject")[1] + read_name(fresh, "issuer")[1]


def fingerprint(certificate: x509.Certificate) -> str:
    """Return the SHA-256 fingerprint of the whole DER certificate, as colon-separated hex."""
    digest = certificate.fingerprint(hashes.SHA256())
    return ":".join(f"{byte:02X}" for byte in digest)


def describe_public_key(certificate: x509.Certificate) -> str:
    """Name the key type and size, such as ``EC P-256`` or ``RSA 2048``."""
    try:
        key = certificate.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        return f"unsupported ({exc})"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {_CURVE_NAMES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def read_identity_fields(certificate: x509.Certificate) -> IdentityFields:
    subject, _ = read_name(certificate, "subject")
    hardware_module_name, hardware_problem = _read_hardware_module_name(certificate)
    masa_url, masa_problem, masa_note = _read_masa_url(certificate)
    return IdentityFields(
        subject_serial=_first_attribute(subject, NameOID.SERIAL_NUMBER),
        common_name=_first_attribute(subject, NameOID.COMMON_NAME),
        hardware_module_name=hardware_module_name,
        hardware_module_name_problem=hardware_problem,
        masa_url=masa_url,
        masa_url_problem=masa_problem,
        fingerprint=fingerprint(certificate),
        notes=tuple(filter(None, [masa_note])),
    )


def _first_attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> Optional[str]:
    for attribute in name.get_attributes_for_oid(oid):
        value = attribute.value if isinstance(attribute.value, str) else attribute.value.hex()
        if value.strip():
            return value.strip()
    return None


def _read_hardware_module_name(certificate: x509.Certificate) -> Tuple[Optional[HardwareModuleName], Optional[str]]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None, None
    values = [name.value for name in san if isinstance(name, x509.OtherName) and name.type_id == HARDWARE_MODULE_NAME_OID]
    if not values:
        return None, None
    try:
        return decode_hardware_module_name(values[0]), None
    except DerError as exc:
        return None, f"the HardwareModuleName otherName cannot be decoded: {exc}"


def _read_masa_url(certificate: x509.Certificate) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """Return the MASA URL, why it cannot be decoded, and a note on its encoding."""
    try:
        raw = certificate.extensions.get_extension_for_oid(MASA_URL_OID).value
    except x509.ExtensionNotFound:
        return None, None, None
    if not isinstance(raw, x509.UnrecognizedExtension):
        return None, f"the MASA URL extension was decoded as {type(raw).__name__}, expected raw bytes", None
    try:
        type_name, url = decode_text(raw.value)
    except DerError as exc:
        return None, f"the MASA URL extension cannot be decoded: {exc}", None
    note = None if type_name == "IA5String" else f"the MASA URL is a {type_name}; RFC 8995 specifies an IA5String"
    return url, None, note


def choose_device_id(fields: IdentityFields, source: str) -> Tuple[Optional[str], str]:
    """Return the device id for ``source`` (``auto`` tries each source in turn) and the label of where it came from.

    The id is None when the certificate lacks the requested field.
    """
    order = AUTO_ORDER if source == "auto" else (source,)
    for candidate_source in order:
        value = fields.candidate(candidate_source)
        if value:
            return value, SOURCE_LABELS[candidate_source]
    return None, " or ".join(SOURCE_LABELS[s] for s in order)


def device_id_problem(device_id: str) -> Optional[str]:
    """Explain why ``device_id`` cannot be an MQTT client id and topic level, or return None."""
    unsafe = sorted({ch for ch in device_id if ch in _TOPIC_UNSAFE})
    if unsafe:
        return f"device id {device_id!r} contains {', '.join(repr(ch) for ch in unsafe)}, which MQTT topics do not allow"
    return None
