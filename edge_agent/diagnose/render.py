"""Report output: plain ASCII in 80 columns for a serial terminal, or JSON for automation.

Every line of the text form is at most ``WIDTH`` characters of printable
ASCII. Text that comes from certificates or files is escaped, so a subject
carrying terminal control sequences cannot reach the technician's terminal.
Colour (the status tags only) is added when the output is a terminal that
supports it and ``NO_COLOR`` is not set.
"""

import datetime
import json
import os
import re
import textwrap
from typing import IO, List, Optional, Tuple

from edge_agent.diagnose.model import CheckResult, Detail, Report, Status

WIDTH = 80
_TAG_WIDTH = 7
_ID_WIDTH = 21
_FINDING_COLUMN = _TAG_WIDTH + _ID_WIDTH
_LABEL_WIDTH = 10
_DETAIL_COLUMN = _TAG_WIDTH + _LABEL_WIDTH

_TAGS = {Status.OK: "[ OK ]", Status.WARNING: "[WARN]", Status.ERROR: "[FAIL]", Status.SKIPPED: "[SKIP]"}
_COLOURS = {Status.OK: "32", Status.WARNING: "33", Status.ERROR: "1;31", Status.SKIPPED: "2"}


# --- small formatting helpers ----------------------------------------------


def to_ascii(text: str) -> str:
    """Return ``text`` as printable ASCII: control characters and non-ASCII become escapes."""
    out = []
    for char in str(text):
        code = ord(char)
        if char == "\n" or char == "\t":
            out.append(" ")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x80:
            out.append(char)
        else:
            out.append(char.encode("ascii", "backslashreplace").decode("ascii"))
    return "".join(out)


def format_duration(seconds: float) -> str:
    """Return a duration for people: ``45 s``, ``12 min``, ``3 h 5 min``, ``4 d 2 h``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 120:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def format_utc(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_timestamp(epoch_s: float) -> str:
    try:
        return format_utc(datetime.datetime.fromtimestamp(epoch_s, datetime.timezone.utc))
    except (OverflowError, OSError, ValueError):
        return f"{epoch_s:.0f} (epoch seconds)"


def split_fix(message: str) -> Tuple[str, str]:
    """Split an error of the form "problem; fix" into its two halves."""
    problem, separator, fix = message.partition("; ")
    if not separator:
        return message, ""
    return problem, fix[:1].upper() + fix[1:]


def _wrap(text: str, first_indent: int, next_indent: Optional[int] = None) -> List[str]:
    """Wrap ``text`` to WIDTH; the first line starts at ``first_indent``, the others at ``next_indent``."""
    next_indent = first_indent if next_indent is None else next_indent
    lines = textwrap.wrap(
        _join_quoted(to_ascii(text), WIDTH - next_indent),
        width=WIDTH,
        initial_indent=" " * first_indent,
        subsequent_indent=" " * next_indent,
        break_on_hyphens=False,
    )
    return [line.replace(_GLUE, " ") for line in lines] or [" " * first_indent]


# A quoted command stays on one line so that it can be copied from the screen.
_GLUE = "\x00"
_QUOTED = re.compile(r"'[^']+'")


def _join_quoted(text: str, room: int) -> str:
    return _QUOTED.sub(lambda m: m.group(0).replace(" ", _GLUE) if len(m.group(0)) <= room else m.group(0), text)


# --- text form -------------------------------------------------------------


def supports_colour(stream: IO[str]) -> bool:
    """Tell whether ANSI colour may be used on ``stream``: a terminal, not dumb, and NO_COLOR unset."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM", "dumb") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def render_text(report: Report, colour: bool = False, header: bool = True) -> str:
    """Render the report as lines of at most 80 ASCII characters (ANSI tags aside when ``colour``)."""
    lines: List[str] = []
    if header:
        lines.extend(_header_lines(report))
        lines.append("")
    for result in report.results:
        lines.extend(render_result(result, colour))
    if header:
        lines.append("")
        lines.extend(_summary_lines(report))
    return "\n".join(lines) + "\n"


def _header_lines(report: Report) -> List[str]:
    device = f" - device {report.device_id}" if report.device_id else ""
    lines = _wrap(f"edge-agent {report.version} diagnose{device} - {report.generated_at}", 0)
    lines += _wrap(f"configuration {report.config_path}", 0, 2)
    if report.offline:
        lines.append("offline: network checks skipped")
    return lines


def _summary_lines(report: Report) -> List[str]:
    counts = report.summary()
    parts = [
        f"{counts['ok']} ok",
        f"{counts['warning']} warning" + ("" if counts["warning"] == 1 else "s"),
        f"{counts['error']} error" + ("" if counts["error"] == 1 else "s"),
        f"{counts['skipped']} skipped",
    ]
    verdict = "healthy" if report.exit_code == 0 else "errors found"
    return _wrap(f"summary: {', '.join(parts)} - {verdict} (exit {report.exit_code})", 0, 9)


def render_result(result: CheckResult, colour: bool = False) -> List[str]:
    """Render one check: a tag line with its finding, then details and the remedy."""
    finding = result.finding
    if result.status is Status.SKIPPED and not finding.startswith("skipped"):
        finding = f"skipped: {finding}"
    lines = _wrap(f"{result.id:<{_ID_WIDTH - 1}} {finding}", _TAG_WIDTH, _FINDING_COLUMN)
    tag = _TAGS[result.status]
    if colour:
        tag = f"\x1b[{_COLOURS[result.status]}m{tag}\x1b[0m"
    lines[0] = tag + lines[0][len(_TAGS[result.status]):]

    for detail in result.details:
        lines.extend(_detail_lines(detail))
    if result.status in (Status.WARNING, Status.ERROR):
        if result.failure_class:
            lines.extend(_detail_lines(Detail("class", result.failure_class)))
        if result.remedy:
            lines.extend(_detail_lines(Detail("fix", result.remedy)))
    return lines


def _detail_lines(detail: Detail) -> List[str]:
    label = to_ascii(detail.label)[: _LABEL_WIDTH - 1]
    prefix = " " * _TAG_WIDTH + f"{label:<{_LABEL_WIDTH}}"
    available = WIDTH - _DETAIL_COLUMN
    wrapped = textwrap.wrap(_join_quoted(to_ascii(detail.value), available), width=available, break_on_hyphens=False)
    lines = [line.replace(_GLUE, " ") for line in wrapped] or [""]
    out = [prefix + lines[0]] + [" " * _DETAIL_COLUMN + line for line in lines[1:]]
    if detail.note:
        note = to_ascii(detail.note)
        if len(out[-1]) + 2 + len(note) <= WIDTH:
            out[-1] = f"{out[-1]}  {note}"
        else:
            out.extend(_wrap(f"({note})", _DETAIL_COLUMN + 2))
    return out


# --- JSON form -------------------------------------------------------------


def render_json(report: Report) -> str:
    """Render the report as JSON; ``ensure_ascii`` keeps it ASCII."""
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=True) + "\n"
