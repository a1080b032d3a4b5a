"""Channel pub/sub (seed 002) at /ws/channels: a session's live status (read-only, followed with a channel
token or an API key), free channels as the seed has them, bad input, and idle sockets.

The tests of a session's channel that need no answer run on gateways without workers: a chat turn there
fails over to the agent's fallback message at once, and the session publishes its statuses all the same.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest
import websockets

from tests.gateway.test_chat import ChatClient
from tests.support.gateway import API_KEY, TOKEN_SECRET, api_client
from voice_gateway.api.auth import Authenticator, ChannelTokens, sign_token

IDLE_TIMEOUT_S = 3


async def receive(ws, timeout: float = 60) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def quiet(ws, timeout: float = 0.5) -> list[dict]:
    """What arrives on ``ws`` within ``timeout`` (nothing, usually)."""
    received = []
    try:
        while True:
            received.append(await receive(ws, timeout))
    except TimeoutError:
        return received


def channels_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/ws/channels"


def subscription(action: str, channel: str, **proof: object) -> str:
    return json.dumps({"channel": "subscription", "payload": {"action": action, "channel": channel, **proof}})


def subscribed(channel: str) -> dict:
    return {"channel": "subscription", "payload": {"action": "subscribed", "channel": channel}}


async def chat_turn(base_url: str, conversation: str, content: str = "Say hello.") -> None:
    """One chat turn in ``conversation`` (opening the session on first use), to its ``stream_end``."""
    async with ChatClient(base_url) as client:
        await client.send(type="authorize", token=API_KEY)
        assert (await client.next())["type"] == "authorize_success"
        await client.send(type="chat_message", content=content, conversation_id=conversation)
        await client.until("stream_end")


async def statuses_of_a_turn(ws, channel: str) -> list[dict]:
    """The status payloads ``ws`` receives on ``channel`` up to the turn's final message."""
    payloads: list[dict] = []
    while not payloads or not payloads[-1]["final_message"]:
        message = await receive(ws, 30)
        assert message["channel"] == channel, message
        payloads.append(message["payload"])
    return payloads


async def channel_token(base_url: str, channel: str) -> str:
    async with api_client(base_url) as http:
        answer = await http.post("/api/channels/token", json={"channel": channel})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["channel"] == channel and body["expires_at"] > time.time() + 3600
    return body["token"]


@pytest.fixture(scope="module")
def secured(start_bare_gateway):
    """A gateway without workers, with API keys and the token secret (channel tokens signed with it)."""
    return start_bare_gateway(GATEWAY_API_KEYS=API_KEY, GATEWAY_TOKEN_SECRET=TOKEN_SECRET)


@pytest.fixture(scope="module")
def replica(start_bare_gateway, secured):
    """Another replica of ``secured`` on the same NATS and secret."""
    return start_bare_gateway(GATEWAY_API_KEYS=API_KEY, GATEWAY_TOKEN_SECRET=TOKEN_SECRET)


@pytest.fixture(scope="module")
def impatient(start_bare_gateway):
    """A gateway with a short idle timeout."""
    return start_bare_gateway(GATEWAY_API_KEYS=API_KEY, GATEWAY_IDLE_TIMEOUT_SECONDS=str(IDLE_TIMEOUT_S))


@pytest.fixture(scope="module")
def legacy(start_bare_gateway):
    """A gateway with GATEWAY_OPEN_CHANNELS=true."""
    return start_bare_gateway(GATEWAY_API_KEYS=API_KEY, GATEWAY_OPEN_CHANNELS="true")


# -- with the whole pipeline behind the gateway ------------------------------------------------------------


async def test_a_session_publishes_its_status_on_its_channel(gateway_url):
    conversation = f"conv_{uuid.uuid4().hex[:8]}"
    token = await channel_token(gateway_url, conversation)
    async with websockets.connect(channels_url(gateway_url)) as dashboard:
        await dashboard.send(subscription("subscribe", conversation, token=token))
        assert await receive(dashboard) == subscribed(conversation)
        await chat_turn(gateway_url, conversation)
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
    url = channels_url(gateway_url)
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
    url = channels_url(gateway_url)
    async with websockets.connect(url) as ws:
        for raw in (
            "{x",
            "[]",
            json.dumps({"channel": "a.b", "payload": {}}),
            json.dumps({"channel": "ok"}),
            json.dumps({"channel": "subscription", "payload": {"action": "dance", "channel": "c"}}),
            json.dumps({"channel": "subscription", "payload": {"action": "subscribe", "channel": "bad name"}}),
            subscription("subscribe", "c", token=5),
            subscription("subscribe", "c", token=""),
            subscription("subscribe", "c", token="bogus"),
            subscription("subscribe", "c", api_key="not-a-key"),
            b"\x00",
            "y" * 300_000,
        ):
            await ws.send(raw)
            message = await receive(ws)
            assert message["channel"] == "error" and message["payload"]["error"], raw[:20]
        await ws.send(json.dumps({"channel": "subscription", "payload": {"action": "subscribe", "channel": "fine"}}))
        assert (await receive(ws))["payload"]["action"] == "subscribed"


# -- a session's channel: read-only, and only with proof ---------------------------------------------------


async def test_a_subscriber_without_proof_gets_an_error_and_never_the_sessions_statuses(secured):
    conversation = f"conv_{uuid.uuid4().hex[:8]}"
    url = channels_url(secured.url)
    async with (
        websockets.connect(url) as early,
        websockets.connect(url) as operator,
    ):
        # Before the session exists its id is a free channel name: the seed's subscribe is acknowledged...
        await early.send(subscription("subscribe", conversation))
        assert await receive(early) == subscribed(conversation)
        await operator.send(subscription("subscribe", conversation, token=API_KEY))
        assert await receive(operator) == subscribed(conversation)
        await chat_turn(secured.url, conversation)
        payloads = await statuses_of_a_turn(operator, conversation)
        assert payloads[0]["status"] == "started" and payloads[-1]["status"] == "completed"
        assert {p["thread_id"] for p in payloads} == {conversation}

        # ...but once the session publishes, the subscriber without proof gets one error, never a status.
        warned = await quiet(early, 1.0)
        assert [m["channel"] for m in warned] == ["error"], warned
        assert conversation in warned[0]["payload"]["error"] and "token" in warned[0]["payload"]["error"]

        # A subscribe without proof to a known session is refused outright.
        async with websockets.connect(url) as late:
            await late.send(subscription("subscribe", conversation))
            refusal = await receive(late)
            assert refusal["channel"] == "error" and "need proof" in refusal["payload"]["error"], refusal
            await chat_turn(secured.url, conversation, "And again.")
            await statuses_of_a_turn(operator, conversation)
            assert await quiet(late) == [] and await quiet(early) == []


async def test_a_trigger_issued_token_follows_the_session_on_every_replica(secured, replica):
    async with api_client(secured.url) as http:
        trigger = await http.post("/api/calls/trigger", json={"agent_id": "default"})
    assert trigger.status_code == 200, trigger.text
    session_id, token = trigger.json()["session_id"], trigger.json()["channel_token"]
    assert token and token != API_KEY
    other_token = await channel_token(secured.url, f"other_{uuid.uuid4().hex[:8]}")
    chat_token = sign_token(TOKEN_SECRET, "end-user")
    async with (
        websockets.connect(channels_url(replica.url)) as dashboard,
        websockets.connect(channels_url(secured.url)) as operator,
        websockets.connect(channels_url(secured.url)) as intruder,
    ):
        await dashboard.send(subscription("subscribe", session_id, token=token))
        assert await receive(dashboard) == subscribed(session_id)
        await operator.send(subscription("subscribe", session_id, api_key=API_KEY))
        assert await receive(operator) == subscribed(session_id)
        for wrong in (other_token, chat_token, token[:-2] + ("AA" if token[-2:] != "AA" else "BB")):
            await intruder.send(subscription("subscribe", session_id, token=wrong))
            refusal = await receive(intruder)
            assert refusal["channel"] == "error" and "cannot subscribe" in refusal["payload"]["error"], refusal

        # The session's statuses reach both (the token was issued by one replica and checked by the other).
        await chat_turn(secured.url, session_id)
        for ws in (dashboard, operator):
            payloads = await statuses_of_a_turn(ws, session_id)
            assert payloads[0]["status"] == "started" and {p["thread_id"] for p in payloads} == {session_id}
        assert await quiet(intruder) == []

    # A channel token is not a chat credential.
    async with ChatClient(secured.url) as client:
        await client.send(type="authorize", token=token)
        assert (await client.next())["type"] != "authorize_success"


async def test_the_browser_init_success_carries_its_own_channel_token(secured):
    async with websockets.connect(secured.url.replace("http://", "ws://") + "/ws") as browser:
        await browser.send(json.dumps({"type": "init", "data": {"agentId": "default"}}))
        init = await receive(browser, 30)
        while init["type"] != "init_success":
            init = await receive(browser, 30)
        call_log_id, token = init["data"]["callLogId"], init["data"]["channelToken"]
        assert init["data"]["agentName"] and init["data"]["message"]
        async with websockets.connect(channels_url(secured.url)) as dashboard:
            await dashboard.send(subscription("subscribe", f"other_{uuid.uuid4().hex[:8]}", token=token))
            assert (await receive(dashboard))["channel"] == "error"
            await dashboard.send(subscription("subscribe", call_log_id, token=token))
            assert await receive(dashboard) == subscribed(call_log_id)
            await browser.send(json.dumps({"type": "text", "data": {"text": "Hello?"}}))
            payloads = await statuses_of_a_turn(dashboard, call_log_id)
            # (Without workers the greeting's speech fails too: its error status may come first.)
            assert "started" in [p["status"] for p in payloads] and {p["thread_id"] for p in payloads} == {call_log_id}


async def test_a_client_publish_to_a_sessions_channel_is_refused_and_never_reaches_its_subscribers(secured):
    conversation = f"conv_{uuid.uuid4().hex[:8]}"
    url = channels_url(secured.url)
    spoof = {"message": "Transfer the money now", "status": "completed", "type": "response", "final_message": True}
    async with (
        websockets.connect(url) as operator,
        websockets.connect(url) as publisher,
    ):
        await operator.send(subscription("subscribe", conversation, token=API_KEY))
        assert await receive(operator) == subscribed(conversation)
        # Before the session exists the name is free: the publish is taken, but on the free channel only.
        await publisher.send(json.dumps({"channel": conversation, "payload": spoof}))
        assert await quiet(operator) == []

        await chat_turn(secured.url, conversation)
        payloads = await statuses_of_a_turn(operator, conversation)
        assert spoof not in payloads

        # Once the session is known, a publish is refused with an error saying the channel is read-only.
        await publisher.send(json.dumps({"channel": conversation, "payload": spoof}))
        refusal = await receive(publisher)
        assert refusal["channel"] == "error" and "read-only" in refusal["payload"]["error"], refusal
        assert await quiet(operator) == []
        # The publisher's connection goes on, and free channels still work for it.
        room = f"room_{uuid.uuid4().hex[:8]}"
        await publisher.send(subscription("subscribe", room))
        assert await receive(publisher) == subscribed(room)
        await publisher.send(json.dumps({"channel": room, "payload": {"n": 1}}))
        assert await receive(publisher) == {"channel": room, "payload": {"n": 1}}


async def test_open_channels_let_anyone_follow_statuses_but_not_publish_into_them(legacy):
    conversation = f"conv_{uuid.uuid4().hex[:8]}"
    url = channels_url(legacy.url)
    async with websockets.connect(url) as dashboard, websockets.connect(url) as publisher:
        await dashboard.send(subscription("subscribe", conversation))
        assert await receive(dashboard) == subscribed(conversation)
        await chat_turn(legacy.url, conversation)
        payloads = await statuses_of_a_turn(dashboard, conversation)
        assert payloads[0]["status"] == "started"
        await publisher.send(json.dumps({"channel": conversation, "payload": {"message": "spoof"}}))
        assert "read-only" in (await receive(publisher))["payload"]["error"]
        assert await quiet(dashboard) == []


# -- idle sockets ------------------------------------------------------------------------------------------


async def test_an_idle_channels_socket_is_closed_and_a_receiving_subscriber_stays(impatient):
    url = channels_url(impatient.url)
    room = f"room_{uuid.uuid4().hex[:8]}"
    conversation = f"conv_{uuid.uuid4().hex[:8]}"
    talk_for_s = 2 * IDLE_TIMEOUT_S + 1
    async with (
        websockets.connect(url) as idle,
        websockets.connect(url) as listener,
        websockets.connect(url) as follower,
    ):
        # Subscribed, but nothing arrives and nothing is sent: closed after the idle timeout, as any socket.
        await idle.send(subscription("subscribe", f"quiet_{uuid.uuid4().hex[:8]}"))
        await receive(idle)
        await listener.send(subscription("subscribe", room))
        assert await receive(listener) == subscribed(room)
        await follower.send(subscription("subscribe", conversation, token=API_KEY))
        assert await receive(follower) == subscribed(conversation)
        started = time.monotonic()

        async def publish() -> int:
            """A message on the room every 0.3 s; returns how many."""
            async with websockets.connect(url) as publisher:
                n = 0
                while time.monotonic() - started < talk_for_s:
                    await publisher.send(json.dumps({"channel": room, "payload": {"n": n}}))
                    n += 1
                    await asyncio.sleep(0.3)
                return n

        async def talk() -> int:
            """A chat turn in the conversation, one after the other (statuses every ~0.5 s); returns how many."""
            async with ChatClient(impatient.url) as client:
                await client.send(type="authorize", token=API_KEY)
                assert (await client.next())["type"] == "authorize_success"
                turns = 0
                while time.monotonic() - started < talk_for_s:
                    await client.send(type="chat_message", content=f"Message {turns}.", conversation_id=conversation)
                    await client.until("stream_end")
                    turns += 1
                    await asyncio.sleep(0.5)
                return turns

        publishing, talking = asyncio.create_task(publish()), asyncio.create_task(talk())
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                message = await receive(idle, 10)
                assert message["channel"] == "error" and "idle" in message["payload"]["error"], message
        assert closed.value.rcvd.code == 1008 and "idle" in closed.value.rcvd.reason
        assert IDLE_TIMEOUT_S - 0.5 < time.monotonic() - started < IDLE_TIMEOUT_S + 3
        published, turns = await publishing, await talking

        # The listener and the follower only listened all along, and kept receiving: they are still open.
        numbers = [(await receive(listener, 5))["payload"]["n"] for _ in range(published)]
        assert numbers == list(range(published))
        statuses = []
        while len([s for s in statuses if s["final_message"]]) < turns:
            statuses.append((await receive(follower, 5))["payload"])
        await listener.send(json.dumps({"channel": room, "payload": {"still": "here"}}))
        assert (await receive(listener, 5))["payload"] == {"still": "here"}
        # A repeated subscribe keeps a socket busy; on a channel proven on this connection it needs no proof.
        await follower.send(subscription("subscribe", conversation))
        assert await receive(follower, 5) == subscribed(conversation)


# -- channel tokens ----------------------------------------------------------------------------------------


def test_channel_tokens_are_bound_to_their_channel_and_expire():
    tokens = ChannelTokens.from_settings("secret", ())
    token, expires = tokens.issue("conv_1")
    assert expires > time.time() + 23 * 3600
    assert tokens.check(token, "conv_1") == (True, "")
    assert tokens.check(token, "conv_2") == (False, "the channel token is for another channel")
    expired, _ = tokens.issue("conv_1", ttl_s=-1)
    assert tokens.check(expired, "conv_1") == (False, "channel token expired")
    claims, signature = token.split(".")
    assert not tokens.check(f"{claims}.{signature[::-1]}", "conv_1")[0]
    for junk in (None, 7, "", "no-dot", "a.b.c", "é.x"):
        assert not tokens.check(junk, "conv_1")[0]
    # Replicas sharing the secret accept each other's tokens; another secret does not.
    assert ChannelTokens.from_settings("secret", ("k",)).check(token, "conv_1")[0]
    assert not ChannelTokens.from_settings("other", ()).check(token, "conv_1")[0]


def test_channel_tokens_without_a_secret_come_from_the_api_keys_or_this_process():
    from_keys = ChannelTokens.from_settings(None, ("b", "a"))
    token, _ = from_keys.issue("c")
    assert from_keys.shared and ChannelTokens.from_settings(None, ("a", "b")).check(token, "c")[0]
    assert not ChannelTokens.from_settings(None, ("a",)).check(token, "c")[0]
    alone = ChannelTokens.from_settings(None, ())
    assert not alone.shared and alone.check(alone.issue("c")[0], "c")[0]
    assert "only on the replica" in ChannelTokens.from_settings(None, ()).check(alone.issue("c")[0], "c")[1]


def test_channel_tokens_and_chat_tokens_are_not_interchangeable():
    secret = "shared-secret"
    channel_token, _ = ChannelTokens.from_settings(secret, ()).issue("conv_1")
    authenticator = Authenticator(("key",), secret)
    assert authenticator.check(channel_token) == (False, "invalid token")
    assert not ChannelTokens.from_settings(secret, ()).check(sign_token(secret, "conv_1"), "conv_1")[0]


async def test_the_channel_token_endpoint_needs_an_api_key_and_a_channel_name(secured):
    async with httpx.AsyncClient(base_url=secured.url) as anonymous:
        assert (await anonymous.post("/api/channels/token", json={"channel": "c"})).status_code == 401
    async with api_client(secured.url) as http:
        for body in ({}, {"channel": 5}, {"channel": "a.b"}, {"channel": "subscription"}, {"channel": "x" * 129}):
            assert (await http.post("/api/channels/token", json=body)).status_code == 422, body
