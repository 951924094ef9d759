"""CPU temperature and the thermal governor that stretches periodic work as the gateway heats up.

Readings come from the profile's sysfs files first (millidegrees Celsius,
read below a configurable root so tests can point it at a fake tree), then
from ``psutil.sensors_temperatures()`` by the sensor names the profile
prefers. A platform with neither reports ``None`` ("unavailable"), never 0,
and the governor then stays in the normal state.

The governor only ever delays work. It never skips or weakens a certificate
or pin check: a hot gateway connects later, never less safely.
"""

import logging
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional

from edge_agent.config import ThermalConfig

logger = logging.getLogger(__name__)

STATES = ("normal", "warm", "hot", "critical")

# Readings outside this range are sensor faults, not temperatures.
SANE_RANGE_C = (-40.0, 150.0)
# A reading this far from the running median is treated as a single spike.
SPIKE_DELTA_C = 20.0
_SMOOTHING_WINDOW = 5


def millidegrees_to_celsius(raw: float) -> float:
    """Convert a sysfs thermal reading; values above 1000 are millidegrees."""
    return raw / 1000.0 if abs(raw) >= 1000 else float(raw)


def _is_placeholder(value: float) -> bool:
    return value in (0.0, -273.15) or math.isnan(value) or math.isinf(value)


def _psutil_sensors() -> Dict[str, list]:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a runtime dependency
        return {}
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return {}
    try:
        return reader() or {}
    except (OSError, RuntimeError) as exc:
        logger.debug("psutil.sensors_temperatures failed: %s", exc)
        return {}


@dataclass(frozen=True)
class ThermalReading:
    """One raw temperature and where it came from."""

    celsius: float
    source: str


class TemperatureReader:
    """Reads one CPU temperature from the configured sources in order."""

    def __init__(self, settings: ThermalConfig, sensors: Callable[[], Dict[str, list]] = _psutil_sensors) -> None:
        self.settings = settings
        self._sensors = sensors

    def read(self) -> Optional[ThermalReading]:
        for relative in self.settings.sysfs_files:
            reading = self._read_sysfs(Path(self.settings.sysfs_root) / relative.lstrip("/"))
            if reading is not None:
                return reading
        return self._read_psutil()

    def _read_sysfs(self, path: Path) -> Optional[ThermalReading]:
        try:
            raw = float(path.read_text().strip())
        except (OSError, ValueError):
            return None
        celsius = millidegrees_to_celsius(raw)
        if not self._plausible(celsius):
            return None
        return ThermalReading(celsius, str(path))

    def _read_psutil(self) -> Optional[ThermalReading]:
        readings = self._sensors()
        for name in self.settings.sensors:
            for entry in readings.get(name, []):
                current = getattr(entry, "current", None)
                if isinstance(current, (int, float)) and self._plausible(float(current)):
                    return ThermalReading(float(current), f"psutil:{name}")
        return None

    @staticmethod
    def _plausible(celsius: float) -> bool:
        return not _is_placeholder(celsius) and SANE_RANGE_C[0] <= celsius <= SANE_RANGE_C[1]


class ThermalGovernor:
    """Smooths readings and moves between states with hysteresis.

    A state is entered when the smoothed temperature reaches its threshold
    and left only when it falls ``hysteresis_c`` below it, so a reading that
    hovers at a threshold does not flap.
    """

    def __init__(self, settings: ThermalConfig, reader: Optional[TemperatureReader] = None) -> None:
        self.settings = settings
        self.reader = reader or TemperatureReader(settings)
        self.state = "normal"
        self.temperature_c: Optional[float] = None
        self.source: Optional[str] = None
        self._window: Deque[float] = deque(maxlen=_SMOOTHING_WINDOW)
        self.transitions = 0

    def _thresholds(self) -> List[float]:
        return [self.settings.warm_c, self.settings.hot_c, self.settings.critical_c]

    def _accept(self, celsius: float) -> bool:
        if len(self._window) < 2:
            return True
        median = sorted(self._window)[len(self._window) // 2]
        return abs(celsius - median) < SPIKE_DELTA_C

    def update(self) -> str:
        """Take one reading and return the state it leads to."""
        reading = self.reader.read()
        if reading is None:
            if self.temperature_c is not None:
                logger.warning("temperature sensor %s no longer answers; thermal state stays %s", self.source, self.state)
            self.temperature_c = None
            self._window.clear()
            return self.state

        if not self._accept(reading.celsius):
            logger.debug("discarded temperature spike %.1f C from %s", reading.celsius, reading.source)
            # A spike is kept in the window so that a lasting change is accepted once it repeats.
            self._window.append(reading.celsius)
            return self.state

        self._window.append(reading.celsius)
        self.source = reading.source
        self.temperature_c = sum(self._window) / len(self._window)
        self._set_state(self._next_state(self.temperature_c))
        return self.state

    def _next_state(self, celsius: float) -> str:
        current = STATES.index(self.state)
        thresholds = self._thresholds()
        rising = 0
        for level, threshold in enumerate(thresholds, start=1):
            if celsius >= threshold:
                rising = level
        if rising > current:
            return STATES[rising]
        level = current
        while level > 0 and celsius < thresholds[level - 1] - self.settings.hysteresis_c:
            level -= 1
        return STATES[level]

    def _set_state(self, state: str) -> None:
        if state != self.state:
            logger.warning("thermal state %s -> %s at %.1f C (%s)", self.state, state, self.temperature_c, self.source)
            self.state = state
            self.transitions += 1

    @property
    def slowdown(self) -> float:
        """Factor applied to the verification interval and the minimum reconnect delay."""
        return {
            "normal": 1.0,
            "warm": self.settings.warm_slowdown,
            "hot": self.settings.hot_slowdown,
            "critical": self.settings.critical_slowdown,
        }[self.state]

    @property
    def verify_interval_s(self) -> float:
        return self.settings.verify_interval_s * self.slowdown

    def to_dict(self) -> dict:
        return {
            "state": self.state,
            "temperature_c": None if self.temperature_c is None else round(self.temperature_c, 1),
            "source": self.source,
            "available": self.temperature_c is not None,
            "slowdown": self.slowdown,
        }
