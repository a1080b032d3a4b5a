"""The seed 001 browser protocol at /ws against the real gateway, workers, models and NATS."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import wave

from tests.gateway.client import BrowserClient
from tests.services.conftest import presence
from tests.support.gateway import api_client
from tests.support.speech import speak, word_error_rate
from voice.v1 import llm_pb2
from voice_audio import wav_bytes
from voice_bus.catalog import SERVICES
from voice_bus.connection import connect

SPOKEN = "What is the capital of France?"


def b64_wav(text: str) -> str:
    samples, rate = speak(text)
    return base64.b64encode(wav_bytes(samples, rate)).decode()


def decode_wav(b64: str) -> tuple[int, int]:
    with wave.open(io.BytesIO(base64.b64decode(b64))) as wav:
        return wav.getframerate(), wav.getnframes()


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


async def test_a_whole_session_audio_then_text_then_end(gateway_url):
    async with BrowserClient(gateway_url) as client:
        await client.send("init", agentId="default")
        init = await client.next()
        assert init["type"] == "init_success"
        call_log_id = init["data"]["callLogId"]
        assert init["data"]["agentName"] == "Ava" and init["data"]["message"]
        greeting = await client.next()
        assert greeting["type"] == "audio_response" and greeting["data"]["text"]
        rate, frames = decode_wav(greeting["data"]["audio"])
        assert rate > 0 and frames > rate // 4

        await client.send("audio", audio=b64_wav(SPOKEN))
        events = await client.until("processing_complete")
        kinds = types(events)
        assert kinds[:4] == ["processing_started", "stt_start", "stt_complete", "llm_start"]
        stt = next(e for e in events if e["type"] == "stt_complete")
        assert word_error_rate(SPOKEN, stt["data"]["text"]) <= 0.2, stt["data"]["text"]
        chunks = [e["data"] for e in events if e["type"] == "llm_chunk"]
        assert len(chunks) >= 2
        full = [c["fullText"] for c in chunks]
        assert all(
            later.startswith(earlier) and len(later) > len(earlier) for earlier, later in itertools.pairwise(full)
        )
        assert full[-1] == "".join(c["chunk"] for c in chunks)
        complete = next(e for e in events if e["type"] == "llm_complete")
        assert complete["data"]["text"] == full[-1].strip()
        # Per sentence, in the seed's order: tts_start, tts_complete and audio_response with the same audio.
        speech = [e for e in events if e["type"] in ("tts_start", "tts_complete", "audio_response")]
        assert speech and [e["type"] for e in speech] == ["tts_start", "tts_complete", "audio_response"] * (
            len(speech) // 3
        )
        audio = speech[2::3]
        assert all(decode_wav(a["data"]["audio"])[1] > 0 for a in audio)
        assert [c["data"]["audio"] for c in speech[1::3]] == [a["data"]["audio"] for a in audio]
        assert kinds[-2:] == ["audio_response", "processing_complete"]

        await client.send("text", text="And what about Germany?")
        events = await client.until("processing_complete")
        kinds = types(events)
        assert kinds[0] == "llm_start" and "llm_chunk" in kinds and "llm_complete" in kinds
        assert kinds.index("text_response") == kinds.index("llm_complete") + 1
        text_response = events[kinds.index("text_response")]["data"]["text"]
        assert text_response
        assert "audio_response" in kinds

        await client.send("end")
        ended = await client.until("session_ended")
        assert ended[-1]["data"] == {"callLogId": call_log_id}

    async with api_client(gateway_url) as http:
        log = (await http.get(f"/api/calls/{call_log_id}")).json()
    assert log["callLogId"] == call_log_id and log["agentId"] == "default" and log["status"] == "completed"
    assert log["endedAt"] >= log["startedAt"]
    turns = [t for t in log["turns"] if t["kind"] != "greeting"]
    assert [t["kind"] for t in turns] == ["audio", "text"]
    assert word_error_rate(SPOKEN, turns[0]["user"]) <= 0.2
    assert turns[1]["user"] == "And what about Germany?" and turns[1]["assistant"] == text_response
    assert {"stt_s", "llm_first_token_s", "first_audio_s", "total_s"} <= set(turns[0]["timings"])
    assert {"llm_first_token_s", "total_s"} <= set(turns[1]["timings"])


async def test_the_second_turn_sees_the_first(gateway_url, nats_url):
    nc = await connect(nats_url, name="llm-observer")
    seen: list[llm_pb2.GenerateRequest] = []

    async def collect(msg) -> None:
        seen.append(llm_pb2.GenerateRequest.FromString(msg.data))

    sub = await nc.subscribe(SERVICES["llm"].subject, cb=collect)
    try:
        async with BrowserClient(gateway_url) as client:
            await client.send("init", agentId="default")
            session_id = (await client.next())["data"]["callLogId"]
            await client.send("text", text="My name is Zorblax.")
            first = await client.until("llm_complete")
            first_answer = first[-1]["data"]["text"]
            await client.send("text", text="What is my name?")
            await client.until("llm_complete")
    finally:
        await sub.unsubscribe()
        await nc.close()
    mine = [r for r in seen if r.session_id == session_id and r.max_tokens != 1]
    assert len(mine) == 2
    warm_ups = [r for r in seen if r.session_id == session_id and r.max_tokens == 1]
    assert len(warm_ups) == 1, "the prompt cache is warmed once, while the greeting plays"
    assert [m.role for m in warm_ups[0].messages] == ["system", "assistant"]
    prompt = [(m.role, m.content) for m in mine[1].messages]
    assert prompt[0][0] == "system"
    assert ("user", "My name is Zorblax.") in prompt
    assert ("assistant", first_answer) in prompt
    assert prompt[-1] == ("user", "What is my name?")


async def test_bad_input_gets_errors_and_the_session_keeps_working(gateway_url):
    async with BrowserClient(gateway_url) as client:
        await client.send("audio", audio=b64_wav("hello"))
        assert "before 'init'" in (await client.until("error"))[-1]["data"]["error"]
        await client.send("init", agentId="no-such-agent")
        assert "unknown agent" in (await client.until("error"))[-1]["data"]["error"]
        await client.send("init", agentId="default")
        await client.until("audio_response")

        cases = [
            ("{not json", "invalid JSON"),
            ("[1, 2]", "JSON object"),
            (json.dumps({"type": "dance"}), "unknown message type"),
            (json.dumps({"type": "text", "data": {}}), "text"),
            (json.dumps({"type": "text", "data": {"text": 42}}), "text"),
            (json.dumps({"type": "audio", "data": {}}), "audio"),
            (json.dumps({"type": "audio", "data": {"audio": "%%% not base64 %%%"}}), "base64"),
            (json.dumps({"type": "init", "data": {"agentId": "default"}}), "already"),
            (json.dumps({"type": "text", "data": {"text": "x" * (7 * 1024 * 1024)}}), "exceeds the limit"),
            (b"\x00\x01binary", "binary frames"),
        ]
        for raw, expected in cases:
            await client.send_raw(raw)
            event = (await client.until("error"))[-1]
            assert expected in event["data"]["error"], (raw[:40], event)

        garbage = base64.b64encode(b"RIFF" + bytes(range(256)) * 20).decode()
        await client.send("audio", audio=garbage)
        events = await client.until("processing_complete")
        errors = [e["data"]["error"] for e in events if e["type"] == "error"]
        assert errors and "speech recognition" in errors[0], events

        await client.send("text", text="Say hello.")
        events = await client.until("llm_complete")
        assert events[-1]["data"]["text"]


async def test_a_client_that_disconnects_mid_turn_leaves_no_work_on_the_bus(gateway_url, nats_url):
    async with BrowserClient(gateway_url) as client:
        await client.send("init", agentId="default")
        await client.until("audio_response")
        await client.send("text", text="Write a long story about a lighthouse keeper and the sea.")
        await client.until("llm_chunk")
    nc = await connect(nats_url, name="bus-inspector")
    js = nc.jetstream()
    try:
        for _ in range(40):
            busy = [a for service in SERVICES for a in await presence(nc, service, 0.1) if a["in_flight"]]
            queued = [(await js.stream_info(spec.stream)).state.messages for spec in SERVICES.values()]
            if not busy and not any(queued):
                break
            await asyncio.sleep(0.1)
        assert busy == [] and queued == [0, 0, 0]
    finally:
        await nc.close()


async def test_a_multi_sentence_answer_speaks_before_the_text_is_complete(gateway_url):
    agent = {
        "name": "Teller",
        "system_prompt": "You are a helpful assistant.",
        "greeting": "",
        "llm": {"temperature": 0.0, "max_tokens": 240},
    }
    async with api_client(gateway_url) as http:
        assert (await http.put("/api/agents/teller", json=agent)).status_code == 200
    async with BrowserClient(gateway_url) as client:
        await client.send("init", agentId="teller")
        await client.until("init_success")
        # A long answer: its first sentence is spoken long before the model has written the last.
        await client.send("text", text="Give me six facts about the moon, one sentence each.")
        events = await client.until("processing_complete")
    kinds = types(events)
    assert kinds.count("audio_response") >= 2
    assert kinds.index("audio_response") < kinds.index("llm_complete")


async def test_agents_and_calls_api(gateway_url):
    async with api_client(gateway_url) as http:
        default = (await http.get("/api/agents/default")).json()
        assert default["id"] == "default" and default["greeting"]
        assert (await http.get("/api/agents/nobody")).status_code == 404
        body = {"name": "Support", "system_prompt": "Be brief.", "greeting": "Hi.", "tools": []}
        created = await http.put("/api/agents/support", json=body)
        assert created.status_code == 200 and created.json()["pipeline"]["enable_interruptions"] is True
        assert (await http.get("/api/agents/support")).json()["name"] == "Support"
        assert (await http.put("/api/agents/support", json={**body, "id": "other"})).status_code == 400
        bad = await http.put("/api/agents/support", json={**body, "llm": {"temperature": 9}})
        assert bad.status_code == 422 and "temperature" in bad.text
        assert (await http.put("/api/agents/support", json={**body, "colour": "blue"})).status_code == 422
        assert (await http.put("/api/agents/bad id!", json=body)).status_code in (400, 404)
        assert (await http.delete("/api/agents/support")).status_code == 204
        assert (await http.delete("/api/agents/support")).status_code == 404
        assert (await http.get("/api/calls/does-not-exist")).status_code == 404
        assert (await http.get("/healthz")).json()["nats"] is True
        metrics = (await http.get("/metrics/")).text
        assert "voice_gateway_active_sessions" in metrics
