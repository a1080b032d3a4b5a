"""Process logging: one readable line per record, with the trace and span ids of the current span.

A record's message is one line whatever it holds: control characters (a newline in a client's
stream id, a terminal escape in a name) are written escaped (``\\n``, ``\\x1b``), so no input can
forge a log line or drive the reader's terminal. Tracebacks, which the process writes itself, keep
their lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from opentelemetry import trace

_FORMAT = "%(asctime)s %(levelname)-5s %(name)s [trace=%(trace_id)s span=%(span_id)s] %(message)s"


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), m.group().encode("unicode_escape").decode()), text)


class OneLineFormatter(logging.Formatter):
    """Formats a record's message with its control characters escaped (see the module docstring)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (or ``-``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        else:
            record.trace_id = record.span_id = "-"
        return True


def setup_logging(level: str | None = None) -> None:
    """Configures the root logger for a service process.

    Args:
        level: Log level name; defaults to ``LOG_LEVEL`` from the environment, then ``INFO``.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(_FORMAT))
    handler.addFilter(TraceContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("LOG_LEVEL") or "INFO").upper())
    for noisy in ("nats", "httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
