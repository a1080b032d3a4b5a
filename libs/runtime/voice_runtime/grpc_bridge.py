"""Runs a bus handler behind a gRPC server-streaming method, so both front doors share one code path."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import Message
from opentelemetry import trace

from voice_bus.errors import BusError, code_name
from voice_bus.worker import WORK_DURATION, WORK_IN_FLIGHT, Handler, RequestContext, record_outcome
from voice_telemetry.tracing import extract_context

tracer = trace.get_tracer("voice_runtime")


async def stream_from_handler(
    handler: Handler, request: Message, context: grpc.aio.ServicerContext, span_name: str, *, service: str = ""
) -> AsyncIterator[Message]:
    """Yields the handler's events for a gRPC call, turning errors into gRPC status codes.

    The gRPC deadline becomes the handler's deadline; a client that cancels the call cancels the
    handler (its ``RequestContext.cancelled`` is set). With ``service`` set, the call is counted in
    the worker metrics with ``transport="grpc"`` (in flight, duration, outcome, errors).

    Args:
        handler: The bus handler the worker also runs.
        request: The gRPC request message.
        context: The gRPC servicer context.
        span_name: Name of the SERVER span, e.g. ``grpc.Synthesize``.
        service: ``stt``, ``llm`` or ``tts``, for the metrics; empty to skip them.
    """
    metadata = {key: value for key, value in (context.invocation_metadata() or ())}
    remaining = context.time_remaining()
    request_context = RequestContext(
        request_id=getattr(request, "request_id", "") or "grpc",
        session_id=getattr(request, "session_id", ""),
        deadline=None if remaining is None else time.time() + remaining,
    )
    started = time.monotonic()
    outcome = "ok"
    if service:
        WORK_IN_FLIGHT.labels(service, "grpc").inc()
    with tracer.start_as_current_span(span_name, context=extract_context(metadata), kind=trace.SpanKind.SERVER) as span:
        span.set_attribute("voice.session_id", request_context.session_id)
        try:
            async with contextlib.aclosing(handler(request, request_context)) as events:
                async for event in events:
                    yield event
        except BusError as exc:
            outcome = code_name(exc.code).lower()
            await context.abort(getattr(grpc.StatusCode, code_name(exc.code)), exc.message)
        except ValueError as exc:
            outcome = "invalid_argument"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc) or type(exc).__name__)
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            request_context.cancelled.set()
            raise
        except Exception as exc:
            outcome = "internal"
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            request_context.cancelled.set()
            if service:
                WORK_IN_FLIGHT.labels(service, "grpc").dec()
                WORK_DURATION.labels(service, "grpc").observe(time.monotonic() - started)
                record_outcome(service, "grpc", outcome)
