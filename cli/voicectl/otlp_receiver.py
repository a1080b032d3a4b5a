"""A small local OTLP/HTTP trace receiver for development: spans as dicts in memory and as JSON lines in a file.

``voicectl up`` starts one when no exporter is configured, so ``voicectl trace`` can show a call's
spans without Jaeger; the tests and the tracing benchmark use it as a real collector. It is no part of
the shipped telemetry library (``voice_telemetry``): deployments export to an OpenTelemetry collector.

Processes reach it through the standard variables :meth:`OtlpReceiver.env` returns
(``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`` and ``OTEL_EXPORTER_OTLP_ENDPOINT``); it accepts
``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest``, optionally gzip or deflate compressed.

Each span becomes one JSON object (one line in the file)::

    {"trace_id": "…32 hex…", "span_id": "…16 hex…", "parent_span_id": "" or "…16 hex…",
     "name": "tts.synthesize", "kind": "INTERNAL", "service": "voice-tts",
     "start_ns": 1700000000000000000, "end_ns": 1700000000050000000,
     "status": "UNSET" | "OK" | "ERROR", "status_message": "",
     "attributes": {...}, "events": [{"name": "exception", "time_ns": …, "attributes": {...}}]}
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

logger = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
# The file is moved aside to ``<path>.1`` (replacing an older one) once it grows past this.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_KINDS = {
    Span.SPAN_KIND_INTERNAL: "INTERNAL",
    Span.SPAN_KIND_SERVER: "SERVER",
    Span.SPAN_KIND_CLIENT: "CLIENT",
    Span.SPAN_KIND_PRODUCER: "PRODUCER",
    Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
_STATUSES = {Status.STATUS_CODE_UNSET: "UNSET", Status.STATUS_CODE_OK: "OK", Status.STATUS_CODE_ERROR: "ERROR"}


def any_value(value: AnyValue):
    """The plain Python value of an OTLP ``AnyValue`` (arrays as lists, key-value lists as dicts)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_dict(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes_dict(attributes: list[KeyValue]) -> dict:
    """OTLP attributes as a plain dict."""
    return {a.key: any_value(a.value) for a in attributes}


def flatten(request: ExportTraceServiceRequest) -> list[dict]:
    """Every span of an export request as a JSON-ready dict (see the module docstring)."""
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes_dict(resource_spans.resource.attributes)
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": _KINDS.get(span.kind, "INTERNAL"),
                        "service": service,
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "status": _STATUSES.get(span.status.code, "UNSET"),
                        "status_message": span.status.message,
                        "attributes": attributes_dict(span.attributes),
                        "events": [
                            {"name": e.name, "time_ns": e.time_unix_nano, "attributes": attributes_dict(e.attributes)}
                            for e in span.events
                        ],
                    }
                )
    return spans


class OtlpReceiver:
    """Receives OTLP/HTTP spans on loopback; keeps them in ``spans`` and/or appends them to a file.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        path: JSON-lines file to append spans to (its folder is created); ``None`` for none.
        host: Address to listen on.
        port: Port to listen on; a free one when 0.
        keep: Whether to keep every span in :attr:`spans` too (tests do; a long-running stack
            writing to a file does not).
        max_bytes: Size after which the file is moved aside to ``<path>.1``.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: bool = True,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.keep = keep
        self.max_bytes = max_bytes
        self.spans: list[dict] = []
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.split("?")[0] != TRACES_PATH:
                    self._answer(404, b"")
                    return
                try:
                    encoding = self.headers.get("Content-Encoding", "").lower()
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    receiver.add(flatten(ExportTraceServiceRequest.FromString(body)))
                except Exception as exc:
                    logger.warning("OTLP receiver dropped a request: %s", exc)
                    self._answer(400, b"")
                    return
                self._answer(200, ExportTraceServiceResponse().SerializeToString())

            def _answer(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        """The base URL to give ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env(self, schedule_delay_ms: int = 100) -> dict[str, str]:
        """The standard OTEL_* variables that point a process at this receiver.

        Args:
            schedule_delay_ms: ``OTEL_BSP_SCHEDULE_DELAY``: how long a process batches spans before
                sending them.
        """
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": str(schedule_delay_ms),
        }

    def add(self, spans: list[dict]) -> None:
        """Records spans (what an export request carried)."""
        if not spans:
            return
        with self._lock:
            if self.keep:
                self.spans.extend(spans)
            if self.path is not None:
                self._append(spans)

    def _append(self, spans: list[dict]) -> None:
        try:
            if self.path.exists() and self.path.stat().st_size > self.max_bytes:
                self.path.replace(self.path.with_name(self.path.name + ".1"))
            with self.path.open("a", encoding="utf-8") as out:
                out.writelines(json.dumps(span, separators=(",", ":")) + "\n" for span in spans)
        except OSError as exc:
            logger.warning("could not write spans to %s: %s", self.path, exc)

    def start(self) -> OtlpReceiver:
        """Starts serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving (spans already received stay)."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def iter_spans(path: str | os.PathLike) -> Iterator[dict]:
    """The spans of a receiver's file, oldest first (the moved-aside ``<path>.1`` included).

    Lines that are not JSON objects (say, one being written right now) are skipped.
    """
    path = Path(path)
    for part in (path.with_name(path.name + ".1"), path):
        if not part.exists():
            continue
        with part.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    span = json.loads(line)
                except ValueError:
                    continue
                if isinstance(span, dict) and "span_id" in span:
                    yield span


def read_spans(path: str | os.PathLike) -> list[dict]:
    """All spans of a receiver's file; see :func:`iter_spans`."""
    return list(iter_spans(path))
