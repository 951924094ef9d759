"""The validation report of the device identity: per credential, the check results and what they found."""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from edge_agent.identity_checks import ERROR, OK, WARNING, CheckResult, Clock, has_no_expiration
from edge_agent.identity_fields import IdentityFields, describe_public_key, name_notes, name_text
from edge_agent.pinning import pin_from_certificate


def worst_status(checks) -> str:
    """Return ``error`` if any check failed, else ``warning`` if any warned, else ``ok``; skipped checks count as ok."""
    statuses = {check.status for check in checks}
    if ERROR in statuses:
        return ERROR
    if WARNING in statuses:
        return WARNING
    return OK


def _timestamp(certificate_time) -> str:
    return certificate_time.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CredentialReport:
    """The checks on one credential (IDevID or LDevID) and what they found.

    ``intermediates`` are the CA certificates stored after the leaf in the
    certificate file; they go out with the leaf in the TLS handshake.
    ``path`` is the validated chain from the leaf to its trust anchor, empty
    when the chain check failed.
    """

    role: str
    cert_path: Path
    key_path: Optional[Path]
    checks: Tuple[CheckResult, ...]
    certificate: Optional[x509.Certificate] = None
    intermediates: Tuple[x509.Certificate, ...] = ()
    path: Tuple[x509.Certificate, ...] = ()
    anchor_path: Optional[Path] = None
    fields: Optional[IdentityFields] = None
    device_id: Optional[str] = None
    device_id_source: str = ""

    @property
    def status(self) -> str:
        return worst_status(self.checks)

    @property
    def usable(self) -> bool:
        """Whether TLS can present this credential: every check passed or warned, and the key matched."""
        key_checked = any(check.id == "key-match" and check.status == OK for check in self.checks)
        return self.certificate is not None and self.status != ERROR and key_checked

    def first_error(self) -> Optional[CheckResult]:
        return next((check for check in self.checks if check.status == ERROR), None)

    def to_dict(self) -> dict:
        """Describe the credential as plain data; it contains no key material."""
        data = {
            "role": self.role,
            "cert_path": str(self.cert_path),
            "key_path": None if self.key_path is None else str(self.key_path),
            "status": self.status,
            "checks": [check.to_dict() for check in self.checks],
        }
        if self.certificate is not None:
            data.update(self._certificate_dict(self.certificate))
            data["chain"] = self._chain_list()
        if self.fields is not None:
            data.update(self._fields_dict(self.fields))
            data["notes"] = data.get("notes", []) + list(self.fields.notes)
        data["device_id"] = self.device_id
        data["device_id_source"] = self.device_id_source or None
        return data

    @staticmethod
    def _certificate_dict(certificate: x509.Certificate) -> dict:
        return {
            "subject": name_text(certificate, "subject"),
            "issuer": name_text(certificate, "issuer"),
            "serial_number": f"{certificate.serial_number:X}",
            "key_type": describe_public_key(certificate),
            "not_before": _timestamp(certificate.not_valid_before_utc),
            "not_after": _timestamp(certificate.not_valid_after_utc),
            "no_expiration": has_no_expiration(certificate),
            "pin": _pin_text(certificate),
            "notes": name_notes(certificate),
        }

    @staticmethod
    def _fields_dict(fields: IdentityFields) -> dict:
        hardware = fields.hardware_module_name
        return {
            "fingerprint_sha256": fields.fingerprint,
            "serial_candidates": {
                "subject_serial_number": fields.subject_serial,
                "hardware_module_name": fields.candidate("hardware-module-name"),
                "common_name": fields.common_name,
            },
            "hardware_module_name": None if hardware is None else {
                "hw_type": hardware.hw_type,
                "hw_serial": hardware.serial_text,
                "hw_serial_hex": hardware.hw_serial.hex(),
            },
            "masa_url": fields.masa_url,
        }

    def _chain_list(self) -> List[dict]:
        chain = []
        for index, certificate in enumerate(self.path):
            if index == 0:
                where = "leaf"
            elif index == len(self.path) - 1:
                where = f"trust anchor from {self.anchor_path}"
            else:
                where = "intermediate CA"
            chain.append({
                "subject": name_text(certificate, "subject"),
                "issuer": name_text(certificate, "issuer"),
                "role": where,
                "not_after": _timestamp(certificate.not_valid_after_utc),
            })
        return chain


def _pin_text(certificate: x509.Certificate) -> Optional[str]:
    try:
        return str(pin_from_certificate(certificate))
    except (UnsupportedAlgorithm, ValueError):
        return None


@dataclass(frozen=True)
class IdentityReport:
    """The validation of every configured credential and which one the TLS client certificate uses.

    ``credentials`` lists the IDevID first, then the LDevID when one is
    configured. ``selection`` is a check result of its own (id
    ``selection``): ok when the preferred credential is used, a warning when
    the agent falls back to the IDevID, an error when no credential is usable.
    """

    credentials: Tuple[CredentialReport, ...]
    selection: CheckResult
    clock: Clock
    selected_role: Optional[str] = None

    @property
    def selected(self) -> Optional[CredentialReport]:
        return next((c for c in self.credentials if c.role == self.selected_role), None)

    @property
    def checks(self) -> Tuple[CheckResult, ...]:
        """Every check result, credential by credential in the order they ran, then the selection."""
        return tuple(check for credential in self.credentials for check in credential.checks) + (self.selection,)

    @property
    def status(self) -> str:
        return worst_status(self.checks)

    @property
    def ok(self) -> bool:
        return self.status != ERROR

    @property
    def errors(self) -> Tuple[CheckResult, ...]:
        return tuple(check for check in self.checks if check.status == ERROR)

    @property
    def clock_trusted(self) -> bool:
        return self.clock.trusted

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "selected": self.selected_role,
            "clock": {
                "now": _timestamp(self.clock.now),
                "trusted": self.clock.trusted,
                "earliest_plausible": _timestamp(self.clock.floor),
                "earliest_plausible_reason": self.clock.floor_reason,
            },
            "credentials": [credential.to_dict() for credential in self.credentials],
            "checks": [check.to_dict() for check in self.checks],
        }
