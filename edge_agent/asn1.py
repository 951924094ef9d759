"""The few DER structures of 802.1AR that ``cryptography`` leaves as raw bytes.

HardwareModuleName (RFC 4108, OID 1.3.6.1.5.5.7.8.4) is a SAN otherName:
``SEQUENCE { hwType OBJECT IDENTIFIER, hwSerialNum OCTET STRING }``.
"""

from dataclasses import dataclass
from typing import Tuple

from cryptography import x509

HARDWARE_MODULE_NAME_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4")
MASA_URL_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.32")

_SEQUENCE = 0x30
_OID = 0x06
_OCTET_STRING = 0x04
_IA5_STRING = 0x16
_UTF8_STRING = 0x0C
_STRING_TYPES = {_IA5_STRING: "IA5String", 0x13: "PrintableString", _UTF8_STRING: "UTF8String"}
_DER_NULL = b"\x05\x00"
# ecdsa-with-SHA224 to ecdsa-with-SHA512 (RFC 5758 3.2) share this arc.
_ECDSA_SIGNATURE_ARC = "1.2.840.10045.4.3."


class DerError(ValueError):
    """Bytes that are not the expected DER structure."""


@dataclass(frozen=True)
class HardwareModuleName:
    """The hardware type OID and serial number that the manufacturer bound to the device."""

    hw_type: str
    hw_serial: bytes

    @property
    def serial_text(self) -> str:
        """The serial as text when it is printable ASCII, else as hex."""
        try:
            text = self.hw_serial.decode("ascii")
        except UnicodeDecodeError:
            return self.hw_serial.hex()
        return text if text.isprintable() else self.hw_serial.hex()


def _encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _encode_length(len(body)) + body


def _encode_oid(dotted: str) -> bytes:
    arcs = [int(part) for part in dotted.split(".")]
    if len(arcs) < 2:
        raise DerError(f"an OID needs at least two arcs, got {dotted!r}")
    body = bytearray([arcs[0] * 40 + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return bytes(body)


def _decode_oid(body: bytes) -> str:
    if not body:
        raise DerError("empty OBJECT IDENTIFIER")
    first = body[0]
    arcs = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    value = 0
    for byte in body[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if body[-1] & 0x80:
        raise DerError("truncated OBJECT IDENTIFIER")
    return ".".join(str(arc) for arc in arcs)


def read_tlv(data: bytes, offset: int = 0) -> Tuple[int, bytes, int]:
    """Read one DER element at ``offset``; return its tag, body and the offset after it."""
    if offset + 2 > len(data):
        raise DerError("truncated DER element")
    tag = data[offset]
    length = data[offset + 1]
    position = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or position + count > len(data):
            raise DerError("invalid DER length")
        length = int.from_bytes(data[position:position + count], "big")
        position += count
    end = position + length
    if end > len(data):
        raise DerError("DER element runs past the end of the data")
    return tag, data[position:end], end


def der_length(data: bytes) -> int:
    """Return the total length of the DER element at the start of ``data``."""
    return read_tlv(data)[2]


def encode_hardware_module_name(hw_type: str, hw_serial: bytes) -> bytes:
    return _tlv(_SEQUENCE, _tlv(_OID, _encode_oid(hw_type)) + _tlv(_OCTET_STRING, hw_serial))


def decode_hardware_module_name(value: bytes) -> HardwareModuleName:
    """Decode the otherName value; some encoders wrap it in an explicit [0] tag, which is unwrapped."""
    tag, body, _ = read_tlv(value)
    if tag == 0xA0:
        tag, body, _ = read_tlv(body)
    if tag != _SEQUENCE:
        raise DerError(f"HardwareModuleName must be a SEQUENCE, found tag 0x{tag:02x}")
    tag, oid_body, position = read_tlv(body)
    if tag != _OID:
        raise DerError(f"hwType must be an OBJECT IDENTIFIER, found tag 0x{tag:02x}")
    tag, serial, _ = read_tlv(body, position)
    if tag != _OCTET_STRING:
        raise DerError(f"hwSerialNum must be an OCTET STRING, found tag 0x{tag:02x}")
    return HardwareModuleName(_decode_oid(oid_body), serial)


def encode_ia5_string(text: str) -> bytes:
    return _tlv(_IA5_STRING, text.encode("ascii"))


def decode_text(value: bytes) -> Tuple[str, str]:
    """Decode a DER string that fills ``value`` exactly; return its ASN.1 type name and its text.

    IA5String, PrintableString and UTF8String are accepted, because published
    certificates use UTF8String where a specification requires IA5String.
    """
    tag, body, end = read_tlv(value)
    if end != len(value):
        raise DerError(f"{len(value) - end} bytes follow the string")
    type_name = _STRING_TYPES.get(tag)
    if type_name is None:
        raise DerError(f"expected an IA5String, PrintableString or UTF8String, found tag 0x{tag:02x}")
    try:
        return type_name, body.decode("utf-8" if tag == _UTF8_STRING else "ascii")
    except UnicodeDecodeError:
        raise DerError(f"the {type_name} contains bytes its type does not allow") from None


def hardware_module_name_san(hw_type: str, hw_serial: bytes) -> x509.OtherName:
    return x509.OtherName(HARDWARE_MODULE_NAME_OID, encode_hardware_module_name(hw_type, hw_serial))


def drop_ecdsa_null_parameters(signed: bytes) -> bytes:
    """Remove NULL parameters from the outer ECDSA signatureAlgorithm of a DER CSR or certificate.

    RFC 5758 3.2 requires the parameters of ecdsa-with-SHA* to be absent, and
    ``cryptography`` rejects a NULL there; the tpm2 OpenSSL provider 1.1
    writes one into the CSRs it signs. The signature covers only the inner
    structure, so removing the field keeps it valid. Other input is returned
    unchanged.
    """
    tag, body, end = read_tlv(signed)
    if tag != _SEQUENCE or end != len(signed):
        raise DerError("expected one DER SEQUENCE")
    _, _, after_inner = read_tlv(body)
    algorithm_tag, algorithm, after_algorithm = read_tlv(body, after_inner)
    if algorithm_tag != _SEQUENCE:
        raise DerError(f"signatureAlgorithm must be a SEQUENCE, found tag 0x{algorithm_tag:02x}")
    oid_tag, oid_body, after_oid = read_tlv(algorithm)
    is_ecdsa = oid_tag == _OID and _decode_oid(oid_body).startswith(_ECDSA_SIGNATURE_ARC)
    if not is_ecdsa or algorithm[after_oid:] != _DER_NULL:
        return signed
    without_null = _tlv(_SEQUENCE, algorithm[:after_oid])
    return _tlv(_SEQUENCE, body[:after_inner] + without_null + body[after_algorithm:])
