"""Agent tools: webhook and built-in tools run by the gateway, fed back to the model, and shown the way
each dialect expects. The webhooks are a real local HTTP server; the model is the real embedded LLM."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid

import nats
import pytest
import websockets
from pydantic import ValidationError

from tests.gateway.client import BrowserClient
from tests.gateway.test_chat import ChatClient
from tests.gateway.test_retell import RetellPeer, transcript
from tests.gateway.webhooks import WebhookServer
from tests.support.gateway import WEBHOOK_NETWORKS, api_client
from voice.v1 import llm_pb2
from voice_bus.catalog import status_subject
from voice_gateway.agents import Agent
from voice_gateway.agents.egress import EgressPolicy
from voice_gateway.agents.egress_client import EgressClient
from voice_gateway.agents.tools import Toolbox

ORDER_SCHEMA = {
    "type": "object",
    "properties": {"order_id": {"type": "string"}},
    "required": ["order_id"],
}


@pytest.fixture(scope="module")
def webhooks():
    with WebhookServer(slow_s=4.0) as server:
        yield server


def order_tool(url: str, **extra) -> dict:
    return {
        "name": "get_order",
        "description": "Look up an order's delivery status by its id.",
        "parameters": ORDER_SCHEMA,
        "url": url,
        "headers": {"Authorization": "Bearer hook-secret"},
        **extra,
    }


def agent_with(agent_id: str, tools: list[dict], tool_choice: str, **extra) -> dict:
    return {
        "id": agent_id,
        "name": "Orders",
        "system_prompt": "You help customers with their orders. Use the tools to look orders up.",
        "greeting": "",
        "llm": {"tool_choice": tool_choice, "temperature": 0.0, "max_tokens": 40, "max_tool_rounds": 2},
        "tools": tools,
        **extra,
    }


async def put_agent(gateway_url: str, agent: dict) -> None:
    async with api_client(gateway_url) as http:
        response = await http.put(f"/api/agents/{agent['id']}", json=agent)
        assert response.status_code == 200, response.text


@contextlib.asynccontextmanager
async def loopback_egress():
    """The webhooks' client, allowed to reach the local webhook server (loopback is refused by default)."""
    egress = EgressClient(EgressPolicy(allowed_networks=[WEBHOOK_NETWORKS]))
    try:
        yield egress
    finally:
        await egress.aclose()


def call(name: str, arguments: str) -> llm_pb2.ToolCall:
    return llm_pb2.ToolCall(id=f"call_{uuid.uuid4().hex[:8]}", name=name, arguments=arguments)


# The toolbox on its own: a real HTTP server, no model.


async def test_webhook_tool_posts_the_arguments_and_returns_the_body(webhooks):
    agent = Agent.model_validate(agent_with("a", [order_tool(webhooks.url + "/order")], "auto"))
    async with loopback_egress() as egress:
        outcome = await Toolbox(agent, egress).run(call("get_order", '{"order_id": "A-42"}'), "session-1")
    assert outcome.successful
    assert json.loads(outcome.content)["status"] == "shipped"
    sent = webhooks.requests[-1]
    assert sent["method"] == "POST" and sent["path"] == "/order"
    assert sent["headers"]["authorization"] == "Bearer hook-secret"
    assert sent["body"]["name"] == "get_order" and sent["body"]["arguments"] == {"order_id": "A-42"}
    assert sent["body"]["session_id"] == "session-1" and sent["body"]["agent_id"] == "a"


async def test_get_webhook_sends_query_parameters(webhooks):
    agent = Agent.model_validate(agent_with("a", [order_tool(webhooks.url + "/order", method="GET")], "auto"))
    async with loopback_egress() as egress:
        outcome = await Toolbox(agent, egress).run(call("get_order", '{"order_id": "B-7"}'), "s")
    assert outcome.successful
    assert webhooks.requests[-1]["method"] == "GET" and webhooks.requests[-1]["query"] == {"order_id": "B-7"}


async def test_slow_webhook_is_an_error_result_after_its_timeout(webhooks):
    agent = Agent.model_validate(agent_with("a", [order_tool(webhooks.url + "/slow", timeout_s=0.5)], "auto"))
    async with loopback_egress() as egress:
        started = time.monotonic()
        outcome = await Toolbox(agent, egress).run(call("get_order", '{"order_id": "A-42"}'), "s")
        elapsed = time.monotonic() - started
    assert not outcome.successful
    assert "did not answer within 0.5 s" in json.loads(outcome.content)["error"]
    assert elapsed < 2.0


@pytest.mark.parametrize(
    ("url_path", "arguments", "expected"),
    [
        ("/fail", '{"order_id": "A-42"}', "answered HTTP 500"),
        ("/order", '{"order_id": ', "not valid JSON"),
        ("/order", "[1, 2]", "must be a JSON object"),
    ],
)
async def test_failures_are_error_results(webhooks, url_path, arguments, expected):
    agent = Agent.model_validate(agent_with("a", [order_tool(webhooks.url + url_path)], "auto"))
    async with loopback_egress() as egress:
        outcome = await Toolbox(agent, egress).run(call("get_order", arguments), "s")
    assert not outcome.successful
    assert expected in json.loads(outcome.content)["error"]


async def test_unreachable_webhook_and_unknown_tool_are_error_results():
    agent = Agent.model_validate(agent_with("a", [order_tool("http://127.0.0.1:9/order")], "auto"))
    async with loopback_egress() as egress:
        toolbox = Toolbox(agent, egress)
        unreachable = await toolbox.run(call("get_order", "{}"), "s")
        unknown = await toolbox.run(call("launch_rocket", "{}"), "s")
    assert not unreachable.successful and "could not be reached" in unreachable.content
    assert not unknown.successful and "no tool named 'launch_rocket'" in unknown.content


async def test_builtins_ask_for_call_actions():
    agent = Agent.model_validate(
        agent_with("a", [{"name": "end_call"}, {"name": "transfer_call", "transfer_number": "+15550100"}], "auto")
    )
    async with loopback_egress() as egress:
        toolbox = Toolbox(agent, egress)
        ended = await toolbox.run(call("end_call", '{"reason": "goodbye"}'), "s")
        transferred = await toolbox.run(call("transfer_call", "{}"), "s")
    assert ended.action.kind == "end_call" and ended.action.reason == "goodbye"
    assert transferred.action.kind == "transfer_call" and transferred.action.number == "+15550100"
    assert [t.name for t in toolbox.specs()] == ["end_call", "transfer_call"]
    assert all(json.loads(t.parameters_json)["type"] == "object" and t.description for t in toolbox.specs())


def test_agent_tool_configuration_is_validated():
    with pytest.raises(ValidationError, match="has no url"):
        Agent.model_validate(agent_with("a", [{"name": "get_order"}], "auto"))
    with pytest.raises(ValidationError, match="http:// or https://"):
        Agent.model_validate(agent_with("a", [order_tool("ftp://example.com/x")], "auto"))
    with pytest.raises(ValidationError, match="tool_choice"):
        Agent.model_validate(agent_with("a", [order_tool("http://example.com/x")], "find_order"))
    with pytest.raises(ValidationError, match="unique"):
        Agent.model_validate(agent_with("a", [{"name": "end_call"}, {"name": "end_call"}], "auto"))
    transfer = Agent.model_validate(agent_with("a", [{"name": "transfer_call"}], "auto")).tools[0]
    assert transfer.parameters["required"] == ["number"]


# Through the gateway, with the real model.


async def test_chat_stream_shows_tool_call_and_result_and_feeds_it_back(gateway_url, webhooks):
    await put_agent(gateway_url, agent_with("orders-chat", [order_tool(webhooks.url + "/order")], "get_order"))
    conversation = f"conv_{uuid.uuid4().hex[:8]}"
    before = len(webhooks.requests)
    async with ChatClient(gateway_url) as client:
        await client.send(type="authorize", token="test-key")
        await client.next()
        await client.send(
            type="chat_message",
            content="Where is my order A-42?",
            agent_id="orders-chat",
            conversation_id=conversation,
        )
        events = await client.until("stream_end")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "stream_start" and kinds[-1] == "stream_end"
    tool_call = next(e for e in events if e["type"] == "tool_call")
    tool_result = next(e for e in events if e["type"] == "tool_result")
    assert kinds.index("tool_call") < kinds.index("tool_result")
    assert tool_call["name"] == "get_order" and isinstance(tool_call["arguments"], dict)
    assert isinstance(tool_call["arguments"].get("order_id"), str)
    assert tool_result["tool_call_id"] == tool_call["tool_call_id"] and tool_result["successful"] is True
    assert json.loads(tool_result["content"])["status"] == "shipped"
    assert webhooks.requests[before]["body"]["arguments"] == tool_call["arguments"]
    async with api_client(gateway_url) as http:
        log = (await http.get(f"/api/calls/{conversation}")).json()
    recorded = log["turns"][-1]["tools"]
    assert recorded[0]["name"] == "get_order" and recorded[0]["successful"] is True


async def test_a_webhook_that_times_out_never_sticks_the_turn(gateway_url, webhooks):
    tool = order_tool(webhooks.url + "/slow", timeout_s=1.0)
    await put_agent(gateway_url, agent_with("orders-slow", [tool], "get_order"))
    async with ChatClient(gateway_url) as client:
        await client.send(type="authorize", token="test-key")
        await client.next()
        started = time.monotonic()
        await client.send(type="chat_message", content="Where is order A-42?", agent_id="orders-slow")
        events = await client.until("stream_end", timeout=60)
        elapsed = time.monotonic() - started
    results = [e for e in events if e["type"] == "tool_result"]
    assert results and results[0]["successful"] is False
    assert "did not answer within 1 s" in json.loads(results[0]["content"])["error"]
    assert events[-1]["interrupted"] is False
    assert elapsed < 30


async def test_retell_gets_invocation_result_and_end_call(gateway_url):
    await put_agent(gateway_url, agent_with("retell-bye", [{"name": "end_call"}], "end_call"))
    retell = RetellPeer(gateway_url, "call_tools2")
    retell.url += "?agent_id=retell-bye"
    async with retell:
        assert (await retell.next())["response_type"] == "config"
        await retell.send(interaction_type="call_details", call={"call_id": "call_tools2"})
        await retell.next()
        await retell.send(
            interaction_type="response_required",
            response_id=1,
            transcript=transcript(("user", "That is all, goodbye!")),
        )
        events = []
        while True:
            message = await retell.next(90)
            events.append(message)
            if message.get("response_type") == "response" and message.get("content_complete") is True:
                break
    kinds = [e["response_type"] for e in events]
    invocation = next(e for e in events if e["response_type"] == "tool_call_invocation")
    result = next(e for e in events if e["response_type"] == "tool_call_result")
    assert kinds.index("tool_call_invocation") < kinds.index("tool_call_result")
    assert set(invocation) == {"response_type", "tool_call_id", "name", "arguments"}
    assert invocation["name"] == "end_call" and isinstance(json.loads(invocation["arguments"]), dict)
    assert result["tool_call_id"] == invocation["tool_call_id"] and result["successful"] is True
    assert isinstance(result["content"], str)
    final = events[-1]
    assert final["response_id"] == 1 and final["end_call"] is True


async def test_browser_sees_llm_tool_events_and_the_session_ends(gateway_url):
    await put_agent(gateway_url, agent_with("browser-bye", [{"name": "end_call"}], "end_call"))
    async with BrowserClient(gateway_url) as client:
        await client.send("init", agentId="browser-bye")
        session_id = (await client.next())["data"]["callLogId"]
        await client.send("text", text="Goodbye, thanks for your help.")
        events = await client.until("session_ended")
    kinds = [e["type"] for e in events]
    assert kinds.index("llm_start") < kinds.index("llm_tool_call") < kinds.index("llm_tool_result")
    tool_call = events[kinds.index("llm_tool_call")]["data"]
    assert tool_call["name"] == "end_call" and tool_call["toolCallId"]
    assert kinds.index("llm_complete") < kinds.index("session_ended")
    assert events[-1]["data"] == {"callLogId": session_id, "reason": "end_call"}


async def test_twilio_transfer_closes_the_stream_and_dials_the_number(gateway_url, nats_url):
    agent = agent_with("transfer-desk", [{"name": "transfer_call", "transfer_number": "+15550100"}], "transfer_call")
    await put_agent(gateway_url, agent)
    call_sid = f"CA{uuid.uuid4().hex}"
    stream_sid = f"MZ{uuid.uuid4().hex}"
    nc = await nats.connect(nats_url)
    channel_events: list[dict] = []

    async def on_event(msg) -> None:
        channel_events.append(json.loads(msg.data))

    await nc.subscribe(status_subject(stream_sid), cb=on_event)
    url = gateway_url.replace("http://", "ws://") + "/twilio/media"
    try:
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            start = {
                "streamSid": stream_sid,
                "callSid": call_sid,
                "customParameters": {"agent_id": "transfer-desk"},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            }
            await ws.send(json.dumps({"event": "start", "streamSid": stream_sid, "start": start}))
            await ws.send(json.dumps({"event": "dtmf", "streamSid": stream_sid, "dtmf": {"digit": "0"}}))
            audio_bytes = 0
            async with asyncio.timeout(120):
                async for frame in ws:
                    message = json.loads(frame)
                    if message["event"] == "media":
                        audio_bytes += len(base64.b64decode(message["media"]["payload"]))
                    elif message["event"] == "mark":
                        await ws.send(json.dumps({"event": "mark", "streamSid": stream_sid, "mark": message["mark"]}))
            assert ws.close_code == 1000 and ws.close_reason == "transfer_call"
        assert audio_bytes > 0, "the agent's answer was not played before the transfer"
        async with api_client(gateway_url) as http:
            after = await http.post("/twilio/after-stream", data={"CallSid": call_sid, "CallStatus": "in-progress"})
            other = await http.post("/twilio/after-stream", data={"CallSid": "CAunknown"})
            log = (await http.get(f"/api/calls/{stream_sid}")).json()
        assert "<Dial>+15550100</Dial>" in after.text
        assert "<Hangup/>" in other.text
        assert log["status"] == "transferred"
        actions = [t["action"] for t in log["turns"] if t.get("action")]
        assert actions and actions[0]["kind"] == "transfer_call" and actions[0]["number"] == "+15550100"
        tool_events = [e for e in channel_events if e["type"] == "tool"]
        assert tool_events[0]["status"] == "processing" and "transfer_call" in tool_events[0]["message"]
        assert tool_events[-1]["status"] == "completed"
    finally:
        await nc.close()
