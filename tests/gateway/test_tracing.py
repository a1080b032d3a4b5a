"""One call is one trace across the gateway and the three workers, checked by a real OTLP receiver."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import pytest
import websockets

from tests.gateway.client import BrowserClient
from tests.support.otlp import OtlpReceiver
from tests.support.speech import speak
from tests.support.workers import WorkerProcess, _Tee
from voice_audio import wav_bytes
from voicectl.local import GatewayProcess, NatsServer


@pytest.fixture(scope="module")
def traced_stack(llama_server):
    """Its own NATS, workers and gateway, all exporting spans to one OTLP receiver."""
    with OtlpReceiver() as receiver, NatsServer() as nats:
        env = receiver.env()
        workers = [
            WorkerProcess("stt", nats.url, env),
            WorkerProcess("tts", nats.url, env),
            WorkerProcess("llm", nats.url, {**env, "LLM_BASE_URL": llama_server}),
        ]
        for worker in workers:
            worker.launch()
        gateway = None
        try:
            for worker in workers:
                worker.wait_ready()
            gateway = GatewayProcess(nats.url, env, sink=_Tee(io.StringIO())).start()
            yield receiver, gateway
        finally:
            if gateway:
                gateway.stop()
            for worker in workers:
                worker.stop()


async def test_one_call_is_one_trace_with_the_expected_tree(traced_stack):
    receiver, gateway = traced_stack
    samples, rate = speak("Please tell me a short joke.")
    async with BrowserClient(gateway.url) as client:
        await client.send("init", agentId="default")
        session_id = (await client.next())["data"]["callLogId"]
        await client.until("audio_response")
        await client.send("audio", audio=base64.b64encode(wav_bytes(samples, rate)).decode())
        await client.until("processing_complete")
        await client.send("text", text="Thank you.")
        await client.until("processing_complete")
        await client.send("end")
        await client.until("session_ended")

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sessions = [
            s
            for s in receiver.spans
            if s["name"] == "session" and s["attributes"].get("voice.session_id") == session_id
        ]
        if sessions:
            trace_id = sessions[0]["trace_id"]
            spans = [s for s in receiver.spans if s["trace_id"] == trace_id]
            names = {s["name"] for s in spans}
            if {"stt.transcribe", "tts.synthesize"} <= names and any(n.startswith("llm.generate") for n in names):
                await asyncio.sleep(1.0)
                break
        await asyncio.sleep(0.2)
    assert len(sessions) == 1, "no session span arrived"
    spans = [s for s in receiver.spans if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in spans}
    orphans = [s["name"] for s in spans if s["parent_span_id"] and s["parent_span_id"] not in by_id]
    assert orphans == []
    session = sessions[0]
    ancestor = by_id.get(session["parent_span_id"])
    while ancestor:
        assert ancestor["service"] == "voice-gateway", ancestor
        ancestor = by_id.get(ancestor["parent_span_id"])
    turns = [s for s in spans if s["name"] == "turn"]
    assert sorted(t["attributes"]["voice.turn.kind"] for t in turns) == ["audio", "greeting", "text"]
    assert all(t["parent_span_id"] == session["span_id"] for t in turns)
    assert {s["service"] for s in spans} == {"voice-gateway", "voice-stt", "voice-llm", "voice-tts"}

    def turn_of(span: dict) -> dict | None:
        while span and span["name"] != "turn":
            span = by_id.get(span["parent_span_id"])
        return span

    for name in ("stt.transcribe", "tts.synthesize"):
        for span in (s for s in spans if s["name"] == name):
            assert turn_of(span) is not None, f"{name} is not under a turn"

    def warming(span: dict) -> bool:
        while span and span["name"] != "llm.warm":
            span = by_id.get(span["parent_span_id"])
        return span is not None

    warm_ups = [s for s in spans if s["name"].startswith("llm.generate") and warming(s)]
    assert len(warm_ups) == 1, "the prompt cache is warmed once, under the session, while the greeting plays"
    llm = [s for s in spans if s["name"].startswith("llm.generate") and not warming(s)]
    assert len(llm) == 2 and all(turn_of(s)["attributes"]["voice.turn.kind"] in ("audio", "text") for s in llm)
    assert all(s["attributes"].get("gen_ai.request.model") for s in llm)
    stt = [s for s in spans if s["name"] == "stt.transcribe"]
    assert len(stt) == 1 and turn_of(stt[0])["attributes"]["voice.turn.kind"] == "audio"
    text_turn = next(t for t in turns if t["attributes"]["voice.turn.kind"] == "text")
    assert text_turn["attributes"]["voice.timing.llm_first_token_s"] > 0
    assert text_turn["attributes"]["voice.timing.first_audio_s"] > 0
    assert session["attributes"]["voice.dialect"] == "browser" and session["attributes"]["voice.agent_id"] == "default"
    values = [str(v) for s in spans for v in s["attributes"].values()]
    assert not [v for v in values if "Thank you" in v or "joke" in v], "transcript text in spans without the opt-in"
    other_traces = {s["trace_id"] for s in receiver.spans if s["attributes"].get("voice.session_id") == session_id} - {
        trace_id
    }
    assert other_traces == set()


async def test_query_strings_and_client_ids_stay_out_of_the_spans(traced_stack):
    """Exotel passes custom parameters in the URL: a key there never reaches a span, and a client's
    out-of-range id is refused before it could reach one."""
    receiver, gateway = traced_stack
    secret, sid = "query-secret-4f1d", "MZtrace-query"
    url = gateway.url.replace("http", "ws", 1) + f"/exotel/media?sample-rate=8000&agent_id=default&api_key={secret}"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"event": "start", "stream_sid": sid, "start": {"call_sid": "CA-trace"}}))
        await asyncio.sleep(1.0)
        await ws.send(json.dumps({"event": "stop", "stream_sid": sid}))
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    retell = gateway.url.replace("http", "ws", 1) + "/ws-default/call_huge_id"
    async with websockets.connect(retell) as ws:
        await ws.send(json.dumps({"interaction_type": "response_required", "response_id": 10**30, "transcript": []}))
        await ws.send(json.dumps({"interaction_type": "ping_pong", "timestamp": 7}))
        while json.loads(await asyncio.wait_for(ws.recv(), 10)).get("response_type") != "ping_pong":
            pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
        s["name"] == "session" and s["attributes"].get("voice.session_id") == sid for s in receiver.spans
    ):
        await asyncio.sleep(0.2)
    values = [f"{k}={v}" for s in receiver.spans for k, v in s["attributes"].items()]
    assert any(f"voice.session_id={sid}" in v for v in values), "the Exotel session's span never arrived"
    assert not [v for v in values if secret in v or "url.query" in v]
    assert not [v for v in values if v.startswith("voice.retell.response_id=") and int(v.split("=")[1]) >= 2**63]
