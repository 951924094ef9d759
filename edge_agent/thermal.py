"""CPU temperature and the thermal governor that paces periodic work as the gateway heats up.

Readings come from the profile's sysfs files first (read below
``thermal.sysfs_root`` so that tests can point it at a fake tree), then from
``psutil.sensors_temperatures()`` by the sensor names the profile prefers.
A platform with neither (VMs, containers, macOS) reports ``None``
("unavailable"), never 0, and the governor keeps the normal schedule.

The governor only ever delays work. It never skips or weakens a certificate
or pin check: a hot gateway connects later, never less safely.
"""

import datetime
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Tuple

from edge_agent.config import ThermalConfig

logger = logging.getLogger(__name__)

STATES = ("normal", "warm", "hot", "critical")

# Readings outside this range are sensor faults, not temperatures: silicon in
# service stays well inside it, and -40 C is the lower bound of industrial parts.
SANE_RANGE_C = (-40.0, 150.0)
# Values that drivers report when a sensor is absent or not yet sampled.
PLACEHOLDERS_C = (0.0, -273.15)
# A reading this far from the smoothed temperature is held back as a possible
# spike and accepted only when the next reading confirms the new level.
SPIKE_DELTA_C = 20.0
# Accepted readings averaged into the temperature the states are decided on.
SMOOTHING_WINDOW = 5
# Consecutive reads without any reading before the temperature is reported
# unavailable; fewer are treated as a transient read error.
MISSING_READS_LIMIT = 3

SensorReader = Callable[[], Dict[str, list]]


def millidegrees_to_celsius(raw: int) -> float:
    """Convert a sysfs temperature: thermal zones and hwmon ``temp*_input`` report millidegrees Celsius."""
    return raw / 1000.0


def sanitise_celsius(value: object) -> Optional[float]:
    """Return ``value`` as Celsius, or None for a non-number, a placeholder or a value out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    celsius = float(value)
    if not math.isfinite(celsius) or celsius in PLACEHOLDERS_C:
        return None
    if not SANE_RANGE_C[0] <= celsius <= SANE_RANGE_C[1]:
        return None
    return celsius


def psutil_sensors() -> Dict[str, list]:
    """Call ``psutil.sensors_temperatures()``; return ``{}`` where psutil has no sensor support."""
    import psutil

    # macOS and Windows builds of psutil have no sensors_temperatures at all.
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return {}
    try:
        return read() or {}
    except (OSError, RuntimeError, ValueError) as exc:
        logger.debug("psutil.sensors_temperatures() failed: %s", exc)
        return {}


@dataclass(frozen=True)
class ThermalReading:
    """One sanitised temperature in Celsius and the source it came from."""

    celsius: float
    source: str


class TemperatureReader:
    """Reads one CPU temperature from the configured sources, in profile order."""

    def __init__(self, settings: ThermalConfig, sensors: Optional[SensorReader] = None) -> None:
        self.settings = settings
        self._sensors = sensors or psutil_sensors
        self.discarded = 0

    def sources(self) -> List[str]:
        """Return the sources in the order they are tried, as they appear in ``ThermalReading.source``."""
        files = [str(self._sysfs_path(relative)) for relative in self.settings.sysfs_files]
        return files + [f"psutil:{name}" for name in self.settings.sensors]

    def read(self) -> Optional[ThermalReading]:
        """Return the first plausible reading, or None when no source has one."""
        for relative in self.settings.sysfs_files:
            reading = self._read_sysfs(self._sysfs_path(relative))
            if reading is not None:
                return reading
        return self._read_psutil()

    def _sysfs_path(self, relative: str) -> Path:
        return Path(self.settings.sysfs_root) / relative

    def _read_sysfs(self, path: Path) -> Optional[ThermalReading]:
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            # A missing file, or a driver that returns EINVAL or ENODATA while the sensor sleeps.
            return None
        try:
            raw = int(text)
        except ValueError:
            logger.debug("discarded non-numeric temperature %r from %s", text[:40], path)
            self.discarded += 1
            return None
        celsius = sanitise_celsius(millidegrees_to_celsius(raw))
        if celsius is None:
            logger.debug("discarded implausible temperature %r from %s", text, path)
            self.discarded += 1
            return None
        return ThermalReading(celsius, str(path))

    def _read_psutil(self) -> Optional[ThermalReading]:
        found = self._sensors()
        for name in self.settings.sensors:
            for entry in found.get(name) or []:
                # psutil has already converted to Celsius; only the sanity checks apply here.
                celsius = sanitise_celsius(getattr(entry, "current", None))
                if celsius is not None:
                    return ThermalReading(celsius, f"psutil:{name}")
                logger.debug("discarded implausible temperature %r from psutil:%s", getattr(entry, "current", None), name)
                self.discarded += 1
        return None


class SmoothingFilter:
    """Averages the last readings of one source and drops single spikes."""

    def __init__(self) -> None:
        self._window: Deque[float] = deque(maxlen=SMOOTHING_WINDOW)
        self._candidate: Optional[float] = None
        self.discarded = 0

    @property
    def value(self) -> Optional[float]:
        if not self._window:
            return None
        return sum(self._window) / len(self._window)

    def reset(self) -> None:
        self._window.clear()
        self._candidate = None

    def add(self, celsius: float) -> bool:
        """Add a reading; return False when it is held back as a possible spike."""
        current = self.value
        if current is None or abs(celsius - current) < SPIKE_DELTA_C:
            self._window.append(celsius)
            self._candidate = None
            return True

        if self._candidate is not None and abs(celsius - self._candidate) < SPIKE_DELTA_C:
            # Two readings in a row at the new level: a real change, so the average restarts there.
            self._window.clear()
            self._window.extend((self._candidate, celsius))
            self._candidate = None
            return True

        self._candidate = celsius
        self.discarded += 1
        return False


@dataclass(frozen=True)
class StatePolicy:
    """The schedule of one thermal state: its verification interval and the minimum gap between reconnect attempts."""

    state: str
    enter_c: Optional[float]
    verify_interval_s: float
    reconnect_min_s: float
    slowdown: float


def state_policies(settings: ThermalConfig) -> Tuple[StatePolicy, ...]:
    """Return the policy of each state in ``STATES`` order, from the profile's thresholds and factors."""
    base = settings.verify_interval_s
    return (
        StatePolicy("normal", None, base, 0.0, 1.0),
        StatePolicy("warm", settings.warm_c, base * settings.warm_slowdown, settings.warm_reconnect_min_s, settings.warm_slowdown),
        StatePolicy("hot", settings.hot_c, base * settings.hot_slowdown, settings.hot_reconnect_min_s, settings.hot_slowdown),
        StatePolicy(
            "critical", settings.critical_c, base * settings.critical_slowdown,
            settings.critical_reconnect_min_s, settings.critical_slowdown,
        ),
    )


class ThermalGovernor:
    """Smooths readings and moves between states with hysteresis.

    A state is entered when the smoothed temperature reaches its threshold
    and left only when it falls ``hysteresis_c`` below it, so a temperature
    that hovers at a threshold does not flap. Without a temperature the
    state is normal, which is the schedule of a gateway without sensors.
    """

    def __init__(
        self,
        settings: ThermalConfig,
        reader: Optional[TemperatureReader] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.reader = reader or TemperatureReader(settings)
        self._clock = clock
        self._filter = SmoothingFilter()
        self._missing_reads = 0
        self._reported_absent = False
        self.state = "normal"
        self.state_since = clock()
        self.temperature_c: Optional[float] = None
        self.source: Optional[str] = None
        self.transitions = 0

    # --- readings ---------------------------------------------------------

    def update(self) -> str:
        """Take one reading and return the state it leads to."""
        reading = self.reader.read()
        if reading is None:
            self._on_missing_reading()
            return self.state
        self._missing_reads = 0

        if reading.source != self.source:
            self._on_new_source(reading.source)
        if not self._filter.add(reading.celsius):
            logger.debug("held back temperature spike %.1f C from %s", reading.celsius, reading.source)
            return self.state

        self.temperature_c = self._filter.value
        self._set_state(self._next_state(self.temperature_c))
        return self.state

    def _on_new_source(self, source: str) -> None:
        if self.source is None:
            logger.info("reading the CPU temperature from %s", source)
        else:
            logger.warning("CPU temperature source changed from %s to %s", self.source, source)
        self._reported_absent = False
        self.source = source
        # Averaging two different sensors would mix their offsets.
        self._filter.reset()

    def _on_missing_reading(self) -> None:
        self._missing_reads += 1
        if self.source is None:
            if not self._reported_absent:
                logger.info(
                    "no CPU temperature sensor returned a plausible reading (tried %s); the thermal state stays normal",
                    ", ".join(self.reader.sources()) or "no sources",
                )
                self._reported_absent = True
            return
        if self._missing_reads < MISSING_READS_LIMIT:
            return

        logger.warning(
            "temperature sensor %s gave no plausible reading %d times in a row; temperature unavailable, normal schedule",
            self.source, self._missing_reads,
        )
        self.source = None
        self.temperature_c = None
        self._reported_absent = True
        self._filter.reset()
        self._set_state("normal")

    # --- states -----------------------------------------------------------

    def _next_state(self, celsius: float) -> str:
        policies = state_policies(self.settings)
        current = STATES.index(self.state)

        reached = 0
        for level, policy in enumerate(policies[1:], start=1):
            if celsius >= policy.enter_c:
                reached = level
        if reached > current:
            return STATES[reached]

        level = current
        while level > 0 and celsius < policies[level].enter_c - self.settings.hysteresis_c:
            level -= 1
        return STATES[level]

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        previous, self.state = self.state, state
        self.state_since = self._clock()
        self.transitions += 1
        policy = self.policy
        temperature = "unavailable" if self.temperature_c is None else f"{self.temperature_c:.1f} C"
        rising = STATES.index(state) > STATES.index(previous)
        logger.log(
            logging.WARNING if rising else logging.INFO,
            "thermal state %s -> %s at %s (%s): verification every %.0f s, reconnect attempts at least %.0f s apart",
            previous, state, temperature, self.source or "no sensor", policy.verify_interval_s, policy.reconnect_min_s,
        )

    # --- the schedule each state sets -------------------------------------

    @property
    def policy(self) -> StatePolicy:
        return state_policies(self.settings)[STATES.index(self.state)]

    @property
    def slowdown(self) -> float:
        """Factor on the normal verification interval in the current state."""
        return self.policy.slowdown

    @property
    def verify_interval_s(self) -> float:
        return self.policy.verify_interval_s

    @property
    def reconnect_min_s(self) -> float:
        return self.policy.reconnect_min_s

    def pace_reconnect(self, delay_s: float) -> float:
        """Return the delay before the next connection attempt: ``delay_s``, raised to the state's minimum."""
        return max(delay_s, self.policy.reconnect_min_s)

    def to_dict(self) -> dict:
        """Return the state for telemetry and ``diagnose``; ``temperature_c`` is None when unavailable."""
        since = datetime.datetime.fromtimestamp(self.state_since, datetime.timezone.utc)
        return {
            "state": self.state,
            "available": self.temperature_c is not None,
            "temperature_c": None if self.temperature_c is None else round(self.temperature_c, 1),
            "source": self.source,
            "state_since": since.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "transitions": self.transitions,
            "slowdown": self.slowdown,
            "verify_interval_s": self.verify_interval_s,
            "reconnect_min_s": self.reconnect_min_s,
            "discarded_readings": getattr(self.reader, "discarded", 0) + self._filter.discarded,
        }
