"""The one place where diagnose calls into identity, TLS, thermal, entropy and spool code.

The checks use only the small records defined here, so that a change of
those modules' interfaces touches this file alone.
"""

import datetime
import sqlite3
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from cryptography import x509

from edge_agent import identity as identity_module
from edge_agent.config import BrokerConfig, EntropyConfig, IdentityConfig, SpoolConfig, ThermalConfig, secret_file_mode_problem
from edge_agent import tlserrors
from edge_agent.diagnose import classify
from edge_agent.diagnose.classify import FailureClass
from edge_agent.diagnose.render import split_fix
from edge_agent.entropy import EntropyGate, EntropyStatus
from edge_agent.errors import EdgeAgentError, IdentityError
from edge_agent.identity import DeviceIdentity
from edge_agent.spool import SpoolStats
from edge_agent.thermal import ThermalGovernor
from edge_agent.tls import PinnedContext, create_client_context, presented_chain_der, verified_chain_der

# --- identity ---------------------------------------------------------------

# The IDevID steps in the order they are shown. "key-mode" is diagnose's own
# stat-only check of the key file; the others map the checks of
# edge_agent.identity.validate_identity, whose "identity" check is shown as
# "device-id". "ldevid" sums up the LDevID, and "selection" names the
# credential TLS presents.
IDENTITY_STEPS = ("certificate", "leaf", "key-mode", "key-match", "chain", "time", "device-id", "ldevid", "selection")
_REPORT_STEP_NAMES = {"identity": "device-id"}
# A device certificate that expires within this many days gets a warning.
CERT_WARN_DAYS = 30


@dataclass(frozen=True)
class IdentityStep:
    """The outcome of one identity step: a status (ok, warning, error, skipped), the finding and the fix."""

    name: str
    status: str
    finding: str
    remedy: str = ""


@dataclass(frozen=True)
class IdentityOutcome:
    """The steps in order, the IDevID leaf when it parsed, the device id, and the identity TLS presents."""

    steps: Tuple[IdentityStep, ...]
    certificate: Optional[x509.Certificate]
    device_id: Optional[str]
    identity: Optional[DeviceIdentity]

    def step(self, name: str) -> IdentityStep:
        return next(s for s in self.steps if s.name == name)


def validate_identity(settings: IdentityConfig, device_id: Optional[str], now: datetime.datetime) -> IdentityOutcome:
    """Validate every configured credential and return one step per check, IDevID first."""
    report = identity_module.validate_identity(settings, now, device_id)
    idevid = report.credentials[0]
    key_mode = _key_mode_step(settings)

    steps: List[IdentityStep] = []
    for check in idevid.checks:
        name = _REPORT_STEP_NAMES.get(check.id, check.id)
        if name == "key-match":
            steps.append(key_mode)
            if key_mode.status == "error" and check.status == "error":
                steps.append(IdentityStep(name, "skipped", "the private key file is readable by others (see key-mode)"))
                continue
        step = _step_from_check(name, check.status, check.message)
        if name == "time":
            step = _add_expiry_horizon(step, idevid.certificate, now)
        steps.append(step)
    steps.append(_ldevid_step(report.credentials[1:]))
    steps.append(_step_from_check("selection", report.selection.status, report.selection.message))

    selected = report.selected
    return IdentityOutcome(
        steps=tuple(steps),
        certificate=idevid.certificate,
        device_id=selected.device_id if selected is not None else idevid.device_id,
        identity=_load_selected(settings, device_id, now) if selected is not None else None,
    )


def _step_from_check(name: str, status: str, message: str) -> IdentityStep:
    if status in ("ok", "skipped"):
        return IdentityStep(name, status, message)
    finding, remedy = split_fix(message)
    return IdentityStep(name, status, finding, remedy)


def _key_mode_step(settings: IdentityConfig) -> IdentityStep:
    """Check that the key and passphrase files are private to their owner, without reading them."""
    described = []
    for path in (settings.key, settings.key_passphrase_file):
        if path is None:
            continue
        try:
            problem = secret_file_mode_problem(path)
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            return IdentityStep("key-mode", "error", f"{path}: file not found", "Fix identity.key or install the key file.")
        except OSError as exc:
            return IdentityStep("key-mode", "error", f"{path}: cannot read its mode: {exc.strerror}")
        if problem:
            finding, remedy = split_fix(problem)
            return IdentityStep("key-mode", "error", finding, remedy)
        described.append(f"{path} mode {mode:04o}")
    return IdentityStep("key-mode", "ok", ", ".join(described) + ": private to its owner")


def _add_expiry_horizon(step: IdentityStep, leaf: Optional[x509.Certificate], now: datetime.datetime) -> IdentityStep:
    if step.status != "ok" or leaf is None or identity_module.has_no_expiration(leaf):
        return step
    days = (leaf.not_valid_after_utc - now).days
    if days >= CERT_WARN_DAYS:
        return IdentityStep(step.name, "ok", f"{step.finding}; the leaf expires in {days} days")
    return IdentityStep(
        step.name, "warning", f"the device certificate expires in {days} days, on {leaf.not_valid_after_utc:%Y-%m-%d}",
        "Arrange a replacement identity (an LDevID, or a new IDevID from the manufacturer) before that date.",
    )


def _ldevid_step(ldevid_reports) -> IdentityStep:
    if not ldevid_reports:
        return IdentityStep("ldevid", "skipped", "no LDevID configured ([identity.ldevid])")
    credential = ldevid_reports[0]
    worst = credential.status
    if worst == "ok":
        return IdentityStep("ldevid", "ok", f"the LDevID {credential.cert_path} passes every check")
    first = next(c for c in credential.checks if c.status == worst)
    return _step_from_check("ldevid", worst, f"LDevID {first.id} check: {first.message}")


@dataclass(frozen=True)
class KeyStoreStatus:
    """The place the device key is held and, for a TPM, whether the TPM signed with it."""

    tpm_held: bool
    ok: bool
    summary: str


def key_store_status(settings: IdentityConfig, timeout_s: float) -> KeyStoreStatus:
    """Probe a TPM-held key in child processes bounded by ``timeout_s``; a key file is not probed."""
    # Imported here: edge_agent.tpm pulls in the provider set-up, which only TPM gateways need.
    from edge_agent.tpm import tpm_status

    status = tpm_status(settings, timeout_s=timeout_s)
    return KeyStoreStatus(status.tpm_held, status.ok, status.summary())


def _load_selected(settings: IdentityConfig, device_id: Optional[str], now: datetime.datetime) -> Optional[DeviceIdentity]:
    try:
        return identity_module.load_identity(settings, device_id, now)
    except IdentityError:
        return None


def load_certificates(path: Path) -> List[x509.Certificate]:
    return identity_module.load_certificates(path, "certificate file")


# --- TLS --------------------------------------------------------------------


def client_context(broker: BrokerConfig, identity: Optional[DeviceIdentity]) -> PinnedContext:
    """Return the agent's own TLS context: TLS floor, CA, host name and pin check before any MQTT byte."""
    return create_client_context(broker, identity)


def verified_chain(sock: ssl.SSLSocket) -> List[x509.Certificate]:
    return [x509.load_der_x509_certificate(der) for der in verified_chain_der(sock)]


def unverified_chain(sock: ssl.SSLSocket) -> List[x509.Certificate]:
    """Return the chain the server sent, unverified and for display only."""
    return [x509.load_der_x509_certificate(der) for der in presented_chain_der(sock)]


# The classes of edge_agent.tlserrors, as the failure classes that carry a technician's remedy.
_SHARED_CLASSES = {
    tlserrors.PIN_MISMATCH: classify.PIN_MISMATCH,
    tlserrors.UNTRUSTED_CHAIN: classify.UNTRUSTED_CHAIN,
    tlserrors.HOSTNAME_MISMATCH: classify.HOSTNAME_MISMATCH,
    tlserrors.EXPIRED: classify.CERT_EXPIRED,
    tlserrors.NOT_YET_VALID: classify.CERT_NOT_YET_VALID,
    tlserrors.CERTIFICATE_INVALID: classify.CERT_INVALID,
    tlserrors.TLS_VERSION: classify.TLS_VERSION,
    tlserrors.NOT_TLS: classify.NOT_TLS,
    tlserrors.CLIENT_CERTIFICATE_REJECTED: classify.CLIENT_CERT_REJECTED,
    tlserrors.HANDSHAKE_FAILURE: classify.HANDSHAKE_FAILURE,
    tlserrors.RESET: classify.RESET,
    tlserrors.CLOSED: classify.RESET,
    tlserrors.TIMEOUT: classify.TIMED_OUT,
    tlserrors.REFUSED: classify.CONNECTION_REFUSED,
    tlserrors.DNS: classify.DNS_FAILURE,
    tlserrors.NETWORK: classify.UNREACHABLE,
}


def classify_tls_failure(exc: BaseException) -> FailureClass:
    """Sort an error of the TCP connect, the TLS handshake or the pin check into a class with its remedy."""
    return _SHARED_CLASSES.get(tlserrors.classify_tls_error(exc), classify.TLS_FAILURE)


# --- hardware and storage ---------------------------------------------------


@dataclass(frozen=True)
class ThermalSnapshot:
    """One temperature reading and the governor state it leads to."""

    temperature_c: Optional[float]
    source: Optional[str]
    state: str
    slowdown: float
    warm_c: float
    hot_c: float
    critical_c: float
    sources_tried: Tuple[str, ...]


def read_thermal(settings: ThermalConfig) -> ThermalSnapshot:
    governor = ThermalGovernor(settings)
    governor.update()
    tried = tuple(governor.reader.sources())
    return ThermalSnapshot(
        temperature_c=governor.temperature_c,
        source=governor.source,
        state=governor.state,
        slowdown=governor.slowdown,
        warm_c=settings.warm_c,
        hot_c=settings.hot_c,
        critical_c=settings.critical_c,
        sources_tried=tried,
    )


def entropy_status(settings: EntropyConfig) -> EntropyStatus:
    return EntropyGate(settings).status()


def read_spool_stats(settings: SpoolConfig, now: float) -> Optional[SpoolStats]:
    """Read the spool's depth, size and oldest message through a read-only SQLite connection.

    Return None when no spool file exists. A read-only connection never
    creates, repairs or moves the file, so it cannot disturb a running agent;
    WAL mode lets it read while the agent writes. Raise ``EdgeAgentError`` when
    the file cannot be read as a spool.
    """
    # NOTE: mirrors Spool.stats() because Spool() creates and repairs the file on open.
    path = settings.path
    try:
        if not path.exists():
            return None
    except OSError as exc:
        raise EdgeAgentError(
            f"{path}: cannot look at the spool: {exc.strerror}; run diagnose as root or as the agent's user"
        ) from None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise EdgeAgentError(f"{path}: cannot open the spool read-only: {exc}") from None
    try:
        depth, size, oldest = db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0), min(created) FROM message"
        ).fetchone()
        counters = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('dropped_total', 'unstored_total')"))
    except sqlite3.Error as exc:
        raise EdgeAgentError(f"{path}: cannot read the spool: {exc}") from None
    finally:
        db.close()
    return SpoolStats(
        depth=depth,
        bytes=size,
        oldest_age_s=None if oldest is None else max(0.0, now - oldest),
        dropped_total=int(counters.get("dropped_total", 0)),
        unstored_total=int(counters.get("unstored_total", 0)),
        available=True,
    )
