"""Run certificate work in a short-lived child process, so the service never loads ``cryptography``.

``cryptography`` bundles its own OpenSSL, which costs the process about
10 MB of resident memory for as long as it lives. The service needs it only
to validate the device identity at start-up, on reload and on the periodic
verification, and for the serial console's checks, so that work runs in a
fresh interpreter that exits when the work is done.

The request and the result travel as pickles over the child's stdin and
stdout; both ends are this package, started by the same user. The child's log
records are replayed through the parent's loggers, so they reach the service
log as if the work had run in-process. An ``EdgeAgentError`` raised in the
child is raised again in the parent with the same message.
"""

import importlib
import logging
import os
import pickle
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

from edge_agent.errors import ConfigError, EdgeAgentError, IdentityError, PinSyntaxError

logger = logging.getLogger(__name__)

# The only functions a child runs, by the name the parent sends.
TARGETS = {
    "load_credential": ("edge_agent.credential", "load_credential"),
    "finish_verification": ("edge_agent.verify", "finish_checks"),
    "diagnose": ("edge_agent.diagnose.runner", "run_group"),
}

# Identity validation reads a few files and, for a TPM-held key, waits for the
# TPM; it takes about 0.2 s on a 2-core x86 machine.
CHILD_TIMEOUT_S = 60.0

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class _LogEntry:
    logger: str
    level: int
    message: str


@dataclass(frozen=True)
class _Reply:
    """The child's output on stdout: the outcome, the returned value or error, and the log records of the run."""

    outcome: str
    value: Any
    log: Tuple[_LogEntry, ...]


def call(target: str, *args: Any, timeout_s: float = CHILD_TIMEOUT_S) -> Any:
    """Run the function registered as ``target`` with ``args`` in a child process and return its result."""
    if target not in TARGETS:
        raise ValueError(f"unknown isolated function {target!r}; choose from {', '.join(sorted(TARGETS))}")
    request = pickle.dumps((target, args, logging.getLogger().getEffectiveLevel()))

    try:
        completed = subprocess.run(
            [sys.executable, "-m", __name__],
            input=request,
            capture_output=True,
            timeout=timeout_s,
            env=_child_environment(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise EdgeAgentError(f"{target} did not finish within {timeout_s:g} s in its child process") from None
    except OSError as exc:
        raise EdgeAgentError(f"cannot start the child process for {target} ({sys.executable}): {exc}") from None

    reply = _read_reply(target, completed)
    for entry in reply.log:
        logging.getLogger(entry.logger).log(entry.level, "%s", entry.message)
    if reply.outcome == "ok":
        return reply.value
    raise _rebuild_error(reply.value)


def _child_environment() -> "dict[str, str]":
    # The child must import this same copy of the package, also when it runs from a source tree.
    environment = dict(os.environ)
    paths = [str(_PACKAGE_ROOT)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def _read_reply(target: str, completed: "subprocess.CompletedProcess[bytes]") -> _Reply:
    detail = _last_line(completed.stderr)
    if completed.returncode != 0:
        logger.debug("child process for %s failed; its stderr:\n%s", target, completed.stderr.decode(errors="replace"))
        raise EdgeAgentError(f"the child process for {target} exited with status {completed.returncode}: {detail}")
    try:
        reply = pickle.loads(completed.stdout)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as exc:
        raise EdgeAgentError(f"the child process for {target} returned no readable result ({exc}): {detail}") from None
    if not isinstance(reply, _Reply):
        raise EdgeAgentError(f"the child process for {target} returned {type(reply).__name__}, not a result")
    return reply


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no error output"


def _describe_error(exc: BaseException) -> "tuple[str, tuple]":
    if isinstance(exc, ConfigError):
        return "ConfigError", (exc.problems,)
    if isinstance(exc, IdentityError):
        return "IdentityError", (str(exc), exc.path, exc.check)
    if isinstance(exc, PinSyntaxError):
        return "PinSyntaxError", (str(exc),)
    return "EdgeAgentError", (str(exc),)


def _rebuild_error(description: "tuple[str, tuple]") -> EdgeAgentError:
    kind, args = description
    classes = {"ConfigError": ConfigError, "IdentityError": IdentityError, "PinSyntaxError": PinSyntaxError}
    return classes.get(kind, EdgeAgentError)(*args)


# --- the child ---------------------------------------------------------------


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.entries: List[_LogEntry] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        self.entries.append(_LogEntry(record.name, record.levelno, message))


def _run_child() -> int:
    target, args, level = pickle.load(sys.stdin.buffer)
    recorder = _Recorder()
    root = logging.getLogger()
    root.addHandler(recorder)
    root.setLevel(level)

    outcome: str = "ok"
    value: Optional[Any] = None
    try:
        module_name, function_name = TARGETS[target]
        function = getattr(importlib.import_module(module_name), function_name)
        value = function(*args)
    except EdgeAgentError as exc:
        outcome, value = "error", _describe_error(exc)
    except Exception as exc:  # noqa: BLE001 - reported to the parent instead of a traceback on stderr
        logger.debug("%s failed in its child process", target, exc_info=True)
        outcome, value = "error", ("EdgeAgentError", (f"{target} failed: {type(exc).__name__}: {exc}",))

    sys.stdout.buffer.write(pickle.dumps(_Reply(outcome, value, tuple(recorder.entries))))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    # Run through the imported module, so the reply's class pickles as edge_agent.isolated._Reply, not __main__._Reply.
    from edge_agent.isolated import _run_child as run_child

    sys.exit(run_child())
