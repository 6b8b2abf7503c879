"""Log lines that a network peer cannot forge: control characters in logged text are escaped.

Values in our log come from the network (AE titles, UIDs, descriptions, error
messages quoting received bytes). A CR or LF in one would start a fake log line,
an ESC would drive the terminal that shows the log. :func:`printable` escapes
them where a value is taken in; :class:`PrintableFormatter` escapes every
message at the end (the CLI installs it), so a value logged raw anywhere, by
us or by pynetdicom (which quotes a bad AE title in its error), is still one
harmless line. Tracebacks keep their line breaks, but every line of one is
indented with a bar, so a line break inside a quoted value cannot start what
looks like a log record.
"""
from __future__ import annotations

import logging
import re

# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: object) -> str:
    """``text`` as a string with every control character written as an escape (\\n, \\x1b, \\x00...)."""
    return _CONTROL.sub(_escape, str(text))


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class PrintableFormatter(logging.Formatter):
    """A Formatter whose message part is passed through :func:`printable`."""

    def format(self, record: logging.LogRecord) -> str:
        cached, record.exc_text = record.exc_text, None  # another handler's unindented traceback
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  | " + printable(line) for line in text.split("\n"))


def configure_logging(level: int, format: str) -> None:
    """Log to stderr at ``level`` through a :class:`PrintableFormatter` (the CLI and the worker process)."""
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter(format))
    logging.basicConfig(level=level, handlers=[handler])
