"""The gateway's IEEE 802.1AR identity: the IDevID, an optional LDevID, and which one TLS presents.

``validate_identity`` runs every check on every configured credential and
returns a report. It does not raise for bad certificates or keys.
``load_identity`` uses that report to pick the TLS client certificate: the
LDevID when one is configured and passes every check, otherwise the IDevID,
and it logs why it fell back. The checks themselves live in
``identity_checks``, file loading in ``certfiles``.
"""

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from edge_agent.certfiles import load_certificates, load_private_key, read_file, read_passphrase  # noqa: F401
from edge_agent.config import IdentityConfig
from edge_agent.credential import ClientCredential
from edge_agent.errors import IdentityError
from edge_agent.identity_checks import (  # noqa: F401
    CHECK_IDS,
    ERROR,
    NO_EXPIRATION,
    OK,
    SKIPPED,
    WARNING,
    ChainOutcome,
    CheckResult,
    TrustAnchor,
    check_chain,
    check_identity,
    check_key_match,
    check_leaf,
    check_time,
    has_no_expiration,
    is_issued_by,
    make_clock,
    public_keys_equal,
)
from edge_agent.identity_fields import choose_device_id, fingerprint, name_text, read_identity_fields
from edge_agent.identity_report import CredentialReport, IdentityReport
from edge_agent.pinning import Pin, pin_from_certificate

logger = logging.getLogger(__name__)

IDEVID = "IDevID"
LDEVID = "LDevID"


@dataclass(frozen=True)
class DeviceIdentity:
    """A loaded and checked device identity, ready to be the TLS client certificate.

    ``chain`` contains the intermediate CA certificates sent with the leaf.
    ``role`` is ``IDevID`` or ``LDevID``; ``report`` is the validation that
    chose this credential, when ``load_identity`` built the object.
    """

    cert_path: Path
    key_path: Path
    certificate: x509.Certificate
    chain: "tuple[x509.Certificate, ...]"
    device_id: str
    device_id_source: str
    key_passphrase: Optional[bytes] = None
    role: str = IDEVID
    report: Optional[IdentityReport] = field(default=None, compare=False)
    # "tpm": key_path is a TSS2 blob that only the TPM behind tpm_tcti can use.
    key_source: str = "file"
    tpm_tcti: Optional[str] = None

    @property
    def subject(self) -> str:
        return name_text(self.certificate, "subject")

    @property
    def pin(self) -> Pin:
        return pin_from_certificate(self.certificate)

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the whole DER certificate, as colon-separated hex."""
        return fingerprint(self.certificate)

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def never_expires(self) -> bool:
        return has_no_expiration(self.certificate)

    @property
    def chain_pem(self) -> bytes:
        """The leaf and the intermediate CA certificates as concatenated PEM."""
        return b"".join(cert.public_bytes(Encoding.PEM) for cert in (self.certificate, *self.chain))

    def credential(self) -> ClientCredential:
        """Return the plain-data form that the service keeps (see ``edge_agent.credential``)."""
        return ClientCredential(
            role=self.role,
            subject=self.subject,
            cert_path=self.cert_path,
            key_path=self.key_path,
            chain_pem=self.chain_pem,
            device_id=self.device_id,
            device_id_source=self.device_id_source,
            key_source=self.key_source,
            tpm_tcti=self.tpm_tcti,
            key_passphrase=self.key_passphrase,
        )

    def __repr__(self) -> str:
        # The passphrase must not reach logs through a repr.
        return (
            f"DeviceIdentity(role={self.role!r}, device_id={self.device_id!r}, subject={self.subject!r}, "
            f"cert_path='{self.cert_path}')"
        )


@dataclass(frozen=True)
class CredentialFiles:
    """The file paths of one credential; ``setting`` is the configuration section named in messages."""

    role: str
    setting: str
    cert: Path
    key: Optional[Path]
    trust_anchors: Tuple[Path, ...]
    key_passphrase_file: Optional[Path] = None
    key_passphrase_credential: Optional[str] = None
    key_source: str = "file"
    tpm_tcti: Optional[str] = None

    def read_passphrase(self) -> Optional[bytes]:
        return read_passphrase(self.key_passphrase_file, self.key_passphrase_credential, self.setting)


@dataclass(frozen=True)
class IdentityPolicy:
    """The settings that every credential is checked against."""

    key_types: Tuple[str, ...] = IdentityConfig.key_types
    strict_time: bool = False
    device_id_source: str = "auto"
    device_id: Optional[str] = None

    @classmethod
    def from_config(cls, settings: IdentityConfig, device_id: Optional[str] = None) -> "IdentityPolicy":
        return cls(settings.key_types, settings.strict_time, settings.device_id_source, device_id)


def credential_files(settings: IdentityConfig) -> List[CredentialFiles]:
    """List the configured credentials: the IDevID, then the LDevID when ``[identity.ldevid]`` is present."""
    credentials = [
        CredentialFiles(
            IDEVID, "identity", settings.cert, settings.key, settings.trust_anchors,
            settings.key_passphrase_file, settings.key_passphrase_credential,
            settings.key_source, settings.tpm_tcti,
        )
    ]
    ldevid = settings.ldevid
    if ldevid is not None:
        credentials.append(
            CredentialFiles(
                LDEVID, "identity.ldevid", ldevid.cert, ldevid.key, ldevid.trust_anchors,
                ldevid.key_passphrase_file, ldevid.key_passphrase_credential,
            )
        )
    return credentials


def validate_identity(
    settings: IdentityConfig, now: Optional[datetime.datetime] = None, device_id: Optional[str] = None
) -> IdentityReport:
    """Check every configured credential and decide which one the TLS client certificate uses.

    Contract: it reads the files named in ``settings`` (never the system trust
    store), changes nothing, and does not raise for bad certificates, keys or
    passphrases: each problem is a ``CheckResult`` with an ``id`` from
    ``CHECK_IDS`` (or ``selection``), a ``status`` of ``ok``, ``warning``,
    ``error`` or ``skipped``, a one-line ``message`` naming the file and the
    fix, and the ``credential`` it concerns (``IDevID`` or ``LDevID``). Checks
    run in the order of ``CHECK_IDS`` per credential; a certificate that
    cannot be loaded makes the later checks ``skipped``.

    ``now`` is the validation time (default: the system clock), ``device_id``
    the top-level configured device id, which overrides the certificate's.
    ``report.ok`` is false when any check failed; ``report.selected`` is the
    credential the agent would use, or None when none is usable.
    """
    policy = IdentityPolicy.from_config(settings, device_id)
    return validate_credentials(credential_files(settings), policy, now)


def validate_credentials(
    credentials: Sequence[CredentialFiles], policy: IdentityPolicy, now: Optional[datetime.datetime] = None
) -> IdentityReport:
    """Validate ``credentials`` (the IDevID first) under ``policy``; see ``validate_identity``."""
    reports: List[CredentialReport] = []
    idevid_leaf: Optional[x509.Certificate] = None
    for files in credentials:
        report = _validate_credential(files, policy, now, idevid_leaf)
        if files.role == IDEVID:
            idevid_leaf = report.certificate
        reports.append(report)

    selected, selection = _select(reports)
    clock = make_clock(now, idevid_leaf)
    return IdentityReport(tuple(reports), selection, clock, selected.role if selected else None)


def _validate_credential(
    files: CredentialFiles,
    policy: IdentityPolicy,
    now: Optional[datetime.datetime],
    idevid_leaf: Optional[x509.Certificate],
) -> CredentialReport:
    role = files.role
    try:
        certificates = load_certificates(files.cert, f"{role} certificate file")
    except IdentityError as exc:
        skipped = [CheckResult(check_id, SKIPPED, "the certificate could not be loaded", role) for check_id in CHECK_IDS[1:]]
        checks = (CheckResult("certificate", ERROR, str(exc), role), *skipped)
        return CredentialReport(role, files.cert, files.key, checks)

    leaf, intermediates = certificates[0], tuple(certificates[1:])
    loaded = CheckResult("certificate", OK, f"loaded {len(certificates)} certificate(s) from {files.cert}", role)
    leaf_result = check_leaf(leaf, policy.key_types, role)
    key_result = _check_key(files, leaf)
    chain = _check_chain(files, leaf, intermediates)

    time_items = [("leaf", leaf)]
    if chain.path:
        time_items += [("CA", ca) for ca in chain.path[1:-1]] + [("trust anchor", chain.path[-1])]
    # The IDevID's notBefore bounds the plausible time for every credential.
    clock = make_clock(now, idevid_leaf or leaf)
    time_result = check_time(time_items, clock, policy.strict_time, role)

    fields = read_identity_fields(leaf)
    identity_result, device_id, source = check_identity(fields, policy.device_id_source, policy.device_id, role)

    return CredentialReport(
        role=role,
        cert_path=files.cert,
        key_path=files.key,
        checks=(loaded, leaf_result, key_result, chain.result, time_result, identity_result),
        certificate=leaf,
        intermediates=intermediates,
        path=chain.path,
        anchor_path=chain.anchor.path if chain.anchor else None,
        fields=fields,
        device_id=device_id,
        device_id_source=source,
    )


def _check_key(files: CredentialFiles, leaf: x509.Certificate) -> CheckResult:
    if files.key is None:
        return CheckResult("key-match", SKIPPED, "no private key given", files.role)
    if files.key_source == "tpm":
        # Imported here because edge_agent.tpm imports this module.
        from edge_agent.tpm import check_tpm_key_match

        return check_tpm_key_match(files, leaf)
    try:
        private_key = load_private_key(files.key, files.read_passphrase(), files.setting)
    except IdentityError as exc:
        return CheckResult("key-match", ERROR, str(exc), files.role)
    return check_key_match(leaf, private_key, files.cert, files.key, files.role)


def _check_chain(
    files: CredentialFiles, leaf: x509.Certificate, intermediates: Sequence[x509.Certificate]
) -> ChainOutcome:
    anchors: List[TrustAnchor] = []
    for path in files.trust_anchors:
        try:
            anchors.extend(TrustAnchor(cert, path) for cert in load_certificates(path, "trust anchor file"))
        except IdentityError as exc:
            return ChainOutcome(CheckResult("chain", ERROR, f"{exc}; fix {files.setting}.trust_anchors", files.role))
    return check_chain(leaf, intermediates, anchors, f"{files.setting}.trust_anchors", files.role)


def _select(reports: Sequence[CredentialReport]) -> "tuple[Optional[CredentialReport], CheckResult]":
    by_role = {report.role: report for report in reports}
    idevid, ldevid = by_role.get(IDEVID), by_role.get(LDEVID)

    if ldevid is not None and ldevid.usable:
        return ldevid, CheckResult("selection", OK, f"the LDevID {ldevid.cert_path} is the TLS client certificate", LDEVID)

    fallback_reason = ""
    if ldevid is not None:
        failed = ldevid.first_error()
        detail = f"{failed.id} check failed: {failed.message}" if failed else "private key was not checked"
        fallback_reason = f"the LDevID {ldevid.cert_path} is not used because its {detail}"

    if idevid is not None and idevid.usable:
        if fallback_reason:
            message = f"{fallback_reason}; the IDevID is the TLS client certificate"
            return idevid, CheckResult("selection", WARNING, message, IDEVID)
        return idevid, CheckResult("selection", OK, f"the IDevID {idevid.cert_path} is the TLS client certificate", IDEVID)

    if idevid is not None and idevid.first_error() is None:
        return None, CheckResult("selection", SKIPPED, "no private key was given, so no TLS client certificate is chosen", IDEVID)

    message = "no usable device identity: the IDevID failed its checks"
    if fallback_reason:
        message += f", and {fallback_reason}"
    return None, CheckResult("selection", ERROR, message, IDEVID)


def load_identity(
    settings: IdentityConfig, device_id: Optional[str] = None, now: Optional[datetime.datetime] = None
) -> DeviceIdentity:
    """Validate the identity and return the credential that TLS presents; raise ``IdentityError`` when none is usable."""
    report = validate_identity(settings, now, device_id)
    _log_report(report)

    chosen = report.selected
    if chosen is None or chosen.certificate is None or chosen.key_path is None or chosen.device_id is None:
        raise _unusable_error(report)

    files = next(f for f in credential_files(settings) if f.role == chosen.role)
    identity = DeviceIdentity(
        cert_path=chosen.cert_path,
        key_path=chosen.key_path,
        certificate=chosen.certificate,
        chain=chosen.intermediates,
        device_id=chosen.device_id,
        device_id_source=chosen.device_id_source,
        key_passphrase=None if files.key_source == "tpm" else files.read_passphrase(),
        role=chosen.role,
        report=report,
        key_source=files.key_source,
        tpm_tcti=files.tpm_tcti if files.key_source == "tpm" else None,
    )
    logger.info(
        "using the %s %s as the TLS client certificate (device id %s from %s)",
        identity.role, identity.subject, identity.device_id, identity.device_id_source,
    )
    return identity


def _unusable_error(report: IdentityReport) -> IdentityError:
    idevid = report.credentials[0]
    failed = idevid.first_error()
    if failed is None:
        return IdentityError(report.selection.message, str(idevid.cert_path), "selection")
    return IdentityError(f"{idevid.role} {failed.id} check failed: {failed.message}", str(idevid.cert_path), failed.id)


def _log_report(report: IdentityReport) -> None:
    for check in report.checks:
        if check.id == "selection":
            continue
        if check.status == ERROR:
            logger.error("%s %s check failed: %s", check.credential, check.id, check.message)
        elif check.status == WARNING:
            logger.warning("%s %s check: %s", check.credential, check.id, check.message)
        elif check.status == SKIPPED and check.id == "time":
            logger.warning("%s time check skipped: %s", check.credential, check.message)
    if report.selection.status != OK:
        logger.warning("%s", report.selection.message)


def extract_device_id(certificate: x509.Certificate, source: str = "auto") -> "tuple[str, str]":
    """Return the device id and where it came from; raise ``IdentityError`` when the certificate lacks it."""
    device_id, label = choose_device_id(read_identity_fields(certificate), source)
    if device_id is None:
        raise IdentityError(
            f"the device certificate (subject {name_text(certificate, 'subject')!r}) has no {label}; "
            "set device_id in the configuration",
            check="identity",
        )
    return device_id, label
