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
from voice_bus.worker import Handler, RequestContext
from voice_telemetry.tracing import extract_context

tracer = trace.get_tracer("voice_runtime")


async def stream_from_handler(
    handler: Handler, request: Message, context: grpc.aio.ServicerContext, span_name: str
) -> AsyncIterator[Message]:
    """Yields the handler's events for a gRPC call, turning errors into gRPC status codes.

    The gRPC deadline becomes the handler's deadline; a client that cancels the call cancels the
    handler (its ``RequestContext.cancelled`` is set).
    """
    metadata = {key: value for key, value in (context.invocation_metadata() or ())}
    remaining = context.time_remaining()
    request_context = RequestContext(
        request_id=getattr(request, "request_id", "") or "grpc",
        session_id=getattr(request, "session_id", ""),
        deadline=None if remaining is None else time.time() + remaining,
    )
    with tracer.start_as_current_span(span_name, context=extract_context(metadata), kind=trace.SpanKind.SERVER) as span:
        span.set_attribute("voice.session_id", request_context.session_id)
        try:
            async with contextlib.aclosing(handler(request, request_context)) as events:
                async for event in events:
                    yield event
        except BusError as exc:
            await context.abort(getattr(grpc.StatusCode, code_name(exc.code)), exc.message)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc) or type(exc).__name__)
        except asyncio.CancelledError:
            request_context.cancelled.set()
            raise
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            request_context.cancelled.set()
