"""An id chosen by a client never addresses a call log it did not create (issue #14, call logs).

The attack: a Twilio ``start`` (or Exotel's, or a Retell connect on ``/ws-default/<id>``) naming an
existing chat conversation's id replaced that conversation's log and locked its owner out. Now a new
log is created create-only (atomic in JetStream), a carrier's or Retell's colliding id gets a fresh
log, an id the gateway issued (raw PCM) is refused, and a Retell reconnect resumes only its own call.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import pytest
import websockets

from tests.gateway.test_chat import ChatClient
from tests.support.gateway import API_KEY, SECOND_API_KEY, api_client
from voice_bus.connection import connect
from voice_gateway.storage.call_log import CallLog, CallLogStore


async def get_log(gateway_url: str, call_log_id: str) -> dict | None:
    async with api_client(gateway_url) as http:
        response = await http.get(f"/api/calls/{call_log_id}")
    return response.json() if response.status_code == 200 else None


async def settled_log(gateway_url: str, call_log_id: str, timeout_s: float = 10) -> dict:
    """The log once its session has closed (its status is no longer ``active``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        log = await get_log(gateway_url, call_log_id)
        if (log is not None and log["status"] != "active") or time.monotonic() > deadline:
            assert log is not None, f"no call log {call_log_id}"
            return log
        await asyncio.sleep(0.1)


async def fresh_log_id(gateway, dialect: str, taken: str, timeout_s: float = 10) -> str:
    """The id of the fresh log the gateway gave a ``dialect`` call that asked for the taken id (from its
    warning)."""
    pattern = re.compile(
        rf"{dialect} session: a call log with id '{re.escape(taken)}' already exists; "
        r"this session's log is ([0-9a-f]{32}) instead"
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = pattern.findall(gateway.log.getvalue())
        if found:
            return found[-1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no warning about a fresh {dialect} log for the taken id {taken!r}")


async def chat(gateway_url: str, conversation_id: str, content: str, token: str = API_KEY) -> list[dict]:
    """One chat message on a new connection: the events up to ``stream_end``, or the ``error``."""
    async with ChatClient(gateway_url) as client:
        await client.send(type="authorize", token=token)
        assert (await client.next())["type"] == "authorize_success"
        await client.send(type="chat_message", content=content, conversation_id=conversation_id)
        first = await client.next()
        if first["type"] == "error":
            return [first]
        return [first, *await client.until("stream_end")]


async def carrier_call(gateway_url: str, dialect: str, stream_sid: str) -> list[dict]:
    """A Twilio or Exotel stream that starts with ``stream_sid``, hears the greeting, and stops."""
    url = gateway_url.replace("http://", "ws://") + ("/twilio/media" if dialect == "twilio" else "/exotel/media")
    key, params = ("streamSid", "customParameters") if dialect == "twilio" else ("stream_sid", "custom_parameters")
    received = []
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"event": "connected"}))
        start = {key: stream_sid, "callSid": f"CA{uuid.uuid4().hex[:8]}", params: {"agent_id": "default"}}
        await ws.send(json.dumps({"event": "start", key: stream_sid, "start": start}))
        while not any(m.get("event") == "media" for m in received):
            received.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        await ws.send(json.dumps({"event": "stop", key: stream_sid, "stop": {}}))
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    return received


class Retell:
    """Retell's side of one custom-LLM socket on the default path."""

    def __init__(self, gateway_url: str, call_id: str, agent_id: str | None = None) -> None:
        query = f"?agent_id={agent_id}" if agent_id else ""
        self.url = gateway_url.replace("http://", "ws://") + f"/ws-default/{call_id}{query}"
        self.received: list[dict] = []

    async def __aenter__(self) -> Retell:
        self.ws = await websockets.connect(self.url)
        assert (await self.next())["response_type"] == "config"
        await self.ws.send(json.dumps({"interaction_type": "call_details", "call": {}}))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    async def next(self, timeout: float = 60) -> dict:
        message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.received.append(message)
        return message

    async def respond(self, response_id: int, user: str) -> str:
        transcript = [{"role": "user", "content": user}]
        await self.ws.send(
            json.dumps({"interaction_type": "response_required", "response_id": response_id, "transcript": transcript})
        )
        content = []
        while True:
            message = await self.next(90)
            if message.get("response_type") == "response" and message["response_id"] == response_id:
                content.append(message["content"])
                if message["content_complete"]:
                    return "".join(content)

    @property
    def greetings(self) -> int:
        return sum(1 for m in self.received if m.get("response_type") == "response" and m["response_id"] == 0)


async def test_concurrent_creates_of_one_id_have_exactly_one_winner(nats_url):
    # Two gateways (two connections) race for each id, eight times: one create wins, the other writes nothing.
    first, second = await connect(nats_url, name="gateway-a"), await connect(nats_url, name="gateway-b")
    try:
        stores = [await CallLogStore.open(first.jetstream()), await CallLogStore.open(second.jetstream())]
        for _ in range(8):
            call_log_id = f"race_{uuid.uuid4().hex[:12]}"
            logs = [
                CallLog(call_log_id=call_log_id, agent_id="a", agent_name=name, dialect=dialect)
                for name, dialect in (("A", "chat"), ("B", "twilio"), ("C", "retell"), ("D", "exotel"))
            ]
            created = await asyncio.gather(*(stores[i % 2].create(log) for i, log in enumerate(logs)))
            assert sorted(created) == [False, False, False, True], created
            stored = await stores[0].get(call_log_id)
            winner = logs[created.index(True)]
            assert stored is not None and (stored.agent_name, stored.dialect) == (winner.agent_name, winner.dialect)

            # The winner goes on writing its log; creating it again is still refused and changes nothing.
            winner.status = "completed"
            await stores[1].save(winner)
            assert await stores[0].create(logs[created.index(False)]) is False
            assert (await stores[1].get(call_log_id)).status == "completed"
    finally:
        await first.close()
        await second.close()


async def test_a_carrier_or_retell_id_naming_a_chat_conversation_gets_its_own_fresh_log(gateway, gateway_url):
    victim = f"conv_{uuid.uuid4().hex[:10]}"
    opened = await chat(gateway_url, victim, "My name is Zorblax.")
    assert opened[-1]["type"] == "stream_end", opened
    before = await settled_log(gateway_url, victim)
    assert before["dialect"] == "chat" and before["owner"] and len(before["turns"]) == 1

    for dialect in ("twilio", "exotel"):
        received = await carrier_call(gateway_url, dialect, victim)
        key = "streamSid" if dialect == "twilio" else "stream_sid"
        # The wire keeps the carrier's stream id...
        assert all(m[key] == victim for m in received if m.get("event") in ("media", "mark", "clear")), received
        # ...while the call's log is a fresh one of its own.
        assert await get_log(gateway_url, victim) == before, f"{dialect} changed the chat conversation's log"
        own = await settled_log(gateway_url, await fresh_log_id(gateway, dialect, victim))
        assert own["dialect"] == dialect and own["owner"] is None and own["callLogId"] != victim

    async with Retell(gateway_url, victim) as retell:
        begin = await retell.next()
        assert begin["response_type"] == "response" and begin["response_id"] == 0, "a new call, greeted"
        # (a session records its start before the begin message)
    assert await get_log(gateway_url, victim) == before, "retell changed the chat conversation's log"
    own = await settled_log(gateway_url, await fresh_log_id(gateway, "retell", victim))
    assert own["dialect"] == "retell" and own["owner"] is None and own["callLogId"] != victim

    # Nor does the unauthenticated browser socket continue it.
    async with websockets.connect(gateway_url.replace("http://", "ws://") + "/ws") as ws:
        await ws.send(json.dumps({"type": "init", "data": {"callLogId": victim}}))
        assert "unknown callLogId" in json.loads(await asyncio.wait_for(ws.recv(), 10))["data"]["error"]
    assert await get_log(gateway_url, victim) == before

    # The owner is not locked out: the conversation goes on with its history; another credential is refused.
    assert (await chat(gateway_url, victim, "Hi.", token=SECOND_API_KEY))[0]["code"] == "forbidden"
    continued = await chat(gateway_url, victim, "What is my name?")
    assert continued[-1]["type"] == "stream_end", continued
    after = await settled_log(gateway_url, victim)
    assert after["dialect"] == "chat" and after["owner"] == before["owner"]
    assert [t["user"] for t in after["turns"]] == ["My name is Zorblax.", "What is my name?"]


async def test_a_retell_reconnect_naming_another_agent_does_not_resume(gateway, gateway_url):
    async with api_client(gateway_url) as http:
        stored = await http.put("/api/agents/retell-other", json={"name": "Other", "greeting": "Other agent here."})
        assert stored.status_code == 200, stored.text
    call_id = f"call_{uuid.uuid4().hex[:10]}"
    async with Retell(gateway_url, call_id) as first:
        assert (await first.next())["response_id"] == 0
        assert (await first.respond(1, "What is two plus two?")).strip()
        open_log = await get_log(gateway_url, call_id)
        assert open_log["status"] == "active" and open_log["agentId"] == "default" and len(open_log["turns"]) == 1

        # Same call id while the call is open, another agent: not this call. A new, greeted call of its own.
        async with Retell(gateway_url, call_id, agent_id="retell-other") as other:
            begin = await other.next()
            assert begin["response_id"] == 0 and begin["content"] == "Other agent here."
        own = await settled_log(gateway_url, await fresh_log_id(gateway, "retell", call_id))
        assert own["agentId"] == "retell-other" and own["callLogId"] != call_id
        assert await get_log(gateway_url, call_id) == open_log

        # The same agent reconnecting does resume the call: no second greeting, its turns kept.
        async with Retell(gateway_url, call_id) as again:
            assert (await again.respond(2, "And three plus three?")).strip()
            assert again.greetings == 0, again.received
        resumed = await settled_log(gateway_url, call_id)
        assert resumed["agentId"] == "default" and [t["user"] for t in resumed["turns"]] == [
            "What is two plus two?",
            "And three plus three?",
        ]


async def test_a_pcm_session_id_that_names_an_existing_log_is_refused(gateway, gateway_url):
    async with api_client(gateway_url) as http:
        response = await http.post("/api/calls/trigger", json={"agent_id": "default"})
    session_id = response.json()["session_id"]
    # Someone who learnt the issued id starts a Twilio stream with it before the PCM socket connects: its log
    # is the first under that id (nothing to take over yet)...
    await carrier_call(gateway_url, "twilio", session_id)
    taken = await settled_log(gateway_url, session_id)
    assert taken["dialect"] == "twilio"
    # ...and the PCM call is refused rather than written over it, or moved to an id its backend does not know.
    async with websockets.connect(gateway_url.replace("http://", "ws://") + f"/ws/pcm/{session_id}") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 4404 and "already in use" in closed.value.rcvd.reason
    assert await get_log(gateway_url, session_id) == taken


async def test_two_credentials_racing_for_a_new_conversation_cannot_both_have_it(gateway_url):
    for _ in range(3):
        conversation = f"conv_{uuid.uuid4().hex[:10]}"
        outcomes = await asyncio.gather(
            chat(gateway_url, conversation, "Hello.", token=API_KEY),
            chat(gateway_url, conversation, "Hello.", token=SECOND_API_KEY),
        )
        kinds = sorted(events[0]["type"] if events[0]["type"] != "error" else events[0]["code"] for events in outcomes)
        assert kinds == ["forbidden", "stream_start"], outcomes
        log = await settled_log(gateway_url, conversation)
        winner = API_KEY if outcomes[0][0]["type"] == "stream_start" else SECOND_API_KEY
        assert log["dialect"] == "chat" and len(log["turns"]) == 1
        assert (await chat(gateway_url, conversation, "Again.", token=winner))[-1]["type"] == "stream_end"
