"""Temperature sources, sanitising, the thermal governor and the verification schedule it sets.

Sensors are the one thing this machine cannot provide: sysfs is a fake tree
under ``thermal.sysfs_root`` and psutil's ``sensors_temperatures`` is mocked.
Time is a plain number the tests advance.
"""

import collections
import dataclasses
from pathlib import Path

import psutil
import pytest

from edge_agent.config import ThermalConfig, load_config
from edge_agent.errors import ConfigError
from edge_agent.thermal import (
    MISSING_READS_LIMIT,
    SmoothingFilter,
    TemperatureReader,
    ThermalGovernor,
    millidegrees_to_celsius,
    sanitise_celsius,
)
from edge_agent.verify import VerificationSchedule
from fakehw import FakeSysfs

# psutil's own record type is private; this one has the same fields.
shwtemp = collections.namedtuple("shwtemp", "label current high critical")


@pytest.fixture
def sysfs(tmp_path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "sys")


@pytest.fixture
def no_psutil_sensors(mocker):
    return mocker.patch("psutil.sensors_temperatures", return_value={})


def profile_thermal(write_config, profile: str, sysfs: FakeSysfs) -> ThermalConfig:
    """Load a firmware profile's thermal settings with sysfs_root pointed at the fake tree."""
    path = write_config(top={"profile": profile}, thermal={"sysfs_root": str(sysfs.root)})
    return load_config(path).thermal


def settings_for(sysfs: FakeSysfs, **overrides) -> ThermalConfig:
    return ThermalConfig(sysfs_root=sysfs.root, **overrides)


def set_temperature(path: Path, celsius: float) -> None:
    path.write_text(f"{int(round(celsius * 1000))}\n")


# --- reading -----------------------------------------------------------------


def test_raspberry_pi_reads_sysfs_zone(sysfs, write_config, mocker):
    sysfs.zone(0, "cpu-thermal", "48312")
    sensors = mocker.patch("psutil.sensors_temperatures", return_value={"cpu_thermal": [shwtemp("", 61.0, None, None)]})
    reader = TemperatureReader(profile_thermal(write_config, "raspberry-pi-4", sysfs))

    reading = reader.read()

    assert reading.celsius == 48.312
    assert reading.source == str(sysfs.root / "class/thermal/thermal_zone0/temp")
    sensors.assert_not_called()


def test_raspberry_pi_falls_back_to_psutil(sysfs, write_config, mocker):
    mocker.patch("psutil.sensors_temperatures", return_value={"cpu_thermal": [shwtemp("", 52.6, None, None)]})
    reader = TemperatureReader(profile_thermal(write_config, "raspberry-pi-4", sysfs))

    reading = reader.read()

    assert reading.celsius == 52.6
    assert reading.source == "psutil:cpu_thermal"


def test_x86_coretemp_by_preferred_name(sysfs, write_config, mocker):
    sysfs.zone(0, "acpitz", "0")  # an ACPI zone that only ever reports the 0 placeholder
    mocker.patch("psutil.sensors_temperatures", return_value={
        "acpitz": [shwtemp("", 27.8, None, None)],
        "nvme": [shwtemp("Composite", 38.9, 84.8, 84.8)],
        "coretemp": [
            shwtemp("Package id 0", 63.0, 100.0, 100.0),
            shwtemp("Core 0", 61.0, 100.0, 100.0),
        ],
    })
    reader = TemperatureReader(profile_thermal(write_config, "generic-linux", sysfs))

    reading = reader.read()

    assert reading.source == "psutil:coretemp"
    assert reading.celsius == 63.0


def test_no_sensors_reads_none(sysfs, write_config, no_psutil_sensors):
    reader = TemperatureReader(profile_thermal(write_config, "generic-linux", sysfs))

    assert reader.read() is None


def test_psutil_without_sensor_support(sysfs, monkeypatch):
    # macOS and Windows builds of psutil lack the function entirely.
    monkeypatch.delattr(psutil, "sensors_temperatures", raising=False)
    reader = TemperatureReader(settings_for(sysfs))

    assert reader.read() is None


def test_no_sensors_governor_unavailable(sysfs, no_psutil_sensors):
    governor = ThermalGovernor(settings_for(sysfs))

    for _ in range(MISSING_READS_LIMIT + 1):
        state = governor.update()
    report = governor.to_dict()

    assert state == "normal"
    assert report["available"] is False
    assert report["temperature_c"] is None
    assert report["verify_interval_s"] == ThermalConfig().verify_interval_s
    assert report["reconnect_min_s"] == 0.0


@pytest.mark.parametrize("raw", ["-273150", "0", "garbage", "", "45.5", "200000", "-60000", "nan"])
def test_garbage_sysfs_values_discarded(sysfs, no_psutil_sensors, raw):
    sysfs.zone(0, "cpu-thermal", raw)
    reader = TemperatureReader(settings_for(sysfs))

    assert reader.read() is None
    assert reader.discarded == 1


def test_garbage_psutil_values_skipped(sysfs, mocker):
    mocker.patch("psutil.sensors_temperatures", return_value={
        "coretemp": [
            shwtemp("Package id 0", -273.15, None, None),
            shwtemp("Core 0", 0.0, None, None),
            shwtemp("Core 1", float("nan"), None, None),
            shwtemp("Core 2", 512.0, None, None),
            shwtemp("Core 3", None, None, None),
            shwtemp("Core 4", 57.0, None, None),
        ],
    })
    reader = TemperatureReader(settings_for(sysfs, sensors=("coretemp",)))

    reading = reader.read()

    assert reading.celsius == 57.0
    assert reader.discarded == 5


def test_sanitise_rejects_placeholders():
    assert sanitise_celsius(-273.15) is None
    assert sanitise_celsius(0.0) is None
    assert sanitise_celsius(float("inf")) is None
    assert sanitise_celsius(True) is None
    assert sanitise_celsius("45") is None
    assert sanitise_celsius(151.0) is None
    assert sanitise_celsius(-41.0) is None
    assert sanitise_celsius(-12.5) == -12.5
    assert sanitise_celsius(45) == 45.0


def test_millidegrees_always_divided():
    # A cold sensor reports small millidegree values; they are never taken as whole degrees.
    assert millidegrees_to_celsius(500) == 0.5
    assert millidegrees_to_celsius(48312) == 48.312
    assert millidegrees_to_celsius(-5000) == -5.0


def test_sensor_disappears_then_unavailable(sysfs, no_psutil_sensors, caplog):
    path = sysfs.zone(0, "cpu-thermal", "85000")
    governor = ThermalGovernor(settings_for(sysfs))
    assert governor.update() == "hot"

    path.unlink()
    for _ in range(MISSING_READS_LIMIT - 1):
        governor.update()
    assert governor.state == "hot"
    assert governor.to_dict()["available"] is True

    governor.update()
    report = governor.to_dict()

    assert report["state"] == "normal"
    assert report["available"] is False
    assert report["temperature_c"] is None
    assert "gave no plausible reading" in caplog.text


def test_psutil_sensor_disappears(sysfs, mocker):
    sensors = mocker.patch("psutil.sensors_temperatures", return_value={"k10temp": [shwtemp("Tctl", 71.5, None, None)]})
    governor = ThermalGovernor(settings_for(sysfs, sensors=("k10temp",)))
    assert governor.update() == "warm"

    sensors.return_value = {}
    for _ in range(MISSING_READS_LIMIT):
        governor.update()

    assert governor.state == "normal"
    assert governor.to_dict()["available"] is False
    assert governor.to_dict()["source"] is None


def test_sensor_disappears_falls_back(sysfs, mocker, caplog):
    path = sysfs.zone(0, "x86_pkg_temp", "60000")
    mocker.patch("psutil.sensors_temperatures", return_value={"coretemp": [shwtemp("Package id 0", 58.0, None, None)]})
    governor = ThermalGovernor(settings_for(sysfs))
    governor.update()

    path.unlink()
    governor.update()

    assert governor.source == "psutil:coretemp"
    assert governor.temperature_c == 58.0
    assert "source changed" in caplog.text


# --- smoothing -----------------------------------------------------------------


def test_single_spike_discarded():
    smoothing = SmoothingFilter()
    for value in (50.0, 51.0, 50.0):
        smoothing.add(value)

    assert smoothing.add(125.0) is False
    smoothing.add(50.0)

    assert smoothing.value == pytest.approx(50.25)
    assert smoothing.discarded == 1


def test_confirmed_jump_accepted():
    smoothing = SmoothingFilter()
    for value in (50.0, 50.0, 50.0):
        smoothing.add(value)

    assert smoothing.add(80.0) is False
    assert smoothing.add(81.0) is True
    assert smoothing.value == pytest.approx(80.5)


def test_one_reading_does_not_flip(sysfs, no_psutil_sensors):
    path = sysfs.zone(0, "cpu-thermal", "60000")
    governor = ThermalGovernor(settings_for(sysfs))
    for _ in range(5):
        governor.update()

    set_temperature(path, 78.0)
    governor.update()

    assert governor.state == "normal"


def test_spike_does_not_change_state(sysfs, no_psutil_sensors):
    path = sysfs.zone(0, "cpu-thermal", "60000")
    governor = ThermalGovernor(settings_for(sysfs))
    governor.update()

    set_temperature(path, 140.0)
    governor.update()
    set_temperature(path, 60.0)
    governor.update()

    assert governor.state == "normal"
    assert governor.temperature_c == 60.0


# --- states and hysteresis ------------------------------------------------------


def ramp(start: float, stop: float, step: float):
    value = start
    while (step > 0 and value <= stop) or (step < 0 and value >= stop):
        yield value
        value += step


def test_ramp_visits_each_state_once(sysfs, no_psutil_sensors):
    path = sysfs.zone(0, "cpu-thermal", "60000")
    governor = ThermalGovernor(settings_for(sysfs))
    visited = []

    for celsius in [*ramp(60.0, 96.0, 0.5), *ramp(96.0, 55.0, -0.5)]:
        set_temperature(path, celsius)
        state = governor.update()
        if not visited or visited[-1] != state:
            visited.append(state)

    assert visited == ["normal", "warm", "hot", "critical", "hot", "warm", "normal"]
    assert governor.transitions == 6


def test_falling_needs_hysteresis(sysfs, no_psutil_sensors):
    path = sysfs.zone(0, "cpu-thermal", "82000")
    governor = ThermalGovernor(settings_for(sysfs, hysteresis_c=3.0))
    assert governor.update() == "hot"

    set_temperature(path, 78.0)  # below hot_c = 80, above 80 - 3
    for _ in range(5):
        governor.update()
    assert governor.state == "hot"

    set_temperature(path, 76.5)
    for _ in range(5):
        governor.update()
    assert governor.state == "warm"


def test_no_flapping_at_threshold(sysfs, no_psutil_sensors, caplog):
    path = sysfs.zone(0, "cpu-thermal", "68000")
    governor = ThermalGovernor(settings_for(sysfs, warm_c=70.0, hysteresis_c=3.0))

    for index in range(200):
        set_temperature(path, 72.0 if index % 2 else 68.0)  # alternates across warm_c every reading
        governor.update()

    assert governor.transitions <= 1
    assert caplog.text.count("thermal state") <= 1


def test_state_change_logged(sysfs, no_psutil_sensors, caplog):
    sysfs.zone(0, "cpu-thermal", "93000")
    governor = ThermalGovernor(settings_for(sysfs), clock=lambda: 1_700_000_000.0)

    governor.update()
    report = governor.to_dict()

    assert "thermal state normal -> critical at 93.0 C" in caplog.text
    assert report["state"] == "critical"
    assert report["state_since"] == "2023-11-14T22:13:20Z"
    assert report["transitions"] == 1


def test_reconnect_pacing_per_state(sysfs, no_psutil_sensors):
    path = sysfs.zone(0, "cpu-thermal", "50000")
    settings = settings_for(sysfs, warm_reconnect_min_s=5.0, hot_reconnect_min_s=30.0, critical_reconnect_min_s=120.0)
    governor = ThermalGovernor(settings)
    paced = {}

    for celsius in (50.0, 72.0, 82.0, 92.0):
        set_temperature(path, celsius)
        for _ in range(6):  # fills the smoothing window at the new level
            governor.update()
        paced[governor.state] = governor.pace_reconnect(1.0)

    assert paced == {"normal": 1.0, "warm": 5.0, "hot": 30.0, "critical": 120.0}
    assert governor.pace_reconnect(300.0) == 300.0


# --- the verification interval over time -------------------------------------------


def simulate(governor: ThermalGovernor, path: Path, phases, tick_s: float = 10.0):
    """Advance a test clock through (seconds, Celsius) phases; return (time, state) of each verification run."""
    schedule = VerificationSchedule(governor, start=0.0, first_run_delay_s=0.0)
    runs = []
    now = 0.0
    for duration_s, celsius in phases:
        end = now + duration_s
        while now < end:
            set_temperature(path, celsius)
            governor.update()
            if schedule.due(now):
                runs.append((now, governor.state))
                schedule.completed(now)
            now += tick_s
    return runs


def gaps_by_state(runs):
    """Map each state to the gaps between runs made in that state, skipping the first run after a change."""
    gaps = collections.defaultdict(set)
    for (before, state_before), (after, state_after) in zip(runs, runs[1:]):
        if state_before == state_after:
            gaps[state_after].add(after - before)
    return gaps


def test_interval_stretches_and_returns(sysfs, no_psutil_sensors):
    path = sysfs.zone(0, "cpu-thermal", "50000")
    settings = settings_for(sysfs, verify_interval_s=60.0, warm_slowdown=2.0, hot_slowdown=6.0, critical_slowdown=24.0)
    governor = ThermalGovernor(settings, clock=lambda: 0.0)
    phases = [(600, 50.0), (1200, 75.0), (2400, 85.0), (6000, 95.0), (1200, 85.0), (1200, 60.0)]

    runs = simulate(governor, path, phases)
    gaps = gaps_by_state(runs)
    states = [state for _, state in runs]

    assert gaps["normal"] == {60.0}
    assert gaps["warm"] == {120.0}
    assert gaps["hot"] == {360.0}
    assert gaps["critical"] == {1440.0}
    assert states[-1] == "normal"
    assert runs[-1][0] - runs[-2][0] == 60.0


def test_cooling_runs_overdue_verification(sysfs, no_psutil_sensors):
    path = sysfs.zone(0, "cpu-thermal", "95000")
    governor = ThermalGovernor(settings_for(sysfs, verify_interval_s=60.0, critical_slowdown=24.0))
    schedule = VerificationSchedule(governor, start=0.0, first_run_delay_s=0.0)
    governor.update()
    schedule.completed(0.0)
    assert schedule.next_due() == 1440.0

    set_temperature(path, 50.0)
    for _ in range(2):
        governor.update()

    assert governor.state == "normal"
    assert schedule.next_due() == 60.0
    assert schedule.due(300.0)


def test_interval_steady_at_threshold(sysfs, no_psutil_sensors):
    path = sysfs.zone(0, "cpu-thermal", "69000")
    governor = ThermalGovernor(settings_for(sysfs, verify_interval_s=60.0, warm_c=70.0, hysteresis_c=3.0))
    schedule = VerificationSchedule(governor, start=0.0, first_run_delay_s=0.0)
    intervals = []

    for index in range(300):
        set_temperature(path, 71.0 if index % 2 else 69.0)
        governor.update()
        intervals.append(governor.verify_interval_s)
        if schedule.due(index * 10.0):
            schedule.completed(index * 10.0)

    changes = sum(1 for before, after in zip(intervals, intervals[1:]) if before != after)
    assert changes <= 1


# --- configuration ---------------------------------------------------------------


def test_absolute_sysfs_file_rejected(write_config):
    path = write_config(thermal={"sysfs_files": ["/sys/class/thermal/thermal_zone0/temp"]})

    with pytest.raises(ConfigError) as info:
        load_config(path)

    message = str(info.value)
    assert "thermal.sysfs_files[0]" in message
    assert "'/sys/class/thermal/thermal_zone0/temp'" in message
    assert "relative to thermal.sysfs_root" in message


def test_parent_sysfs_file_rejected(write_config):
    path = write_config(thermal={"sysfs_files": ["class/../../etc/passwd"]})

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert "'..' is not allowed" in str(info.value)


def test_decreasing_reconnect_floor_rejected(write_config):
    path = write_config(thermal={"hot_reconnect_min_s": 300.0, "critical_reconnect_min_s": 60.0})

    with pytest.raises(ConfigError) as info:
        load_config(path)

    message = str(info.value)
    assert "hot_reconnect_min_s=300.0" in message
    assert "must not decrease" in message


def test_profiles_define_rising_schedule(write_config, sysfs):
    for profile in ("generic-linux", "raspberry-pi-4", "nxp-imx8m"):
        settings = profile_thermal(write_config, profile, sysfs)
        fields = dataclasses.asdict(settings)

        assert fields["warm_c"] < fields["hot_c"] < fields["critical_c"], profile
        assert 1.0 <= fields["warm_slowdown"] <= fields["hot_slowdown"] <= fields["critical_slowdown"], profile
