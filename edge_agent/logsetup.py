"""Logging set-up for the command line and the service.

Lines are plain text; under systemd (``JOURNAL_STREAM`` set) the timestamp is
left out because journald adds its own. Identical messages repeated within
a window are collapsed and the next line reports how many were suppressed.
"""

import json
import logging
import os
import sys
import threading
import time
from typing import Dict, Optional, Tuple

REPEAT_WINDOW_S = 60.0


class RepeatFilter(logging.Filter):
    """Let the first of identical records through per window and count the rest."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: Dict[Tuple[str, int, str], Tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = time.monotonic()
        with self._lock:
            first, suppressed = self._seen.get(key, (0.0, 0))
            if now - first < self.window_s:
                self._seen[key] = (first, suppressed + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > 1000:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
        if suppressed:
            record.msg = f"{record.getMessage()} (repeated {suppressed} more times in the last {self.window_s:g} s)"
            record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def configure_logging(level: str = "info", log_format: str = "text", stream=None) -> None:
    """Configure the root logger once for a command-line run."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    elif os.environ.get("JOURNAL_STREAM"):
        formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    handler.addFilter(RepeatFilter())

    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # paho logs every packet at debug; keep it at info unless asked.
    logging.getLogger("edge_agent.uplink.paho").setLevel(max(logging.INFO, root.level))


def level_name(name: Optional[str], default: str = "info") -> str:
    return (name or default).lower()
