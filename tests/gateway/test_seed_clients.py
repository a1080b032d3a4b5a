"""Seed 001's and seed 002's clients, as the seeds write them, against ``/ws`` unchanged.

Seed 002's channel client connects to ``ws://…/ws`` (not ``/ws/channels``), subscribes, receives,
reconnects and resubscribes, on a free channel and on a session's channel with its token; a first
message that fits neither seed's envelope gets an error in the format it resembles (these need no
workers). Seed 001's client gets, for a text and an audio turn, the seed's order per sentence
(``tts_start``, ``tts_complete``, ``audio_response``) with each sentence's audio once, and
``processing_complete`` last (these run the real workers).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import uuid
import wave

import httpx
import pytest
import websockets

from tests.gateway.client import BrowserClient
from tests.gateway.test_channels import quiet, receive, statuses_of_a_turn, subscribed, subscription
from tests.support.gateway import API_KEY, TOKEN_SECRET, api_client
from tests.support.speech import speak
from voice_audio import wav_bytes
from voice_channels import WebSocketService
from voice_gateway.dialects.browser import PLAYBACK_LEAD_S

SPEECH = ("tts_start", "tts_complete", "audio_response")


@pytest.fixture(scope="module")
def bare(start_bare_gateway):
    """A gateway without workers, with an API key and the token secret."""
    return start_bare_gateway(GATEWAY_API_KEYS=API_KEY, GATEWAY_TOKEN_SECRET=TOKEN_SECRET)


def ws_url(gateway) -> str:
    """The seeds' URL: ``ws://…/ws``, for both."""
    return gateway.url.replace("http://", "ws://") + "/ws"


def fresh(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def publish(channel: str, payload: dict) -> str:
    return json.dumps({"channel": channel, "payload": payload})


async def by_dialect(gateway) -> dict:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as http:
        return (await http.get("/readyz")).json()["by_dialect"]


# -- seed 002 on /ws ---------------------------------------------------------------------------------------


async def test_seed_002s_client_subscribes_receives_reconnects_and_resubscribes_on_ws(bare):
    channel = fresh("user_session")
    message = {"message": "Assistant is processing your request...", "status": "started", "type": "status"}
    async with websockets.connect(ws_url(bare)) as publisher:
        async with websockets.connect(ws_url(bare)) as subscriber:
            await subscriber.send(subscription("subscribe", channel))
            assert await receive(subscriber, 10) == subscribed(channel)
            assert (await by_dialect(bare)).get("channels", 0) >= 1
            # The publisher's first message is a publish: it is a channel client too.
            await publisher.send(publish(channel, message))
            assert await receive(subscriber, 10) == {"channel": channel, "payload": message}
        # Reconnect and resubscribe, as the seed's client does after losing its connection.
        async with websockets.connect(ws_url(bare)) as subscriber:
            await subscriber.send(subscription("subscribe", channel))
            assert await receive(subscriber, 10) == subscribed(channel)
            final = {**message, "status": "completed", "final_message": True}
            await publisher.send(publish(channel, final))
            assert await receive(subscriber, 10) == {"channel": channel, "payload": final}
            await subscriber.send(subscription("unsubscribe", channel))
            assert (await receive(subscriber, 10))["payload"]["action"] == "unsubscribed"

    # The seed's WebSocketService, pointed at /ws.
    async with WebSocketService(ws_url(bare), retry_delay=0.1, ack_timeout=5.0) as service:
        await service.subscribe(channel)
        stream = service.messages()
        async with websockets.connect(ws_url(bare)) as publisher:
            await publisher.send(publish(channel, message))
            received = await stream.get(timeout=10)
        assert received.channel == channel and received.payload == message


async def test_seed_002s_client_resubscribes_on_ws_after_the_gateway_closed_it(start_bare_gateway):
    impatient = start_bare_gateway(GATEWAY_IDLE_TIMEOUT_SECONDS="2")
    channel = fresh("user_session")
    async with WebSocketService(ws_url(impatient), retry_delay=0.1, max_retry_delay=0.5, ack_timeout=5.0) as service:
        await service.subscribe(channel)
        stream = service.messages()
        deadline = asyncio.get_running_loop().time() + 30
        while service.reconnects < 1:
            assert asyncio.get_running_loop().time() < deadline, "the idle socket was never closed"
            await asyncio.sleep(0.2)
        await service.wait_ready(timeout=10)
        # Delivery is at most once: publish until the resubscribed client gets one.
        async with websockets.connect(ws_url(impatient)) as publisher:
            while True:
                await publisher.send(publish(channel, {"message": "again", "status": "started"}))
                try:
                    received = await stream.get(timeout=0.5)
                except TimeoutError:
                    assert asyncio.get_running_loop().time() < deadline, "nothing arrived after resubscribing"
                    continue
                if not received.is_error:  # (the idle close's notice may come first)
                    break
        assert received.channel == channel and received.payload["message"] == "again"
        assert channel in service.subscribed_channels


async def test_a_sessions_channel_on_ws_needs_its_token_and_is_read_only(bare):
    async with websockets.connect(ws_url(bare)) as browser:
        await browser.send(json.dumps({"type": "init", "data": {"agentId": "default"}}))
        init = await receive(browser, 30)
        while init["type"] != "init_success":
            init = await receive(browser, 30)
        session, token = init["data"]["callLogId"], init["data"]["channelToken"]
        async with websockets.connect(ws_url(bare)) as intruder:
            await intruder.send(subscription("subscribe", session))
            refused = await receive(intruder, 10)
            assert refused["channel"] == "error" and "token" in refused["payload"]["error"]
            await intruder.send(publish(session, {"message": "forged", "status": "completed"}))
            assert "read-only" in (await receive(intruder, 10))["payload"]["error"]
        async with websockets.connect(ws_url(bare)) as dashboard:
            await dashboard.send(subscription("subscribe", session, token=token))
            assert await receive(dashboard, 10) == subscribed(session)
            await browser.send(json.dumps({"type": "text", "data": {"text": "Hello?"}}))
            payloads = await statuses_of_a_turn(dashboard, session)
            assert "started" in [p["status"] for p in payloads] and {p["thread_id"] for p in payloads} == {session}
        # Reconnected, the dashboard resubscribes with its token and follows the next turn.
        async with websockets.connect(ws_url(bare)) as dashboard:
            await dashboard.send(subscription("subscribe", session, token=token))
            assert await receive(dashboard, 10) == subscribed(session)
            await browser.send(json.dumps({"type": "text", "data": {"text": "Still there?"}}))
            payloads = await statuses_of_a_turn(dashboard, session)
            assert "forged" not in [p["message"] for p in payloads]


async def test_a_first_message_that_fits_neither_envelope_gets_an_error_in_the_format_it_resembles(bare):
    channel = fresh("free")
    async with websockets.connect(ws_url(bare)) as ws:
        for frame in ("{not json", "[1, 2]", json.dumps({"data": {"text": "hi"}}), b"\x00binary", "{}"):
            await ws.send(frame)
            error = await receive(ws, 10)
            assert error["type"] == "error" and error["data"]["error"], (frame, error)
        for frame in (json.dumps({"channel": "subscription"}), json.dumps({"payload": {"action": "subscribe"}})):
            await ws.send(frame)
            error = await receive(ws, 10)
            assert error["channel"] == "error" and '"payload"' in error["payload"]["error"], (frame, error)
        # The socket goes on, and its first message that fits decides: a channel client.
        await ws.send(subscription("subscribe", channel))
        assert await receive(ws, 10) == subscribed(channel)
        await ws.send(json.dumps({"type": "init", "data": {"agentId": "default"}}))
        assert (await receive(ws, 10))["channel"] == "error"
    async with websockets.connect(ws_url(bare)) as ws:
        await ws.send(json.dumps({"payload": []}))
        assert (await receive(ws, 10))["channel"] == "error"
        await ws.send(json.dumps({"type": "dance"}))
        assert "unknown message type 'dance'" in (await receive(ws, 10))["data"]["error"]
        # A browser client now: a channel message is an unknown type to it.
        await ws.send(subscription("subscribe", channel))
        assert (await receive(ws, 10))["type"] == "error"
        assert await quiet(ws) == []


# -- seed 001: the order of a turn's speech ----------------------------------------------------------------


def wav_frames(b64: str) -> tuple[int, bytes]:
    with wave.open(io.BytesIO(base64.b64decode(b64))) as wav:
        return wav.getframerate(), wav.readframes(wav.getnframes())


def check_speech(timed: list[tuple[float, dict]]) -> list[dict]:
    """Asserts the seed's order of a turn's speech and returns its ``audio_response`` events."""
    events = [event for _, event in timed]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "processing_complete" and "error" not in kinds, kinds
    speech = [(at, e) for at, e in timed if e["type"] in SPEECH]
    assert speech and [e["type"] for _, e in speech] == list(SPEECH) * (len(speech) // 3), kinds
    responses = []
    for index in range(0, len(speech), 3):
        complete, response = speech[index + 1][1], speech[index + 2][1]
        # tts_complete and audio_response carry the same sentence, once; nothing carries the whole reply.
        assert complete["data"]["audio"] == response["data"]["audio"] and response["data"]["text"].strip()
        responses.append((speech[index + 2][0], response))
    audio = [r["data"]["audio"] for _, r in responses]
    assert len(set(audio)) == len(audio), "a sentence's audio was sent twice"
    # Paced: each sentence leaves no earlier than shortly before the ones before it end (a lenient bound:
    # a late reader only widens the gaps, except for its delay on the first one).
    seconds = [len(pcm) / 2 / rate for rate, pcm in (wav_frames(a) for a in audio)]
    if len(responses) >= 2:
        first_at, last_at = responses[0][0], responses[-1][0]
        assert last_at - first_at >= 0.5 * (sum(seconds[:-1]) - PLAYBACK_LEAD_S * (len(seconds) - 1))
    assert all(s > 0 for s in seconds)
    return [r for _, r in responses]


async def test_seed_001s_client_gets_each_sentence_once_in_the_seeds_order(gateway_url):
    agent = {
        "name": "Teller",
        "system_prompt": "You are a helpful assistant. Answer in two or three short sentences.",
        "greeting": "",
        "llm": {"temperature": 0.0, "max_tokens": 60},
    }
    async with api_client(gateway_url) as http:
        assert (await http.put("/api/agents/seed-teller", json=agent)).status_code == 200
    samples, rate = speak("Tell me two facts about the moon.")
    async with BrowserClient(gateway_url) as client:
        await client.send("init", agentId="seed-teller")
        await client.until("init_success")

        await client.send("text", text="Give me two facts about the sun.")
        timed = await client.timed_until("processing_complete", timeout=180)
        kinds = [e["type"] for _, e in timed]
        assert kinds[0] == "llm_start" and kinds.index("text_response") == kinds.index("llm_complete") + 1
        sentences = check_speech(timed)
        assert len(sentences) >= 2, kinds
        answer = next(e for _, e in timed if e["type"] == "llm_complete")["data"]["text"]
        assert " ".join(s["data"]["text"] for s in sentences).split() == answer.split()

        await client.send("audio", audio=base64.b64encode(wav_bytes(samples, rate)).decode())
        timed = await client.timed_until("processing_complete", timeout=180)
        kinds = [e["type"] for _, e in timed]
        assert kinds[:4] == ["processing_started", "stt_start", "stt_complete", "llm_start"], kinds
        check_speech(timed)
