"""The agent state file that diagnose and the console read from other processes."""

import json
import os
import subprocess

import pytest

from edge_agent.agentstate import HEARTBEAT_S, AgentStateWriter, process_is_agent, read_agent_state, state_file_path


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def writer(tmp_path):
    clock = FakeClock()
    state_writer = AgentStateWriter(tmp_path / "spool.db.state.json", "boot-1", "GW-0001", "broker:8883", clock, clock)
    return state_writer, clock


def test_state_path_beside_spool(tmp_path):
    assert state_file_path(tmp_path / "spool.db") == tmp_path / "spool.db.state.json"


def test_writes_on_change_only(writer):
    state_writer, clock = writer

    first = state_writer.update("connecting", None, None)
    clock.now += 1
    repeat = state_writer.update("connecting", None, None)
    changed = state_writer.update("connected", None, None)
    first_ack = state_writer.update("connected", clock.now, None)

    assert [first, repeat, changed, first_ack] == [True, False, True, True]


def test_heartbeat_rewrites_unchanged_state(writer):
    state_writer, clock = writer
    state_writer.update("connected", None, None)

    clock.now += HEARTBEAT_S

    assert state_writer.update("connected", None, None) is True


def test_snapshot_round_trips(writer):
    state_writer, clock = writer
    state_writer.update("connected", clock.now - 5, "none yet")

    state = read_agent_state(state_writer.path)

    assert state.pid == os.getpid()
    assert state.state == "connected"
    assert state.last_publish_ack == clock.now - 5
    assert state.last_publish_ack_monotonic == clock.now - 5
    assert state.last_error == "none yet"
    assert oct(state_writer.path.stat().st_mode & 0o777) == "0o644"


def test_unwritable_directory_does_not_raise(tmp_path):
    missing = tmp_path / "absent" / "spool.db.state.json"
    state_writer = AgentStateWriter(missing, "boot-1", "GW-0001", "broker:8883")

    assert state_writer.update("connected", None, None) is False


def test_garbled_file_is_value_error(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"pid": "x"}))

    with pytest.raises(ValueError):
        read_agent_state(path)


def test_recycled_pid_is_not_agent():
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert process_is_agent(other.pid) is False
    finally:
        other.kill()
        other.wait()


def test_agent_command_line_recognised(tmp_path):
    fake_proc = tmp_path / "proc" / str(os.getpid())
    fake_proc.mkdir(parents=True)
    (fake_proc / "cmdline").write_bytes(b"/usr/bin/python3\0/usr/bin/edge-agent\0run\0")

    assert process_is_agent(os.getpid(), proc_root=tmp_path / "proc") is True
    assert process_is_agent(0) is False
