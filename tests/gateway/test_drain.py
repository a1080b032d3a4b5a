"""A draining gateway (SIGTERM) finishes the turns in flight of every dialect before it closes their
sockets with 1012, and counts them in the turn metrics: the one turn runner serves them all.

Each test starts its own gateway and holds two turns in flight at once with webhook tools that answer
only when the test lets them: the dialect's own turn (``/pause``) and a chat turn (``/hold``) that keeps
the gateway draining after the first one has finished, so its metrics can be read while it still runs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid

import httpx
import numpy as np
import pytest
import websockets

from tests.gateway.webhooks import WebhookServer
from tests.support.gateway import API_KEY, WEBHOOK_NETWORKS, api_client
from tests.support.speech import speak
from voice_audio import StreamResampler

DIALECTS = ["browser", "chat", "retell", "twilio", "exotel", "pcm", "realtime"]
# The kind of turn each dialect starts in these tests, as the call log and the metrics name it.
TURN_KINDS = {
    "browser": "text",
    "chat": "chat",
    "retell": "response",
    "twilio": "dtmf",
    "exotel": "dtmf",
    "pcm": "audio",
    "realtime": "text",
}
# One of a few ticket ids: the model's forced call is always valid JSON well within its tokens (a free string
# can run on until max_tokens cuts it, and the call is then refused without reaching the webhook).
SCHEMA = {
    "type": "object",
    "properties": {"ticket": {"type": "string", "enum": ["T-1", "T-2", "T-7"]}},
    "required": ["ticket"],
}


def agent(agent_id: str, path: str, hooks: WebhookServer) -> dict:
    tool = {"name": "check_ticket", "description": "Check a support ticket.", "parameters": SCHEMA}
    return {
        "id": agent_id,
        "name": "Support",
        "system_prompt": "You help with support tickets. Always check the ticket first.",
        "greeting": "",
        "llm": {"tool_choice": "check_ticket", "temperature": 0.0, "max_tokens": 48, "max_tool_rounds": 1},
        "tools": [{**tool, "url": hooks.url + path, "timeout_s": 60}],
    }


@pytest.fixture(scope="module")
def hooks():
    with WebhookServer() as server:
        yield server


async def metrics(url: str) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(url + "/metrics/")).text


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head = line.rsplit(" ", 1)[0]
            if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def until(predicate, timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def requests_to(hooks: WebhookServer, path: str, count: int) -> None:
    async def arrived() -> bool:
        return len([r for r in hooks.requests if r["path"] == path]) >= count

    await until(arrived, what=f"{count} request(s) to {path}")


async def chat_turn(ws, agent_id: str, content: str) -> None:
    await ws.send(json.dumps({"type": "authorize", "token": API_KEY}))
    assert json.loads(await ws.recv())["type"] == "authorize_success"
    await ws.send(json.dumps({"type": "chat_message", "content": content, "agent_id": agent_id}))


async def collect(ws, into: list) -> int:
    """Every message until the socket closes; returns the close code."""
    try:
        async for message in ws:
            into.append(message if isinstance(message, bytes) else json.loads(message))
    except websockets.ConnectionClosed:
        pass
    return ws.close_code


async def open_dialect(dialect: str, url: str, agent_id: str) -> websockets.ClientConnection:
    """Connects as ``dialect``'s client and starts one turn with ``agent_id``."""
    ws_url = url.replace("http://", "ws://")
    if dialect == "browser":
        ws = await websockets.connect(ws_url + "/ws")
        await ws.send(json.dumps({"type": "init", "data": {"agentId": agent_id}}))
        assert json.loads(await ws.recv())["type"] == "init_success"
        await ws.send(json.dumps({"type": "text", "data": {"text": "Check ticket T-7 please."}}))
    elif dialect == "chat":
        ws = await websockets.connect(ws_url + "/v1/chat/stream")
        await chat_turn(ws, agent_id, "Check ticket T-7 please.")
    elif dialect == "retell":
        ws = await websockets.connect(ws_url + f"/ws-default/call_{uuid.uuid4().hex[:8]}?agent_id={agent_id}")
        assert json.loads(await ws.recv())["response_type"] == "config"
        await ws.send(json.dumps({"interaction_type": "call_details", "call": {}}))
        assert json.loads(await ws.recv())["response_id"] == 0
        transcript = [{"role": "user", "content": "Check ticket T-7 please."}]
        await ws.send(json.dumps({"interaction_type": "response_required", "response_id": 1, "transcript": transcript}))
    elif dialect in ("twilio", "exotel"):
        ws = await websockets.connect(ws_url + ("/twilio/media" if dialect == "twilio" else "/exotel/media"))
        sid = f"MZ{uuid.uuid4().hex[:16]}"
        key, params = ("streamSid", "customParameters") if dialect == "twilio" else ("stream_sid", "custom_parameters")
        await ws.send(json.dumps({"event": "connected"}))
        await ws.send(json.dumps({"event": "start", key: sid, "start": {key: sid, params: {"agent_id": agent_id}}}))
        await ws.send(json.dumps({"event": "dtmf", key: sid, "dtmf": {"digit": "7"}}))
    elif dialect == "realtime":
        headers = {"Authorization": f"Bearer {API_KEY}"}
        ws = await websockets.connect(ws_url + f"/v1/realtime?model={agent_id}", additional_headers=headers)
        assert json.loads(await ws.recv())["type"] == "session.created"
        content = [{"type": "input_text", "text": "Check ticket T-7 please."}]
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {"role": "user", "content": content}}))
        await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
    else:
        async with api_client(url) as http:
            response = await http.post("/api/calls/trigger", json={"agent_id": agent_id})
            assert response.status_code == 200, response.text
        ws = await websockets.connect(ws_url + response.json()["websocket_url"])
        samples, rate = speak("Please check my support ticket.")
        pcm = StreamResampler(rate, 16000).process(samples)
        pcm = np.concatenate([pcm, np.zeros(16000, dtype=np.int16)]).astype("<i2").tobytes()
        for offset in range(0, len(pcm), 640):
            await ws.send(pcm[offset : offset + 640])
    return ws


def answered_before_close(dialect: str, received: list) -> bool:
    """Whether the client got the end of its turn (or, on a call, the answer's audio)."""
    texts = [m for m in received if isinstance(m, dict)]
    if dialect == "browser":
        return any(m.get("type") == "processing_complete" for m in texts)
    if dialect == "chat":
        return any(m.get("type") == "stream_end" and m["interrupted"] is False for m in texts)
    if dialect == "retell":
        return any(m.get("response_id") == 1 and m.get("content_complete") is True for m in texts)
    if dialect == "pcm":
        return any(isinstance(m, bytes) and m for m in received)
    if dialect == "realtime":
        return any(m.get("type") == "response.done" and m["response"]["status"] == "completed" for m in texts)
    return any(m.get("event") == "media" for m in texts)


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_turn_in_flight_during_sigterm_is_finished_before_the_socket_closes(
    dialect, start_bare_gateway, stt_worker, llm_worker, tts_worker, hooks
):
    gateway = start_bare_gateway(
        GATEWAY_API_KEYS=API_KEY, GATEWAY_DRAIN_TIMEOUT_SECONDS="90", GATEWAY_TOOL_ALLOWED_NETWORKS=WEBHOOK_NETWORKS
    )
    hooks.released.clear()
    hooks.resumed.clear()
    async with api_client(gateway.url) as http:
        for agent_id, path in (("holder", "/hold"), ("pauser", "/pause")):
            response = await http.put(f"/api/agents/{agent_id}", json=agent(agent_id, path, hooks))
            assert response.status_code == 200, response.text
    held_before = len([r for r in hooks.requests if r["path"] == "/hold"])
    paused_before = len([r for r in hooks.requests if r["path"] == "/pause"])

    holder = await websockets.connect(gateway.url.replace("http://", "ws://") + "/v1/chat/stream")
    await chat_turn(holder, "holder", "Check ticket T-1 please.")
    await requests_to(hooks, "/hold", held_before + 1)
    client = await open_dialect(dialect, gateway.url, "pauser")
    try:
        await requests_to(hooks, "/pause", paused_before + 1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the gateway's log ends: {gateway.log.getvalue()[-3000:]}") from None
    kind = TURN_KINDS[dialect]
    before = metric(await metrics(gateway.url), "voice_gateway_turns_total", dialect=dialect, kind=kind)
    assert metric(await metrics(gateway.url), "voice_gateway_turns_in_flight") >= 2

    received: list = []
    held: list = []
    reader = asyncio.create_task(collect(client, received))
    holder_reader = asyncio.create_task(collect(holder, held))
    gateway.child.signal(signal.SIGTERM)
    async with httpx.AsyncClient() as http:

        async def draining() -> bool:
            return (await http.get(gateway.url + "/readyz")).status_code == 503

        await until(draining, 10, "the gateway to drain")
    hooks.resumed.set()

    async def counted() -> bool:
        text = await metrics(gateway.url)
        return metric(text, "voice_gateway_turns_total", dialect=dialect, kind=kind, outcome="ok") > before

    await until(counted, 90, f"the {dialect} turn to be counted")
    await asyncio.sleep(0.3)
    assert not reader.done(), "the socket closed while another turn still held the drain"
    assert answered_before_close(dialect, received), received[-5:]

    hooks.released.set()
    assert await asyncio.wait_for(reader, 60) == 1012
    assert await asyncio.wait_for(holder_reader, 60) == 1012
    assert any(isinstance(m, dict) and m.get("type") == "stream_end" for m in held), held[-3:]
    assert await asyncio.to_thread(gateway.child.wait, 30) is not None
