"""The read-only maintenance console on the gateway's UART.

A technician with a serial cable gets a prompt that answers ``diagnose``,
``status``, ``identity``, ``pins``, ``thermal``, ``help`` and ``exit``. No
command changes the configuration or prints key material, because every
command only renders diagnose checks, and those never print a key.

The console survives what a real line does: ``LineEditor`` handles line ends,
editing keys, bytes that are not UTF-8 and overlong input, and ``serve``
reopens the port with backoff when a USB adapter is pulled and plugged back.
It takes an exclusive lock on the port (``flock``), so a second console on
the same port gets a clear message instead of half of the bytes.
"""

import errno
import logging
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import serial

from edge_agent import __version__, isolated
from edge_agent.diagnose.model import DEFAULT_TIMEOUT_S, Report
from edge_agent.diagnose.render import WIDTH, render_text, to_ascii
from edge_agent.errors import EdgeAgentError
from edge_agent.lineeditor import Echo, Line, LineEditor, Notice

logger = logging.getLogger(__name__)

PROMPT = "edge-agent> "
# serial.read() blocks at most this long, so a stop request is seen quickly without polling.
READ_TIMEOUT_S = 0.5
WRITE_TIMEOUT_S = 2.0
REOPEN_MIN_S = 0.5
REOPEN_MAX_S = 30.0
# Repeated port errors are logged at most this often.
LOG_INTERVAL_S = 60.0

HELP = """\
Read-only maintenance console. Commands:
  diagnose [offline]  run every check and show what to fix (offline: no network)
  status              agent service, connection, spool
  identity            device certificate, private key file mode, chain
  pins                configured broker pins and their expiry
  thermal             temperature and thermal governor state
  help                this list
  exit                end the session
Nothing typed here changes the configuration."""


@dataclass(frozen=True)
class CommandOutput:
    """The output of a command and whether the session ends after it."""

    text: str
    end_session: bool = False


class ConsoleCommands:
    """Runs console commands against one configuration file; all output is printable ASCII."""

    def __init__(
        self,
        config_path: Path,
        live_status: Optional[Callable[[], Dict[str, object]]] = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        isolate: bool = False,
    ) -> None:
        self.config_path = Path(config_path)
        self.live_status = live_status
        self.timeout_s = timeout_s
        # In the service, the checks run in a child process, so the agent never loads cryptography.
        self.isolate = isolate

    def execute(self, line: str) -> CommandOutput:
        words = line.strip().split()
        if not words:
            return CommandOutput("")
        command, arguments = words[0].lower(), [w.lower() for w in words[1:]]
        handler = {
            "diagnose": self._diagnose,
            "status": self._status,
            "identity": lambda args: self._group("identity", args),
            "pins": lambda args: self._group("pins", args),
            "thermal": self._thermal,
            "help": lambda args: CommandOutput(HELP),
            "?": lambda args: CommandOutput(HELP),
            "exit": lambda args: CommandOutput("session closed", end_session=True),
            "quit": lambda args: CommandOutput("session closed", end_session=True),
        }.get(command)
        if handler is None:
            printable_name = "".join(c if 0x20 < ord(c) < 0x7F else "?" for c in words[0][:40])
            return CommandOutput(f"unknown command '{printable_name}'; type 'help' for the list of commands")
        try:
            return handler(arguments)
        except Exception as exc:  # a failing command must never end the console
            logger.exception("console command %r failed", command)
            return CommandOutput(f"the command failed: {type(exc).__name__}: {to_ascii(str(exc))[:200]}")

    def _diagnose(self, arguments: list) -> CommandOutput:
        if arguments not in ([], ["offline"]):
            return CommandOutput("usage: diagnose [offline]")
        report = self._run_checks(offline=bool(arguments), group=None)
        return CommandOutput(render_text(report).rstrip("\n"))

    def _group(self, name: str, arguments: list) -> CommandOutput:
        if arguments:
            return CommandOutput(f"usage: {name}")
        report = self._run_checks(offline=True, group=name)
        return CommandOutput(render_text(report, header=False).rstrip("\n"))

    def _run_checks(self, offline: bool, group: Optional[str]) -> Report:
        if self.isolate:
            # Each network check is bounded by timeout_s; the child gets room for all of them.
            limit = isolated.CHILD_TIMEOUT_S + 10 * self.timeout_s
            return isolated.call("diagnose", self.config_path, offline, self.timeout_s, group, timeout_s=limit)
        from edge_agent.diagnose.runner import run_group

        return run_group(self.config_path, offline, self.timeout_s, group)

    def _status(self, arguments: list) -> CommandOutput:
        output = self._group("status", arguments)
        if arguments or self.live_status is None:
            return output
        return CommandOutput(output.text + "\n" + _render_live_status(self.live_status()))

    def _thermal(self, arguments: list) -> CommandOutput:
        output = self._group("thermal", arguments)
        if arguments or self.live_status is None:
            return output
        thermal = self.live_status().get("thermal") or {}
        return CommandOutput(output.text + "\n" + _render_live_status({"service governor": thermal}))


def _render_live_status(status: Dict[str, object]) -> str:
    """Render the running agent's own health as ``key: value`` lines within 80 columns."""
    lines = ["live state of this agent:"]
    for key, value in status.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {_plain_value(v)}" for k, v in value.items())
        else:
            value = _plain_value(value)
        # Wrap at word boundaries with an indent, so a serial terminal never splits a word.
        lines.extend(textwrap.wrap(
            to_ascii(f"{key}: {value}"), WIDTH - 1, initial_indent="  ", subsequent_indent="      ",
            break_long_words=False, break_on_hyphens=False,
        ))
    return "\n".join(lines)


def _plain_value(value) -> str:
    """Render a status value as a technician reads it: none, yes, no, or the text itself."""
    if value is None:
        return "none"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value) or "none"
    return str(value)


class _RateLimitedLog:
    """Logs the first occurrence of a problem, then at most one summary per interval."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: Dict[str, float] = {}
        self._suppressed: Dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        suffix = f" (repeated {suppressed} times since the last message)" if suppressed else ""
        logger.warning("%s%s", message, suffix)

    def clear(self, key: str) -> None:
        self._last.pop(key, None)
        self._suppressed.pop(key, None)


def describe_open_error(port: str, exc: serial.SerialException) -> str:
    """Explain why a serial port did not open, with what to do about it."""
    code = exc.errno if isinstance(exc.errno, int) else None
    if code in (errno.EAGAIN, errno.EWOULDBLOCK) or "exclusively lock" in str(exc):
        return (
            f"{port} is in use by another program that holds its lock (another 'edge-agent console', the agent's "
            "own console with serial.enabled = true, or a terminal program); close it and try again"
        )
    if code == errno.ENOENT:
        return f"{port} does not exist; check the cable or USB adapter, or give another port with --port (serial.port)"
    if code in (errno.EACCES, errno.EPERM):
        return f"{port}: permission denied; run as root or as a member of the port's group (usually dialout)"
    return f"cannot open {port}: {exc}"


class SerialConsole:
    """Serves console sessions on one serial port until stopped, reopening the port when it goes away."""

    def __init__(self, port: str, baud: int, commands: ConsoleCommands, stop: Optional[threading.Event] = None) -> None:
        self.port_name = port
        self.baud = baud
        self.commands = commands
        self.stop_event = stop or threading.Event()
        self._log = _RateLimitedLog()
        self._port: Optional[serial.Serial] = None
        self.thread: Optional[threading.Thread] = None

    def open_port(self) -> serial.Serial:
        """Open the port as 8N1 with an exclusive lock; raise ``serial.SerialException`` on failure."""
        return serial.Serial(
            self.port_name,
            self.baud,
            bytesize=serial.EIGHTBITS,
            parity=serial.PARITY_NONE,
            stopbits=serial.STOPBITS_ONE,
            timeout=READ_TIMEOUT_S,
            write_timeout=WRITE_TIMEOUT_S,
            exclusive=True,
        )

    def serve(self, fail_fast: bool = False) -> bool:
        """Serve sessions until ``stop`` is set or a session ends with ``exit``; return True for ``exit``.

        With ``fail_fast`` a port that does not open at the first attempt
        raises ``EdgeAgentError``; later losses of the port are always retried.
        """
        delay = REOPEN_MIN_S
        first = True
        while not self.stop_event.is_set():
            try:
                port = self.open_port()
            except serial.SerialException as exc:
                message = describe_open_error(self.port_name, exc)
                if first and fail_fast:
                    raise EdgeAgentError(message) from None
                self._log.warning("open", f"serial console: {message}; retrying in up to {REOPEN_MAX_S:g} s")
                self.stop_event.wait(delay)
                delay = min(delay * 2, REOPEN_MAX_S)
                continue

            first = False
            delay = REOPEN_MIN_S
            self._log.clear("open")
            logger.info("serial console listening on %s at %d baud", self.port_name, self.baud)
            try:
                if self._session(port):
                    return True
            except (serial.SerialException, OSError) as exc:
                self._log.warning("lost", f"serial console: lost {self.port_name} ({exc}); reopening it")
            finally:
                self._port = None
                port.close()
        return False

    def stop(self) -> None:
        self.stop_event.set()
        port = self._port
        if port is not None:
            try:
                port.cancel_read()
            except (serial.SerialException, OSError):
                pass

    def _session(self, port: serial.Serial) -> bool:
        """Run one session on an open port; return True when the technician typed ``exit``."""
        self._port = port
        editor = LineEditor()
        banner = f"edge-agent {__version__} maintenance console (read-only) on {self.port_name}; type 'help'"
        self._write(port, f"\n{banner}\n{PROMPT}", end_line=False)
        while not self.stop_event.is_set():
            data = port.read(max(1, port.in_waiting))
            if not data:
                continue
            for event in editor.feed(data):
                if self._handle(port, editor, event):
                    return True
        return False

    def _handle(self, port: serial.Serial, editor: LineEditor, event) -> bool:
        if isinstance(event, Echo):
            self._send(port, event.data)
            return False
        if isinstance(event, Notice):
            self._write(port, f"\n{event.text}\n{PROMPT}{to_ascii(editor.pending)}", end_line=False)
            return False
        if isinstance(event, Line):
            output = self.commands.execute(event.text)
            if output.text:
                self._write(port, output.text)
            if output.end_session:
                return True
            self._write(port, PROMPT, end_line=False)
        return False

    def _write(self, port: serial.Serial, text: str, end_line: bool = True) -> None:
        if end_line:
            text += "\n"
        # Raw mode: the terminal needs CR LF, and the line carries ASCII only.
        data = to_ascii_lines(text).replace("\n", "\r\n").encode("ascii")
        self._send(port, data)

    def _send(self, port: serial.Serial, data: bytes) -> None:
        try:
            port.write(data)
        except serial.SerialTimeoutException:
            # Flow control held the line for WRITE_TIMEOUT_S, so no one reads the port. Drop the output.
            self._log.warning("write", f"serial console: output to {self.port_name} timed out; dropped {len(data)} bytes")


def to_ascii_lines(text: str) -> str:
    """Escape everything except printable ASCII and line breaks."""
    return "\n".join(to_ascii(line) for line in text.split("\n"))


def start_service_console(config_path: Path, port: str, baud: int, live_status: Callable[[], dict]) -> SerialConsole:
    """Start the console in a daemon thread of the running agent; return it so the agent can stop it."""
    console = SerialConsole(port, baud, ConsoleCommands(config_path, live_status=live_status, isolate=True))

    def run() -> None:
        while not console.stop_event.is_set():
            try:
                console.serve()
            except Exception:  # the console must never take the agent down
                logger.exception("serial console on %s failed; restarting it", port)
                console.stop_event.wait(REOPEN_MAX_S)

    thread = threading.Thread(target=run, name="serial-console", daemon=True)
    thread.start()
    console.thread = thread
    return console
