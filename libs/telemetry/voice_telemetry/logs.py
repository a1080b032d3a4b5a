"""Process logging: one readable line per record, with the trace and span ids of the current span."""

from __future__ import annotations

import logging
import os
import sys

from opentelemetry import trace

_FORMAT = "%(asctime)s %(levelname)-5s %(name)s [trace=%(trace_id)s span=%(span_id)s] %(message)s"


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
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(TraceContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("LOG_LEVEL") or "INFO").upper())
    for noisy in ("nats", "httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
