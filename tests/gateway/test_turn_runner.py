"""Cancellation goes through the one turn runner whatever the dialect: a superseded Retell response and a
caller's barge-in both end the running turn as ``cancelled`` in the turn metrics, record it the way the
dialect expects, and leave no work on the bus.

The turns are held mid-way (in a webhook tool that answers only when the test lets it), so the
cancellation always hits a running turn.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import websockets

from tests.gateway.test_calls import bus_is_idle
from tests.gateway.test_drain import agent, metric, metrics, requests_to, until
from tests.gateway.webhooks import WebhookServer
from tests.support.gateway import API_KEY, api_client
from tests.support.speech import speak
from voice_audio import StreamResampler


@pytest.fixture(scope="module")
def hooks():
    with WebhookServer() as server:
        yield server


async def put_pauser(gateway_url: str, hooks: WebhookServer) -> str:
    agent_id = f"pauser_{uuid.uuid4().hex[:6]}"
    async with api_client(gateway_url) as http:
        response = await http.put(f"/api/agents/{agent_id}", json=agent(agent_id, "/pause", hooks))
        assert response.status_code == 200, response.text
    return agent_id


def pauses(hooks: WebhookServer) -> int:
    return len([r for r in hooks.requests if r["path"] == "/pause"])


async def counter(gateway_url: str, **labels: str) -> float:
    return metric(await metrics(gateway_url), "voice_gateway_turns_total", **labels)


async def test_a_superseded_retell_response_is_cancelled_by_the_runner(gateway_url, nats_url, hooks):
    hooks.resumed.clear()
    agent_id = await put_pauser(gateway_url, hooks)
    call_id = f"call_{uuid.uuid4().hex[:8]}"
    cancelled = await counter(gateway_url, dialect="retell", kind="response", outcome="cancelled")
    url = gateway_url.replace("http://", "ws://") + f"/ws-default/{call_id}?agent_id={agent_id}"
    async with websockets.connect(url) as ws:
        await ws.recv()
        await ws.send(json.dumps({"interaction_type": "call_details", "call": {}}))
        await ws.recv()
        paused = pauses(hooks)
        first = [{"role": "user", "content": "Check ticket T-1 please."}]
        await ws.send(json.dumps({"interaction_type": "response_required", "response_id": 1, "transcript": first}))
        await requests_to(hooks, "/pause", paused + 1)
        second = [*first, {"role": "user", "content": "No, check ticket T-2."}]
        await ws.send(json.dumps({"interaction_type": "response_required", "response_id": 2, "transcript": second}))

        async def superseded() -> bool:
            now = await counter(gateway_url, dialect="retell", kind="response", outcome="cancelled")
            return now > cancelled

        await until(superseded, 30, "the first response to be cancelled")
        await requests_to(hooks, "/pause", paused + 2)
        hooks.resumed.set()
        received = []
        while not (received and received[-1].get("content_complete") is True):
            received.append(json.loads(await ws.recv()))
    assert {m.get("response_id") for m in received if m.get("response_type") == "response"} == {2}
    async with api_client(gateway_url) as http:
        log = (await http.get(f"/api/calls/{call_id}")).json()
    assert [t["kind"] for t in log["turns"]] == ["response"], "the superseded response is not recorded"
    assert log["turns"][0]["user"].endswith("No, check ticket T-2.")
    assert await bus_is_idle(nats_url)


async def test_a_barge_in_cancels_the_running_turn_through_the_runner(gateway_url, nats_url, hooks):
    hooks.resumed.clear()
    agent_id = await put_pauser(gateway_url, hooks)
    labels = {"dialect": "pcm", "kind": "audio"}
    cancelled = await counter(gateway_url, outcome="cancelled", **labels)
    answered = await counter(gateway_url, outcome="ok", **labels)
    async with api_client(gateway_url, API_KEY) as http:
        response = await http.post("/api/calls/trigger", json={"agent_id": agent_id})
        assert response.status_code == 200, response.text
    session_id = response.json()["session_id"]

    def utterance(text: str) -> list[bytes]:
        samples, rate = speak(text)
        pcm = StreamResampler(rate, 16000).process(samples)
        pcm = np.concatenate([pcm, np.zeros(16000, dtype=np.int16)]).astype("<i2").tobytes()
        return [pcm[offset : offset + 640] for offset in range(0, len(pcm), 640)]

    url = gateway_url.replace("http://", "ws://") + response.json()["websocket_url"]
    async with websockets.connect(url) as ws:
        paused = pauses(hooks)
        for frame in utterance("Please check my support ticket."):
            await ws.send(frame)
        try:
            await requests_to(hooks, "/pause", paused + 1)
        except AssertionError as exc:
            async with api_client(gateway_url) as http:
                ready = (await http.get("/readyz")).text
                log = (await http.get(f"/api/calls/{session_id}")).text
            raise AssertionError(f"{exc}; socket close {ws.close_code} {ws.close_reason}; {ready}; {log}") from None
        for frame in utterance("Actually, wait a moment."):
            await ws.send(frame)

        async def barged_in() -> bool:
            return await counter(gateway_url, outcome="cancelled", **labels) > cancelled

        await until(barged_in, 30, "the barge-in to cancel the running turn")
        hooks.resumed.set()

        async def second_turn_answered() -> bool:
            return await counter(gateway_url, outcome="ok", **labels) > answered

        await until(second_turn_answered, 60, "the next turn to be answered")
    async with api_client(gateway_url) as http:
        log = (await http.get(f"/api/calls/{session_id}")).json()
    turns = [t for t in log["turns"] if t["kind"] == "audio"]
    assert turns[0]["interrupted"] is True and turns[0]["user"], turns
    assert turns[-1]["interrupted"] is False and turns[-1]["assistant"], turns
    assert await bus_is_idle(nats_url)
