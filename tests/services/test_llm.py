"""The LLM worker as users run it: a real process against the real llama.cpp server, over the bus and gRPC."""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest

from tests.services.conftest import wait_idle
from voice.v1 import events_pb2, llm_pb2, llm_pb2_grpc
from voice_bus.catalog import HEADER_DEADLINE, HEADER_REPLY, HEADER_REQUEST_ID, SERVICES, cancel_subject
from voice_bus.errors import INVALID_ARGUMENT, BusError


def chat(text: str, **fields) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role="user", content=text)], **fields)


WEATHER_TOOL = llm_pb2.Tool(
    name="get_weather",
    description="Get the current weather for a city.",
    parameters_json=json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
)


async def test_streams_deltas_and_respects_max_tokens(bus, llm_worker):
    events = await bus.collect("llm", chat("Tell me a long story about a dragon.", max_tokens=12), timeout=120)
    deltas = [e.delta.text for e in events if e.HasField("delta")]
    completion = events[-1].completion
    assert len(deltas) >= 2
    assert "".join(deltas) == completion.text
    assert completion.finish_reason == "length"
    assert 0 < completion.usage.completion_tokens <= 12
    assert completion.time_to_first_token_s > 0


async def test_forced_tool_call_is_assembled(bus, llm_worker):
    request = chat(
        "What is the weather in Paris?", tools=[WEATHER_TOOL], tool_choice="get_weather", max_tokens=64, temperature=0.0
    )
    completion = (await bus.collect("llm", request, timeout=120))[-1].completion
    assert [call.name for call in completion.tool_calls] == ["get_weather"]
    arguments = json.loads(completion.tool_calls[0].arguments)
    assert isinstance(arguments, dict)
    assert completion.tool_calls[0].id


async def test_cancel_mid_stream_stops_output_and_frees_the_slot(nc, llm_worker):
    inbox = nc.new_inbox()
    replies = await nc.subscribe(inbox)
    request_id = uuid.uuid4().hex
    request = chat("Write a very long essay about the history of the ocean.", max_tokens=400, request_id=request_id)
    headers = {
        HEADER_REPLY: inbox,
        HEADER_REQUEST_ID: request_id,
        HEADER_DEADLINE: str(int(time.time() * 1000) + 120_000),
    }
    await nc.jetstream().publish(SERVICES["llm"].subject, request.SerializeToString(), headers=headers)
    deltas = 0
    while deltas < 3:
        reply = events_pb2.Reply.FromString((await replies.next_msg(timeout=60)).data)
        deltas += reply.HasField("llm") and reply.llm.HasField("delta")
    cancelled_at = time.monotonic()
    await nc.publish(cancel_subject(request_id), b"")
    late = 0
    while True:
        reply = events_pb2.Reply.FromString((await replies.next_msg(timeout=5)).data)
        if reply.HasField("llm") and time.monotonic() - cancelled_at > 0.3:
            late += 1
        if reply.final:
            break
    stopped_after = time.monotonic() - cancelled_at
    freed_after = stopped_after + await wait_idle(nc, "llm", 2.0)
    assert reply.error.code == events_pb2.ERROR_CODE_CANCELLED
    assert late == 0
    assert stopped_after < 0.3
    assert freed_after < 1.0


@pytest.mark.parametrize(
    "request_",
    [
        llm_pb2.GenerateRequest(),
        chat("hi", tools=[llm_pb2.Tool(name="broken", parameters_json="{not json")]),
        chat("hi", tool_choice="no_such_tool"),
        llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role="wizard", content="hi")]),
    ],
    ids=["no messages", "bad tool schema", "unknown tool choice", "bad role"],
)
async def test_bad_requests_are_invalid_argument(bus, llm_worker, request_):
    with pytest.raises(BusError) as err:
        await bus.collect("llm", request_, timeout=30)
    assert err.value.code == INVALID_ARGUMENT
    assert llm_worker.child.running()


async def test_generate_over_grpc(llm_worker):
    async with grpc.aio.insecure_channel(llm_worker.target) as channel:
        stub = llm_pb2_grpc.LanguageModelStub(channel)
        events = [e async for e in stub.Generate(chat("Say hello.", max_tokens=8))]
        assert events[-1].HasField("completion") and events[-1].completion.text
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(llm_pb2.GenerateRequest()):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
