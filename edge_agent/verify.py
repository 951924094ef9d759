"""The periodic verification: re-check the device identity and the broker, and report expiry.

The identity check re-runs the identity validation (certificate, key,
chain to a trust anchor, validity at the current time) on the credential the
agent presents, then reports how soon any certificate on that path expires. The broker check makes a fresh TLS handshake with the agent's own
client context, so the chain, host name and SPKI pin are verified by the
same ``PinnedSSLSocket`` code as for a new MQTT connection. It passes the
entropy gate first and closes the socket right after the handshake, so the
broker never receives an MQTT byte from it.

The job runs on the thermal governor's interval, which stretches as the
gateway heats up and returns to normal as it cools. In the service, the
certificate parsing of each run (``finish_checks``) runs in a short-lived
child process, so that the service never loads ``cryptography``.
"""

import dataclasses
import datetime
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from edge_agent import isolated
from edge_agent.config import AgentConfig, BrokerConfig, IdentityConfig
from edge_agent.entropy import EntropyGate
from edge_agent.errors import EdgeAgentError
from edge_agent.pinning import PinMismatchError, pin_from_certificate_der
from edge_agent.thermal import ThermalGovernor
from edge_agent.tls import PinnedContext, verified_chain_der
from edge_agent.tlserrors import classify_tls_error, describe_tls_error

if TYPE_CHECKING:
    from cryptography import x509

    from edge_agent.identity_report import IdentityReport

logger = logging.getLogger(__name__)

UTC = datetime.timezone.utc
# A certificate expiring within this many days turns the result into "expiring".
EXPIRY_WARN_DAYS = 30.0
# The first run waits this long after start, so that it does not add a second
# handshake to the connection attempt of a gateway that has just booted.
FIRST_RUN_DELAY_S = 60.0
SECONDS_PER_DAY = 86400.0


def _utc_text(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ChainExpiry:
    """The certificate of a chain that expires first; ``not_after`` is None when none expires."""

    not_after: Optional[datetime.datetime]
    subject: Optional[str]

    def days_left(self, now: datetime.datetime) -> Optional[float]:
        if self.not_after is None:
            return None
        return (self.not_after - now).total_seconds() / SECONDS_PER_DAY


def earliest_expiry(certificates: Sequence["x509.Certificate"]) -> ChainExpiry:
    """Find the certificate that expires first; notAfter 99991231235959Z means it never expires."""
    from edge_agent.identity import has_no_expiration

    expiring = [c for c in certificates if not has_no_expiration(c)]
    if not expiring:
        return ChainExpiry(None, None)
    first = min(expiring, key=lambda c: c.not_valid_after_utc)
    return ChainExpiry(first.not_valid_after_utc, first.subject.rfc4514_string())


@dataclass(frozen=True)
class Finding:
    """The result of one check: whether it passed, a one-line detail and the chain's earliest expiry."""

    valid: bool
    detail: str
    expiry: ChainExpiry = ChainExpiry(None, None)
    checked: bool = True
    pin_matched: Optional[bool] = None
    pin: Optional[str] = None
    failure_class: Optional[str] = None

    def to_dict(self, now: datetime.datetime) -> dict:
        days = self.expiry.days_left(now)
        document = {
            "checked": self.checked,
            "valid": self.valid,
            "detail": self.detail,
            "expires": None if self.expiry.not_after is None else _utc_text(self.expiry.not_after),
            "expires_subject": self.expiry.subject,
            "days_until_expiry": None if days is None else round(days, 1),
        }
        if self.pin_matched is not None or self.pin is not None:
            document["pin_matched"] = self.pin_matched
            document["pin"] = self.pin
        if self.failure_class is not None:
            document["failure_class"] = self.failure_class
        return document


# --- the device identity ---------------------------------------------------


def identity_report(settings: IdentityConfig, device_id: Optional[str], now: datetime.datetime) -> "IdentityReport":
    """Validate the configured credentials at ``now``.

    This is the only call into the identity module, so a change of its
    interface touches this function alone. ``validate_identity`` reports
    bad certificates and keys as check results instead of raising.
    """
    from edge_agent.identity import validate_identity

    return validate_identity(settings, now, device_id)


def check_identity(settings: IdentityConfig, device_id: Optional[str], now: datetime.datetime) -> Finding:
    from edge_agent.identity import WARNING

    try:
        report = identity_report(settings, device_id, now)
    except (EdgeAgentError, OSError, ValueError) as exc:
        # The files changed under the running agent in a way the validation does not report.
        return Finding(False, f"device identity could not be re-read: {exc}")

    chosen = report.selected
    if chosen is None or chosen.certificate is None:
        reasons = "; ".join(f"{c.credential} {c.id}: {c.message}" for c in report.errors) or report.selection.message
        return Finding(False, f"device identity unusable: {reasons}")

    path = chosen.path or (chosen.certificate, *chosen.intermediates)
    expiry = earliest_expiry(path)
    warnings = [f"{c.id}: {c.message}" for c in chosen.checks if c.status == WARNING]
    detail = f"{chosen.role} valid, {len(path)} certificates up to the trust anchor"
    if warnings:
        detail += "; " + "; ".join(warnings)
    return Finding(True, detail, expiry)


# --- the broker --------------------------------------------------------------


def check_broker(broker: BrokerConfig, context: PinnedContext) -> Finding:
    """Make one TLS handshake with the broker as a new connection would, then close without MQTT.

    ``context`` is the agent's client context from ``create_client_context``:
    its ``PinnedSSLSocket`` checks the pin-set inside ``do_handshake`` and
    raises ``PinMismatchError`` before this function gets the socket.
    """
    finding, chain_der = probe_broker(broker, context)
    return add_chain_expiry(finding, _peer(broker), chain_der)


def probe_broker(broker: BrokerConfig, context: PinnedContext) -> "tuple[Finding, tuple[bytes, ...]]":
    """Run the handshake of ``check_broker``; return the finding without expiry and the verified chain."""
    peer = _peer(broker)
    try:
        with socket.create_connection((broker.host, broker.port), timeout=broker.handshake_timeout_s) as raw:
            # paho wraps the same way: server_hostname is the host, PinnedContext swaps in server_name.
            with context.wrap_socket(raw, server_hostname=broker.host, do_handshake_on_connect=False) as tls:
                tls.do_handshake()
                chain_der = tuple(verified_chain_der(tls))
                version = tls.version()
    except PinMismatchError as exc:
        finding = Finding(False, f"broker {peer}: {describe_tls_error(exc)}", pin_matched=False, failure_class=classify_tls_error(exc))
        return finding, ()
    except OSError as exc:
        # ssl.SSLError and its verification errors are OSErrors too.
        return Finding(False, f"broker {peer}: {describe_tls_error(exc)}", failure_class=classify_tls_error(exc)), ()
    except ValueError as exc:
        # The pin check raises ValueError for a certificate whose DER has no readable SubjectPublicKeyInfo.
        return Finding(False, f"broker {peer} chain could not be parsed for the pin check: {exc}"), ()

    matched = context.pin_set.first_match([pin_from_certificate_der(der) for der in chain_der])
    if matched is None:
        # The handshake passed without a pin: the pin-set expired and runs in CA-only mode.
        detail = f"broker {peer} verified by its CA only ({version}); the pin-set has expired"
        return Finding(True, detail, pin_matched=False), chain_der
    return Finding(True, f"broker {peer} chain and pin verified ({version})", pin_matched=True, pin=str(matched)), chain_der


def add_chain_expiry(finding: Finding, peer: str, chain_der: Sequence[bytes]) -> Finding:
    """Return ``finding`` with the earliest expiry of the broker's verified chain ``chain_der``."""
    if not chain_der:
        return finding
    from cryptography import x509

    try:
        certificates = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as exc:
        # OpenSSL verified the chain, but cryptography rejects some name encodings it accepts.
        detail = f"broker {peer} chain verified but not readable for its expiry: {exc}"
        return dataclasses.replace(finding, valid=False, detail=detail)
    return dataclasses.replace(finding, expiry=earliest_expiry(certificates))


def finish_checks(
    settings: IdentityConfig,
    device_id: Optional[str],
    now: datetime.datetime,
    broker: Finding,
    peer: str,
    chain_der: Sequence[bytes],
) -> "tuple[Finding, Finding]":
    """Run the certificate parsing of a verification: the identity check and the broker chain's expiry.

    The service runs this in a child process (see ``edge_agent.isolated``).
    """
    return check_identity(settings, device_id, now), add_chain_expiry(broker, peer, chain_der)


def _peer(broker: BrokerConfig) -> str:
    return f"{broker.host}:{broker.port}"


# --- the report --------------------------------------------------------------


@dataclass(frozen=True)
class VerificationReport:
    """The findings of one verification run."""

    finished_at: datetime.datetime
    duration_s: float
    thermal_state: str
    identity: Finding
    broker: Finding

    @property
    def days_until_expiry(self) -> Optional[float]:
        days = [d for d in (f.expiry.days_left(self.finished_at) for f in (self.identity, self.broker)) if d is not None]
        return min(days) if days else None

    @property
    def result(self) -> str:
        """Return ``failed`` (a check failed or did not run), ``expired``, ``expiring`` (within the warning window) or ``ok``.

        An expired certificate is ``expired`` rather than ``failed`` when the
        identity policy still accepts it (``identity.strict_time`` false).
        """
        if not (self.identity.valid and self.broker.valid and self.broker.checked):
            return "failed"
        days = self.days_until_expiry
        if days is not None and days < 0:
            return "expired"
        if days is not None and days < EXPIRY_WARN_DAYS:
            return "expiring"
        return "ok"

    def to_dict(self) -> dict:
        days = self.days_until_expiry
        return {
            "last_run": _utc_text(self.finished_at),
            "result": self.result,
            "duration_s": round(self.duration_s, 3),
            "thermal_state": self.thermal_state,
            "days_until_expiry": None if days is None else round(days, 1),
            "pin_matched": self.broker.pin_matched,
            "identity": self.identity.to_dict(self.finished_at),
            "broker": self.broker.to_dict(self.finished_at),
        }


class VerificationSchedule:
    """When the next verification is due: one governor interval after the last run.

    The interval is read at each call, so a run that is pending moves later as
    the gateway heats up and earlier as it cools. Times are
    ``time.monotonic()`` values.
    """

    def __init__(self, governor: ThermalGovernor, start: float, first_run_delay_s: Optional[float] = None) -> None:
        self.governor = governor
        delay = FIRST_RUN_DELAY_S if first_run_delay_s is None else first_run_delay_s
        self._first_due = start + delay
        self._last_run: Optional[float] = None
        self._retry_at: Optional[float] = None

    def next_due(self) -> float:
        if self._retry_at is not None:
            return self._retry_at
        if self._last_run is None:
            return self._first_due
        return self._last_run + self.governor.verify_interval_s

    def due(self, now: float) -> bool:
        return now >= self.next_due()

    def postpone(self, until: float) -> None:
        """Ask again at ``until`` (the entropy gate is still waiting)."""
        self._retry_at = until

    def completed(self, now: float) -> None:
        self._last_run = now
        self._retry_at = None


class Verifier:
    """Runs the verification on the thermal governor's interval and keeps the last report.

    Times passed to ``due``, ``next_due`` and ``run`` are ``time.monotonic()``
    values; ``wall_clock`` gives the UTC time that certificates are checked at.
    """

    def __init__(
        self,
        gate: EntropyGate,
        governor: ThermalGovernor,
        start: float,
        first_run_delay_s: Optional[float] = None,
        wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(UTC),
        isolate: bool = False,
    ) -> None:
        self.gate = gate
        self.isolate = isolate
        self.governor = governor
        self.schedule = VerificationSchedule(governor, start, first_run_delay_s)
        self._wall_clock = wall_clock
        self.last_report: Optional[VerificationReport] = None
        self.runs = 0

    def next_due(self) -> float:
        return self.schedule.next_due()

    def due(self, now: float) -> bool:
        return self.schedule.due(now)

    def run(self, now: float, config: AgentConfig, context: PinnedContext) -> Optional[VerificationReport]:
        """Run the checks; return None when the entropy gate postpones the run to ``next_due()``."""
        peer = _peer(config.broker)
        admission = self.gate.admit("verification", peer)
        if not admission.ready and not admission.gave_up:
            self.schedule.postpone(now + admission.retry_in_s)
            return None

        started = time.monotonic()
        wall_now = self._wall_clock()
        chain_der: "tuple[bytes, ...]" = ()
        if admission.ready:
            broker, chain_der = probe_broker(config.broker, context)
        else:
            broker = Finding(False, f"broker {peer} not checked: {admission.status.detail}", checked=False)
        identity, broker = self._finish(config, wall_now, broker, chain_der)

        report = VerificationReport(wall_now, time.monotonic() - started, self.governor.state, identity, broker)
        self.schedule.completed(now)
        self.last_report = report
        self.runs += 1
        self._log(report)
        return report

    def _finish(
        self, config: AgentConfig, wall_now: datetime.datetime, broker: Finding, chain_der: "tuple[bytes, ...]"
    ) -> "tuple[Finding, Finding]":
        arguments = (config.identity, config.device_id, wall_now, broker, _peer(config.broker), chain_der)
        if not self.isolate:
            return finish_checks(*arguments)
        try:
            return isolated.call("finish_verification", *arguments)
        except EdgeAgentError as exc:
            return Finding(False, f"device identity could not be checked: {exc}"), broker

    def _log(self, report: VerificationReport) -> None:
        days = report.days_until_expiry
        expiry = "nothing expires" if days is None else f"earliest expiry in {days:.1f} days"
        interval = self.governor.verify_interval_s
        if report.result == "ok":
            logger.info("verification ok: %s; %s; next in %.0f s", report.broker.detail, expiry, interval)
            return
        level = logging.ERROR if report.result == "failed" else logging.WARNING
        logger.log(
            level, "verification %s: %s; %s; %s; next in %.0f s",
            report.result, report.identity.detail, report.broker.detail, expiry, interval,
        )

    def to_dict(self) -> dict:
        """Return the last report for telemetry and ``diagnose`` (``result`` None before the first run)."""
        document = {"last_run": None, "result": None, "days_until_expiry": None, "pin_matched": None}
        if self.last_report is not None:
            document = self.last_report.to_dict()
        document["runs"] = self.runs
        document["interval_s"] = self.governor.verify_interval_s
        return document
