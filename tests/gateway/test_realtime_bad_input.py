"""Bad input on ``/v1/realtime``: every bad event gets the protocol's ``error`` event and the session lives on.
Explicit cases, then Hypothesis: the pure parsers in process, and sequences of bad and half-valid client
events against a real gateway process (no workers behind it), as tests/gateway/test_fuzz.py does for the
other dialects."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway.test_fuzz import json_values, nasty_frames, nasty_text, no_tracebacks, shaped
from tests.support.gateway import api_client
from voice_gateway.agents import Agent
from voice_gateway.config import DEFAULT_AGENT_FILE
from voice_gateway.dialects.realtime_events import Wire
from voice_gateway.dialects.realtime_items import Items
from voice_gateway.dialects.realtime_session import ConfigError, RealtimeConfig, agent_for, apply_update

KEY = "realtime-key"
IN_PROCESS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
END_TO_END = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
AGENT = Agent.model_validate_json(DEFAULT_AGENT_FILE.read_text())


@pytest.fixture(scope="module")
def bare(start_bare_gateway):
    return start_bare_gateway(GATEWAY_API_KEYS=KEY, GATEWAY_MAX_FRAME_BYTES="65536")


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def url(gateway) -> str:
    return gateway.url.replace("http://", "ws://") + "/v1/realtime?model=default"


def connect(gateway, beta: bool = False):
    headers = {"Authorization": f"Bearer {KEY}", **({"OpenAI-Beta": "realtime=v1"} if beta else {})}
    return websockets.connect(url(gateway), additional_headers=headers, max_size=None)


async def next_event(ws, timeout: float = 10.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def answer(ws, message) -> dict:
    await ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
    return await next_event(ws)


BAD = [
    ("unknown event", {"type": "dance"}, None),
    ("no type", {"session": {}}, None),
    ("malformed JSON", "{", None),
    ("not an object", "[1, 2]", None),
    ("binary frame", b"\x00\x01", None),
    ("not base64", {"type": "input_audio_buffer.append", "audio": "%%%"}, "audio"),
    ("odd PCM16", {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x00").decode()}, "audio"),
    ("audio not a string", {"type": "input_audio_buffer.append", "audio": 5}, "audio"),
    (
        "16 kHz PCM",
        {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}},
        "session.audio.input.format",
    ),
    ("opus", {"type": "session.update", "session": {"input_audio_format": "opus"}}, "session.input_audio_format"),
    (
        "bad VAD",
        {"type": "session.update", "session": {"turn_detection": {"type": "loud_vad"}}},
        "session.turn_detection",
    ),
    (
        "bad eagerness",
        {
            "type": "session.update",
            "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "max"}}}},
        },
        "session.audio.input.turn_detection.eagerness",
    ),
    ("hot", {"type": "session.update", "session": {"temperature": "hot"}}, "session.temperature"),
    (
        "tool choice",
        {"type": "session.update", "session": {"tool_choice": {"type": "function", "name": "x"}}},
        "session.tool_choice",
    ),
    ("empty commit", {"type": "input_audio_buffer.commit"}, "input_audio_buffer"),
    (
        "unknown item",
        {"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 1},
        "item_id",
    ),
    ("delete unknown", {"type": "conversation.item.delete", "item_id": "nope"}, "item_id"),
    ("retrieve unknown", {"type": "conversation.item.retrieve", "item_id": "nope"}, "item_id"),
    ("bad item", {"type": "conversation.item.create", "item": {"type": "message", "role": "robot"}}, "item.type"),
    (
        "no content",
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": []}},
        "item.content",
    ),
    ("cancel nothing", {"type": "response.cancel"}, "response_id"),
    (
        "bad response",
        {"type": "response.create", "response": {"output_modalities": ["video"]}},
        "response.output_modalities",
    ),
]


async def test_every_bad_event_gets_an_error_and_the_session_lives(bare):
    since = len(bare.log.getvalue())
    async with connect(bare) as ws:
        await ws.send(json.dumps({"type": "dance", "event_id": "evt_early"}))  # before reading session.created
        created = await next_event(ws)
        assert created["type"] == "session.created" and created["event_id"]
        early = await next_event(ws)
        assert early["type"] == "error" and early["error"]["event_id"] == "evt_early"
        for name, message, param in BAD:
            event = await answer(ws, message)
            assert event["type"] == "error", (name, event)
            assert event["error"]["type"] == "invalid_request_error" and event["error"]["message"], (name, event)
            if param is not None:
                assert event["error"]["param"] == param, (name, event)
        big = {"type": "input_audio_buffer.append", "audio": "A" * 70_000}
        event = await answer(ws, big)
        assert event["type"] == "error" and "exceeds the limit" in event["error"]["message"]
        updated = await answer(ws, {"type": "session.update", "session": {"instructions": "Hi", "speed": 1.2, "x": 1}})
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Hi"
    no_tracebacks(bare, since)


async def test_a_full_push_to_talk_buffer_is_refused_and_the_rest_goes_on(bare):
    async with connect(bare) as ws:
        await next_event(ws)
        update = {"input_audio_format": "g711_ulaw", "turn_detection": None}
        assert (await answer(ws, {"type": "session.update", "session": update}))["type"] == "session.updated"
        second = base64.b64encode(b"\xff" * 8000).decode()  # one second of μ-law silence
        for _ in range(30):
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": second}))
        event = await answer(ws, {"type": "input_audio_buffer.append", "audio": second})
        assert event["type"] == "error" and "full" in event["error"]["message"]
        assert (await answer(ws, {"type": "input_audio_buffer.clear"}))["type"] == "input_audio_buffer.cleared"
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": second}))
        committed = await answer(ws, {"type": "input_audio_buffer.commit"})
        assert committed["type"] == "input_audio_buffer.committed" and committed["item_id"]


async def test_no_key_is_refused_with_an_error_and_1008(bare):
    async with websockets.connect(url(bare)) as ws:
        event = await next_event(ws)
        assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd.code == 1008


# -- Hypothesis -------------------------------------------------------------------------------------------

EVENT_TYPES = [
    "session.update",
    "transcription_session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.truncate",
    "conversation.item.delete",
    "response.create",
    "response.cancel",
    "output_audio_buffer.clear",
    "dance",
]
formats = st.sampled_from(["pcm16", "g711_ulaw", "g711_alaw", "opus"]) | shaped(
    {"type": st.sampled_from(["audio/pcm", "audio/pcmu", "audio/pcma", "audio/x"]), "rate": json_values}
)
turn_detection = st.none() | shaped(
    {
        "type": st.sampled_from(["server_vad", "semantic_vad", "x"]) | json_values,
        "eagerness": st.sampled_from(["low", "high", "max"]) | json_values,
        "silence_duration_ms": st.integers(-10, 9000) | json_values,
        "prefix_padding_ms": json_values,
        "threshold": json_values,
        "create_response": json_values,
        "interrupt_response": json_values,
    }
)
sessions = shaped(
    {
        "type": st.just("realtime"),
        "instructions": nasty_text | json_values,
        "output_modalities": st.sampled_from([["text"], ["audio"], ["video"], []]) | json_values,
        "modalities": st.sampled_from([["text", "audio"], ["text"]]) | json_values,
        "input_audio_format": formats,
        "output_audio_format": formats,
        "turn_detection": turn_detection,
        "voice": st.sampled_from(["alloy", "", "x" * 300]) | json_values,
        "tools": st.lists(shaped({"type": st.just("function"), "name": nasty_text, "parameters": json_values})),
        "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "name": "f"}]) | json_values,
        "temperature": json_values,
        "max_output_tokens": st.sampled_from(["inf", 0, 10, 5000]) | json_values,
        "audio": shaped(
            {
                "input": shaped({"format": formats, "turn_detection": turn_detection, "transcription": json_values}),
                "output": shaped({"format": formats, "voice": json_values, "speed": json_values}),
            }
        )
        | json_values,
    }
)
items = shaped(
    {
        "id": nasty_text,
        "type": st.sampled_from(["message", "function_call", "function_call_output", "x"]) | json_values,
        "role": st.sampled_from(["user", "assistant", "system", "robot"]) | json_values,
        "content": st.lists(
            shaped(
                {
                    "type": st.sampled_from(["input_text", "input_audio", "output_text", "audio", "x"]),
                    "text": nasty_text | json_values,
                    "audio": st.sampled_from(["AAAA", "%%%", "AAA"]) | json_values,
                    "transcript": nasty_text | json_values,
                }
            ),
            max_size=3,
        )
        | json_values,
        "call_id": nasty_text | json_values,
        "output": nasty_text | json_values,
        "name": nasty_text | json_values,
        "arguments": nasty_text | json_values,
    }
)
client_events = shaped(
    {
        "type": st.sampled_from(EVENT_TYPES) | json_values,
        "event_id": nasty_text | json_values,
        "session": sessions | json_values,
        "audio": st.sampled_from(["", "%%%", "AAAA", "AAA", "/w==", "é"]) | json_values,
        "item": items | json_values,
        "item_id": nasty_text | json_values,
        "content_index": json_values,
        "audio_end_ms": st.integers(-5, 10**6) | json_values,
        "response": shaped({"output_modalities": json_values, "instructions": json_values, "tool_choice": json_values})
        | json_values,
        "response_id": nasty_text | json_values,
    }
)


@IN_PROCESS
@given(sessions | json_values, st.booleans())
def test_session_updates_apply_or_raise_config_error(session, twice):
    config = RealtimeConfig.from_agent(AGENT)
    try:
        config, notes = apply_update(config, session)
        agent = agent_for(config, AGENT)
    except ConfigError as error:
        assert str(error) and isinstance(error.param, str)
        return
    assert isinstance(agent, Agent) and all(isinstance(note, str) for note in notes)
    json.dumps(config.__dict__, allow_nan=False)


@IN_PROCESS
@given(items | json_values, st.booleans())
def test_client_items_parse_or_raise_config_error(item, beta):
    try:
        shown, entry, pending = Items().from_client(item, Wire(beta))
    except ConfigError as error:
        assert str(error) and isinstance(error.param, str)
        return
    assert isinstance(shown["id"], str) and shown["type"] in ("message", "function_call", "function_call_output")
    assert entry is None or isinstance(entry["content"], str)
    assert pending is None or isinstance(pending, str)


@END_TO_END
@given(st.lists(client_events.map(json.dumps) | nasty_frames, min_size=1, max_size=8), st.booleans())
def test_the_realtime_socket_survives_fuzz(bare, loop, frames, beta):
    since = len(bare.log.getvalue())

    async def scenario() -> None:
        async with connect(bare, beta) as ws:
            for text in frames:
                await ws.send(text)
            await ws.send(json.dumps({"type": "session.update", "session": {}, "event_id": "probe"}))
            async with asyncio.timeout(15):
                while True:
                    event = json.loads(await ws.recv())
                    assert event.get("type") and event.get("event_id")
                    if event["type"] == "session.updated":
                        break

    loop.run_until_complete(scenario())
    no_tracebacks(bare, since)


async def test_a_stored_agent_cannot_carry_client_tools(bare):
    tool = {"name": "get_weather", "client": True}
    async with api_client(bare.url, KEY) as http:
        response = await http.put("/api/agents/clienty", json={"name": "x", "tools": [tool]})
    assert response.status_code == 422 and "client tools" in response.text
