"""The Generate operation in protobuf terms, shared by the NATS worker and the gRPC server.

Spans follow the OpenTelemetry GenAI conventions. The chat messages and the answer go into the span
(``gen_ai.input.messages``, ``gen_ai.output.messages``, JSON) and a log line only with
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from opentelemetry import trace
from prometheus_client import Counter, Histogram

from voice.v1 import llm_pb2
from voice_bus.errors import UNAVAILABLE, BusError
from voice_bus.worker import RequestContext
from voice_llm.engine import BackendUnavailable, ChatEngine, Completion, TokenDelta, Usage
from voice_telemetry.metrics import LATENCY_BUCKETS_S
from voice_telemetry.tracing import capture_content, set_content_attribute

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("voice_llm")

LLM_TTFT = Histogram("voice_llm_time_to_first_token_seconds", "Request to first token", buckets=LATENCY_BUCKETS_S)
LLM_TOKENS_PER_S = Histogram(
    "voice_llm_tokens_per_second",
    "Completion tokens per second after the first token",
    buckets=(5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500),
)
LLM_TOKENS = Counter(
    "voice_llm_tokens_total", "Tokens processed, by kind (input: the prompt, output: generated)", ["kind"]
)


class GenerateHandler:
    """Streams a chat completion as token deltas, then one Completion with tool calls and usage.

    Args:
        engine: The chat engine (an OpenAI-compatible client).
        default_max_tokens: Applied when a request leaves ``max_tokens`` at 0.
    """

    def __init__(self, engine: ChatEngine, default_max_tokens: int) -> None:
        self._engine = engine
        self._default_max_tokens = default_max_tokens

    async def __call__(
        self, request: llm_pb2.GenerateRequest, context: RequestContext
    ) -> AsyncIterator[llm_pb2.GenerateEvent]:
        messages = [message_dict(m) for m in request.messages]
        tools = [tool_dict(t) for t in request.tools]
        model = request.model or getattr(self._engine, "model", "")
        with tracer.start_as_current_span(f"llm.generate {model}") as span:
            span.set_attribute("voice.session_id", context.session_id)
            span.set_attribute("gen_ai.operation.name", "chat")
            span.set_attribute("gen_ai.request.model", model)
            max_tokens = request.max_tokens or self._default_max_tokens
            span.set_attribute("gen_ai.request.max_tokens", max_tokens)
            if capture_content():
                set_content_attribute(span, "gen_ai.input.messages", json.dumps(input_messages(request.messages)))
                logger.info("prompt of %s: %s", context.request_id, json.dumps([m["content"] for m in messages]))
            stream = self._engine.stream(
                messages,
                tools=tools or None,
                tool_choice=request.tool_choice or None,
                model=request.model or None,
                max_tokens=max_tokens,
                temperature=request.temperature if request.HasField("temperature") else None,
                top_p=request.top_p if request.HasField("top_p") else None,
                stop=list(request.stop) or None,
                seed=request_seed(context.request_id),
            )
            chunks = 0
            try:
                async for item in stream:
                    if isinstance(item, TokenDelta):
                        chunks += 1
                        yield llm_pb2.GenerateEvent(delta=llm_pb2.TokenDelta(text=item.text))
                    elif isinstance(item, Completion):
                        if item.usage is None:
                            # Backends that omit usage when streaming (llama.cpp) send one token per chunk.
                            item = replace(
                                item, usage=Usage(0, chunks + len(item.tool_calls), chunks + len(item.tool_calls))
                            )
                            span.set_attribute("voice.llm.usage_estimated", True)
                        record(span, item)
                        if capture_content():
                            set_content_attribute(span, "gen_ai.output.messages", json.dumps(output_messages(item)))
                            logger.info("answer of %s: %r", context.request_id, item.text)
                        yield llm_pb2.GenerateEvent(completion=completion_proto(item))
            except BackendUnavailable as exc:
                raise BusError(UNAVAILABLE, f"LLM backend unavailable: {exc}") from None
            finally:
                await stream.aclose()


def request_seed(request_id: str) -> int | None:
    """The sampling seed of a request: fixed by its id, so that a redelivery (its worker died) or a
    re-send streams the same answer and the bus client can skip what the caller already has."""
    if not request_id:
        return None
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=4).digest(), "big") & 0x7FFFFFFF


def record(span: trace.Span, completion: Completion) -> None:
    """Puts a completion's figures on the span (GenAI conventions) and the metrics."""
    span.set_attribute("gen_ai.response.model", completion.model)
    span.set_attribute("gen_ai.response.finish_reasons", [completion.finish_reason])
    span.set_attribute("voice.llm.time_to_first_token_s", completion.time_to_first_token_s)
    if completion.usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", completion.usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", completion.usage.completion_tokens)
    LLM_TTFT.observe(completion.time_to_first_token_s)
    if completion.usage is not None:
        LLM_TOKENS.labels("input").inc(completion.usage.prompt_tokens)
        LLM_TOKENS.labels("output").inc(completion.usage.completion_tokens)
    generating_s = completion.total_time_s - completion.time_to_first_token_s
    if completion.usage is not None and completion.usage.completion_tokens > 1 and generating_s > 0:
        LLM_TOKENS_PER_S.observe((completion.usage.completion_tokens - 1) / generating_s)


def input_messages(messages) -> list[dict]:
    """Chat messages in the GenAI conventions' ``gen_ai.input.messages`` shape (role and parts)."""
    out = []
    for message in messages:
        parts: list[dict] = []
        if message.role == "tool":
            parts.append({"type": "tool_call_response", "id": message.tool_call_id, "response": message.content})
        elif message.content:
            parts.append({"type": "text", "content": message.content})
        parts.extend(
            {"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls
        )
        out.append({"role": message.role, "parts": parts})
    return out


def output_messages(completion: Completion) -> list[dict]:
    """A completion in the GenAI conventions' ``gen_ai.output.messages`` shape."""
    parts: list[dict] = [{"type": "text", "content": completion.text}] if completion.text else []
    parts.extend(
        {"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.arguments} for c in completion.tool_calls
    )
    return [{"role": "assistant", "parts": parts, "finish_reason": completion.finish_reason}]


def message_dict(message: llm_pb2.ChatMessage) -> dict:
    """An OpenAI chat message from its protobuf form."""
    out: dict = {"role": message.role, "content": message.content}
    if message.name:
        out["name"] = message.name
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
        if not message.content:
            out["content"] = None
    return out


def tool_dict(tool: llm_pb2.Tool) -> dict:
    """An OpenAI function tool from its protobuf form; bad parameter JSON is a ValueError."""
    try:
        parameters = json.loads(tool.parameters_json) if tool.parameters_json else {"type": "object", "properties": {}}
    except json.JSONDecodeError as exc:
        raise ValueError(f"tool {tool.name!r}: parameters_json is not JSON ({exc})") from None
    function = {"name": tool.name, "parameters": parameters}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def completion_proto(completion: Completion) -> llm_pb2.Completion:
    """The protobuf form of an engine completion."""
    usage = completion.usage
    return llm_pb2.Completion(
        text=completion.text,
        tool_calls=[llm_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in completion.tool_calls],
        finish_reason=completion.finish_reason,
        usage=llm_pb2.Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )
        if usage
        else None,
        model=completion.model,
        time_to_first_token_s=completion.time_to_first_token_s,
        total_time_s=completion.total_time_s,
    )
