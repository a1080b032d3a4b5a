"""The seeds' own example clients, unchanged in behaviour, against a gateway started the way ``make run``
(``voicectl up``) starts it: seed 003's Python client (a trigger with only a JSON body, then raw PCM) and
seed 004's authorized chat flow. Also the policy that lets the first one in on purpose
(``GATEWAY_OPEN_ROUTES``, docs/security.md "Legacy clients") and the bounds that still hold without a key.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid

import aiohttp
import httpx
import numpy as np
import pytest
import websockets

from tests.support.speech import speak
from tests.support.workers import _Tee
from voice_audio import resample
from voice_gateway.config import Settings
from voice_runtime.config import ConfigError
from voicectl.gateway_api import DEFAULT_API_KEY
from voicectl.local import GatewayProcess
from voicectl.stack import gateway_env

# The environment voicectl up gives the gateway when the user sets nothing (tracing aside).
MAKE_RUN_ENV = {"OTEL_TRACES_EXPORTER": "none", **gateway_env({})}


@pytest.fixture(scope="module")
def make_run_gateway(nats_url, stt_worker, llm_worker, tts_worker):
    """The gateway with ``voicectl up``'s environment, in front of real workers."""
    log = io.StringIO()
    process = GatewayProcess(nats_url, MAKE_RUN_ENV, sink=_Tee(log)).start()
    process.log = log
    yield process
    process.stop()


async def seed_003_start_call(base_url: str, agent_id: str, audio_data: bytes) -> tuple[str, bytes]:
    """Seed 003's Python example as written (``http://localhost:8000`` is ``base_url``): no key, no headers."""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base_url}/api/calls/trigger",
            json={"agent_id": agent_id, "driver_name": "John Doe", "load_number": "LOAD-123"},
        ) as response:
            data = await response.json()
            session_id = data["session_id"]
            websocket_url = data["websocket_url"]

    uri = f"ws://{base_url.split('://', 1)[1]}{websocket_url}"
    async with websockets.connect(uri) as websocket:
        await websocket.send(audio_data)
        response_audio = await websocket.recv()
    return session_id, response_audio


def pcm16_16k(text: str, silence_after_s: float) -> bytes:
    """Piper speaking ``text`` then ``silence_after_s`` of silence (so that the turn ends), in seed 003's
    audio format: 16 kHz, 16-bit, mono PCM."""
    samples, rate = speak(text)
    speech = np.asarray(resample(samples, rate, 16000), dtype="<i2")
    return np.concatenate([speech, np.zeros(int(16000 * silence_after_s), dtype="<i2")]).tobytes()


async def test_seed_003_python_client_starts_a_call_on_a_make_run_gateway(make_run_gateway):
    audio = pcm16_16k("Hello, this is John. Can you hear me?", silence_after_s=3.0)
    session_id, response_audio = await asyncio.wait_for(
        seed_003_start_call(make_run_gateway.url, "default", audio), timeout=180
    )
    assert isinstance(response_audio, bytes) and response_audio and len(response_audio) % 2 == 0
    uuid.UUID(session_id)
    assert "GATEWAY_OPEN_ROUTES=trigger" in make_run_gateway.log.getvalue()


async def seed_004_flow(base_url: str, token: str, agent_id: str, conversation_id: str) -> list[dict]:
    """Seed 004's message flow: ``authorize``, then a ``chat_message``; answers ``ping`` with ``pong``.

    Returns:
        Every server event from ``authorize_success`` to ``stream_end``, pings included.
    """
    events: list[dict] = []
    async with websockets.connect(f"ws://{base_url.split('://', 1)[1]}/v1/chat/stream") as socket:
        await socket.send(json.dumps({"type": "authorize", "token": token}))
        while True:
            msg = json.loads(await socket.recv())
            events.append(msg)
            if msg["type"] == "authorize_success":
                await socket.send(
                    json.dumps(
                        {
                            "type": "chat_message",
                            "content": "Hello!",
                            "user_id": "user_001",
                            "agent_id": agent_id,
                            "conversation_id": conversation_id,
                        }
                    )
                )
            elif msg["type"] == "ping":
                await socket.send(json.dumps({"type": "pong"}))
            elif msg["type"] in ("stream_end", "error"):
                return events


async def test_seed_004_flow_on_a_make_run_gateway(make_run_gateway):
    async with httpx.AsyncClient(
        base_url=make_run_gateway.url, headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"}
    ) as http:
        agent = (await http.get("/api/agents/default")).json()
        assert (await http.put("/api/agents/agent_001", json={**agent, "id": "agent_001"})).status_code == 200
    events = await asyncio.wait_for(
        seed_004_flow(make_run_gateway.url, DEFAULT_API_KEY, "agent_001", f"conv_001-{uuid.uuid4().hex}"),
        timeout=300,
    )
    kinds = [event["type"] for event in events if event["type"] != "ping"]
    assert kinds[0] == "authorize_success" and events[0]["connection_id"]
    assert kinds[1] == "stream_start" and kinds[-1] == "stream_end", kinds
    chunks = [event["chunk"] for event in events if event["type"] == "tts_ready_chunk"]
    assert chunks and all(isinstance(chunk, str) and chunk.strip() for chunk in chunks)


async def test_the_seed_003_trigger_without_a_key_is_bounded_by_its_pseudo_identity(start_bare_gateway):
    gateway = start_bare_gateway(
        **{**MAKE_RUN_ENV, "GATEWAY_MAX_PENDING_TRIGGERS_PER_KEY": "2", "GATEWAY_MAX_SESSIONS_PER_KEY": "1"}
    )
    body = {"agent_id": "default"}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        first = await http.post("/api/calls/trigger", json=body)
        assert first.status_code == 200, first.text
        assert (await http.post("/api/calls/trigger", json=body)).status_code == 200
        full = await http.post("/api/calls/trigger", json=body)
        assert full.status_code == 429 and "this client already has 2 triggered calls" in full.json()["detail"]
        keyed = await http.post("/api/calls/trigger", json=body, headers={"X-API-Key": DEFAULT_API_KEY})
        assert keyed.status_code == 200, "a key is its own identity, not the open one"
        wrong = await http.post("/api/calls/trigger", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid API key"
        for method, path in (("GET", "/api/agents/default"), ("GET", "/api/calls/x"), ("POST", "/api/channels/token")):
            assert (await http.request(method, path, json={"channel": "c"})).status_code == 401, path

        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}{first.json()['websocket_url']}"):
            # Once the call is connected it no longer waits, but it is the open identity's one session.
            for _ in range(100):
                busy = await http.post("/api/calls/trigger", json=body)
                assert busy.status_code == 429, busy.text
                if "already has 1 sessions open" in busy.json()["detail"]:
                    break
                await asyncio.sleep(0.1)
            assert "already has 1 sessions open" in busy.json()["detail"], busy.text
    log = gateway.log.getvalue()
    assert "GATEWAY_OPEN_ROUTES=trigger: POST /api/calls/trigger accepts calls without an API key" in log


def test_voicectl_up_opens_the_trigger_only_on_loopback():
    assert gateway_env({}) == {
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_API_KEYS": "dev-key",
        "GATEWAY_OPEN_ROUTES": "trigger",
    }
    exposed = gateway_env({"GATEWAY_HOST": "0.0.0.0"})
    assert exposed["GATEWAY_OPEN_ROUTES"] == "" and exposed["GATEWAY_API_KEYS"] == "dev-key"
    assert gateway_env({"GATEWAY_OPEN_ROUTES": ""})["GATEWAY_OPEN_ROUTES"] == ""


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"GATEWAY_HOST": "0.0.0.0", "GATEWAY_OPEN_ROUTES": "trigger"}, "not a loopback address"),
        ({"GATEWAY_HOST": "10.0.0.5", "GATEWAY_OPEN_ROUTES": "channels"}, "GATEWAY_TRUSTED_NETWORK=true"),
        ({"GATEWAY_HOST": "127.0.0.1", "GATEWAY_OPEN_ROUTES": "agents"}, "unknown route 'agents'"),
        ({"GATEWAY_HOST": "127.0.0.1", "GATEWAY_TRUSTED_NETWORK": "yes"}, "GATEWAY_TRUSTED_NETWORK"),
    ],
)
def test_open_routes_are_refused_where_keys_must_stay_required(monkeypatch, env, problem):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=problem):
        Settings.from_env()


def test_open_routes_on_loopback_or_a_trusted_network(monkeypatch):
    monkeypatch.setenv("GATEWAY_HOST", "::1")
    monkeypatch.setenv("GATEWAY_OPEN_ROUTES", "trigger, channels,trigger")
    settings = Settings.from_env()
    assert settings.open_routes == ("trigger", "channels") and settings.open_channels
    monkeypatch.setenv("GATEWAY_HOST", "0.0.0.0")
    monkeypatch.setenv("GATEWAY_OPEN_ROUTES", "trigger")
    monkeypatch.setenv("GATEWAY_TRUSTED_NETWORK", "true")
    settings = Settings.from_env()
    assert settings.open_routes == ("trigger",) and not settings.open_channels and settings.trusted_network
    monkeypatch.delenv("GATEWAY_OPEN_ROUTES")
    assert Settings.from_env().open_routes == ()
