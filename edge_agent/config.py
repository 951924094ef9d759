"""Configuration: TOML files validated into frozen dataclasses.

The agent reads its own file (default ``/etc/edge-agent/agent.toml``) over a
firmware profile (``firmware_profiles/<name>.toml``) that contains the
hardware facts of one gateway model. A key set in the agent's file wins over the
profile. Every invalid setting is reported with the file, the key, the value
and the fix. Unknown keys are errors, because a misspelt security setting
must never fall back to a default without anyone noticing.
"""

import dataclasses
import datetime
import difflib
import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.9 and 3.10 only
    import tomli as tomllib

from edge_agent.errors import ConfigError, PinSyntaxError
from edge_agent.pinning import Pin, PinSet, parse_pin_list

logger = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
DEFAULT_PROFILE = "generic-linux"
PROFILE_DIR_ENV = "EDGE_AGENT_PROFILE_DIR"

# Sections a firmware profile may set: hardware facts only. Broker, pins and
# telemetry belong to the operator's file.
PROFILE_SECTIONS = ("identity", "spool", "thermal", "entropy", "serial")

_MISSING = object()
_INVALID = object()


# --- typed configuration -------------------------------------------------


def _key(default: Any = _MISSING, *, kind: str, fix: str = "", **options: Any) -> Any:
    metadata = {"kind": kind, "fix": fix, **options}
    if default is _MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


# Key types a device certificate may carry; "rsa-N" accepts RSA keys of N bits or more.
KEY_TYPES = ("ec-p256", "ec-p384", "ec-p521", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519", "ed448")
DEVICE_ID_SOURCES = ("auto", "subject-serial", "hardware-module-name", "common-name")


@dataclass(frozen=True)
class LDevIDConfig:
    """A locally significant device identity (LDevID) issued by the owner, used for TLS instead of the IDevID.

    Its files are checked when the identity is loaded, not here: a gateway
    configured for an LDevID that is not enrolled yet still starts on its IDevID.
    """

    cert: Path = _key(kind="path", fix="point it at the LDevID certificate (PEM or DER)")
    key: Path = _key(kind="path", fix="point it at the LDevID private key")
    trust_anchors: Tuple[Path, ...] = _key(kind="files", fix="list the owner CA certificate files that issued the LDevID")
    key_passphrase_file: Optional[Path] = _key(None, kind="path?", fix="point it at a file that contains only the passphrase")
    key_passphrase_credential: Optional[str] = _key(None, kind="credential?")


@dataclass(frozen=True)
class IdentityConfig:
    """The device certificate (IDevID), its private key, the manufacturer trust anchors and the checks applied."""

    cert: Path = _key(Path("/etc/edge-agent/idevid.pem"), kind="file", fix="point it at the device certificate (PEM or DER)")
    key: Path = _key(Path("/etc/edge-agent/idevid.key"), kind="file", fix="point it at the device private key")
    trust_anchors: Tuple[Path, ...] = _key(
        (Path("/etc/edge-agent/manufacturer-ca.pem"),),
        kind="files",
        fix="list the manufacturer CA certificate files that issued the IDevID",
    )
    key_passphrase_file: Optional[Path] = _key(None, kind="file?", fix="point it at a file that contains only the passphrase")
    # The name of a systemd credential (LoadCredential=NAME:...) that contains the passphrase.
    key_passphrase_credential: Optional[str] = _key(None, kind="credential?")
    strict_time: bool = _key(False, kind="bool")
    key_types: Tuple[str, ...] = _key(("ec-p256", "ec-p384", "rsa-2048"), kind="choices", choices=KEY_TYPES)
    device_id_source: str = _key("auto", kind="enum", choices=DEVICE_ID_SOURCES)
    ldevid: Optional[LDevIDConfig] = _key(None, kind="table", section=LDevIDConfig)
    # "tpm": identity.key is a TSS2 PRIVATE KEY blob that only the TPM behind tpm_tcti can use.
    key_source: str = _key("file", kind="enum", choices=("file", "tpm"))
    tpm_tcti: str = _key("device:/dev/tpmrm0", kind="str", fix="set the TPM's TCTI, e.g. 'device:/dev/tpmrm0'")


@dataclass(frozen=True)
class BrokerConfig:
    """The MQTT broker, how its TLS chain is verified and which SPKI pins it must match."""

    host: str = _key(kind="host", fix="set the broker host name or IP address")
    pins: Tuple[Pin, ...] = _key(kind="pins")
    ca_file: Path = _key(kind="file", fix="point it at the CA bundle that issued the broker certificate")
    port: int = _key(8883, kind="int", min=1, max=65535)
    server_name: Optional[str] = _key(None, kind="host?", fix="set the name in the broker certificate")
    pins_expire: Optional[datetime.date] = _key(None, kind="date?")
    pins_on_expiry: str = _key("enforce", kind="enum", choices=("enforce", "ca-only"))
    pins_warn_days: int = _key(30, kind="int", min=0, max=3650)
    tls_min_version: str = _key("1.2", kind="enum", choices=("1.2", "1.3"))
    mqtt_version: str = _key("3.1.1", kind="enum", choices=("3.1.1", "5"))
    keepalive_s: int = _key(60, kind="int", min=5, max=65535)
    handshake_timeout_s: float = _key(10.0, kind="float", min=0.5, max=300.0)
    connack_timeout_s: float = _key(10.0, kind="float", min=0.5, max=300.0)

    @property
    def tls_server_name(self) -> str:
        return self.server_name or self.host

    @property
    def pin_set(self) -> PinSet:
        return PinSet(self.pins, self.pins_expire, self.pins_on_expiry, self.pins_warn_days)


@dataclass(frozen=True)
class TelemetryConfig:
    """How often readings are taken and under which topic prefix they are published."""

    interval_s: float = _key(30.0, kind="float", min=0.1, max=86400.0)
    topic_prefix: str = _key("edge", kind="topic")


@dataclass(frozen=True)
class SpoolConfig:
    """The on-flash queue of accepted telemetry and its bounds."""

    path: Path = _key(Path("/var/lib/edge-agent/spool.db"), kind="path")
    max_messages: int = _key(100_000, kind="int", min=10, max=100_000_000)
    max_bytes: int = _key(32 * 1024 * 1024, kind="int", min=64 * 1024, max=1 << 40)
    overflow: str = _key("drop-oldest", kind="enum", choices=("drop-oldest", "drop-newest"))
    inflight_window: int = _key(20, kind="int", min=1, max=1000)


@dataclass(frozen=True)
class ReconnectConfig:
    """Backoff between connection attempts: full jitter under a cap that doubles per failure.

    ``min_delay_s`` is the first cap, so after a broker restart a fleet's
    reconnects spread over that many seconds.
    """

    min_delay_s: float = _key(5.0, kind="float", min=0.05, max=3600.0)
    max_delay_s: float = _key(120.0, kind="float", min=0.1, max=86400.0)


@dataclass(frozen=True)
class ThermalConfig:
    """Temperature sources, governor thresholds and how much each state slows the periodic work."""

    sysfs_root: Path = _key(Path("/sys"), kind="path")
    sysfs_files: Tuple[str, ...] = _key(
        ("class/thermal/thermal_zone0/temp",),
        kind="relpaths",
        fix="write it relative to thermal.sysfs_root: 'class/thermal/thermal_zone0/temp' for /sys/class/thermal/thermal_zone0/temp",
    )
    sensors: Tuple[str, ...] = _key(("cpu_thermal", "cpu-thermal", "coretemp", "k10temp"), kind="strings")
    warm_c: float = _key(70.0, kind="float", min=0.0, max=150.0)
    hot_c: float = _key(80.0, kind="float", min=0.0, max=150.0)
    critical_c: float = _key(90.0, kind="float", min=0.0, max=150.0)
    hysteresis_c: float = _key(3.0, kind="float", min=0.0, max=20.0)
    verify_interval_s: float = _key(3600.0, kind="float", min=1.0, max=7 * 86400.0)
    warm_slowdown: float = _key(2.0, kind="float", min=1.0, max=1000.0)
    hot_slowdown: float = _key(6.0, kind="float", min=1.0, max=1000.0)
    critical_slowdown: float = _key(24.0, kind="float", min=1.0, max=1000.0)
    warm_reconnect_min_s: float = _key(5.0, kind="float", min=0.0, max=86400.0)
    hot_reconnect_min_s: float = _key(30.0, kind="float", min=0.0, max=86400.0)
    critical_reconnect_min_s: float = _key(120.0, kind="float", min=0.0, max=86400.0)


@dataclass(frozen=True)
class EntropyConfig:
    """Readiness of the kernel random generator before each TLS handshake."""

    proc_root: Path = _key(Path("/proc"), kind="path")
    min_entropy_bits: int = _key(256, kind="int", min=0, max=4096)
    wait_max_s: float = _key(60.0, kind="float", min=0.0, max=3600.0)


@dataclass(frozen=True)
class SerialConfig:
    """The UART that serves the read-only maintenance console."""

    port: str = _key("/dev/ttyS0", kind="str")
    baud: int = _key(115200, kind="int", min=300, max=4_000_000)
    enabled: bool = _key(False, kind="bool")


@dataclass(frozen=True)
class AgentConfig:
    """The effective configuration: the agent's file merged over its firmware profile."""

    source: Path
    profile: str
    profile_path: Path
    identity: IdentityConfig
    broker: BrokerConfig
    telemetry: TelemetryConfig
    spool: SpoolConfig
    reconnect: ReconnectConfig
    thermal: ThermalConfig
    entropy: EntropyConfig
    serial: SerialConfig
    device_id: Optional[str] = None
    log_level: str = "info"

    def to_dict(self) -> Dict[str, Any]:
        """Return the effective settings as plain data (no key material is ever part of them)."""
        return _plain(self)


SECTIONS: Dict[str, type] = {
    "identity": IdentityConfig,
    "broker": BrokerConfig,
    "telemetry": TelemetryConfig,
    "spool": SpoolConfig,
    "reconnect": ReconnectConfig,
    "thermal": ThermalConfig,
    "entropy": EntropyConfig,
    "serial": SerialConfig,
}
TOP_LEVEL_KEYS = ("profile", "device_id", "log_level")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _plain(value: Any) -> Any:
    if isinstance(value, Pin):
        return str(value)
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    return value


# --- validation ----------------------------------------------------------


class _Problems:
    """Collected validation errors, each tied to the file that set the value."""

    def __init__(self, origins: Mapping[str, Path], default_file: Path) -> None:
        self.lines: "list[str]" = []
        self.origins = origins
        self.default_file = default_file

    def add(self, key: str, problem: str, fix: str = "") -> None:
        source = self.origins.get(key, self.default_file)
        line = f"{source}: {key}: {problem}"
        if fix:
            line += f"; {fix}"
        self.lines.append(line)


def _convert(value: Any, key: str, meta: Mapping[str, Any], base_dir: Path, problems: _Problems) -> Any:
    kind = meta["kind"]
    fix = meta.get("fix", "")
    optional = kind.endswith("?")
    kind = kind.rstrip("?")

    if optional and value == "":
        return None

    converter = _CONVERTERS[kind]
    return converter(value, key, meta, base_dir, problems, fix)


def _type_name(value: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def _as_str(value, key, meta, base_dir, problems, fix):
    if not isinstance(value, str) or not value.strip():
        problems.add(key, f"expected a non-empty string, got {_type_name(value)} {value!r}", fix)
        return _INVALID
    return value.strip()


def _as_host(value, key, meta, base_dir, problems, fix):
    text = _as_str(value, key, meta, base_dir, problems, fix)
    if text is _INVALID:
        return text
    if any(ch.isspace() for ch in text) or "/" in text or "://" in text:
        problems.add(key, f"invalid host name {value!r}", "give a bare host name or IP address, without scheme or port")
        return _INVALID
    return text


def _as_bool(value, key, meta, base_dir, problems, fix):
    if not isinstance(value, bool):
        problems.add(key, f"expected true or false, got {_type_name(value)} {value!r}", "write true or false without quotes")
        return _INVALID
    return value


def _as_number(value, key, meta, problems, number_type):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (number_type is int and isinstance(value, float)):
        expected = "an integer" if number_type is int else "a number"
        problems.add(key, f"expected {expected}, got {_type_name(value)} {value!r}", "write the number without quotes")
        return _INVALID
    low, high = meta.get("min"), meta.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        problems.add(key, f"value {value!r} is out of range", f"use a value from {low} to {high}")
        return _INVALID
    return number_type(value)


def _as_int(value, key, meta, base_dir, problems, fix):
    return _as_number(value, key, meta, problems, int)


def _as_float(value, key, meta, base_dir, problems, fix):
    return _as_number(value, key, meta, problems, float)


def _as_enum(value, key, meta, base_dir, problems, fix):
    choices = meta["choices"]
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        problems.add(key, f"invalid value {value!r}", f"use one of {listed}")
        return _INVALID
    return value


def _as_path(value, key, meta, base_dir, problems, fix):
    text = _as_str(value, key, meta, base_dir, problems, fix or "give a file path")
    if text is _INVALID:
        return text
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else base_dir / path


def _as_file(value, key, meta, base_dir, problems, fix):
    # Existence is checked once the profile and the agent's file are merged,
    # because a profile's default location need not exist on every machine.
    return _as_path(value, key, meta, base_dir, problems, fix)


def _as_paths(value, key, meta, base_dir, problems, fix):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        problems.add(key, f"expected a non-empty list of file paths, got {_type_name(value)} {value!r}", fix)
        return _INVALID
    paths = [_as_path(item, f"{key}[{i}]", meta, base_dir, problems, fix) for i, item in enumerate(value)]
    return _INVALID if _INVALID in paths else tuple(paths)


def _as_strings(value, key, meta, base_dir, problems, fix):
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        problems.add(key, f"expected a list of non-empty strings, got {value!r}", fix or 'write ["a", "b"]')
        return _INVALID
    return tuple(value)


def _as_relative_paths(value, key, meta, base_dir, problems, fix):
    paths = _as_strings(value, key, meta, base_dir, problems, fix)
    if paths is _INVALID:
        return paths
    for index, text in enumerate(paths):
        if Path(text).is_absolute() or ".." in Path(text).parts:
            problems.add(f"{key}[{index}]", f"invalid path {text!r}: an absolute path or '..' is not allowed here", fix)
            return _INVALID
    return paths


def _as_date(value, key, meta, base_dir, problems, fix):
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    if isinstance(value, str):
        try:
            return datetime.date.fromisoformat(value)
        except ValueError:
            pass
    problems.add(key, f"invalid date {value!r}", "write a TOML date such as 2027-06-30")
    return _INVALID


def _as_topic(value, key, meta, base_dir, problems, fix):
    text = _as_str(value, key, meta, base_dir, problems, fix)
    if text is _INVALID:
        return text
    if any(ch in text for ch in "+#\0") or text.startswith(("$", "/")) or text.endswith("/") or "//" in text:
        problems.add(
            key,
            f"invalid topic prefix {value!r}",
            "use topic levels without '+', '#', a leading '$' or '/', an empty level or a trailing '/'",
        )
        return _INVALID
    return text


def _as_pins(value, key, meta, base_dir, problems, fix):
    if not isinstance(value, (list, str)):
        problems.add(key, f"expected a list of pins, got {_type_name(value)} {value!r}", 'write pins = ["sha256//...", "sha256//..."]')
        return _INVALID
    try:
        pins = parse_pin_list(value)
    except PinSyntaxError as exc:
        problems.add(key, str(exc))
        return _INVALID
    if len(pins) < 2:
        problems.add(
            key,
            f"at least two distinct pins are required, got {len(pins)}",
            "add a backup pin for a spare broker key (see 'edge-agent keygen'); with a single pin, "
            "losing or rotating the broker key locks every gateway out until someone reconfigures it by hand",
        )
        return _INVALID
    return pins


def _as_credential(value, key, meta, base_dir, problems, fix):
    text = _as_str(value, key, meta, base_dir, problems, fix)
    if text is _INVALID:
        return text
    if "/" in text or text in (".", ".."):
        problems.add(key, f"invalid credential name {value!r}", "use the NAME of LoadCredential=NAME:PATH in the unit, without '/'")
        return _INVALID
    return text


def _as_choices(value, key, meta, base_dir, problems, fix):
    choices = meta["choices"]
    listed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, list) or not value:
        problems.add(key, f"expected a non-empty list, got {_type_name(value)} {value!r}", f"list some of {listed}")
        return _INVALID
    unknown = [item for item in value if item not in choices]
    if unknown:
        problems.add(key, f"invalid value {unknown[0]!r}", f"use some of {listed}")
        return _INVALID
    return tuple(dict.fromkeys(value))


def _as_table(value, key, meta, base_dir, problems, fix):
    if not isinstance(value, dict):
        problems.add(key, f"expected a table, got {_type_name(value)} {value!r}", f"write it as a [{key}] section")
        return _INVALID
    # Every key of a nested table comes from the file that set the table.
    base_dirs = {f"{key}.{name}": base_dir for name in value}
    section = _build_section(meta["section"], key, value, base_dirs, problems)
    return _INVALID if section is None else section


_CONVERTERS: Dict[str, Callable[..., Any]] = {
    "str": _as_str,
    "host": _as_host,
    "bool": _as_bool,
    "int": _as_int,
    "float": _as_float,
    "enum": _as_enum,
    "path": _as_path,
    "file": _as_file,
    "files": _as_paths,
    "strings": _as_strings,
    "relpaths": _as_relative_paths,
    "date": _as_date,
    "topic": _as_topic,
    "pins": _as_pins,
    "credential": _as_credential,
    "choices": _as_choices,
    "table": _as_table,
}


def _build_section(
    cls: type, name: str, raw: Mapping[str, Any], base_dirs: Mapping[str, Path], problems: _Problems
) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: Dict[str, Any] = {}

    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"known keys are: {', '.join(fields)}"
            problems.add(f"{name}.{key}", "unknown key", fix)

    for field_name, spec in fields.items():
        dotted = f"{name}.{field_name}"
        if field_name in raw:
            converted = _convert(raw[field_name], dotted, spec.metadata, base_dirs.get(dotted, Path.cwd()), problems)
            if converted is not _INVALID:
                values[field_name] = converted
        elif spec.default is dataclasses.MISSING:
            problems.add(dotted, "missing required key", spec.metadata.get("fix", "") or "add it to the file")

    if problems.lines:
        return None
    return cls(**values)


# --- files and merging ---------------------------------------------------


def _read_toml(path: Path, what: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"{path}: {what} not found; create it or pass another file with --config"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: {what} is not readable by this user; fix its permissions"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: {what} is a directory, expected a TOML file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}; fix the syntax at that line"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None


def profile_search_path(config_dir: Optional[Path] = None) -> "list[Path]":
    """Return the folders searched for ``<profile>.toml``, in order."""
    folders: "list[Path]" = []
    if os.environ.get(PROFILE_DIR_ENV):
        folders.append(Path(os.environ[PROFILE_DIR_ENV]))
    if config_dir is not None:
        folders.append(config_dir / "firmware_profiles")
    folders.append(Path("/etc/edge-agent/firmware_profiles"))
    folders.append(Path(sys.prefix) / "share" / "edge-agent" / "firmware_profiles")
    # A source checkout or editable install keeps them beside the package.
    folders.append(Path(__file__).resolve().parent.parent / "firmware_profiles")
    return folders


def find_profile(name: str, config_dir: Optional[Path] = None) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError([f"profile: invalid profile name {name!r}; use a file name from firmware_profiles/ without '.toml'"])
    folders = profile_search_path(config_dir)
    for folder in folders:
        candidate = folder / f"{name}.toml"
        if candidate.is_file():
            return candidate
    available = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.toml")})
    hint = difflib.get_close_matches(name, available, n=1)
    fix = f"did you mean {hint[0]!r}?" if hint else f"available profiles: {', '.join(available) or 'none found'}"
    raise ConfigError([f"profile: firmware profile {name!r} not found in {', '.join(map(str, folders))}; {fix}"])


def _validate_profile_data(path: Path, data: Mapping[str, Any]) -> "list[str]":
    problems = _Problems({}, path)
    for section, body in data.items():
        if section == "profile":
            if not isinstance(body, dict):
                problems.add("profile", "expected a table with name and description")
                continue
            for key in body:
                if key not in ("name", "description", "arch"):
                    problems.add(f"profile.{key}", "unknown key", "known keys are: name, description, arch")
            continue
        if section not in PROFILE_SECTIONS:
            problems.add(section, "a firmware profile may not set this section", f"allowed sections: profile, {', '.join(PROFILE_SECTIONS)}")
            continue
        if not isinstance(body, dict):
            problems.add(section, f"expected a table, got {_type_name(body)}")
    return problems.lines


def load_profile(path: Path) -> Dict[str, Any]:
    """Read and validate one firmware profile on its own; return its raw sections."""
    data = _read_toml(path, "firmware profile")
    lines = _validate_profile_data(path, data)
    if lines:
        raise ConfigError(lines)

    problems = _Problems({}, path)
    for section in PROFILE_SECTIONS:
        if section in data:
            _check_section_values(SECTIONS[section], section, data[section], path.parent, problems)
    if problems.lines:
        raise ConfigError(problems.lines)
    _check_thermal_order(data.get("thermal", {}), path)
    return data


def _check_section_values(cls: type, name: str, raw: Mapping[str, Any], base_dir: Path, problems: _Problems) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            problems.add(f"{name}.{key}", "unknown key", f"did you mean '{hint[0]}'?" if hint else f"known keys are: {', '.join(fields)}")
            continue
        _convert(value, f"{name}.{key}", fields[key].metadata, base_dir, problems)


def _check_thermal_order(thermal: Mapping[str, Any], path: Path) -> None:
    warm = thermal.get("warm_c", ThermalConfig.warm_c)
    hot = thermal.get("hot_c", ThermalConfig.hot_c)
    critical = thermal.get("critical_c", ThermalConfig.critical_c)
    if not warm < hot < critical:
        raise ConfigError([
            f"{path}: thermal: thresholds must rise, got warm_c={warm}, hot_c={hot}, critical_c={critical}; "
            "set warm_c < hot_c < critical_c"
        ])

    # A hotter state may only slow work down further, never speed it up again.
    for suffix in ("slowdown", "reconnect_min_s"):
        names = [f"{state}_{suffix}" for state in ("warm", "hot", "critical")]
        values = [thermal.get(name, getattr(ThermalConfig, name)) for name in names]
        if not values[0] <= values[1] <= values[2]:
            got = ", ".join(f"{name}={value}" for name, value in zip(names, values))
            raise ConfigError([f"{path}: thermal: {got} must not decrease; set {' <= '.join(names)}"])


def load_config(path: Optional[Path] = None, check_files: bool = True) -> AgentConfig:
    """Load, merge and validate the agent's configuration; raise ``ConfigError`` listing every problem.

    ``check_files=False`` skips the existence and mode checks of the files the
    settings name, so that ``edge-agent diagnose`` can still examine them one by one.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    data = _read_toml(path, "configuration file")
    config_dir = path.resolve().parent

    top_problems = _Problems({}, path)
    for key, value in data.items():
        if key in SECTIONS or key in TOP_LEVEL_KEYS:
            if key in SECTIONS and not isinstance(value, dict):
                top_problems.add(key, f"expected a [{key}] table, got {_type_name(value)}")
            continue
        candidates = list(SECTIONS) + list(TOP_LEVEL_KEYS)
        hint = difflib.get_close_matches(key, candidates, n=1)
        top_problems.add(key, "unknown key or section", f"did you mean '{hint[0]}'?" if hint else f"known: {', '.join(candidates)}")

    profile_name = data.get("profile", DEFAULT_PROFILE)
    if not isinstance(profile_name, str):
        top_problems.add("profile", f"expected a profile name string, got {profile_name!r}")
        raise ConfigError(top_problems.lines)
    log_level = data.get("log_level", "info")
    if log_level not in LOG_LEVELS:
        top_problems.add("log_level", f"invalid value {log_level!r}", f"use one of {', '.join(LOG_LEVELS)}")
    device_id = data.get("device_id")
    if device_id is not None and (not isinstance(device_id, str) or not device_id.strip() or any(c in device_id for c in "+#/\0")):
        top_problems.add("device_id", f"invalid device id {device_id!r}", "use a non-empty string without '+', '#' or '/'")
    if top_problems.lines:
        raise ConfigError(top_problems.lines)

    try:
        profile_path = find_profile(profile_name, config_dir)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {line}" for line in exc.problems]) from None
    profile_data = load_profile(profile_path)

    merged, origins, base_dirs = _merge(profile_data, profile_path, data, path, config_dir)
    problems = _Problems(origins, path)
    sections = {name: _build_section(cls, name, merged.get(name, {}), base_dirs, problems) for name, cls in SECTIONS.items()}
    if problems.lines:
        raise ConfigError(problems.lines)

    _check_thermal_order(merged.get("thermal", {}), path)
    config = AgentConfig(
        source=path,
        profile=profile_name,
        profile_path=profile_path,
        device_id=device_id.strip() if device_id else None,
        log_level=log_level,
        **sections,
    )
    if check_files:
        _check_files(config, origins, path)
    return config


def _merge(
    profile: Mapping[str, Any], profile_path: Path, agent: Mapping[str, Any], agent_path: Path, agent_dir: Path
) -> "tuple[Dict[str, Dict[str, Any]], Dict[str, Path], Dict[str, Path]]":
    merged: Dict[str, Dict[str, Any]] = {}
    origins: Dict[str, Path] = {}
    base_dirs: Dict[str, Path] = {}
    for source, source_path, base_dir in ((profile, profile_path, profile_path.parent), (agent, agent_path, agent_dir)):
        for section in SECTIONS:
            body = source.get(section)
            if not isinstance(body, dict):
                continue
            for key, value in body.items():
                merged.setdefault(section, {})[key] = value
                origins[f"{section}.{key}"] = source_path
                base_dirs[f"{section}.{key}"] = base_dir
    return merged, origins, base_dirs


def _check_files(config: AgentConfig, origins: Mapping[str, Path], default_file: Path) -> None:
    problems = _Problems(origins, default_file)
    required = [
        ("identity.cert", config.identity.cert),
        ("identity.key", config.identity.key),
        ("broker.ca_file", config.broker.ca_file),
    ]
    required += [(f"identity.trust_anchors[{i}]", p) for i, p in enumerate(config.identity.trust_anchors)]
    if config.identity.key_passphrase_file is not None:
        required.append(("identity.key_passphrase_file", config.identity.key_passphrase_file))

    for key, path in required:
        origin_key = key.split("[", 1)[0]
        if not path.exists():
            problems.add(origin_key, f"file not found: {path}", "fix the path or install the file")
        elif not path.is_file():
            problems.add(origin_key, f"not a regular file: {path}", "point it at a file")
        elif not os.access(path, os.R_OK):
            problems.add(origin_key, f"file not readable by this user: {path}", "fix its owner or mode")

    for key, path in (("identity.key", config.identity.key), ("identity.key_passphrase_file", config.identity.key_passphrase_file)):
        if path is not None and path.is_file():
            message = secret_file_mode_problem(path)
            if message:
                problems.add(key, message)

    if problems.lines:
        raise ConfigError(problems.lines)


def _mode_rights(mode: int) -> str:
    rights = []
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        rights.append("read")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        rights.append("change")
    if mode & (stat.S_IXGRP | stat.S_IXOTH) and not rights:
        rights.append("execute")
    return " and ".join(rights) or "access"


def secret_file_mode_problem(path: Path) -> Optional[str]:
    """Describe why a key or passphrase file is too open, or return None when it is private."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f"{path} has mode {mode:04o}, so users other than its owner can {_mode_rights(mode)} it; "
            f"run 'chmod 600 {path}' (or 400)"
        )
    return None
