"""Keeping secrets and personal data out of the gateway's logs.

The gateway's own log lines name sessions by id and never carry credentials, transcripts or phone
numbers unless ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``. Uvicorn's lines do: every
HTTP request and WebSocket handshake is logged with its path and query string, which would put
Retell's secret path segment (``OBFUSCATED_WS_PATH``) and the callers' custom parameters (Exotel
passes them in the query string) in the log. :func:`install_log_redaction` rewrites those lines.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Iterable

UVICORN_LOGGERS = ("uvicorn.error", "uvicorn.access")
REDACTED = "redacted"
# Query parameters whose values say nothing about the caller and help reading the log.
KEPT_QUERY_PARAMETERS = frozenset({"agent_id", "sample-rate", "sample_rate"})
_QUERY = re.compile(r"\?([^\s\"]*)")


class PathRedactor(logging.Filter):
    """Replaces secret path segments and query values in the string arguments of log records.

    Args:
        secret_segments: Path segments that must not appear in logs (Retell's socket path).
    """

    def __init__(self, secret_segments: Iterable[str]) -> None:
        super().__init__()
        segments = sorted({segment for segment in secret_segments if segment}, key=len, reverse=True)
        self._secret = (
            re.compile("/(?:" + "|".join(re.escape(s) for s in segments) + r")(?=/|\?|$|\s|\")") if segments else None
        )

    def redact(self, text: str) -> str:
        """``text`` with secret segments replaced by ``<secret>`` and query values (but a few) redacted."""
        if self._secret is not None:
            text = self._secret.sub("/<secret>", text)
        return _QUERY.sub(lambda match: "?" + _redact_query(match.group(1)), text)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        elif isinstance(record.msg, str) and not record.args:
            record.msg = self.redact(record.msg)
        return True


def _redact_query(query: str) -> str:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return "&".join(
        f"{urllib.parse.quote(key)}={urllib.parse.quote(value) if key in KEPT_QUERY_PARAMETERS else REDACTED}"
        for key, value in pairs
    )


def install_log_redaction(secret_segments: Iterable[str]) -> PathRedactor:
    """Adds a :class:`PathRedactor` to uvicorn's loggers (replacing one added before).

    Args:
        secret_segments: Path segments that must not appear in logs.

    Returns:
        The filter, for tests.
    """
    redactor = PathRedactor(secret_segments)
    for name in UVICORN_LOGGERS:
        target = logging.getLogger(name)
        for existing in [f for f in target.filters if isinstance(f, PathRedactor)]:
            target.removeFilter(existing)
        target.addFilter(redactor)
    return redactor
