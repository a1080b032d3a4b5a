"""Conformance of the Retell custom-LLM socket (seed 000, protocols.md §1), against the real stack."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from tests.gateway.test_calls import bus_is_idle
from tests.support.gateway import api_client


class RetellPeer:
    """Plays Retell's side: sends interaction events, records every server event with its time."""

    def __init__(self, url: str, call_id: str) -> None:
        self.url = url.replace("http://", "ws://") + f"/ws-default/{call_id}"
        self.received: list[tuple[float, dict]] = []

    async def __aenter__(self) -> RetellPeer:
        self.ws = await websockets.connect(self.url)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    async def send(self, **message) -> None:
        await self.ws.send(json.dumps(message))

    async def next(self, timeout: float = 60) -> dict:
        message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.received.append((time.monotonic(), message))
        return message

    async def response(self, response_id: int, timeout: float = 90) -> list[dict]:
        """Every ``response`` event for ``response_id`` until ``content_complete``."""
        chunks = []
        while True:
            message = await self.next(timeout)
            if message.get("response_type") == "response" and message.get("response_id") == response_id:
                chunks.append(message)
                if message["content_complete"] is True:
                    return chunks


def transcript(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


async def test_happy_path_and_field_types(gateway_url):
    async with RetellPeer(gateway_url, "call_happy1") as retell:
        config = await retell.next()
        assert config["response_type"] == "config"
        assert config["config"] == {"auto_reconnect": True, "call_details": True, "transcript_with_tool_calls": True}
        await retell.send(interaction_type="call_details", call={"call_id": "call_happy1", "call_type": "web_call"})
        begin = await retell.next()
        assert begin["response_type"] == "response" and begin["response_id"] == 0
        assert isinstance(begin["content"], str) and begin["content"]
        assert begin["content_complete"] is True

        await retell.send(interaction_type="ping_pong", timestamp=1703302407333)
        assert await retell.next() == {"response_type": "ping_pong", "timestamp": 1703302407333}

        await retell.send(interaction_type="update_only", transcript=transcript(("user", "Hi")), turntaking="user_turn")
        await retell.send(
            interaction_type="response_required",
            response_id=1,
            transcript=transcript(("agent", begin["content"]), ("user", "What is two plus two?")),
        )
        chunks = await retell.response(1)
    assert len(chunks) >= 2
    for chunk in chunks:
        assert set(chunk) == {"response_type", "response_id", "content", "content_complete"}
        assert type(chunk["response_id"]) is int and type(chunk["content_complete"]) is bool
        assert isinstance(chunk["content"], str)
    assert [c["content_complete"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c["content"] for c in chunks).strip()
    async with api_client(gateway_url) as http:
        log = (await http.get("/api/calls/call_happy1")).json()
    assert log["dialect"] == "retell" and log["turns"][-1]["user"] == "What is two plus two?"


async def test_a_newer_response_id_stops_the_older_stream_at_once(gateway_url, nats_url):
    async with RetellPeer(gateway_url, "call_interrupt1") as retell:
        await retell.next()
        await retell.send(interaction_type="call_details", call={})
        await retell.next()
        story = transcript(("user", "Tell me a very long story about the sea and the lighthouse keeper."))
        await retell.send(interaction_type="response_required", response_id=1, transcript=story)
        while True:
            message = await retell.next()
            if message.get("response_id") == 1 and message["content"]:
                break
        interrupted_at = time.monotonic()
        await retell.send(
            interaction_type="response_required", response_id=2, transcript=transcript(("user", "Stop. Say hello."))
        )
        await retell.response(2)
        late = [m for t, m in retell.received if t > interrupted_at + 0.05 and m.get("response_id") == 1]
    assert late == [], late
    assert await bus_is_idle(nats_url)


async def test_reminder_required_is_answered(gateway_url):
    async with RetellPeer(gateway_url, "call_reminder1") as retell:
        await retell.next()
        await retell.send(interaction_type="call_details", call={})
        begin = await retell.next()
        await retell.send(
            interaction_type="reminder_required", response_id=1, transcript=transcript(("agent", begin["content"]))
        )
        chunks = await retell.response(1)
    assert chunks[-1]["content_complete"] is True


async def test_bad_input_is_ignored_and_a_binary_frame_closes_with_1007(gateway_url):
    async with RetellPeer(gateway_url, "call_bad1") as retell:
        await retell.next()
        await retell.send(interaction_type="call_details", call={})
        await retell.next()
        for bad in (
            "{nope",
            "[]",
            json.dumps({"interaction_type": "dance"}),
            json.dumps({"interaction_type": "response_required", "response_id": "7", "transcript": []}),
            json.dumps({"interaction_type": "response_required", "response_id": True, "transcript": []}),
        ):
            await retell.ws.send(bad)
        await retell.send(interaction_type="ping_pong", timestamp=5)
        assert await retell.next() == {"response_type": "ping_pong", "timestamp": 5}
        await retell.ws.send(b"\x00\x01")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await retell.next(10)
    assert closed.value.rcvd.code == 1007


async def test_begin_message_uses_dynamic_variables(gateway_url):
    async with api_client(gateway_url) as http:
        await http.put(
            "/api/agents/retell-agent", json={"name": "R", "greeting": "Hi {{first_name}}, thanks for calling."}
        )
    async with RetellPeer(gateway_url, "call_vars1") as retell:
        retell.url += "?agent_id=retell-agent"
        await retell.next()
        call = {"metadata": {"agent_id": "retell-agent"}, "retell_llm_dynamic_variables": {"first_name": "Maya"}}
        await retell.send(interaction_type="call_details", call=call)
        begin = await retell.next()
    assert begin["content"] == "Hi Maya, thanks for calling."
