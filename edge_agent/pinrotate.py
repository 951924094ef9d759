"""Rolling the broker pin list forward before the broker changes its key.

The safe order is: add the pin of the broker's next key to every gateway,
switch the broker to that key, and only then drop the old pin. A rotation
adds pins and keeps the current ones until a drop is requested. It never
leaves fewer than two, and it gives the same result when run twice, so a
pipeline can run it on every deployment.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from edge_agent.config import _read_toml
from edge_agent.errors import EdgeAgentError, PinSyntaxError
from edge_agent.pinfiles import read_pin_sources
from edge_agent.pinning import Pin, parse_pin, parse_pin_list

# Fewer pins than this means no backup, and one lost key locks the fleet out.
MIN_PINS = 2


@dataclass(frozen=True)
class Rotation:
    """The pin list before and after one rotation, and what changed."""

    current: Tuple[Pin, ...]
    pins: Tuple[Pin, ...]
    added: Tuple[Pin, ...]
    already_present: Tuple[Pin, ...]
    dropped: Tuple[Pin, ...]
    already_absent: Tuple[Pin, ...]
    sources: Tuple[Tuple[Pin, str], ...]

    @property
    def changed(self) -> bool:
        return self.pins != self.current

    def to_dict(self) -> dict:
        return {
            "pins": [str(pin) for pin in self.pins],
            "previous": [str(pin) for pin in self.current],
            "added": [str(pin) for pin in self.added],
            "already_present": [str(pin) for pin in self.already_present],
            "dropped": [str(pin) for pin in self.dropped],
            "already_absent": [str(pin) for pin in self.already_absent],
            "sources": [{"pin": str(pin), "source": source} for pin, source in self.sources],
            "changed": self.changed,
        }

    def summary(self) -> str:
        parts = [f"{len(self.pins)} pins"]
        for label, pins in (
            ("added", self.added), ("already present", self.already_present),
            ("dropped", self.dropped), ("already absent", self.already_absent),
        ):
            if pins:
                parts.append(f"{label}: {', '.join(map(str, pins))}")
        if not self.changed:
            parts.append("no change")
        return "; ".join(parts)


def read_configured_pins(path: Path) -> Tuple[Pin, ...]:
    """Read ``broker.pins`` from an agent configuration file.

    Only that key is read and checked, because a pipeline runs this on a
    machine where the gateway's certificate and key files do not exist.
    """
    data = _read_toml(path, "configuration file")
    broker = data.get("broker")
    if not isinstance(broker, dict) or "pins" not in broker:
        raise EdgeAgentError(f"{path}: broker.pins: missing; add pins = [\"sha256//...\", \"sha256//...\"] to [broker]")
    value = broker["pins"]
    if not isinstance(value, (list, str)):
        raise EdgeAgentError(f"{path}: broker.pins: expected a list of pins, got {value!r}")
    try:
        return parse_pin_list(value)
    except PinSyntaxError as exc:
        raise EdgeAgentError(f"{path}: broker.pins: {exc}") from None


def pin_to_add(spec: str) -> Tuple[Pin, str]:
    """Return the pin named by ``spec`` and where it came from.

    ``spec`` is a pin (``sha256//...``) or a file with exactly one
    certificate, public key, private key or CSR: a bundle would add the pins
    of its CA certificates too, which is seldom meant.
    """
    if spec.lower().startswith(("sha256/", "sha1/", "pin-sha256")):
        return parse_pin(spec), "given on the command line"

    path = Path(spec)
    sources = read_pin_sources(path)
    if len(sources) > 1:
        listed = "; ".join(f"{source.description} {source.pin}" for source in sources)
        raise EdgeAgentError(
            f"{path}: contains {len(sources)} certificates or keys ({listed}); --add takes one: "
            "pass the leaf certificate alone, or the pin itself"
        )
    return sources[0].pin, f"{path}: {sources[0].description}"


def rotate_pins(current: Sequence[Pin], additions: Sequence[Tuple[Pin, str]], drops: Sequence[Pin]) -> Rotation:
    """Add the new pins after the current ones, then remove ``drops``.

    A pin already present is kept in place, and dropping a pin that is
    already gone does nothing, so running the same rotation twice gives the
    same list. Raises ``EdgeAgentError`` when a pin is both added and
    dropped, or when fewer than ``MIN_PINS`` pins would remain.
    """
    first_source: Dict[Pin, str] = {}
    for pin, source in additions:
        first_source.setdefault(pin, source)
    additions = list(first_source.items())
    drops = list(dict.fromkeys(drops))
    added_pins = [pin for pin, _ in additions]
    both = [pin for pin in drops if pin in added_pins]
    if both:
        raise EdgeAgentError(f"pin {both[0]} is given to both --add and --drop; keep one of them")

    result: List[Pin] = [pin for pin in current if pin not in drops]
    added: List[Pin] = []
    present: List[Pin] = []
    for pin in added_pins:
        if pin in current:
            present.append(pin)
        elif pin not in result:
            result.append(pin)
            added.append(pin)

    if len(result) < MIN_PINS:
        raise EdgeAgentError(
            f"the rotation would leave {len(result)} pin(s) ({', '.join(map(str, result)) or 'none'}); at least "
            f"{MIN_PINS} are required so that a backup key remains: add the next key's pin with --add before "
            "dropping the current one"
        )

    return Rotation(
        current=tuple(current),
        pins=tuple(result),
        added=tuple(added),
        already_present=tuple(present),
        dropped=tuple(pin for pin in drops if pin in current),
        already_absent=tuple(pin for pin in drops if pin not in current),
        sources=tuple(additions),
    )
