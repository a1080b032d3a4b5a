"""The Vonage Voice API WebSocket (protocols.md §4.3): the NCCO answer webhook and its signed-callback JWT,
the media socket's refusals (an unsupported ``content-type``, an oversized frame), and one whole call with
real workers and Piper speech in L16 16 kHz binary frames: greeting, barge-in (``{"action": "clear"}``), an
answer, DTMF and a hang-up mid-turn."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import httpx
import numpy as np
import pytest
import websockets

from tests.gateway.test_calls import LONG_GREETING, SENTENCE, bus_is_idle, call_log, voiced_onset_s
from tests.support.gateway import API_KEY, api_client
from tests.support.speech import speak, word_error_rate
from voice_gateway.dialects.vonage import jwt_problem, sign_jwt
from voicectl.callers import call

KEY = "vonage-test-key"
SECRET = "vonage-signature-secret"
PUBLIC = "https://gw.example.com"


@pytest.fixture(scope="module")
def vonage_gateway(start_bare_gateway):
    """A gateway with no workers that checks Vonage's signed callbacks and knows its public URL."""
    return start_bare_gateway(
        GATEWAY_API_KEYS=KEY,
        VONAGE_SIGNATURE_SECRET=SECRET,
        GATEWAY_PUBLIC_URL=PUBLIC,
        GATEWAY_MAX_FRAME_BYTES="4096",
    )


def ws_url(gateway, path: str) -> str:
    return gateway.url.replace("http://", "ws://") + path


def bearer(claims: dict, secret: str = SECRET) -> dict:
    return {"Authorization": f"Bearer {sign_jwt(secret, claims)}"}


def test_jwt_checks():
    now = time.time()
    body = b'{"uuid": "u"}'
    good = sign_jwt(SECRET, {"iat": int(now), "payload_hash": hashlib.sha256(body).hexdigest()})
    assert jwt_problem(good, SECRET, body, now) == ""
    assert jwt_problem(good, "other", body, now) == "bad signature"
    assert jwt_problem(good, SECRET, b'{"uuid": "v"}', now) == "payload_hash does not match the body"
    assert jwt_problem(sign_jwt(SECRET, {"exp": now - 3600}), SECRET, b"", now) == "expired"
    assert jwt_problem("a.b", SECRET, b"", now) == "not a JWT"
    assert jwt_problem("%%%.%%%.x", SECRET, b"", now) == "malformed JWT"


async def test_the_ncco_is_signed_and_points_at_the_public_media_url(vonage_gateway):
    body = json.dumps({"uuid": "aaaa-1111", "conversation_uuid": "CON-1", "from": "15550001", "to": "15550002"})
    claims = {"iat": int(time.time()), "payload_hash": hashlib.sha256(body.encode()).hexdigest()}
    path = "/vonage/answer?agent_id=talker&content_type=audio/l16;rate=8000"
    async with httpx.AsyncClient(base_url=vonage_gateway.url) as http:
        json_type = {"Content-Type": "application/json"}
        accepted = await http.post(path, content=body, headers={**json_type, **bearer(claims)})
        forged = await http.post(path, content=body, headers={**json_type, **bearer(claims, "wrong")})
        unsigned = await http.post(path, content=body, headers=json_type)
        tampered = await http.post(path, content=body.replace("15550001", "1"), headers={**json_type, **bearer(claims)})
        get = await http.get("/vonage/answer?uuid=bbbb", headers=bearer({"iat": int(time.time())}))
        bad_type = await http.get("/vonage/answer?content_type=audio/pcmu", headers=bearer({}))
    assert [forged.status_code, unsigned.status_code, tampered.status_code] == [403] * 3
    assert "payload_hash" in tampered.text and "invalid Vonage signature" in forged.text
    assert bad_type.status_code == 400 and "content_type must be one of" in bad_type.text
    assert accepted.status_code == 200, accepted.text
    [connect] = accepted.json()
    [endpoint] = connect["endpoint"]
    assert connect["action"] == "connect" and endpoint["type"] == "websocket"
    assert endpoint["uri"] == "wss://gw.example.com/vonage/media" and endpoint["content-type"] == "audio/l16;rate=8000"
    assert endpoint["headers"] == {
        "agent_id": "talker",
        "uuid": "aaaa-1111",
        "conversation_uuid": "CON-1",
        "from": "15550001",
        "to": "15550002",
    }
    assert get.status_code == 200 and get.json()[0]["endpoint"][0]["content-type"] == "audio/l16;rate=16000"
    assert get.json()[0]["endpoint"][0]["headers"] == {"agent_id": "default", "uuid": "bbbb"}


@pytest.mark.parametrize("content_type", ["audio/l16;rate=24000", "audio/pcmu;rate=8000", None])
async def test_an_unsupported_content_type_closes_1003_and_the_log_says_why(vonage_gateway, content_type):
    call_uuid = f"refused-{str(content_type).replace('/', '-').replace(';', '-').replace('=', '-')}"
    connected = {"event": "websocket:connected", "content-type": content_type, "uuid": call_uuid}
    async with websockets.connect(ws_url(vonage_gateway, "/vonage/media")) as ws:
        await ws.send(b"\x00\x00" * 160)
        await ws.send(json.dumps(connected))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 1003 and "unsupported content-type" in closed.value.rcvd.reason
    async with api_client(vonage_gateway.url, KEY) as http:
        log = (await http.get(f"/api/calls/{call_uuid}")).json()
    assert log["dialect"] == "vonage" and log["status"] == "refused", log
    assert "audio/l16;rate=16000" in log["reason"] and log["turns"] == []


async def test_an_oversized_frame_closes_1009(vonage_gateway):
    async with websockets.connect(ws_url(vonage_gateway, "/vonage/media")) as ws:
        await ws.send(json.dumps({"event": "websocket:connected", "content-type": "audio/l16;rate=16000"}))
        await ws.send(b"\x00" * 8000)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 1009 and "exceeds the limit of 4096" in closed.value.rcvd.reason


async def test_a_whole_vonage_call_in_l16_16k(gateway_url, nats_url):
    async with api_client(gateway_url) as http:
        agent = {"name": "vonage", "greeting": LONG_GREETING, "system_prompt": "Answer in one short sentence."}
        assert (await http.put("/api/agents/vonage-talker", json=agent)).status_code == 200
    samples, rate = speak(SENTENCE)
    speech_at = 4.0
    speech_end = speech_at + len(samples) / rate
    dtmf_at = speech_end + 14.0
    result = await call(
        "vonage",
        gateway_url,
        samples,
        rate,
        agent_id="vonage-talker",
        speech_at_s=speech_at,
        dtmf=[(dtmf_at, "7")],
        hang_up_after_s=dtmf_at + 1.5,
        sample_rate=16000,
        api_key=API_KEY,
    )
    table = result.timeline.table()
    assert result.problems == [], table
    assert result.sample_rate == 16000 and result.closed_by == "caller", table
    frames = [m["binary"] for m in result.raw_received if "binary" in m]
    assert frames and set(frames) == {640}, set(frames)
    texts = [m for m in result.raw_received if "binary" not in m]
    assert {m.get("action") for m in texts} <= {"notify", "clear"}, texts[:3]
    assert all(isinstance(m["payload"]["mark"], str) for m in texts if m["action"] == "notify")

    onset = speech_at + voiced_onset_s(samples, rate)
    assert result.first_agent_audio_s is not None and result.first_agent_audio_s <= onset - 1.0, table
    clears = result.timeline.times("clear received")
    assert clears and 0 <= clears[0] - onset <= 0.5, table
    assert result.marks_echoed, table
    heard = result.heard_track.astype(np.float64)
    before = heard[int((onset - 0.7) * 16000) : int(onset * 16000)]
    assert np.sqrt(np.mean(before**2)) > 300, "the greeting was not playing before the barge-in"

    log = await call_log(gateway_url, result.session_id)
    assert log["dialect"] == "vonage" and log["status"] == "completed", log
    greeting, *turns = log["turns"]
    assert greeting["kind"] == "greeting" and greeting["interrupted"] is True
    assert greeting["assistant"] and len(greeting["assistant"]) < len(LONG_GREETING)
    assert LONG_GREETING.startswith(greeting["assistant"].split()[0])
    spoken = [t for t in turns if t["kind"] == "audio"]
    assert spoken and word_error_rate(SENTENCE, spoken[0]["user"]) <= 0.2, spoken
    assert spoken[0]["assistant"], spoken
    answer_audio = [t for t, what, _ in result.timeline.events if what == "agent audio start" and t > clears[0]]
    assert answer_audio, table
    dtmf = [t for t in turns if t["kind"] == "dtmf"]
    assert dtmf and "pressed 7" in dtmf[0]["user"], turns
    assert await bus_is_idle(nats_url)
