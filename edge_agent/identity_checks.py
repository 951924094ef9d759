"""The checks an IEEE 802.1AR verifier applies to a device certificate, one function each.

They run in this order:

- ``leaf``: an end-entity certificate with an allowed key type and no
  unprocessed critical extension.
- ``key-match``: the private key belongs to the certificate.
- ``chain``: hop by hop to a configured trust anchor, by name and signature.
- ``time``: validity periods, unless the clock cannot be right.
- ``identity``: the device id and the serials that name the device.

Each check returns a ``CheckResult`` and none raises on bad input.

Real IDevIDs break many Web-PKI rules (no authorityKeyIdentifier, no keyUsage,
non-critical CA basicConstraints), so nothing here demands those extensions,
and the chain is walked with ``verify_directly_issued_by`` instead of a
Web-PKI verifier. Only the configured trust anchors count, never the system
trust store.
"""

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

import edge_agent
from edge_agent.asn1 import MASA_URL_OID
from edge_agent.identity_fields import (
    IdentityFields,
    choose_device_id,
    describe_public_key,
    device_id_problem,
    name_text,
    read_name,
)

OK = "ok"
WARNING = "warning"
ERROR = "error"
SKIPPED = "skipped"
STATUSES = (OK, WARNING, ERROR, SKIPPED)
CHECK_IDS = ("certificate", "leaf", "key-match", "chain", "time", "identity")

# RFC 5280 4.1.2.5: this notAfter value means "no well-defined expiration".
NO_EXPIRATION = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)

# Maximum number of CA certificates tried between the leaf and a trust anchor.
MAX_PATH_LENGTH = 8

# Extensions whose content this verifier applies or that only carry information.
# A critical extension outside these sets must be rejected (RFC 5280 4.2).
LEAF_EXTENSIONS = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    MASA_URL_OID,
})
CA_EXTENSIONS = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
})

_EC_KEY_TYPES = {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one credential (IDevID or LDevID)."""

    id: str
    status: str
    message: str
    credential: str = "IDevID"

    def to_dict(self) -> dict:
        return {"id": self.id, "status": self.status, "message": self.message, "credential": self.credential}


@dataclass(frozen=True)
class TrustAnchor:
    """A configured trust anchor certificate and the file it came from."""

    certificate: x509.Certificate
    path: Path


@dataclass(frozen=True)
class Clock:
    """The time to validate at and the earliest time the clock can plausibly show."""

    now: datetime.datetime
    floor: datetime.datetime
    floor_reason: str

    @property
    def trusted(self) -> bool:
        return self.now >= self.floor


def has_no_expiration(certificate: x509.Certificate) -> bool:
    return certificate.not_valid_after_utc == NO_EXPIRATION


def make_clock(now: Optional[datetime.datetime], idevid: Optional[x509.Certificate]) -> Clock:
    """Build the clock for validation at ``now`` (default: the system clock).

    A clock earlier than the agent's build date, or than the notBefore of the
    IDevID installed at the factory, cannot be right: a gateway without an
    RTC boots in 1970 until NTP sets the time.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    floor, reason = edge_agent.BUILD_DATE, "the agent's build date"
    if idevid is not None and idevid.not_valid_before_utc > floor:
        floor, reason = idevid.not_valid_before_utc, "the IDevID's notBefore"
    return Clock(now, floor, reason)


def _extension(certificate: x509.Certificate, kind: type):
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _unprocessed_critical(certificate: x509.Certificate, known: frozenset) -> List[str]:
    return [ext.oid.dotted_string for ext in certificate.extensions if ext.critical and ext.oid not in known]


def join_sentences(parts: Sequence[str]) -> str:
    """Join message parts into sentences, each starting with a capital letter."""
    return ". ".join(part[:1].upper() + part[1:] for part in parts)


def _result(check_id: str, errors: Sequence[str], warnings: Sequence[str], ok_message: str, credential: str) -> CheckResult:
    if errors:
        return CheckResult(check_id, ERROR, join_sentences([*errors, *warnings]), credential)
    if warnings:
        return CheckResult(check_id, WARNING, join_sentences(warnings), credential)
    return CheckResult(check_id, OK, ok_message, credential)


# --- 1. leaf sanity ------------------------------------------------------


def key_type_problem(certificate: x509.Certificate, allowed: Sequence[str]) -> Optional[str]:
    """Explain why the certificate's key type is not in ``allowed`` (names from ``config.KEY_TYPES``)."""
    try:
        key = certificate.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        return f"its public key cannot be used: {exc}"

    listed = ", ".join(allowed)
    if isinstance(key, rsa.RSAPublicKey):
        minimums = [int(name[len("rsa-"):]) for name in allowed if name.startswith("rsa-")]
        if minimums and key.key_size >= min(minimums):
            return None
        return f"an RSA key of {key.key_size} bits is not allowed by identity.key_types ({listed})"

    name = None
    if isinstance(key, ec.EllipticCurvePublicKey):
        name = _EC_KEY_TYPES.get(key.curve.name)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        name = "ed25519"
    elif isinstance(key, ed448.Ed448PublicKey):
        name = "ed448"
    if name is not None and name in allowed:
        return None
    return f"key type {describe_public_key(certificate)} is not allowed by identity.key_types ({listed})"


def check_leaf(certificate: x509.Certificate, key_types: Sequence[str], credential: str = "IDevID") -> CheckResult:
    """Check that the certificate can be a device's TLS client certificate."""
    errors, warnings = [], []

    constraints = _extension(certificate, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        errors.append("the certificate is a CA certificate (basicConstraints cA is true), not an end-entity certificate")

    usage = _extension(certificate, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        errors.append("the keyUsage extension lacks digitalSignature, which TLS client authentication needs")

    for oid in _unprocessed_critical(certificate, LEAF_EXTENSIONS):
        errors.append(f"the critical extension {oid} is not processed by edge-agent, so the certificate must be rejected")

    key_problem = key_type_problem(certificate, key_types)
    if key_problem:
        errors.append(key_problem)

    purposes = _extension(certificate, x509.ExtendedKeyUsage)
    if purposes is not None and not {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(purposes):
        warnings.append("the extendedKeyUsage extension lacks clientAuth, so a broker that checks it rejects this certificate")

    summary = f"end-entity certificate with an allowed {describe_public_key(certificate)} key"
    return _result("leaf", errors, warnings, summary, credential)


# --- 2. key match --------------------------------------------------------


def public_keys_equal(first, second) -> bool:
    encoding, fmt = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return first.public_bytes(encoding, fmt) == second.public_bytes(encoding, fmt)


def check_key_match(
    certificate: x509.Certificate, private_key, cert_path: Path, key_path: Path, credential: str = "IDevID"
) -> CheckResult:
    try:
        matches = public_keys_equal(certificate.public_key(), private_key.public_key())
    except (UnsupportedAlgorithm, ValueError):
        matches = False
    if not matches:
        return CheckResult(
            "key-match",
            ERROR,
            f"the private key {key_path} does not belong to the certificate {cert_path} "
            f"(subject {name_text(certificate, 'subject')}); install the key that was issued with it",
            credential,
        )
    return CheckResult("key-match", OK, f"the private key {key_path} matches the certificate", credential)


# --- 3. chain ------------------------------------------------------------


def _canonical(name: x509.Name) -> Tuple:
    """Return a comparable form of ``name``: case folded, inner whitespace collapsed, as OpenSSL compares."""
    return tuple(tuple(sorted(_canonical_attribute(attribute) for attribute in rdn)) for rdn in name.rdns)


def _canonical_attribute(attribute: x509.NameAttribute) -> Tuple[str, str]:
    value = attribute.value
    text = " ".join(value.split()).casefold() if isinstance(value, str) else value.hex()
    return attribute.oid.dotted_string, text


def names_match(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    child_issuer, _ = read_name(child, "issuer")
    issuer_subject, _ = read_name(issuer, "subject")
    return child_issuer == issuer_subject or _canonical(child_issuer) == _canonical(issuer_subject)


def _key_identifier(certificate: x509.Certificate, kind: type) -> Optional[bytes]:
    value = _extension(certificate, kind)
    if value is None:
        return None
    return value.key_identifier if kind is x509.AuthorityKeyIdentifier else value.digest


def signature_problem(child: x509.Certificate, issuer: x509.Certificate) -> Optional[str]:
    """Explain why ``issuer``'s key did not sign ``child``, or return None when it did."""
    try:
        child.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return "its key did not make the signature (same name, different key)"
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return f"the signature cannot be checked: {exc}"

    authority = _key_identifier(child, x509.AuthorityKeyIdentifier)
    subject = _key_identifier(issuer, x509.SubjectKeyIdentifier)
    if authority is not None and subject is not None and authority != subject:
        return f"authorityKeyIdentifier {authority.hex()} differs from its subjectKeyIdentifier {subject.hex()}"
    return None


def ca_problem(issuer: x509.Certificate, is_anchor: bool) -> Optional[str]:
    """Explain why ``issuer`` may not issue certificates, or return None.

    A trust anchor without basicConstraints is accepted (the operator
    configured it, and old roots are v1 certificates); an intermediate
    must assert cA. Neither needs the extension to be critical.
    """
    constraints = _extension(issuer, x509.BasicConstraints)
    if constraints is None and not is_anchor:
        return "it has no basicConstraints, so it is not a CA"
    if constraints is not None and not constraints.ca:
        return "its basicConstraints cA is false, so it is not a CA"

    usage = _extension(issuer, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        return "its keyUsage lacks keyCertSign"
    if not is_anchor:
        unprocessed = _unprocessed_critical(issuer, CA_EXTENSIONS)
        if unprocessed:
            return f"it has a critical extension {unprocessed[0]} that edge-agent does not process"
    return None


def issuer_problem(child: x509.Certificate, issuer: x509.Certificate, is_anchor: bool) -> Optional[str]:
    """Check name, signature, key identifiers and CA status; return None when ``issuer`` issued ``child``."""
    if not names_match(child, issuer):
        return "its subject differs from the issuer name"
    return signature_problem(child, issuer) or ca_problem(issuer, is_anchor)


def is_issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Check name and signature; key identifiers must agree when both are present."""
    return names_match(child, issuer) and signature_problem(child, issuer) is None


@dataclass(frozen=True)
class ChainOutcome:
    """The result of the chain check and the path it found: leaf, intermediates, trust anchor."""

    result: CheckResult
    path: Tuple[x509.Certificate, ...] = ()
    anchor: Optional[TrustAnchor] = None


def find_path(
    leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], anchors: Sequence[TrustAnchor]
) -> Tuple[Optional[List[x509.Certificate]], Optional[TrustAnchor], List[str]]:
    """Search a path from ``leaf`` to a trust anchor; return it, the anchor and why candidates were rejected.

    Several CAs may share a subject name with different keys, so every
    candidate with the right name is tried by signature, with backtracking
    through the intermediates.
    """
    rejections: List[str] = []

    def note(certificate: x509.Certificate, where: str, problem: str) -> None:
        if problem != "its subject differs from the issuer name":
            rejections.append(f"{where} '{name_text(certificate, 'subject')}' was rejected because {problem}")

    def extend(path: List[x509.Certificate], pool: List[x509.Certificate]):
        current = path[-1]
        for anchor in anchors:
            problem = issuer_problem(current, anchor.certificate, is_anchor=True)
            if problem is None:
                return path + [anchor.certificate], anchor
            note(anchor.certificate, f"trust anchor ({anchor.path})", problem)
        if len(path) > MAX_PATH_LENGTH:
            return None
        for candidate in pool:
            problem = issuer_problem(current, candidate, is_anchor=False)
            if problem is None:
                found = extend(path + [candidate], [other for other in pool if other is not candidate])
                if found:
                    return found
            else:
                note(candidate, "intermediate CA", problem)
        return None

    found = extend([leaf], list(intermediates))
    if found is None:
        return None, None, list(dict.fromkeys(rejections))
    return found[0], found[1], []


def _path_length_problem(path: Sequence[x509.Certificate]) -> Optional[str]:
    for index, ca in enumerate(path[1:], start=1):
        constraints = _extension(ca, x509.BasicConstraints)
        below = index - 1
        if constraints is not None and constraints.path_length is not None and below > constraints.path_length:
            return (
                f"CA '{name_text(ca, 'subject')}' allows {constraints.path_length} intermediate CAs below it "
                f"(pathLenConstraint), but the path has {below}"
            )
    return None


def check_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[TrustAnchor],
    setting: str = "identity.trust_anchors",
    credential: str = "IDevID",
) -> ChainOutcome:
    if not anchors:
        return ChainOutcome(CheckResult("chain", SKIPPED, f"no trust anchor is configured; set {setting}", credential))

    path, anchor, rejections = find_path(leaf, intermediates, anchors)
    if path is None or anchor is None:
        issuer = name_text(leaf, "issuer")
        reasons = join_sentences(rejections) if rejections else f"no configured trust anchor or intermediate is named '{issuer}'"
        message = (
            f"the certificate (issuer '{issuer}') does not chain to a configured trust anchor by name and "
            f"signature: {reasons}. Add the CA that issued it to {setting}"
        )
        return ChainOutcome(CheckResult("chain", ERROR, message, credential))

    problem = _path_length_problem(path)
    if problem:
        return ChainOutcome(CheckResult("chain", ERROR, problem, credential), tuple(path), anchor)

    hops = " <- ".join(f"'{name_text(cert, 'subject')}'" for cert in path)
    message = f"chains to the trust anchor in {anchor.path}: {hops}"
    return ChainOutcome(CheckResult("chain", OK, message, credential), tuple(path), anchor)


# --- 4. time -------------------------------------------------------------


def _timestamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_time(
    certificates: Sequence[Tuple[str, x509.Certificate]], clock: Clock, strict: bool, credential: str = "IDevID"
) -> CheckResult:
    """Check each ``(role, certificate)`` validity period at ``clock.now``.

    An expired or not yet valid certificate is a warning, or an error when
    ``strict`` is set. An untrustworthy clock skips the check.
    """
    if not clock.trusted:
        return CheckResult(
            "time",
            SKIPPED,
            f"the clock reads {_timestamp(clock.now)}, earlier than {clock.floor_reason} {_timestamp(clock.floor)}, "
            "so it cannot be right; validity periods are not checked until the clock is set (for example by NTP)",
            credential,
        )

    problems = []
    for role, certificate in certificates:
        subject = name_text(certificate, "subject")
        if has_no_expiration(certificate):
            continue
        if clock.now > certificate.not_valid_after_utc:
            problems.append(f"{role} '{subject}' expired on {_timestamp(certificate.not_valid_after_utc)}")
        elif clock.now < certificate.not_valid_before_utc:
            problems.append(f"{role} '{subject}' is not valid before {_timestamp(certificate.not_valid_before_utc)}")

    if problems:
        at = f"at {_timestamp(clock.now)}"
        if strict:
            return CheckResult("time", ERROR, f"{join_sentences(problems)} ({at}); identity.strict_time is true", credential)
        return CheckResult(
            "time", WARNING, f"{join_sentences(problems)} ({at}); accepted because identity.strict_time is false", credential
        )

    message = f"{len(certificates)} certificate(s) valid at {_timestamp(clock.now)}"
    if certificates and has_no_expiration(certificates[0][1]):
        message += "; the leaf has no expiration (notAfter 99991231235959Z)"
    return CheckResult("time", OK, message, credential)


# --- 5. identity ---------------------------------------------------------


def check_identity(
    fields: IdentityFields, source: str, configured_device_id: Optional[str], credential: str = "IDevID"
) -> Tuple[CheckResult, Optional[str], str]:
    """Choose the device id and compare the serials; return the result, the id and where it came from."""
    errors, warnings = [], []
    for problem in (fields.hardware_module_name_problem, fields.masa_url_problem, fields.serial_disagreement()):
        if problem:
            warnings.append(problem)

    if configured_device_id:
        device_id, label = configured_device_id, "configuration"
    else:
        device_id, label = choose_device_id(fields, source)

    if device_id is None:
        errors.append(
            f"the certificate has no {label}; set identity.device_id_source to a field it has, "
            "or set device_id in the configuration"
        )
    else:
        problem = device_id_problem(device_id)
        if problem:
            errors.append(f"{problem}; set device_id in the configuration")

    summary = f"device id {device_id!r} from {label}"
    if warnings and not errors:
        warnings.insert(0, summary)
    return _result("identity", errors, warnings, summary, credential), device_id, label
