"""Turns raw bytes from a serial line into command lines, as a terminal's line discipline would.

A UART delivers whatever the technician's terminal sends, split at arbitrary
points: CR, LF or CRLF line ends, backspace or DEL, arrow keys as escape
sequences, UTF-8 characters cut in half between two reads, line noise that is
not UTF-8 at all, and paste floods without a newline. ``LineEditor`` accepts
all of it, echoes what was typed in printable ASCII and keeps at most
``max_chars`` characters of one line.
"""

import codecs
from dataclasses import dataclass
from typing import List

MAX_LINE_CHARS = 256
# An escape sequence longer than this is line noise; stop swallowing bytes.
_MAX_ESCAPE_BYTES = 16

_CR, _LF, _BS, _DEL, _ESC, _CTRL_C, _CTRL_U, _TAB = 0x0D, 0x0A, 0x08, 0x7F, 0x1B, 0x03, 0x15, 0x09


@dataclass(frozen=True)
class Echo:
    """Bytes to send back so the terminal shows what was typed."""

    data: bytes


@dataclass(frozen=True)
class Line:
    """A complete input line, without its line end."""

    text: str


@dataclass(frozen=True)
class Notice:
    """A message for the person at the terminal, such as a discarded overlong line."""

    text: str


class LineEditor:
    """Line assembly with echo, editing keys and a bounded buffer."""

    def __init__(self, max_chars: int = MAX_LINE_CHARS) -> None:
        self.max_chars = max_chars
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars: List[str] = []
        self._discarding = False
        self._after_cr = False
        self._escape_bytes = 0
        self._in_csi = False
        self._events: list = []

    @property
    def pending(self) -> str:
        """The characters typed so far on the current line."""
        return "".join(self._chars)

    def feed(self, data: bytes) -> list:
        """Process received bytes; return the resulting ``Echo``, ``Line`` and ``Notice`` events in order."""
        self._events = []
        for byte in data:
            self._feed_byte(byte)
        events, self._events = self._events, []
        return events

    def _feed_byte(self, byte: int) -> None:
        if self._escape_bytes:
            self._feed_escape(byte)
            return
        if byte == _LF and self._after_cr:
            self._after_cr = False  # the LF of a CRLF pair
            return
        self._after_cr = byte == _CR

        if byte in (_CR, _LF):
            self._end_line()
        elif byte in (_BS, _DEL):
            self._backspace()
        elif byte == _ESC:
            self._flush_decoder()
            self._escape_bytes, self._in_csi = 1, False
        elif byte == _CTRL_C:
            self._cancel_line("^C")
        elif byte == _CTRL_U:
            self._erase_line()
        elif byte == _TAB:
            self._add_text(" ")
        elif byte < 0x20:
            return  # other control characters carry nothing a command needs
        else:
            self._add_text(self._decoder.decode(bytes((byte,))))

    def _feed_escape(self, byte: int) -> None:
        """Swallow an escape sequence such as an arrow key (ESC [ A)."""
        self._escape_bytes += 1
        if self._escape_bytes == 2 and byte in (ord("["), ord("O")):
            self._in_csi = True
            return
        done = not self._in_csi or 0x40 <= byte <= 0x7E
        if done or self._escape_bytes >= _MAX_ESCAPE_BYTES:
            self._escape_bytes, self._in_csi = 0, False

    def _flush_decoder(self) -> None:
        # An incomplete UTF-8 sequence before a control byte becomes U+FFFD.
        self._add_text(self._decoder.decode(b"", final=True))
        self._decoder.reset()

    def _add_text(self, text: str) -> None:
        for char in text:
            if self._discarding:
                continue
            if len(self._chars) >= self.max_chars:
                self._start_discarding()
                continue
            self._chars.append(char)
            self._echo(char if 0x20 <= ord(char) < 0x7F else "?")

    def _start_discarding(self) -> None:
        self._discarding = True
        self._chars.clear()
        self._events.append(
            Notice(f"input longer than {self.max_chars} characters: discarded up to the next Enter")
        )

    def _end_line(self) -> None:
        self._flush_decoder()
        self._echo("\r\n")
        if self._discarding:
            self._discarding = False
            return
        text, self._chars = "".join(self._chars), []
        self._events.append(Line(text))

    def _backspace(self) -> None:
        if self._decoder.getstate()[0]:
            self._decoder.reset()  # the half-received character was never echoed
            return
        if self._chars and not self._discarding:
            self._chars.pop()
            self._erase_echo(1)

    def _cancel_line(self, marker: str) -> None:
        self._decoder.reset()
        self._chars.clear()
        self._discarding = False
        self._echo(f"{marker}\r\n")
        self._events.append(Line(""))

    def _erase_line(self) -> None:
        self._decoder.reset()
        self._erase_echo(len(self._chars))
        self._chars.clear()

    def _erase_echo(self, count: int) -> None:
        if count:
            self._echo("\b \b" * count)

    def _echo(self, text: str) -> None:
        data = text.encode("ascii")
        if self._events and isinstance(self._events[-1], Echo):
            self._events[-1] = Echo(self._events[-1].data + data)
        else:
            self._events.append(Echo(data))
