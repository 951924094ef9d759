"""Output formats of ``edge-agent pin``: curl, hex, JSON, Android and TOML.

- ``curl``: ``sha256//<base64>``, what ``curl --pinnedpubkey`` and ``broker.pins`` take;
- ``hex``: the SHA-256 digest in lower-case hex, for tools that compare hex;
- ``json``: one document with every field, for scripts and pipelines;
- ``android``: a ``<pin-set>`` element for an Android ``network_security_config``,
  with ``<pin digest="SHA-256">`` children and the optional ``expiration`` date;
- ``toml``: a ``pins = [...]`` line to paste into the ``[broker]`` table.
"""

import datetime
import json
from typing import Iterable, List, Optional, Sequence, Tuple
from xml.sax.saxutils import quoteattr

from edge_agent.chainprobe import ChainCertificate, ProbeResult
from edge_agent.pinfiles import PinSource
from edge_agent.pinning import Pin

FORMATS = ("curl", "hex", "json", "android", "toml")


def pin_text(pin: Pin, fmt: str) -> str:
    return pin.hex if fmt == "hex" else str(pin)


def android_pin_set(entries: Iterable[Tuple[Pin, str]], expires: Optional[datetime.date] = None) -> str:
    """Render ``<pin-set>`` with one ``<pin>`` per (pin, comment); the comment names its source."""
    attribute = "" if expires is None else f" expiration={quoteattr(expires.isoformat())}"
    lines = [f"<pin-set{attribute}>"]
    for pin, comment in entries:
        if comment:
            # "--" may not appear inside an XML comment.
            lines.append(f"    <!-- {comment.replace('--', '- -')} -->")
        lines.append(f'    <pin digest="SHA-256">{pin.digest_base64}</pin>')
    lines.append("</pin-set>")
    return "\n".join(lines)


def toml_pin_list(pins: Sequence[Pin]) -> str:
    return "pins = [" + ", ".join(f'"{pin}"' for pin in pins) + "]"


# --- pins of files -------------------------------------------------------


def format_sources(sources: Sequence[PinSource], fmt: str, expires: Optional[datetime.date] = None) -> str:
    """Render the pins found in files: one line each, or one JSON, XML or TOML document."""
    if fmt == "json":
        return json.dumps([source.to_dict() for source in sources], indent=2)
    if fmt == "android":
        return android_pin_set(((s.pin, f"{s.path}: {s.description}") for s in sources), expires)
    if fmt == "toml":
        return toml_pin_list(_unique(source.pin for source in sources))
    return "\n".join(f"{pin_text(source.pin, fmt)}  {source.path}: {source.description}" for source in sources)


def _unique(pins: Iterable[Pin]) -> List[Pin]:
    unique: List[Pin] = []
    for pin in pins:
        if pin not in unique:
            unique.append(pin)
    return unique


# --- a probed chain ------------------------------------------------------


def format_probe(result: ProbeResult, fmt: str, expires: Optional[datetime.date] = None) -> str:
    """Render what ``edge-agent pin --connect`` found."""
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2)
    if fmt == "android":
        entries = ((c.pin, f"{_place(c)}: {c.subject}") for c in result.certificates)
        return android_pin_set(entries, expires if expires is not None else _pin_set_expiry(result))
    if fmt == "toml":
        return toml_pin_list(_unique(c.pin for c in result.certificates))
    return "\n".join(_probe_lines(result, fmt))


def _pin_set_expiry(result: ProbeResult) -> Optional[datetime.date]:
    return None if result.pin_set is None else result.pin_set.expires


def _probe_lines(result: ProbeResult, fmt: str) -> List[str]:
    lines = [
        f"server {result.host}:{result.port}, TLS server name {result.server_name}, "
        f"{result.tls_version or 'no TLS session'}",
    ]
    if result.verified:
        lines.append(f"chain verified against {result.ca_file}")
    elif result.chain_rejected:
        lines.append(f"chain NOT verified against {result.ca_file}: {result.failure}")
    else:
        lines.append(f"TLS handshake failed: {result.failure}")
    if result.pin_set is not None:
        lines.append(_pin_set_line(result))
    lines.extend(f"note: {note}" for note in result.notes)

    for certificate in result.certificates:
        lines.append("")
        lines.extend(_certificate_lines(certificate, result, fmt))

    lines.append("")
    lines.append(f"result: {result.verdict}")
    lines.extend(f"warning: {warning}" for warning in result.warnings())
    return lines


def _pin_set_line(result: ProbeResult) -> str:
    pin_set = result.pin_set
    line = f"pin-set: {len(pin_set.pins)} pins"
    if pin_set.expires is None:
        return line + ", no expiry date"
    return line + f", expires {pin_set.expires.isoformat()} (on expiry: {pin_set.on_expiry})"


def _place(certificate: ChainCertificate) -> str:
    if certificate.position is None:
        return "trust anchor from the CA file (not sent by the server)"
    return f"position {certificate.position}"


def _certificate_lines(certificate: ChainCertificate, result: ProbeResult, fmt: str) -> List[str]:
    if certificate.position is None:
        heading = _place(certificate)
    elif certificate.in_verified_chain:
        heading = f"position {certificate.position} (sent by the server, in the verified chain)"
    elif result.verified:
        heading = f"position {certificate.position} (sent by the server, NOT in the verified chain)"
    else:
        heading = f"position {certificate.position} (sent by the server, unverified)"
    return [
        heading,
        f"  subject  {certificate.subject}",
        f"  issuer   {certificate.issuer}",
        f"  expires  {_expiry_text(certificate)}",
        f"  pin      {pin_text(certificate.pin, fmt)}",
        f"  matches  {_match_text(certificate, result)}",
    ]


def _expiry_text(certificate: ChainCertificate) -> str:
    if certificate.never_expires:
        return "never (notAfter 99991231235959Z)"
    if certificate.not_after is None:
        return "unknown"
    days = (certificate.not_after - datetime.datetime.now(datetime.timezone.utc)).days
    when = certificate.not_after.isoformat()
    if days < 0:
        return f"{when} (EXPIRED {-days} days ago)"
    return f"{when} (in {days} days)"


def _match_text(certificate: ChainCertificate, result: ProbeResult) -> str:
    if result.pin_set is None:
        return "not checked (no --config)"
    if certificate.pin_index is None:
        return "no configured pin"
    if certificate.in_verified_chain:
        return f"broker.pins[{certificate.pin_index}]"
    return f"broker.pins[{certificate.pin_index}], but outside the verified chain: it does not count"
