"""Channel pub/sub (seed 002) at /ws/channels: a session's live status, publishing, bad input."""

from __future__ import annotations

import asyncio
import json
import uuid

import websockets

from tests.gateway.test_chat import ChatClient


async def receive(ws, timeout: float = 60) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def test_a_session_publishes_its_status_on_its_channel(gateway_url):
    conversation = f"conv_{uuid.uuid4().hex[:8]}"
    url = gateway_url.replace("http://", "ws://") + "/ws/channels"
    async with websockets.connect(url) as dashboard:
        await dashboard.send(
            json.dumps({"channel": "subscription", "payload": {"action": "subscribe", "channel": conversation}})
        )
        ack = await receive(dashboard)
        assert ack == {"channel": "subscription", "payload": {"action": "subscribed", "channel": conversation}}
        async with ChatClient(gateway_url) as client:
            await client.send(type="authorize", token="test-key")
            await client.next()
            await client.send(type="chat_message", content="Say hello.", conversation_id=conversation)
            await client.until("stream_end")
        payloads = []
        while not payloads or payloads[-1]["status"] != "completed":
            message = await receive(dashboard)
            assert message["channel"] == conversation
            payloads.append(message["payload"])
    statuses = [p["status"] for p in payloads]
    assert statuses[0] == "started" and statuses[1] == "responding" and "in_progress" in statuses
    assert [p["type"] for p in payloads][:2] == ["status", "status"] and payloads[-1]["type"] == "response"
    for payload in payloads:
        assert set(payload) >= {"message", "timestamp", "status", "type", "final_message", "message_id", "thread_id"}
        assert isinstance(payload["timestamp"], float) and isinstance(payload["final_message"], bool)
        assert payload["thread_id"] == conversation
    assert payloads[-1]["final_message"] is True and payloads[-1]["message"]
    assert len({p["message_id"] for p in payloads}) == 1


async def test_publishing_reaches_every_subscriber_and_unsubscribe_stops_it(gateway_url):
    url = gateway_url.replace("http://", "ws://") + "/ws/channels"
    channel = f"room_{uuid.uuid4().hex[:8]}"
    async with websockets.connect(url) as a, websockets.connect(url) as b:
        for ws in (a, b):
            await ws.send(
                json.dumps({"channel": "subscription", "payload": {"action": "subscribe", "channel": channel}})
            )
            await receive(ws)
        await a.send(json.dumps({"channel": channel, "payload": {"message": "hello", "type": "status"}}))
        for ws in (a, b):
            assert await receive(ws) == {"channel": channel, "payload": {"message": "hello", "type": "status"}}
        await b.send(json.dumps({"channel": "subscription", "payload": {"action": "unsubscribe", "channel": channel}}))
        assert (await receive(b))["payload"]["action"] == "unsubscribed"
        await a.send(json.dumps({"channel": channel, "payload": {"message": "again"}}))
        assert (await receive(a))["payload"] == {"message": "again"}
        try:
            extra = await receive(b, timeout=0.5)
        except TimeoutError:
            extra = None
        assert extra is None


async def test_bad_input_gets_an_error_and_the_connection_survives(gateway_url):
    url = gateway_url.replace("http://", "ws://") + "/ws/channels"
    async with websockets.connect(url) as ws:
        for raw in (
            "{x",
            "[]",
            json.dumps({"channel": "a.b", "payload": {}}),
            json.dumps({"channel": "ok"}),
            json.dumps({"channel": "subscription", "payload": {"action": "dance", "channel": "c"}}),
            json.dumps({"channel": "subscription", "payload": {"action": "subscribe", "channel": "bad name"}}),
            b"\x00",
            "y" * 300_000,
        ):
            await ws.send(raw)
            message = await receive(ws)
            assert message["channel"] == "error" and message["payload"]["error"], raw[:20]
        await ws.send(json.dumps({"channel": "subscription", "payload": {"action": "subscribe", "channel": "fine"}}))
        assert (await receive(ws))["payload"]["action"] == "subscribed"
