"""State shared by the checks of one diagnose run, and the helpers that build their results."""

import datetime
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from cryptography import x509

from edge_agent import BUILD_DATE
from edge_agent.agentstate import AgentState
from edge_agent.config import AgentConfig
from edge_agent.diagnose.adapters import IdentityOutcome
from edge_agent.diagnose.classify import FailureClass
from edge_agent.diagnose.model import CheckResult, Detail, Status
from edge_agent.diagnose.render import format_utc
from edge_agent.pinning import Pin

# A clock this far past the build date is as implausible as one before it.
CLOCK_FUTURE_LIMIT = datetime.timedelta(days=20 * 365)

TITLES = {
    "config": "configuration and firmware profile",
    "clock": "system clock",
    "identity.certificate": "IDevID certificate file",
    "identity.leaf": "IDevID certificate profile and key type",
    "identity.key-mode": "private key file mode",
    "identity.key-match": "private key matches certificate",
    "identity.chain": "chain to a trust anchor",
    "identity.time": "validity period and expiry horizon",
    "identity.device-id": "device id",
    "identity.ldevid": "LDevID",
    "identity.selection": "credential used for TLS",
    "identity.tpm": "TPM-held device key",
    "entropy": "kernel random generator",
    "thermal": "temperature and governor",
    "openssl": "OpenSSL and TLS versions",
    "pins.expiry": "pin-set expiry",
    "broker.resolve": "broker host name lookup",
    "broker.tcp": "TCP connection to the broker",
    "broker.tls": "TLS handshake",
    "broker.pin": "pin match",
    "pins.backup": "backup pin",
    "broker.cert-expiry": "broker certificate expiry",
    "mqtt.connect": "MQTT CONNECT with the device certificate",
    "spool": "telemetry spool",
    "service": "agent service",
}


@dataclass
class TlsOutcome:
    """Results of the TLS check that the pin, expiry and MQTT checks build on."""

    handshake_ok: bool
    failure: Optional[FailureClass] = None
    detail: str = ""
    version: str = ""
    cipher: str = ""
    chain: List[x509.Certificate] = field(default_factory=list)
    matched_pin: Optional[Pin] = None
    pin_checked: bool = False
    pins_enforced: bool = True
    presented_pins: Tuple[Pin, ...] = ()


@dataclass
class DiagnoseContext:
    """Inputs of the run and what earlier checks found."""

    config_path: Path
    offline: bool
    timeout_s: float
    now: Callable[[], datetime.datetime]
    config: Optional[AgentConfig] = None
    identity: Optional[IdentityOutcome] = None
    addresses: List[tuple] = field(default_factory=list)
    connected_socket: Optional[socket.socket] = None
    peer: Optional[tuple] = None
    # False when the entropy check found the kernel CRNG not initialised: OpenSSL would block in getrandom().
    crng_ready: Optional[bool] = None
    tls: Optional[TlsOutcome] = None
    agent_state: Optional[AgentState] = None
    agent_running: Optional[bool] = None
    agent_state_error: Optional[str] = None
    agent_state_read: bool = False

    def clock_problem(self) -> Optional[str]:
        """Describe why the local clock cannot be right, or return None when it is plausible."""
        now = self.now()
        if now < BUILD_DATE:
            return f"the local clock reads {format_utc(now)}, before this release was built ({BUILD_DATE:%Y-%m-%d})"
        if now > BUILD_DATE + CLOCK_FUTURE_LIMIT:
            return f"the local clock reads {format_utc(now)}, implausibly far after this release was built"
        return None

    def close(self) -> None:
        if self.connected_socket is not None:
            self.connected_socket.close()
            self.connected_socket = None


def result(
    check_id: str,
    status: Status,
    finding: str,
    remedy: str = "",
    failure: Optional[FailureClass] = None,
    details: Tuple[Detail, ...] = (),
) -> CheckResult:
    """Build a check result; a failure class supplies the remedy unless one is given."""
    if failure is not None and not remedy:
        remedy = failure.remedy
    return CheckResult(
        id=check_id,
        title=TITLES[check_id],
        status=status,
        finding=finding,
        remedy=remedy if status in (Status.WARNING, Status.ERROR) else "",
        failure_class=failure.id if failure is not None and status in (Status.WARNING, Status.ERROR) else None,
        details=tuple(details),
    )


def labelled(label: str, values, notes=None) -> Tuple[Detail, ...]:
    """Return one detail per value, with ``label`` on the first only, as a list reads best."""
    notes = list(notes) if notes is not None else [""] * len(values)
    return tuple(Detail(label if i == 0 else "", str(v), notes[i]) for i, v in enumerate(values))


def ok(check_id: str, finding: str, details: Tuple[Detail, ...] = ()) -> CheckResult:
    return result(check_id, Status.OK, finding, details=details)


def skipped(check_id: str, reason: str) -> CheckResult:
    return result(check_id, Status.SKIPPED, reason)
