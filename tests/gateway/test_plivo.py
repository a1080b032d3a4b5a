"""Plivo Audio Streaming (protocols.md §4.2): the answer XML and its V3 signature, the media socket's
refusals (an unsupported ``mediaFormat``, an oversized frame), and one whole call with real workers and
Piper speech in L16 16 kHz: greeting, barge-in (``clearAudio``), an answer, DTMF and a hang-up mid-turn."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.parse

import httpx
import numpy as np
import pytest
import websockets

from tests.gateway.test_calls import LONG_GREETING, SENTENCE, bus_is_idle, call_log, voiced_onset_s
from tests.support.gateway import API_KEY, api_client
from tests.support.speech import speak, word_error_rate
from voice_gateway.dialects.plivo import MEDIA_FORMATS, PlivoTransport, expected_signature, signature_base
from voicectl.callers import call

KEY = "plivo-test-key"
TOKEN = "plivo-auth-token"
PUBLIC = "https://gw.example.com"


@pytest.fixture(scope="module")
def plivo_gateway(start_bare_gateway):
    """A gateway with no workers that checks Plivo's signature and knows its public URL."""
    return start_bare_gateway(
        GATEWAY_API_KEYS=KEY, PLIVO_AUTH_TOKEN=TOKEN, GATEWAY_PUBLIC_URL=PUBLIC, GATEWAY_MAX_FRAME_BYTES="4096"
    )


def ws_url(gateway, path: str) -> str:
    return gateway.url.replace("http://", "ws://") + path


def start_message(stream_id: str, encoding: str = "audio/x-mulaw", rate: object = 8000) -> dict:
    start = {
        "callId": "c0ffee00-0000-4000-8000-000000000001",
        "streamId": stream_id,
        "accountId": "MA123",
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": encoding, "sampleRate": rate},
    }
    return {"event": "start", "sequenceNumber": 0, "start": start, "extra_headers": "agent_id=default"}


def test_the_v3_signature_base_follows_plivo_sdks():
    url = "https://gw.example.com/plivo/answer?b=2&a=1"
    assert signature_base("POST", url, {"To": "+1", "From": "+2"}) == (
        "https://gw.example.com/plivo/answer?a=1&b=2.From+2To+1"
    )
    assert signature_base("GET", "https://gw.example.com/plivo/answer", {"x": "1"}) == (
        "https://gw.example.com/plivo/answer?x=1"
    )
    assert signature_base("POST", "https://gw.example.com/plivo/answer", {}) == "https://gw.example.com/plivo/answer"


class _Wire:
    """The socket side of a Plivo connection: what the transport sends, in the stream's format."""

    sid_key = "streamId"

    def __init__(self, content_type: str) -> None:
        self.media = MEDIA_FORMATS[content_type]
        self.sent: list[dict] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))


@pytest.mark.parametrize("content_type", list(MEDIA_FORMATS))
async def test_the_transport_speaks_plivo_verbs_in_the_stream_format(content_type):
    wire = _Wire(content_type)
    transport = PlivoTransport(wire)
    transport.stream_sid = "s-1"
    await transport.send_audio(b"\x7f" * 320)
    await transport.send_mark("t0-s0")
    await transport.clear()
    encoding, rate = content_type.split(";rate=")
    assert wire.sent == [
        {
            "event": "playAudio",
            "streamId": "s-1",
            "media": {
                "contentType": encoding,
                "sampleRate": int(rate),
                "payload": base64.b64encode(b"\x7f" * 320).decode(),
            },
        },
        {"event": "checkpoint", "streamId": "s-1", "name": "t0-s0"},
        {"event": "clearAudio", "streamId": "s-1"},
    ]


async def test_answer_xml_is_signed_and_points_at_the_public_media_url(plivo_gateway):
    path = "/plivo/answer?agent_id=talker&content_type=" + urllib.parse.quote("audio/x-l16;rate=16000")
    form = {"CallUUID": "c0ffee", "From": "+15550001", "To": "+15550002", "Direction": "inbound"}
    nonce = "12345678901234567890"
    good = expected_signature(TOKEN, "POST", PUBLIC + path, form, nonce)
    headers = {"X-Plivo-Signature-V3": f"bogus,{good}", "X-Plivo-Signature-V3-Nonce": nonce}
    async with httpx.AsyncClient(base_url=plivo_gateway.url) as http:
        accepted = await http.post(path, data=form, headers=headers)
        forged = await http.post(path, data=form, headers={**headers, "X-Plivo-Signature-V3": good[:-4] + "AAAA"})
        unsigned = await http.post(path, data=form)
        tampered = await http.post(path, data={**form, "From": "+15559999"}, headers=headers)
        other_nonce = await http.post(path, data=form, headers={**headers, "X-Plivo-Signature-V3-Nonce": "1"})
        get_signed = expected_signature(TOKEN, "GET", PUBLIC + "/plivo/answer?content_type=bad", {}, nonce)
        bad_type = await http.get(
            "/plivo/answer?content_type=bad",
            headers={"X-Plivo-Signature-V3": get_signed, "X-Plivo-Signature-V3-Nonce": nonce},
        )
    assert [forged.status_code, unsigned.status_code, tampered.status_code, other_nonce.status_code] == [403] * 4
    assert "X-Plivo-Signature-V3" in forged.text
    assert bad_type.status_code == 400 and "content_type must be one of" in bad_type.text
    assert accepted.status_code == 200 and accepted.headers["content-type"].startswith("application/xml")
    xml = accepted.text
    assert '<Stream bidirectional="true" keepCallAlive="true"' in xml and 'contentType="audio/x-l16;rate=16000"' in xml
    assert ">wss://gw.example.com/plivo/media?agent_id=talker</Stream></Response>" in xml
    assert 'extraHeaders="agent_id=talker,From=+15550001,To=+15550002,CallUUID=c0ffee,Direction=inbound"' in xml


@pytest.mark.parametrize(
    ("encoding", "rate"), [("audio/x-alaw", 8000), ("audio/x-l16", 24000), ("audio/x-mulaw", "lots")]
)
async def test_an_unsupported_media_format_closes_1003_and_the_log_says_why(plivo_gateway, encoding, rate):
    stream_id = f"refused-{encoding.rsplit('-', 1)[1]}-{rate}"
    async with websockets.connect(ws_url(plivo_gateway, "/plivo/media")) as ws:
        await ws.send(json.dumps(start_message(stream_id, encoding, rate)))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 1003 and "unsupported mediaFormat" in closed.value.rcvd.reason
    async with api_client(plivo_gateway.url, KEY) as http:
        log = (await http.get(f"/api/calls/{stream_id}")).json()
    assert log["dialect"] == "plivo" and log["status"] == "refused", log
    assert f"{encoding};rate={rate}" in log["reason"] and "audio/x-l16;rate=16000" in log["reason"]
    assert log["turns"] == []


async def test_an_oversized_frame_closes_1009(plivo_gateway):
    async with websockets.connect(ws_url(plivo_gateway, "/plivo/media")) as ws:
        await ws.send(json.dumps(start_message("oversized")))
        payload = base64.b64encode(b"\xff" * 8000).decode()
        await ws.send(json.dumps({"event": "media", "streamId": "oversized", "media": {"payload": payload}}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 1009 and "exceeds the limit of 4096" in closed.value.rcvd.reason


async def test_a_whole_plivo_call_in_l16_16k(gateway_url, nats_url):
    async with api_client(gateway_url) as http:
        agent = {"name": "plivo", "greeting": LONG_GREETING, "system_prompt": "Answer in one short sentence."}
        assert (await http.put("/api/agents/plivo-talker", json=agent)).status_code == 200
    samples, rate = speak(SENTENCE)
    speech_at = 4.0
    speech_end = speech_at + len(samples) / rate
    dtmf_at = speech_end + 14.0
    result = await call(
        "plivo",
        gateway_url,
        samples,
        rate,
        agent_id="plivo-talker",
        speech_at_s=speech_at,
        dtmf=[(dtmf_at, "7")],
        hang_up_after_s=dtmf_at + 1.5,
        sample_rate=16000,
        api_key=API_KEY,
    )
    table = result.timeline.table()
    assert result.problems == [], table
    assert result.sample_rate == 16000 and result.closed_by == "caller", table
    received = [m for m in result.raw_received if "event" in m]
    assert received and all(m["streamId"] == result.session_id for m in received), received[:3]
    assert {m["event"] for m in received} <= {"playAudio", "checkpoint", "clearAudio"}
    plays = [m["media"] for m in received if m["event"] == "playAudio"]
    assert all(m["contentType"] == "audio/x-l16" and m["sampleRate"] == 16000 for m in plays)
    sizes = [len(base64.b64decode(m["payload"])) for m in plays]
    assert sizes and all(size % 640 == 0 and size <= 6400 for size in sizes), sizes

    # The greeting was heard, then cut by the caller: clearAudio within half a second of the speech.
    onset = speech_at + voiced_onset_s(samples, rate)
    assert result.first_agent_audio_s is not None and result.first_agent_audio_s <= onset - 1.0, table
    clears = result.timeline.times("clear received")
    assert clears and 0 <= clears[0] - onset <= 0.5, table
    assert result.marks_echoed, table
    heard = result.heard_track.astype(np.float64)
    before = heard[int((onset - 0.7) * 16000) : int(onset * 16000)]
    assert np.sqrt(np.mean(before**2)) > 300, "the greeting was not playing before the barge-in"

    log = await call_log(gateway_url, result.session_id)
    assert log["dialect"] == "plivo" and log["status"] == "completed", log
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
    # The caller hung up while the DTMF turn was running: nothing of it is left on the bus.
    assert await bus_is_idle(nats_url)
