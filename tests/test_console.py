"""The serial maintenance console: line editing, and real sessions over pseudo-terminals."""

import os
import select
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.console import PROMPT, ConsoleCommands, SerialConsole
from edge_agent.errors import EdgeAgentError
from edge_agent.lineeditor import Echo, Line, LineEditor, Notice

PROMPT_BYTES = PROMPT.encode("ascii")


def lines_of(events: list) -> List[str]:
    return [event.text for event in events if isinstance(event, Line)]


def echo_of(events: list) -> bytes:
    return b"".join(event.data for event in events if isinstance(event, Echo))


# --- line editing ---------------------------------------------------------------------


@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n"])
def test_line_endings_give_one_line(ending):
    editor = LineEditor()

    assert lines_of(editor.feed(b"status" + ending + b"pins" + ending)) == ["status", "pins"]


def test_crlf_split_across_reads():
    editor = LineEditor()

    first = lines_of(editor.feed(b"help\r"))
    second = lines_of(editor.feed(b"\nstatus\r"))

    assert first == ["help"]
    assert second == ["status"]


def test_utf8_split_across_reads():
    editor = LineEditor()

    first = editor.feed(b"caf\xc3")
    second = editor.feed(b"\xa9\r")

    assert lines_of(second) == ["caf\u00e9"]
    assert echo_of(first) == b"caf"
    assert echo_of(second).startswith(b"?")


def test_invalid_bytes_become_replacement():
    editor = LineEditor()

    assert lines_of(editor.feed(b"\xff\xfehelp\r")) == ["\ufffd\ufffdhelp"]


def test_backspace_and_del_edit():
    editor = LineEditor()

    events = editor.feed(b"hx\x08elq\x7fp\r")

    assert lines_of(events) == ["help"]
    assert b"\b \b" in echo_of(events)


def test_backspace_removes_whole_character():
    editor = LineEditor()

    assert lines_of(editor.feed(b"ab\xc3\xa9\x7f\r")) == ["ab"]


def test_overlong_line_discarded_with_notice():
    editor = LineEditor(max_chars=16)

    events = editor.feed(b"x" * 40)
    after = editor.feed(b"\rhelp\r")

    notices = [event.text for event in events if isinstance(event, Notice)]
    assert len(notices) == 1
    assert "longer than 16 characters" in notices[0]
    assert editor.pending == ""
    assert lines_of(after) == ["help"]


def test_escape_sequences_ignored():
    editor = LineEditor()

    assert lines_of(editor.feed(b"he\x1b[Alp\x1bOB\r")) == ["help"]


def test_ctrl_c_cancels_line():
    editor = LineEditor()

    assert lines_of(editor.feed(b"diag\x03help\r")) == ["", "help"]


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_any_bytes_stay_bounded(chunks):
    editor = LineEditor(max_chars=32)

    for chunk in chunks:
        events = editor.feed(chunk)

        assert len(editor.pending) <= 32
        assert echo_of(events).isascii()


# --- sessions over a pseudo-terminal ---------------------------------------------------


class Terminal:
    """The technician's end of a pseudo-terminal; the console opens the other end by path."""

    def __init__(self) -> None:
        # The test keeps the slave open too, because reading a master with no open slave fails with EIO.
        self.master, self._slave = os.openpty()
        self.device = os.ttyname(self._slave)
        self.received = b""

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, marker: bytes, timeout_s: float = 30.0) -> bytes:
        """Return everything received up to and including ``marker``."""
        deadline = time.monotonic() + timeout_s
        while marker not in self.received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{marker!r} not received within {timeout_s} s; got {self.received[-400:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.2))
            if ready:
                self.received += os.read(self.master, 65536)
        end = self.received.index(marker) + len(marker)
        answer, self.received = self.received[:end], self.received[end:]
        return answer

    def drain(self, quiet_s: float = 1.0) -> bytes:
        """Read until nothing arrives for ``quiet_s``; return and forget what was received."""
        while True:
            ready, _, _ = select.select([self.master], [], [], quiet_s)
            if not ready:
                break
            self.received += os.read(self.master, 65536)
        drained, self.received = self.received, b""
        return drained

    def command(self, line: bytes) -> bytes:
        self.send(line)
        return self.read_until(PROMPT_BYTES)

    def close(self) -> None:
        os.close(self.master)
        os.close(self._slave)


@pytest.fixture
def serial_link(tmp_path: Path) -> Iterator[dict]:
    """A symlinked serial device, like /dev/serial/by-id, that tests can point at a new pty."""
    terminal = Terminal()
    link = tmp_path / "ttyGW0"
    link.symlink_to(terminal.device)
    state = {"terminal": terminal, "link": link}
    yield state
    try:
        state["terminal"].close()
    except OSError:
        pass


@pytest.fixture
def console_on(write_config) -> Iterator:
    """Start a console on a port in a thread; it is stopped after the test."""
    started: List[tuple] = []

    def start(port: Path) -> SerialConsole:
        console = SerialConsole(str(port), 115200, ConsoleCommands(write_config()))
        thread = threading.Thread(target=console.serve, daemon=True)
        thread.start()
        started.append((console, thread))
        return console

    yield start
    for console, thread in started:
        console.stop()
        thread.join(timeout=10)


def test_console_answers_commands(serial_link, console_on):
    terminal = serial_link["terminal"]
    console_on(serial_link["link"])

    banner = terminal.read_until(PROMPT_BYTES)
    help_text = terminal.command(b"help\r")
    pins = terminal.command(b"pins\n")
    status = terminal.command(b"status\r\n")
    unknown = terminal.command(b"bogus\r")

    assert b"read-only" in banner
    assert b"diagnose [offline]" in help_text
    assert b"pins.expiry" in pins
    assert b"service" in status
    assert b"unknown command 'bogus'" in unknown


def test_console_diagnose_offline_fits_80(serial_link, console_on):
    terminal = serial_link["terminal"]
    console_on(serial_link["link"])
    terminal.read_until(PROMPT_BYTES)

    output = terminal.command(b"diagnose offline\r")

    lines = output.split(b"\r\n")
    assert b"summary:" in output
    assert max(len(line) for line in lines) <= 80
    assert output.isascii()


def test_console_survives_garbage(serial_link, console_on):
    terminal = serial_link["terminal"]
    console_on(serial_link["link"])
    terminal.read_until(PROMPT_BYTES)

    for noise in (b"\xff\xfe\x00\x07\x1b[31m", b"\xe2\x82", b"\xac\r", bytes(range(256)), b"A" * 2000):
        terminal.send(noise)
    terminal.send(b"\r")
    noise_answers = terminal.drain()
    answer = terminal.command(b"help\r")

    assert b"discarded up to the next Enter" in noise_answers
    assert noise_answers.isascii()
    assert b"diagnose [offline]" in answer


def test_console_exit_ends_session(serial_link, write_config):
    terminal = serial_link["terminal"]
    console = SerialConsole(str(serial_link["link"]), 115200, ConsoleCommands(write_config()))
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("exit", console.serve()), daemon=True)
    thread.start()
    terminal.read_until(PROMPT_BYTES)

    terminal.send(b"exit\r")
    thread.join(timeout=10)

    assert outcome.get("exit") is True
    assert b"session closed" in terminal.read_until(b"session closed")


def test_console_reopens_after_unplug(serial_link, console_on):
    link = serial_link["link"]
    console_on(link)
    serial_link["terminal"].read_until(PROMPT_BYTES)

    serial_link["terminal"].close()  # the adapter is pulled: the device node goes away
    replugged = Terminal()
    serial_link["terminal"] = replugged
    fresh_link = link.with_name("ttyGW0.new")
    fresh_link.symlink_to(replugged.device)
    os.replace(fresh_link, link)

    banner = replugged.read_until(PROMPT_BYTES, timeout_s=60)
    answer = replugged.command(b"help\r")

    assert b"maintenance console" in banner
    assert b"diagnose [offline]" in answer


def test_second_reader_gets_clear_message(serial_link, console_on, write_config):
    console_on(serial_link["link"])
    serial_link["terminal"].read_until(PROMPT_BYTES)
    second = SerialConsole(str(serial_link["link"]), 115200, ConsoleCommands(write_config()))

    with pytest.raises(EdgeAgentError) as info:
        second.serve(fail_fast=True)

    assert "is in use by another program" in str(info.value)


def test_console_idle_does_not_spin(serial_link, console_on):
    console_on(serial_link["link"])
    serial_link["terminal"].read_until(PROMPT_BYTES)

    cpu_before, wall_before = time.process_time(), time.monotonic()
    time.sleep(2.0)
    cpu_used = time.process_time() - cpu_before
    wall = time.monotonic() - wall_before

    # A busy loop would use about one CPU second per second; a blocking read uses almost none.
    assert cpu_used < wall * 0.5


def test_console_cli_missing_port(write_config, agent_command, tmp_path):
    missing = tmp_path / "ttyUSB9"

    result = subprocess.run(
        agent_command("console", "--config", str(write_config()), "--port", str(missing)),
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 1
    assert f"{missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_agent_serves_console(serial_link, write_config, pki):
    config = load_config(write_config(serial={"enabled": True, "port": str(serial_link["link"])}))
    agent = Agent(config)
    runner = threading.Thread(target=agent.run, kwargs={"duration_s": 120}, daemon=True)
    runner.start()
    terminal = serial_link["terminal"]
    try:
        terminal.read_until(PROMPT_BYTES)
        status = terminal.command(b"status\r")
        identity = terminal.command(b"identity\r")
    finally:
        agent.stop()
        runner.join(timeout=30)

    # The service runs the checks in a child process, which reads the certificates.
    assert pki.device_serial.encode() in identity
    assert b"FAIL" not in identity
    assert b"live state of this agent" in status
    assert b"queue_depth" in status
    assert not runner.is_alive()
    lines = status.decode("ascii").splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "None" not in status.decode("ascii")
