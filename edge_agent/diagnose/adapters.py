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
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edge_agent import identity as identity_module
from edge_agent.config import BrokerConfig, EntropyConfig, IdentityConfig, SpoolConfig, ThermalConfig, secret_file_mode_problem
from edge_agent.diagnose.classify import FailureClass, classify_tls_error
from edge_agent.diagnose.render import split_fix
from edge_agent.entropy import EntropyGate, EntropyStatus
from edge_agent.errors import EdgeAgentError, IdentityError
from edge_agent.identity import DeviceIdentity
from edge_agent.spool import SpoolStats
from edge_agent.thermal import ThermalGovernor
from edge_agent.tls import PinnedContext, create_client_context, verified_chain_der

UTC = datetime.timezone.utc


# --- identity ---------------------------------------------------------------


@dataclass(frozen=True)
class IdentityStep:
    """One step of identity validation: passed, failed, or not run because an earlier step failed."""

    name: str
    passed: Optional[bool]
    finding: str
    remedy: str = ""


@dataclass(frozen=True)
class IdentityOutcome:
    """The steps in order, the leaf certificate when it parsed, and the identity when every step passed."""

    steps: Tuple[IdentityStep, ...]
    certificate: Optional[x509.Certificate]
    identity: Optional[DeviceIdentity]


def validate_identity(settings: IdentityConfig, device_id: Optional[str]) -> IdentityOutcome:
    """Run each identity check of ``load_identity`` on its own, so that every step gets a result."""
    # NOTE: calls the step functions of edge_agent.identity one by one; a
    # validate_identity() there that reports every step would replace this.
    steps: List[IdentityStep] = []
    state: dict = {}
    for name, step in _IDENTITY_STEP_FUNCTIONS:
        if steps and steps[-1].passed is not True:
            steps.append(IdentityStep(name, None, f"the {steps[-1].name} step did not pass"))
            continue
        try:
            finding = step(settings, device_id, state)
        except EdgeAgentError as exc:
            finding, remedy = split_fix(str(exc))
            steps.append(IdentityStep(name, False, finding, remedy))
            continue
        steps.append(IdentityStep(name, True, finding))

    identity = None
    if all(s.passed for s in steps):
        identity = identity_module.load_identity(settings, device_id)
    return IdentityOutcome(tuple(steps), state.get("leaf"), identity)


def _step_cert(settings: IdentityConfig, device_id: Optional[str], state: dict) -> str:
    certificates = identity_module.load_certificates(settings.cert, "device certificate")
    leaf = certificates[0]
    state["leaf"] = leaf
    state["intermediates"] = certificates[1:]
    identity_module._check_key_type(leaf, settings.cert)
    return f"{leaf.subject.rfc4514_string()} ({_describe_public_key(leaf.public_key())})"


def _step_key_mode(settings: IdentityConfig, device_id: Optional[str], state: dict) -> str:
    described = []
    for path in (settings.key, settings.key_passphrase_file):
        if path is None:
            continue
        try:
            problem = secret_file_mode_problem(path)
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            raise IdentityError(f"{path}: file not found; fix identity.key or install the key file", str(path)) from None
        except OSError as exc:
            raise IdentityError(f"{path}: cannot read its mode: {exc.strerror}", str(path)) from None
        if problem:
            raise IdentityError(problem, str(path), "key-permissions")
        described.append(f"{path} mode {mode:04o}")
    return ", ".join(described) + ": private to its owner"


def _step_key(settings: IdentityConfig, device_id: Optional[str], state: dict) -> str:
    try:
        passphrase = identity_module.read_passphrase(settings.key_passphrase_file)
        key = identity_module.load_private_key(settings.key, passphrase)
    except IdentityError as exc:
        if "not readable by this user" in str(exc):
            raise IdentityError(
                f"{settings.key}: the private key is not readable by this user; run diagnose as root or as the "
                "agent's user (sudo -u <agent user> edge-agent diagnose)",
                str(settings.key),
            ) from None
        raise
    state["key"] = key
    encrypted = " (encrypted with the passphrase file)" if passphrase is not None else ""
    return f"the {_describe_public_key(key.public_key())} private key loads{encrypted}"


def _step_key_match(settings: IdentityConfig, device_id: Optional[str], state: dict) -> str:
    identity_module.check_key_matches(state["leaf"], state["key"], settings.cert, settings.key)
    return "the private key belongs to the device certificate"


def _step_chain(settings: IdentityConfig, device_id: Optional[str], state: dict) -> str:
    anchors: List[x509.Certificate] = []
    for anchor_path in settings.trust_anchors:
        anchors.extend(identity_module.load_certificates(anchor_path, "trust anchor file"))
    path = identity_module.build_chain(state["leaf"], state["intermediates"], anchors)
    return f"chains to trust anchor {path[-1].subject.rfc4514_string()} ({len(path)} certificates)"


def _step_device_id(settings: IdentityConfig, device_id: Optional[str], state: dict) -> str:
    if device_id:
        return f"device id {device_id} (from the configuration)"
    value, source = identity_module.extract_device_id(state["leaf"])
    return f"device id {value} (from the certificate's {source})"


_IDENTITY_STEP_FUNCTIONS = (
    ("cert", _step_cert),
    ("key-mode", _step_key_mode),
    ("key", _step_key),
    ("key-match", _step_key_match),
    ("chain", _step_chain),
    ("device-id", _step_device_id),
)


def _describe_public_key(key) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__.replace("PublicKey", "").lstrip("_")


def load_certificates(path: Path) -> List[x509.Certificate]:
    return identity_module.load_certificates(path, "certificate file")


def device_id_of(certificate: x509.Certificate) -> Optional[str]:
    """Return the device id the certificate carries, or None when it has none."""
    try:
        return identity_module.extract_device_id(certificate)[0]
    except IdentityError:
        return None


def has_no_expiration(certificate: x509.Certificate) -> bool:
    return identity_module.has_no_expiration(certificate)


# --- TLS --------------------------------------------------------------------


def client_context(broker: BrokerConfig, identity: Optional[DeviceIdentity]) -> PinnedContext:
    """Return the agent's own TLS context: TLS floor, CA, host name and pin check before any MQTT byte."""
    return create_client_context(broker, identity)


def verified_chain(sock: ssl.SSLSocket) -> List[x509.Certificate]:
    return [x509.load_der_x509_certificate(der) for der in verified_chain_der(sock)]


def unverified_chain(sock: ssl.SSLSocket) -> List[x509.Certificate]:
    """Return the chain the server sent, unverified; only the leaf before Python 3.10."""
    getter = getattr(sock, "get_unverified_chain", None) or getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
    chain: List[bytes] = []
    if getter is not None:
        for item in getter() or []:
            chain.append(item if isinstance(item, bytes) else item.public_bytes(ssl._ssl.ENCODING_DER))
    if not chain:
        leaf = sock.getpeercert(binary_form=True)
        chain = [leaf] if leaf else []
    return [x509.load_der_x509_certificate(der) for der in chain]


def classify_tls_failure(exc: BaseException) -> FailureClass:
    # NOTE: switch to the pin tooling's TLS error classifier once it lands, keeping these remedies.
    return classify_tls_error(exc)


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
    tried = tuple(str(Path(settings.sysfs_root) / f.lstrip("/")) for f in settings.sysfs_files)
    tried += tuple(f"psutil:{name}" for name in settings.sensors)
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
        row = db.execute("SELECT value FROM meta WHERE key = 'dropped_total'").fetchone()
    except sqlite3.Error as exc:
        raise EdgeAgentError(f"{path}: cannot read the spool: {exc}") from None
    finally:
        db.close()
    return SpoolStats(
        depth=depth,
        bytes=size,
        oldest_age_s=None if oldest is None else max(0.0, now - oldest),
        dropped_total=int(row[0]) if row else 0,
    )
