"""OpenAIChatEngine against a real llama.cpp server (SmolLM2 on CPU) and a scripted stub backend."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.llama import LlamaServer, free_port
from voice_llm.embedded import MODEL_ALIAS
from voice_llm.engine import BackendUnavailable, ChatEngine, Completion, InvalidRequest, TokenDelta, ToolCall, Usage
from voice_llm.openai_engine import DEFAULT_CONNECT_TIMEOUT_S, OpenAIChatEngine

logger = logging.getLogger(__name__)

DATA = Path(__file__).parent / "data"
HELLO = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello and introduce yourself in two sentences."},
]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
STRING = {"type": "string"}
CANCEL_BUDGET_S = 0.3
DISCONNECT_LOG_LINE = "disconnected"


async def collect(events: AsyncIterator[TokenDelta | Completion]) -> list[TokenDelta | Completion]:
    """Drains a stream into a list."""
    return [event async for event in events]


def split(events: list[TokenDelta | Completion]) -> tuple[list[TokenDelta], Completion]:
    """Checks the stream's shape (deltas, then exactly one Completion) and separates the two."""
    assert events, "the stream yielded nothing"
    *deltas, completion = events
    assert isinstance(completion, Completion)
    assert all(isinstance(delta, TokenDelta) for delta in deltas)
    return deltas, completion


def unreachable_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


# ---------------------------------------------------------------------------------------------
# Request validation: rejected before anything is sent.


@pytest.mark.parametrize(
    ("messages", "options"),
    [
        ([], {}),
        ("hello", {}),
        ([{"role": "robot", "content": "hi"}], {}),
        ([{"content": "hi"}], {}),
        ([{"role": "user", "content": None}], {}),
        ([{"role": "user", "content": 42}], {}),
        ([{"role": "tool", "content": "22 C"}], {}),
        (HELLO, {"max_tokens": -1}),
        (HELLO, {"max_tokens": 0}),
        (HELLO, {"max_tokens": 2.5}),
        (HELLO, {"temperature": 3.0}),
        (HELLO, {"top_p": -0.1}),
        (HELLO, {"stop": "\n"}),
        (HELLO, {"stop": ["a", "b", "c", "d", "e"]}),
        (HELLO, {"model": ""}),
        (HELLO, {"tools": [{"type": "function"}]}),
        (HELLO, {"tools": [{"type": "retrieval", "function": {"name": "x"}}]}),
        (HELLO, {"tools": [{"type": "function", "function": {"name": "has space"}}]}),
        (HELLO, {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}),
        (HELLO, {"tools": [{"type": "function", "function": {"name": "f", "parameters": STRING}}]}),
        (HELLO, {"tools": [WEATHER_TOOL, WEATHER_TOOL]}),
        (HELLO, {"tools": [WEATHER_TOOL], "tool_choice": "get_time"}),
        (HELLO, {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function"}}),
        (HELLO, {"tool_choice": "required"}),
    ],
)
async def test_invalid_requests_are_rejected_before_sending(messages: Any, options: dict) -> None:
    engine = OpenAIChatEngine(unreachable_url(), "any")
    try:
        with pytest.raises(InvalidRequest):
            await collect(engine.stream(messages, **options))
    finally:
        await engine.close()


# ---------------------------------------------------------------------------------------------
# An unreachable backend.


async def test_unreachable_backend_raises_backend_unavailable_quickly() -> None:
    engine = OpenAIChatEngine(unreachable_url(), "any", timeout_s=30.0)
    try:
        started = time.perf_counter()
        with pytest.raises(BackendUnavailable):
            await collect(engine.stream(HELLO))
        assert time.perf_counter() - started < 1.0
        assert await engine.ready() is False
    finally:
        await engine.close()


async def test_a_backend_that_never_accepts_fails_after_the_connect_timeout() -> None:
    """A host that drops connection attempts (here a listener whose accept queue is full) is given up on
    after the connect timeout, not after the whole request timeout."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    queued = [socket.create_connection(("127.0.0.1", port), timeout=1.0)]
    engine = OpenAIChatEngine(f"http://127.0.0.1:{port}/v1", "any", timeout_s=30.0)
    try:
        started = time.perf_counter()
        with pytest.raises(BackendUnavailable):
            await collect(engine.stream(HELLO))
        elapsed = time.perf_counter() - started
        assert DEFAULT_CONNECT_TIMEOUT_S - 0.1 < elapsed < DEFAULT_CONNECT_TIMEOUT_S + 1.0
    finally:
        await engine.close()
        for connection in queued:
            connection.close()
        listener.close()


# ---------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible backend, for the responses llama.cpp never gives.


@dataclass
class Reply:
    """What the stub answers: a JSON document, or an SSE stream of chunks."""

    status: int = 200
    json_body: Any = None
    chunks: list[dict] = field(default_factory=list)
    done: bool = True
    delay_s: float = 0.0


class StubBackend:
    """A minimal HTTP/1.1 server that answers each request with a scripted :class:`Reply`."""

    def __init__(self, respond: Callable[[dict], Reply]) -> None:
        self._respond = respond
        self.requests: list[dict] = []
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def __aenter__(self) -> StubBackend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line)
        length = int({k.lower(): v for k, v in headers.items()}.get("content-length", "0"))
        body = json.loads(await reader.readexactly(length)) if length else {}
        self.requests.append(body)
        reply = self._respond(body)
        await asyncio.sleep(reply.delay_s)
        if reply.json_body is not None:
            payload = json.dumps(reply.json_body).encode()
            writer.write(
                f"HTTP/1.1 {reply.status} X\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            for chunk in reply.chunks:
                writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if reply.done:
                writer.write(b"data: [DONE]\n\n")
        await writer.drain()
        writer.close()


def recorded(name: str) -> list[dict]:
    return json.loads((DATA / name).read_text())


async def test_recorded_tool_call_stream_yields_tool_calls_and_usage() -> None:
    async with StubBackend(lambda body: Reply(chunks=recorded("tool_call_stream.json"))) as stub:
        engine = OpenAIChatEngine(stub.base_url, "gpt-4o-mini")
        try:
            deltas, completion = split(await collect(engine.stream(HELLO, tools=[WEATHER_TOOL])))
        finally:
            await engine.close()

    assert deltas == []
    assert completion.finish_reason == "tool_calls"
    assert completion.tool_calls == (
        ToolCall(
            "call_Wm2fTqz8XbNcR4kLp0sVd7Hj",
            "get_weather",
            '{"location": "Paris, France", "unit": "celsius"}',
        ),
        ToolCall("call_7YhGd1sQeKxA3nVb9ZpLc2Uo", "get_time", '{"timezone": "Europe/Paris"}'),
    )
    assert completion.usage == Usage(prompt_tokens=112, completion_tokens=48, total_tokens=160)
    assert completion.model == "gpt-4o-mini-2024-07-18"
    assert stub.requests[0]["stream"] is True
    assert stub.requests[0]["stream_options"] == {"include_usage": True}


async def test_recorded_text_stream_and_tool_choice_by_name() -> None:
    async with StubBackend(lambda body: Reply(chunks=recorded("text_stream.json"))) as stub:
        engine = OpenAIChatEngine(stub.base_url, "gpt-4o-mini")
        try:
            deltas, completion = split(
                await collect(engine.stream(HELLO, tools=[WEATHER_TOOL], tool_choice="get_weather"))
            )
        finally:
            await engine.close()

    assert [delta.text for delta in deltas] == ["It", "'s", " sunny", " in", " Paris", " right", " now", "."]
    assert completion.text == "It's sunny in Paris right now."
    assert completion.finish_reason == "stop"
    assert completion.tool_calls == ()
    assert completion.usage == Usage(prompt_tokens=21, completion_tokens=8, total_tokens=29)
    assert 0 < completion.time_to_first_token_s <= completion.total_time_s
    assert stub.requests[0]["tool_choice"] == {
        "type": "function",
        "function": {"name": "get_weather"},
    }


async def test_a_slow_backend_is_not_cut_short_by_the_connect_timeout() -> None:
    chunks = recorded("text_stream.json")
    async with StubBackend(lambda body: Reply(chunks=chunks, delay_s=1.5)) as stub:
        engine = OpenAIChatEngine(stub.base_url, "m", timeout_s=10.0, connect_timeout_s=0.5)
        try:
            _, completion = split(await collect(engine.stream(HELLO)))
        finally:
            await engine.close()
    assert completion.text and completion.time_to_first_token_s >= 1.5


async def test_backend_rejecting_stream_options_is_asked_again_without_them() -> None:
    def respond(body: dict) -> Reply:
        if "stream_options" in body:
            error = {
                "message": "Unrecognized request argument supplied: stream_options",
                "type": "invalid_request_error",
            }
            return Reply(status=400, json_body={"error": error})
        return Reply(chunks=recorded("text_stream.json")[:-1])

    async with StubBackend(respond) as stub:
        engine = OpenAIChatEngine(stub.base_url, "m")
        try:
            _, first = split(await collect(engine.stream(HELLO)))
            _, second = split(await collect(engine.stream(HELLO)))
        finally:
            await engine.close()

    assert first.text == second.text == "It's sunny in Paris right now."
    assert first.usage is None
    assert ["stream_options" in body for body in stub.requests] == [True, False, False]


async def test_backend_4xx_becomes_invalid_request_with_the_backend_message() -> None:
    error = {
        "message": "This model's maximum context length is 2048 tokens",
        "type": "invalid_request_error",
    }
    async with StubBackend(lambda body: Reply(status=400, json_body={"error": error})) as stub:
        engine = OpenAIChatEngine(stub.base_url, "m")
        try:
            with pytest.raises(InvalidRequest, match="maximum context length is 2048"):
                await collect(engine.stream(HELLO))
        finally:
            await engine.close()


async def test_backend_5xx_becomes_backend_unavailable() -> None:
    error = {"message": "model crashed", "type": "internal_server_error"}
    async with StubBackend(lambda body: Reply(status=503, json_body={"error": error})) as stub:
        engine = OpenAIChatEngine(stub.base_url, "m")
        try:
            with pytest.raises(BackendUnavailable, match="model crashed"):
                await collect(engine.stream(HELLO))
        finally:
            await engine.close()


async def test_stream_cut_short_becomes_backend_unavailable() -> None:
    truncated = recorded("text_stream.json")[:4]
    async with StubBackend(lambda body: Reply(chunks=truncated, done=False)) as stub:
        engine = OpenAIChatEngine(stub.base_url, "m")
        try:
            events: list[TokenDelta | Completion] = []
            with pytest.raises(BackendUnavailable, match="finish_reason"):
                async for event in engine.stream(HELLO):
                    events.append(event)
        finally:
            await engine.close()

    texts = [event.text for event in events if isinstance(event, TokenDelta)]
    assert texts == ["It", "'s", " sunny"]


# ---------------------------------------------------------------------------------------------
# The real llama.cpp server.


@pytest.fixture
async def engine(llama_server: str) -> AsyncIterator[OpenAIChatEngine]:
    chat = OpenAIChatEngine(llama_server, MODEL_ALIAS)
    await chat.start()
    yield chat
    await chat.close()


async def test_llama_is_ready(engine: OpenAIChatEngine) -> None:
    assert isinstance(engine, ChatEngine)
    assert await engine.ready() is True


async def test_llama_streams_deltas_then_one_completion(engine: OpenAIChatEngine) -> None:
    deltas, completion = split(await collect(engine.stream(HELLO, max_tokens=48, temperature=0.0)))

    assert len(deltas) >= 2
    assert completion.text == "".join(delta.text for delta in deltas)
    assert completion.text.strip()
    assert completion.finish_reason in {"stop", "length"}
    assert completion.tool_calls == ()
    assert completion.model
    assert 0 < completion.time_to_first_token_s < completion.total_time_s
    logger.info(
        "llama: TTFT %.3f s, %d deltas in %.3f s, %.1f deltas/s after the first, usage %s",
        completion.time_to_first_token_s,
        len(deltas),
        completion.total_time_s,
        (len(deltas) - 1) / (completion.total_time_s - completion.time_to_first_token_s),
        completion.usage,
    )


async def test_llama_respects_max_tokens(engine: OpenAIChatEngine) -> None:
    deltas, completion = split(await collect(engine.stream(STORY, max_tokens=5)))

    assert completion.finish_reason == "length"
    assert 1 <= len(deltas) <= 5
    if completion.usage is not None:
        assert completion.usage.completion_tokens <= 5


@pytest.mark.parametrize(
    "tool_choice",
    ["get_weather", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["by-name", "openai-dict"],
)
async def test_llama_forced_tool_call_assembles(engine: OpenAIChatEngine, tool_choice: str | dict) -> None:
    messages = [{"role": "user", "content": "What is the weather like in Paris, in celsius?"}]

    deltas, completion = split(
        await collect(
            engine.stream(
                messages,
                tools=[WEATHER_TOOL],
                tool_choice=tool_choice,
                max_tokens=96,
                temperature=0.0,
            )
        )
    )

    assert completion.finish_reason == "tool_calls"
    assert deltas == []
    assert len(completion.tool_calls) == 1
    call = completion.tool_calls[0]
    assert call.name == "get_weather"
    assert call.id
    arguments = json.loads(call.arguments)
    assert isinstance(arguments["city"], str)
    assert arguments["unit"] in {"celsius", "fahrenheit"}
    assert 0 < completion.time_to_first_token_s < completion.total_time_s


async def test_llama_4xx_becomes_invalid_request(llama_server: str) -> None:
    # llama-cpp-python answers 500 even to schema errors; a wrong API root is its plainest 4xx.
    engine = OpenAIChatEngine(llama_server.removesuffix("/v1") + "/v2", MODEL_ALIAS)
    try:
        with pytest.raises(InvalidRequest, match="Not Found"):
            await collect(engine.stream(HELLO, max_tokens=4))
    finally:
        await engine.close()


async def test_llama_failing_mid_stream_leaves_the_engine_usable(engine: OpenAIChatEngine) -> None:
    # A prompt longer than the context fails only once llama-cpp-python has answered 200: it ends
    # the stream without a finish_reason, then resets the keep-alive connection.
    too_long = [{"role": "user", "content": "word " * 4000}]
    with pytest.raises(BackendUnavailable, match="finish_reason"):
        await collect(engine.stream(too_long, max_tokens=4))

    _, completion = split(await collect(engine.stream(HELLO, max_tokens=4)))
    assert completion.finish_reason in {"stop", "length"}


async def wait_for_disconnects(server: LlamaServer, count: int, timeout_s: float = 5.0) -> float:
    """Waits until the server has logged ``count`` client disconnects in all; returns the wait."""
    started = time.monotonic()
    while server.log_text().count(DISCONNECT_LOG_LINE) < count:
        waited = time.monotonic() - started
        assert waited < timeout_s, f"no disconnect logged:\n{server.log_text()[-2000:]}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def assert_server_free(engine: OpenAIChatEngine) -> None:
    """A fresh request right away completes normally: nothing still holds the model."""
    started = time.perf_counter()
    _, completion = split(await collect(engine.stream(HELLO, max_tokens=8)))
    assert completion.finish_reason in {"stop", "length"}
    assert completion.text
    logger.info(
        "request after cancel: TTFT %.3f s, total %.3f s",
        completion.time_to_first_token_s,
        time.perf_counter() - started,
    )


async def test_cancelling_the_consumer_closes_the_upstream_stream(
    engine: OpenAIChatEngine, llama_server_process: LlamaServer
) -> None:
    disconnects = llama_server_process.log_text().count(DISCONNECT_LOG_LINE)
    stream = engine.stream(STORY, max_tokens=1000)
    two_deltas = asyncio.Event()
    seen: list[TokenDelta | Completion] = []

    async def consume() -> None:
        async for event in stream:
            seen.append(event)
            if len(seen) == 2:
                two_deltas.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(two_deltas.wait(), timeout=60)
    cancelled_at = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    closed_after = time.perf_counter() - cancelled_at

    assert stream.ag_frame is None, "the generator is still open"
    assert closed_after < CANCEL_BUDGET_S
    assert not any(isinstance(event, Completion) for event in seen)
    server_stopped_after = closed_after + await wait_for_disconnects(llama_server_process, disconnects + 1)
    logger.info(
        "cancel -> generator closed in %.1f ms, server stopped streaming within %.0f ms",
        closed_after * 1000,
        server_stopped_after * 1000,
    )
    await assert_server_free(engine)


async def test_aclose_mid_stream_closes_the_upstream_stream(
    engine: OpenAIChatEngine, llama_server_process: LlamaServer
) -> None:
    disconnects = llama_server_process.log_text().count(DISCONNECT_LOG_LINE)
    stream = engine.stream(STORY, max_tokens=1000)
    assert isinstance(await anext(stream), TokenDelta)
    assert isinstance(await anext(stream), TokenDelta)

    started = time.perf_counter()
    await stream.aclose()
    closed_after = time.perf_counter() - started

    assert closed_after < CANCEL_BUDGET_S
    server_stopped_after = closed_after + await wait_for_disconnects(llama_server_process, disconnects + 1)
    logger.info(
        "aclose -> generator closed in %.1f ms, server stopped streaming within %.0f ms",
        closed_after * 1000,
        server_stopped_after * 1000,
    )
    await assert_server_free(engine)
