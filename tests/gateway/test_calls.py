"""Real-time calls through the Twilio, Exotel, Telnyx and raw PCM dialects, with simulated carriers that
stream Piper speech in real time and play the agent's audio back as a phone would."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time

import httpx
import numpy as np
import pytest
import websockets

from tests.services.conftest import presence
from tests.support.gateway import API_KEY, api_client
from tests.support.speech import speak, word_error_rate
from voice_bus.catalog import HEADER_DEADLINE, HEADER_REQUEST_ID, HEADER_SESSION_ID, SERVICES
from voice_bus.connection import connect
from voice_gateway.dialects.twilio import expected_signature
from voicectl.callers import CallResult, call
from voicectl.local import GatewayProcess

SENTENCE = "I would like to book a table for two people."
LONG_GREETING = (
    "Good evening and welcome to the Riverside restaurant reservation line. "
    "Tonight we are serving a special menu of seasonal dishes from the coast. "
    "Our kitchen is open until eleven and the terrace is heated. "
    "Please tell me how many guests you expect and at what time you would like to arrive."
)


def session_id_of(result: CallResult, dialect: str) -> str:
    for _, what, details in result.timeline.events:
        if what == "sent start":
            return details.get("streamSid") or details.get("stream_sid") or details.get("stream_id")
        if what == "connected" and dialect == "pcm":
            return details["url"].rstrip("/").rsplit("/", 1)[1]
    raise AssertionError("no session id in the timeline")


async def call_log(gateway_url: str, session_id: str) -> dict:
    async with api_client(gateway_url) as http:
        for _ in range(50):
            response = await http.get(f"/api/calls/{session_id}")
            if response.status_code == 200 and response.json()["status"] != "active":
                return response.json()
            await asyncio.sleep(0.1)
    return response.json()


def voiced_onset_s(samples: np.ndarray, rate: int) -> float:
    frame = rate // 100
    for index in range(0, len(samples) - frame, frame):
        if np.sqrt(np.mean(samples[index : index + frame].astype(np.float64) ** 2)) > 500:
            return index / rate
    return 0.0


class BusState:
    """What :func:`bus_is_idle` found: true when no work is left; its repr names what is left otherwise."""

    def __init__(self, busy: list[str]) -> None:
        self.busy = busy

    def __bool__(self) -> bool:
        return not self.busy

    def __repr__(self) -> str:
        return f"BusState(work left: {', '.join(self.busy)})" if self.busy else "BusState(idle)"


async def bus_is_idle(nats_url: str, timeout_s: float = 30.0) -> BusState:
    """Waits up to ``timeout_s`` for every worker to have nothing in flight and every stream to be empty.

    Work a call left behind never drains, so the wait only allows for work being cancelled or finishing
    (a sentence Piper is in the middle of, a transcription, a generation queued at llama.cpp behind
    another test's) on a slow, shared machine.
    """
    nc = await connect(nats_url, name="bus-inspector")
    js = nc.jetstream()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            # Quick polls while waiting; a patient one for the report of what is left.
            window_s = 0.05 if time.monotonic() < deadline else 0.5
            busy = [
                f"{service} worker {a.get('worker', '?')}: {a['in_flight']} in flight"
                for service in SERVICES
                for a in await presence(nc, service, window_s)
                if a["in_flight"]
            ]
            for service, spec in SERVICES.items():
                state = (await js.stream_info(spec.stream)).state
                if state.messages:
                    busy.append(f"{state.messages} message(s) queued for {service} ({await _left(js, spec, state)})")
            if not busy or window_s > 0.05:
                return BusState(busy)
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def _left(js, spec, state) -> str:
    """What the consumer says of a stream's leftover work and whose request the oldest message is."""
    consumer = await js.consumer_info(spec.stream, spec.durable)
    facts = [
        f"pending {consumer.num_pending}, unacknowledged {consumer.num_ack_pending}, "
        f"redelivered {consumer.num_redelivered}"
    ]
    with contextlib.suppress(Exception):
        oldest = await js.get_msg(spec.stream, state.first_seq)
        headers = oldest.headers or {}
        deadline_ms = headers.get(HEADER_DEADLINE, "")
        past = f", deadline {time.time() - int(deadline_ms) / 1000:.1f} s ago" if deadline_ms.isdigit() else ""
        facts.append(
            f"oldest: seq {state.first_seq}, request {headers.get(HEADER_REQUEST_ID, '?')}, "
            f"session {headers.get(HEADER_SESSION_ID, '?')}{past}"
        )
    return "; ".join(facts)


@pytest.mark.parametrize("dialect", ["twilio", "exotel", "telnyx", "pcm"])
async def test_a_whole_call(gateway_url, dialect):
    samples, rate = speak(SENTENCE)
    result = await call(dialect, gateway_url, samples, rate, speech_at_s=4.0, listen_s=10.0, api_key=API_KEY)
    assert result.problems == []
    assert result.first_agent_audio_s is not None and result.first_agent_audio_s < 4.0
    assert result.voice_to_voice_s is not None, result.timeline.table()
    assert len(result.agent_audio) > result.sample_rate * 2

    log = await call_log(gateway_url, session_id_of(result, dialect))
    assert log["dialect"] == dialect
    turns = [t for t in log["turns"] if t["kind"] == "audio"]
    assert turns, log
    assert word_error_rate(SENTENCE, turns[0]["user"]) <= 0.2, turns[0]["user"]
    assert turns[0]["assistant"]
    assert {"endpointing_s", "stt_s", "first_audio_s"} <= set(turns[0]["timings"])

    received = result.raw_received
    if dialect == "twilio":
        media = [m for m in received if m.get("event") == "media"]
        assert media and all(m["streamSid"] for m in received if "event" in m)
        assert result.sample_rate == 8000 and result.marks_echoed
    elif dialect == "exotel":
        sizes = [len(base64.b64decode(m["media"]["payload"])) for m in received if m.get("event") == "media"]
        assert sizes and all(size % 320 == 0 and size >= 3200 for size in sizes)
        assert all(m.get("stream_sid") for m in received if "event" in m)
        assert result.marks_echoed
    elif dialect == "telnyx":
        sizes = [len(base64.b64decode(m["media"]["payload"])) for m in received if m.get("event") == "media"]
        assert sizes and all(160 <= size <= 1600 for size in sizes) and max(sizes) == 1600
        assert not [m for m in received if "stream_id" in m or "streamSid" in m or "stream_sid" in m]
        assert result.sample_rate == 8000 and result.marks_echoed
    else:
        sizes = [m["binary"] for m in received if "binary" in m]
        assert sizes and all(size % 2 == 0 for size in sizes)
        assert result.sample_rate == 16000


async def _put_agent(gateway_url: str, agent_id: str, **fields) -> None:
    async with api_client(gateway_url) as http:
        response = await http.put(f"/api/agents/{agent_id}", json={"name": agent_id, **fields})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("dialect", ["twilio", "exotel", "telnyx", "pcm"])
async def test_barge_in_stops_the_agent_within_500_ms_and_keeps_only_what_was_heard(gateway_url, nats_url, dialect):
    await _put_agent(gateway_url, "talker", greeting=LONG_GREETING, system_prompt="Answer in one short sentence.")
    samples, rate = speak("Wait, stop please, I have a question.")
    speech_at = 4.0
    result = await call(
        dialect,
        gateway_url,
        samples,
        rate,
        agent_id="talker",
        speech_at_s=speech_at,
        listen_s=4.0,
        sample_rate=8000,
        api_key=API_KEY,
    )
    onset = speech_at + voiced_onset_s(samples, rate)
    first_audio = result.first_agent_audio_s
    assert first_audio is not None and first_audio <= onset - 1.0, result.timeline.table()
    if dialect == "pcm":
        heard = result.heard_track.astype(np.float64)
        window = heard[int((onset + 0.5) * result.sample_rate) : int((onset + 1.2) * result.sample_rate)]
        before = heard[int((onset - 0.7) * result.sample_rate) : int(onset * result.sample_rate)]
        assert np.sqrt(np.mean(before**2)) > 300, "the agent was not speaking before the interruption"
        assert np.sqrt(np.mean(window**2)) < 30, "the agent kept speaking after the caller interrupted"
    else:
        clears = result.timeline.times("clear received")
        assert clears, result.timeline.table()
        assert 0 <= clears[0] - onset <= 0.5, (clears[0] - onset, result.timeline.table())

    log = await call_log(gateway_url, session_id_of(result, dialect))
    greeting = log["turns"][0]
    assert greeting["kind"] == "greeting" and greeting["interrupted"] is True
    heard_text = greeting["assistant"]
    assert heard_text and len(heard_text) < len(LONG_GREETING) and LONG_GREETING.startswith(heard_text.split()[0])
    assert await bus_is_idle(nats_url)


async def test_a_short_cough_does_not_interrupt(gateway_url):
    await _put_agent(gateway_url, "talker2", greeting=LONG_GREETING)
    rng = np.random.default_rng(7)
    rate = 16000
    cough = (rng.standard_normal(int(0.15 * rate)) * 6000).astype(np.int16)
    result = await call("twilio", gateway_url, cough, rate, agent_id="talker2", speech_at_s=4.0, listen_s=3.0)
    assert result.timeline.times("clear received") == []
    log = await call_log(gateway_url, session_id_of(result, "twilio"))
    assert log["turns"][0]["interrupted"] is False


async def test_hanging_up_mid_turn_leaves_no_work_on_the_bus(gateway_url, nats_url):
    samples, rate = speak(SENTENCE)
    speech_at = 4.0
    hang_up = speech_at + len(samples) / rate + 1.0
    await call("twilio", gateway_url, samples, rate, speech_at_s=speech_at, hang_up_after_s=hang_up, listen_s=0.5)
    assert await bus_is_idle(nats_url)


async def test_bad_frames_are_counted_and_the_call_survives(gateway_url):
    url = gateway_url.replace("http://", "ws://")
    async with websockets.connect(url + "/twilio/media") as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps({"event": "media", "streamSid": "MZbad", "media": {"payload": "AAAA"}}))
        start = {"streamSid": "MZbad", "callSid": "CAbad", "customParameters": {"agent_id": "default"}}
        await ws.send(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZbad", "start": start}))
        await ws.send(
            json.dumps(
                {"event": "start", "streamSid": "MZbad", "start": {**start, "mediaFormat": {"encoding": "audio/x-l16"}}}
            )
        )
        for garbage in (
            "not json",
            "[1, 2]",
            json.dumps({"event": "dance"}),
            json.dumps({"event": "media", "streamSid": "MZbad", "media": {"payload": "%%%"}}),
            json.dumps({"event": "media", "streamSid": "MZbad", "media": {}}),
            json.dumps({"event": "media", "streamSid": "MZbad", "media": {"payload": "A" * 200_000}}),
            json.dumps({"event": "start", "streamSid": "MZbad", "start": start}),
            b"\x00\x01\x02",
        ):
            await ws.send(garbage)
        audio = []
        for _ in range(200):
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message["event"] == "media":
                audio.append(message)
                break
        assert audio, "the greeting never came after the bad frames"
        await ws.send(json.dumps({"event": "stop", "streamSid": "MZbad", "stop": {}}))
    async with api_client(gateway_url) as http:
        metrics = (await http.get("/metrics/")).text
    for kind in (
        "invalid_json",
        "not_an_object",
        "unknown_event",
        "invalid_base64",
        "missing_payload",
        "oversized_payload",
        "duplicate_start",
        "binary_frame",
        "media_before_start",
    ):
        assert f'kind="{kind}"' in metrics, kind


async def test_pcm_unknown_session_is_closed_with_4404(gateway_url):
    url = gateway_url.replace("http://", "ws://")
    for path in ("/ws/pcm/no-such-session", "/api/pipecat/websocket/no-such-session"):
        async with websockets.connect(url + path) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd.code == 4404 and "unknown or expired" in closed.value.rcvd.reason


async def test_trigger_fills_template_variables_and_refuses_unknown_agents(gateway_url):
    await _put_agent(gateway_url, "dispatch", greeting="Hello {{driver_name}}, this is about load {{load_number}}.")
    async with api_client(gateway_url) as http:
        missing = await http.post("/api/calls/trigger", json={"agent_id": "nobody"})
        assert missing.status_code == 404 and "nobody" in missing.text
        assert (await http.post("/api/calls/trigger", json={"driver_name": "x"})).status_code == 422
        body = {"agent_id": "dispatch", "driver_name": "John Doe", "load_number": "LOAD-123", "origin": "Dallas, TX"}
        response = (await http.post("/api/calls/trigger", json=body)).json()
    assert response["status"] == "initialized"
    assert response["websocket_url"] == f"/api/pipecat/websocket/{response['session_id']}"
    url = gateway_url.replace("http://", "ws://") + response["websocket_url"]
    async with websockets.connect(url) as ws:
        await asyncio.wait_for(ws.recv(), 30)
    log = await call_log(gateway_url, response["session_id"])
    assert log["turns"][0]["assistant"] == "Hello John Doe, this is about load LOAD-123."
    async with websockets.connect(url) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 4404


async def test_seed_003_agent_config_loads(gateway_url):
    seed_agent = {
        "name": "WebSocket Voice Agent",
        "voice_system": "pipecat",
        "pipeline_config": {
            "stt_config": {"service": "deepgram", "model": "nova-2"},
            "tts_config": {"service": "cartesia", "model": "sonic-english", "voice_id": "79a125e8"},
            "llm_config": {"service": "openai", "model": "gpt-4o"},
            "transport": "websocket",
            "enable_interruptions": False,
            "vad_enabled": True,
        },
    }
    async with api_client(gateway_url) as http:
        stored = await http.put("/api/agents/seed003", json=seed_agent)
    assert stored.status_code == 200, stored.text
    pipeline = stored.json()["pipeline"]
    assert pipeline["transport"] == "websocket" and pipeline["enable_interruptions"] is False


async def test_twilio_webhook_answers_twiml(gateway_url):
    async with api_client(gateway_url) as http:
        response = await http.post("/twilio/voice?agent_id=talker", data={"CallSid": "CA1", "From": "+15550001"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/xml")
    assert "<Connect action=" in response.text and "<Stream url=" in response.text and "/twilio/media" in response.text
    assert '<Parameter name="agent_id" value="talker"/>' in response.text
    assert '<Parameter name="From" value="+15550001"/>' in response.text


@pytest.fixture(scope="module")
def signed_gateway(nats_url, gateway):
    """A second gateway on the same bus that requires Twilio's request signature."""
    process = GatewayProcess(nats_url, {"TWILIO_AUTH_TOKEN": "secret-token", "OTEL_TRACES_EXPORTER": "none"}).start()
    yield process
    process.stop()


async def test_twilio_signature_is_checked_when_a_token_is_set(signed_gateway):
    url = f"{signed_gateway.url}/twilio/voice?agent_id=default"
    form = {"CallSid": "CA9", "From": "+15550002", "To": "+15550003"}
    good = expected_signature("secret-token", url, form)
    async with httpx.AsyncClient() as http:
        accepted = await http.post(url, data=form, headers={"X-Twilio-Signature": good})
        forged = await http.post(url, data=form, headers={"X-Twilio-Signature": good[:-4] + "AAAA"})
        unsigned = await http.post(url, data=form)
        tampered = await http.post(url, data={**form, "From": "+15559999"}, headers={"X-Twilio-Signature": good})
    assert accepted.status_code == 200 and "<Stream" in accepted.text
    assert [forged.status_code, unsigned.status_code, tampered.status_code] == [403, 403, 403]


@pytest.mark.parametrize("dialect", ["twilio", "exotel", "telnyx"])
async def test_dtmf_reaches_the_agent(gateway_url, dialect):
    silence = np.zeros(1600, dtype=np.int16)
    result = await call(
        dialect, gateway_url, silence, 16000, speech_at_s=3.5, dtmf=[(4.0, "7")], listen_s=12.0, api_key=API_KEY
    )
    assert result.timeline.times("dtmf sent"), result.timeline.table()
    log = await call_log(gateway_url, session_id_of(result, dialect))
    dtmf = [t for t in log["turns"] if t["kind"] == "dtmf"]
    assert dtmf and "pressed 7" in dtmf[0]["user"], log["turns"]
    assert dtmf[0]["assistant"] or dtmf[0]["error"] == "the call ended before the answer"


async def test_exotel_and_pcm_bad_frames_are_counted_and_the_call_survives(gateway_url):
    url = gateway_url.replace("http://", "ws://")
    async with websockets.connect(url + "/exotel/media?sample-rate=16000") as ws:
        await ws.send(json.dumps({"event": "connected"}))
        start = {"stream_sid": "EXbad", "call_sid": "c", "account_sid": "a", "custom_parameters": {}}
        await ws.send(json.dumps({"event": "start", "sequence_number": 1, "stream_sid": "EXbad", "start": start}))
        odd = base64.b64encode(b"\x01\x02\x03").decode()
        for garbage in ("{", json.dumps({"event": "media", "stream_sid": "EXbad", "media": {"payload": odd}}), b"\x00"):
            await ws.send(garbage)
        message = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert message["event"] == "media" and message["stream_sid"] == "EXbad"
    async with websockets.connect(url + "/exotel/media?sample-rate=11025") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd.code == 1008
    async with api_client(gateway_url) as http:
        session = (await http.post("/api/calls/trigger", json={"agent_id": "default"})).json()["session_id"]
    async with websockets.connect(f"{url}/ws/pcm/{session}") as ws:
        await ws.send("a text frame")
        await ws.send(b"\x01\x02\x03")
        first = await asyncio.wait_for(ws.recv(), 30)
        assert isinstance(first, bytes) and len(first) % 2 == 0
    async with api_client(gateway_url) as http:
        metrics = (await http.get("/metrics/")).text
    for dialect, kind in (
        ("exotel", "invalid_json"),
        ("exotel", "odd_pcm_length"),
        ("exotel", "binary_frame"),
        ("pcm", "text_frame"),
        ("pcm", "odd_pcm_length"),
    ):
        assert f'voice_gateway_bad_frames_total{{dialect="{dialect}",kind="{kind}"}}' in metrics, (dialect, kind)
