"""OpenTelemetry set-up from the standard OTEL_* variables, and W3C context propagation helpers.

Tracing is configured only through the standard environment: ``OTEL_SDK_DISABLED``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_EXPORTER`` (``otlp``,
``console`` or ``none``), ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc`` or ``http/protobuf``) and the
``OTEL_EXPORTER_OTLP_*`` endpoint variables read by the exporters themselves. With no exporter
variable set at all, spans are created (so trace ids reach the logs and the bus) but not exported.

Transcripts, prompts and synthesized text are personal data: they stay out of spans and logs unless
the operator sets ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`` (the OpenTelemetry
GenAI instrumentations' variable); :func:`capture_content` reads it and :func:`set_content_attribute`
honours it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping, MutableMapping

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

logger = logging.getLogger(__name__)

_configured = False

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def _exporter_from_env() -> SpanExporter | None:
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint_set = any(
        os.environ.get(var) for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    if not names:
        names = "otlp" if endpoint_set else "none"
    if names == "none":
        return None
    if names == "console":
        return ConsoleSpanExporter()
    if names != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={names!r}: supported values are otlp, console, none")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        return HTTPSpanExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: supported values are grpc, http/protobuf")


def setup_tracing(service_name: str) -> None:
    """Installs the global tracer provider for this process (idempotent).

    Args:
        service_name: Used when ``OTEL_SERVICE_NAME`` is not set.
    """
    global _configured
    if _configured or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    resource = resource.merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    exporter = _exporter_from_env()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured = True
    logger.info("tracing ready (exporter: %s)", type(exporter).__name__ if exporter else "none")


def shutdown_tracing() -> None:
    """Flushes and stops span export, if the SDK provider is installed."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def inject_context(carrier: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Writes the current W3C ``traceparent``/``tracestate`` into ``carrier`` and returns it."""
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str] | None) -> context.Context:
    """Reads a W3C trace context from message headers or gRPC metadata."""
    return propagate.extract(dict(carrier or {}))


@functools.cache
def capture_content() -> bool:
    """Whether transcript, prompt and synthesized text may go into spans and logs (default: no).

    Reads ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` once per process: ``true`` (any
    case) opts in; anything else, or unset, keeps text out. Tests that change the variable call
    ``capture_content.cache_clear()``.
    """
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() == "true"


def set_content_attribute(span: trace.Span, key: str, value: str) -> None:
    """Sets a span attribute that holds user or model text, only when :func:`capture_content` allows it.

    Args:
        span: The span to annotate.
        key: Attribute name, e.g. ``voice.stt.transcript`` or ``gen_ai.input.messages``.
        value: The text (or JSON text).
    """
    if capture_content():
        span.set_attribute(key, value)


# OTLP carries integer attributes as int64; larger values make the exporter fail the whole batch.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_CLIENT_STRING = 256


def clamp_attribute(value: object) -> str | int | float | bool:
    """A span attribute value made from client input, clamped to what OTLP can carry.

    Integers are clamped to int64, non-finite floats become strings (``"inf"``), strings are cut to
    :data:`MAX_CLIENT_STRING` characters, and anything else becomes its ``repr`` (cut the same way).

    Args:
        value: A value a client chose (an id, a counter, a name).

    Returns:
        A value every exporter accepts.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return min(max(value, INT64_MIN), INT64_MAX)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    text = value if isinstance(value, str) else repr(value)
    return text[:MAX_CLIENT_STRING]
