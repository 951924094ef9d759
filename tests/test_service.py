"""Running under systemd: sd_notify, the watchdog, SIGTERM, SIGHUP and log formats."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.logsetup import RepeatFilter

REPO_ROOT = Path(__file__).resolve().parent.parent


class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET: a bound AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages = []

    def collect(self, seconds: float) -> list:
        """Receive for ``seconds``; return (arrival time, text) pairs received in that window."""
        deadline = time.monotonic() + seconds
        window = []
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            entry = (time.monotonic(), data.decode())
            window.append(entry)
            self.messages.append(entry)
        return window

    def wait_for(self, prefix: str, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for _, text in self.messages:
                if any(line.startswith(prefix) for line in text.splitlines()):
                    return text
            self.collect(0.2)
        raise AssertionError(f"no {prefix!r} notification in {self.messages}")

    def close(self) -> None:
        self.sock.close()


def start_agent(agent_command, config: Path, log_path: Path, **env: str) -> subprocess.Popen:
    environment = {**os.environ, **env}
    with open(log_path, "w") as log:
        return subprocess.Popen(
            agent_command("run", "--config", str(config)), stdout=log, stderr=subprocess.STDOUT, env=environment
        )


def wait_for_log(path: Path, text: str, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in agent log:\n{path.read_text()}")


def stop(process: subprocess.Popen, timeout_s: float = 20.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout_s)


def test_notify_ready_status_watchdog(broker, write_config, agent_command, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    config = write_config(broker.port)
    agent = start_agent(agent_command, config, tmp_path / "agent.log", NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000")
    try:
        ready = notify.wait_for("READY=1")
        notify.wait_for("STATUS=connected")
        window = notify.collect(3.0)
    finally:
        code = stop(agent)
        notify.collect(0.5)
        notify.close()

    assert "STATUS=" in ready
    pings = [t for t, text in window if text == "WATCHDOG=1"]
    assert len(pings) >= 3
    assert code == 0
    assert any(text == "STOPPING=1" for _, text in notify.messages)


def test_watchdog_stops_when_loop_is_stuck(broker, write_config, agent_command, tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    config = write_config(broker.port)
    agent = start_agent(agent_command, config, tmp_path / "agent.log", NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000")
    blocker = None
    try:
        notify.wait_for("STATUS=connected")
        assert any(text == "WATCHDOG=1" for _, text in notify.collect(2.0))

        # Another process holding the spool's write lock blocks the main loop's next append.
        blocker = sqlite3.connect(str(tmp_path / "spool.db"), timeout=5, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        notify.collect(1.5)
        stuck_window = notify.collect(3.0)

        blocker.execute("ROLLBACK")
        blocker.close()
        blocker = None
        resumed_window = notify.collect(3.0)
    finally:
        if blocker is not None:
            blocker.close()
        stop(agent)
        notify.close()

    assert not [text for _, text in stuck_window if text == "WATCHDOG=1"]
    assert [text for _, text in resumed_window if text == "WATCHDOG=1"]


def test_sigterm_publishes_offline_and_keeps_spool(broker, observer, write_config, agent_command, tmp_path):
    from edge_agent.spool import Spool

    config = write_config(broker.port)
    agent = start_agent(agent_command, config, tmp_path / "agent.log")
    observer.wait_for(2, "/telemetry")

    started = time.monotonic()
    code = stop(agent)
    elapsed = time.monotonic() - started

    assert code == 0
    assert elapsed < 15
    statuses = observer.wait_for(2, "/status", timeout_s=5)
    assert statuses[-1].payload == b"offline"
    log = (tmp_path / "agent.log").read_text()
    assert "edge-agent stopped" in log
    assert "Traceback" not in log
    spool = Spool(tmp_path / "spool.db")
    try:
        assert spool.stats().depth >= 0
        assert spool.sequence(next(iter(_sequence_keys(tmp_path / "spool.db")))) >= 2
    finally:
        spool.close()


def _sequence_keys(path: Path) -> list:
    connection = sqlite3.connect(str(path))
    try:
        return [row[0] for row in connection.execute("SELECT key FROM meta WHERE key LIKE 'seq:%'")]
    finally:
        connection.close()


def test_sighup_reloads_and_rejects_invalid(broker, observer, write_config, agent_command, tmp_path, pki):
    config = write_config(broker.port)
    log_path = tmp_path / "agent.log"
    agent = start_agent(agent_command, config, log_path)
    try:
        observer.wait_for(2, "/telemetry")

        # A broken file: the running configuration stays in force.
        good = config.read_text()
        config.write_text(good + "\n[broker]\nhost = 'again'\n")
        agent.send_signal(signal.SIGHUP)
        wait_for_log(log_path, "reload rejected")
        before = len(observer.received("/telemetry"))
        observer.wait_for(before + 2, "/telemetry")

        # Pins that no longer match: the session is dropped and the new pin-set refuses the broker.
        wrong = write_config(broker.port, name="wrong.toml", broker={"pins": [str(pki.spare_pin), "sha256//" + "A" * 43 + "="]})
        config.write_text(wrong.read_text())
        agent.send_signal(signal.SIGHUP)
        content = wait_for_log(log_path, "pin mismatch")
    finally:
        code = stop(agent)

    assert "configuration reloaded" in content
    assert code == 0
    assert agent.pid  # the same process served both reloads
    assert "Traceback" not in log_path.read_text()


def test_journal_stream_drops_timestamps(write_config, agent_command, tmp_path):
    from edge_agent.devbroker import free_port

    config = write_config(free_port())
    result = subprocess.run(
        agent_command("run", "--config", str(config), "--duration", "1"),
        capture_output=True, text=True, timeout=60, env={**os.environ, "JOURNAL_STREAM": "8:1234"},
    )

    first = result.stderr.splitlines()[0]
    assert first.startswith("INFO edge_agent.")


def test_json_log_format(write_config, agent_command):
    from edge_agent.devbroker import free_port

    config = write_config(free_port())
    result = subprocess.run(
        agent_command("run", "--config", str(config), "--duration", "1", "--log-format", "json"),
        capture_output=True, text=True, timeout=60,
    )

    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    assert any(r["level"] == "warning" and "connection to" in r["message"] for r in records)


def test_repeat_filter_counts_suppressed():
    import logging

    repeat = RepeatFilter(window_s=0.2)
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "broker down", None, None)

    assert repeat.filter(record)
    assert not repeat.filter(logging.LogRecord("x", logging.WARNING, __file__, 1, "broker down", None, None))
    assert not repeat.filter(logging.LogRecord("x", logging.WARNING, __file__, 1, "broker down", None, None))
    time.sleep(0.25)
    later = logging.LogRecord("x", logging.WARNING, __file__, 1, "broker down", None, None)
    assert repeat.filter(later)
    assert "repeated 2 more times" in later.getMessage()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path):
    unit = (REPO_ROOT / "systemd" / "edge-agent.service").read_text()
    executable = Path(sys.executable).parent / "edge-agent"
    copy = tmp_path / "edge-agent.service"
    copy.write_text(unit.replace("/opt/edge-agent/bin/edge-agent", str(executable)))

    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "edge-agent.service" not in result.stderr, result.stderr


def test_unit_file_hardening():
    unit = (REPO_ROOT / "systemd" / "edge-agent.service").read_text()

    for setting in (
        "Type=notify", "WatchdogSec=", "Restart=on-failure", "User=edge-agent", "ProtectSystem=strict",
        "StateDirectory=edge-agent", "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectHome=yes",
        "CapabilityBoundingSet=\n", "RestrictAddressFamilies=", "LoadCredential=",
    ):
        assert setting in unit, setting
