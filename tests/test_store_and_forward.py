"""Store and forward under faults: real `edge-agent run` processes against a real Mosquitto.

Every check is on what the broker delivered to a subscriber and on what the
spool holds, keyed by the (boot_id, seq) pair each telemetry message carries.
"""

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from edge_agent.devbroker import DevBroker, Observer, free_port
from edge_agent.spool import Spool
from waiting import wait_until

FAST = {"telemetry": {"interval_s": 0.1}}


# --- helpers ---------------------------------------------------------------


class Agents:
    """Starts `edge-agent run` processes and makes sure none outlives the test."""

    def __init__(self, agent_command, folder: Path) -> None:
        self.agent_command = agent_command
        self.folder = folder
        self.processes: List[subprocess.Popen] = []

    def start(self, config: Path, name: str = "agent") -> subprocess.Popen:
        log_path = self.folder / f"{name}-{len(self.processes)}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                self.agent_command("run", "--config", str(config)), stdout=log, stderr=subprocess.STDOUT
            )
        process.log_path = log_path
        self.processes.append(process)
        return process

    @staticmethod
    def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        return process.wait(timeout=timeout_s)

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def agents(agent_command, tmp_path) -> Iterator[Agents]:
    runner = Agents(agent_command, tmp_path)
    yield runner
    runner.cleanup()


@pytest.fixture
def durable_broker(pki, tmp_path, mosquitto_binary) -> Iterator[DevBroker]:
    """A broker that keeps the subscriber's session and queued messages across restarts."""
    instance = DevBroker(tmp_path / "broker", pki.broker_cert, pki.broker_key, pki.manufacturer_ca, persistence=True)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def cloud(durable_broker, pki) -> Iterator[Observer]:
    """A subscriber with a persistent session, as a cloud consumer would run it."""
    subscriber = Observer(
        durable_broker, pki.broker_ca, pki.observer_cert, pki.observer_key, client_id="cloud", clean_session=False
    ).start()
    yield subscriber
    subscriber.stop()


def fresh_spool(path: Path) -> Path:
    """Create an empty spool file, so the agent's first sequence number is 1."""
    Spool(path).close()
    return path


def documents(observer: Observer) -> List[dict]:
    return [json.loads(message.payload) for message in observer.received("/telemetry")]


def received_seqs(observer: Observer) -> List[int]:
    return [doc["seq"] for doc in documents(observer) if doc["seq"] is not None]


def wait_for_seq(observer: Observer, seq: int, timeout_s: float = 30.0) -> None:
    wait_until(lambda: seq in set(received_seqs(observer)), timeout_s, f"seq {seq} at the subscriber")


def read_spool(path: Path) -> Dict[str, object]:
    """Return the queued sequence numbers and the counters of a spool file, read by plain SQLite."""
    db = sqlite3.connect(str(path), timeout=10)
    try:
        payloads = [row[0] for row in db.execute("SELECT payload FROM message ORDER BY id")]
        meta = dict(db.execute("SELECT key, value FROM meta"))
    finally:
        db.close()
    last = max((value for key, value in meta.items() if key.startswith("seq:")), default=0)
    return {
        "queued": [json.loads(p)["seq"] for p in payloads],
        "last_seq": last,
        "dropped_total": meta.get("dropped_total", 0),
        "unstored_total": meta.get("unstored_total", 0),
    }


def first_occurrences(seqs: List[int]) -> List[int]:
    seen = set()
    order = []
    for seq in seqs:
        if seq not in seen:
            seen.add(seq)
            order.append(seq)
    return order


def log_text(process: subprocess.Popen) -> str:
    return Path(process.log_path).read_text(errors="replace")


def mount(*args: str) -> None:
    """Run mount(8); skip the test with mount's own words when this machine does not allow it."""
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is not permitted here: {result.stderr.strip()}")


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, check=True)


# --- delivery across crashes and restarts ----------------------------------


def test_kill_9_in_flight_resent(durable_broker, cloud, write_config, agents, tmp_path):
    spool_path = fresh_spool(tmp_path / "spool.db")
    config = write_config(durable_broker.port, **FAST)
    first = agents.start(config)
    wait_until(lambda: len(received_seqs(cloud)) >= 5, what="first telemetry")

    # A stopped broker reads nothing and acknowledges nothing: what the agent sends now stays in flight.
    os.kill(durable_broker.process.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: len(read_spool(spool_path)["queued"]) >= 30, what="a backlog of 30 messages")
        first.kill()
        first.wait()
        received_before = set(received_seqs(cloud))
    finally:
        os.kill(durable_broker.process.pid, signal.SIGCONT)

    at_kill = read_spool(spool_path)
    accepted = range(1, at_kill["last_seq"] + 1)
    # Nothing left the spool without a PUBACK.
    assert [seq for seq in accepted if seq not in received_before and seq not in at_kill["queued"]] == []

    second = agents.start(config)
    wait_for_seq(cloud, at_kill["last_seq"])
    assert agents.stop(second) == 0

    seqs = received_seqs(cloud)
    duplicates = len(seqs) - len(set(seqs))
    print(f"{len(at_kill['queued'])} unacknowledged at kill -9, {duplicates} duplicates received")
    assert set(accepted) <= set(seqs)
    assert first_occurrences(seqs) == sorted(set(seqs))
    assert "Traceback" not in log_text(second)


def test_broker_restart_loses_nothing(durable_broker, cloud, write_config, agents, tmp_path):
    spool_path = fresh_spool(tmp_path / "spool.db")
    agent = agents.start(write_config(durable_broker.port, **FAST))
    wait_until(lambda: len(received_seqs(cloud)) >= 5, what="first telemetry")

    durable_broker.restart()
    restarted_at = read_spool(spool_path)["last_seq"]
    wait_for_seq(cloud, restarted_at + 10)
    assert agents.stop(agent) == 0

    final = read_spool(spool_path)
    seqs = received_seqs(cloud)
    missing = [s for s in range(1, final["last_seq"] + 1) if s not in set(seqs) and s not in final["queued"]]
    assert missing == []
    assert first_occurrences(seqs) == sorted(set(seqs))
    assert "lost the connection" in log_text(agent)


def test_broker_down_at_start_drains(durable_broker, cloud, write_config, agents, tmp_path):
    spool_path = fresh_spool(tmp_path / "spool.db")
    durable_broker.stop()
    agent = agents.start(write_config(durable_broker.port, **FAST))
    wait_until(lambda: len(read_spool(spool_path)["queued"]) >= 15, what="a backlog of 15 messages")

    durable_broker.start()
    backlog = read_spool(spool_path)
    wait_for_seq(cloud, backlog["last_seq"] + 5)
    assert agents.stop(agent) == 0

    seqs = received_seqs(cloud)
    assert set(range(1, backlog["last_seq"] + 1)) <= set(seqs)
    assert first_occurrences(seqs) == sorted(set(seqs))
    assert "connection to 127.0.0.1" in log_text(agent)


def test_overflow_drops_oldest_reports_count(durable_broker, cloud, write_config, agents, tmp_path):
    spool_path = fresh_spool(tmp_path / "spool.db")
    offline = write_config(free_port(), name="offline.toml", spool={"max_messages": 10}, **FAST)
    agent = agents.start(offline)
    wait_until(lambda: read_spool(spool_path)["dropped_total"] >= 10, what="10 dropped messages")
    assert agents.stop(agent) == 0

    full = read_spool(spool_path)
    assert full["queued"] == list(range(full["last_seq"] - 9, full["last_seq"] + 1))
    assert full["dropped_total"] == full["last_seq"] - 10

    # A larger bound now, or the first new reading would push out the oldest queued one.
    online = write_config(durable_broker.port, spool={"max_messages": 20}, **FAST)
    agent = agents.start(online)
    wait_for_seq(cloud, full["last_seq"] + 3)
    assert agents.stop(agent) == 0

    seqs = received_seqs(cloud)
    assert min(seqs) == full["queued"][0]
    assert set(full["queued"]) <= set(seqs)
    reported = [doc["agent"]["spool"]["dropped_total"] for doc in documents(cloud) if doc["seq"] > full["last_seq"]]
    assert reported
    assert set(reported) == {full["dropped_total"]}


# --- a damaged or unwritable spool ------------------------------------------


def test_corrupt_spool_replaced(durable_broker, cloud, write_config, agents, tmp_path):
    (tmp_path / "spool.db").write_bytes(b"not an SQLite database, " * 400)
    agent = agents.start(write_config(durable_broker.port, **FAST))
    wait_until(lambda: len(received_seqs(cloud)) >= 3, what="telemetry from the fresh spool")
    assert agents.stop(agent) == 0

    log = log_text(agent)
    assert "is corrupt" in log
    assert "started a fresh one" in log
    assert len(list(tmp_path.glob("spool.db.corrupt-*[0-9]"))) == 1
    assert "Traceback" not in log


def _unstored(doc: dict) -> int:
    return doc["agent"]["spool"]["unstored_total"]


def test_read_only_spool_directory(durable_broker, cloud, write_config, agents, tmp_path):
    folder = tmp_path / "spool-dir"
    folder.mkdir()
    mount("--bind", str(folder), str(folder))
    try:
        mount("-o", "remount,bind,ro", str(folder))
        agent = agents.start(write_config(durable_broker.port, spool={"path": str(folder / "spool.db")}, **FAST))
        wait_until(lambda: any(doc["seq"] is None for doc in documents(cloud)), what="an unspooled reading")
    finally:
        umount(folder)

    wait_until(lambda: len(received_seqs(cloud)) >= 3, what="stored telemetry after the remount")
    assert agents.stop(agent) == 0

    unspooled = [doc for doc in documents(cloud) if doc["seq"] is None]
    stored = [doc for doc in documents(cloud) if doc["seq"] is not None]
    assert unspooled[0]["agent"]["spool"]["available"] is False
    assert _unstored(unspooled[0]) >= 1
    assert _unstored(stored[-1]) >= len(unspooled)
    log = log_text(agent)
    assert "spool unavailable" in log
    assert "mounted read-only" in log
    assert "Traceback" not in log


def test_full_disk_survived(durable_broker, cloud, write_config, agents, tmp_path):
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder))
    filler: Optional[Path] = folder / "filler"
    try:
        spool_path = folder / "spool.db"
        agent = agents.start(write_config(durable_broker.port, spool={"path": str(spool_path)}, **FAST))
        wait_until(lambda: len(received_seqs(cloud)) >= 3, what="first telemetry")

        with open(filler, "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            except OSError:
                pass
        wait_until(lambda: "disk is full" in log_text(agent), what="a disk-full log line")
        wait_until(lambda: any(doc["seq"] is None for doc in documents(cloud)), what="an unspooled reading")
        filler.unlink()
        filler = None
        resumed_after = max(received_seqs(cloud))
        wait_for_seq(cloud, resumed_after + 3)
        assert agents.stop(agent) == 0
    finally:
        if agents.processes and agents.processes[-1].poll() is None:
            agents.processes[-1].kill()
            agents.processes[-1].wait()
        umount(folder)

    stored = [doc for doc in documents(cloud) if doc["seq"] is not None]
    assert _unstored(stored[-1]) >= 1
    assert first_occurrences(received_seqs(cloud)) == sorted(set(received_seqs(cloud)))
    assert "Traceback" not in log_text(agent)


# --- connection discipline ---------------------------------------------------


def test_duplicate_client_id_backs_off(durable_broker, write_config, agents, pki):
    # Two agents with the same IDevID have the same client id, so each connect
    # makes the broker drop the other. Each agent's delay cap doubles from 0.2 s
    # to 4 s, which allows about ten attempts per agent in 12 s. Retrying at
    # min_delay_s without backoff would make about sixty.
    reconnect = {"min_delay_s": 0.2, "max_delay_s": 4.0}
    first = write_config(durable_broker.port, name="a.toml", reconnect=reconnect, spool={"path": "a.db"})
    second = write_config(durable_broker.port, name="b.toml", reconnect=reconnect, spool={"path": "b.db"})
    started = time.monotonic()
    processes = [agents.start(first, "a"), agents.start(second, "b")]
    time.sleep(12.0 - (time.monotonic() - started))
    for process in processes:
        assert agents.stop(process) == 0

    log = durable_broker.log()
    connects = log.count(f"as {pki.device_serial} (")
    kicks = log.count("already connected, closing old connection")
    print(f"{connects} connections, {kicks} take-overs in 12 s")
    assert kicks >= 2
    assert connects <= 40
    assert "same client id" in log_text(processes[0]) + log_text(processes[1])
