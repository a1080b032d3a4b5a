"""Conformance of the authorized chat stream (seed 004) at /v1/chat/stream, against the real stack."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import pytest
import websockets

from tests.gateway.test_calls import bus_is_idle
from tests.support.gateway import TOKEN_SECRET, api_client
from voice_gateway.api.auth import sign_token


class ChatClient:
    """The seed's JavaScript client in Python: answers pings unless told not to."""

    def __init__(self, url: str, *, answer_pings: bool = True) -> None:
        self.url = url.replace("http://", "ws://") + "/v1/chat/stream"
        self.answer_pings = answer_pings
        self.pings = 0

    async def __aenter__(self) -> ChatClient:
        self.ws = await websockets.connect(self.url)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    async def send(self, **message) -> None:
        await self.ws.send(json.dumps(message))

    async def next(self, timeout: float = 60) -> dict:
        """The next non-ping message within ``timeout`` (pings in between are answered, never cut short)."""
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - time.monotonic())))
            if message.get("type") == "ping":
                self.pings += 1
                if self.answer_pings:
                    await self.send(type="pong")
                continue
            return message

    async def until(self, type_: str, timeout: float = 90) -> list[dict]:
        events = []
        deadline = time.monotonic() + timeout
        while True:
            events.append(await self.next(max(0.01, deadline - time.monotonic())))
            if events[-1]["type"] == type_:
                return events


async def test_authorize_then_stream_sentences(gateway_url):
    conversation = f"conv_{uuid.uuid4().hex[:8]}"
    async with ChatClient(gateway_url) as client:
        await client.send(type="authorize", token="test-key")
        ok = await client.next()
        assert ok["type"] == "authorize_success" and isinstance(ok["connection_id"], str) and ok["connection_id"]
        await client.send(
            type="chat_message",
            content="Tell me two short facts about cats.",
            user_id="user_001",
            agent_id="default",
            conversation_id=conversation,
        )
        events = await client.until("stream_end")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "stream_start" and kinds[-1] == "stream_end"
    chunks = [e for e in events if e["type"] == "tts_ready_chunk"]
    assert chunks and all(isinstance(c["chunk"], str) and c["chunk"].strip() for c in chunks)
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    end = events[-1]
    assert end["interrupted"] is False and end["conversation_id"] == conversation
    assert " ".join(c["chunk"] for c in chunks).split() == end["content"].split()
    assert len({e["message_id"] for e in events}) == 1


async def test_conversations_persist_across_connections(gateway_url):
    # Two tokens of the same user: a conversation can be continued by the credential (subject) that opened it.
    conversation = f"conv_{uuid.uuid4().hex[:8]}"
    async with ChatClient(gateway_url) as client:
        await client.send(type="authorize", token=sign_token(TOKEN_SECRET, "user_001", ttl_s=600))
        await client.next()
        await client.send(type="chat_message", content="My name is Zorblax.", conversation_id=conversation)
        await client.until("stream_end")
    async with ChatClient(gateway_url) as client:
        await client.send(type="authorize", token=sign_token(TOKEN_SECRET, "user_001"))
        assert (await client.next())["type"] == "authorize_success"
        await client.send(type="chat_message", content="What is my name?", conversation_id=conversation)
        await client.until("stream_end")

    async with api_client(gateway_url) as http:
        log = (await http.get(f"/api/calls/{conversation}")).json()
    assert [t["user"] for t in log["turns"]] == ["My name is Zorblax.", "What is my name?"]


@pytest.mark.parametrize(
    "token",
    [None, "", "wrong-key", sign_token("another-secret", "u"), sign_token(TOKEN_SECRET, "u", ttl_s=-10), "a.b"],
    ids=["missing", "empty", "wrong key", "wrong signature", "expired", "malformed"],
)
async def test_bad_and_missing_tokens_are_refused_with_4401(gateway_url, token):
    async with ChatClient(gateway_url) as client:
        await client.send(type="authorize", **({"token": token} if token is not None else {}))
        refusal = await client.next()
        assert refusal["type"] == "error" and refusal["code"] == "unauthorized"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await client.next(10)
    assert closed.value.rcvd.code == 4401


async def test_messages_before_authorize_are_refused(gateway_url):
    async with ChatClient(gateway_url) as client:
        await client.send(type="chat_message", content="hi")
        assert (await client.next())["code"] == "unauthorized"


async def test_missing_pongs_close_the_connection_with_4408(gateway_url):
    async with ChatClient(gateway_url, answer_pings=False) as client:
        await client.send(type="authorize", token="second-key")
        await client.next()
        started = time.monotonic()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await client.next(15)
    assert closed.value.rcvd.code == 4408 and client.pings >= 1
    assert time.monotonic() - started < 10


async def test_answering_pongs_keeps_the_connection(gateway_url):
    async with ChatClient(gateway_url) as client:
        await client.send(type="authorize", token="test-key")
        await client.next()
        with pytest.raises(TimeoutError):
            await client.next(4.0)
        assert client.pings >= 2
        await client.send(type="chat_message", content="Say hi.")
        assert (await client.until("stream_end"))[-1]["interrupted"] is False


async def test_interrupt_stream_ends_the_answer(gateway_url, nats_url):
    async with ChatClient(gateway_url) as client:
        await client.send(type="authorize", token="test-key")
        await client.next()
        await client.send(type="chat_message", content="Write a very long story about the ocean and its creatures.")
        assert (await client.next())["type"] == "stream_start"
        await client.send(type="interrupt_stream")
        events = await client.until("stream_end")
    assert events[-1]["interrupted"] is True
    assert await bus_is_idle(nats_url)


async def test_audio_can_be_attached_to_each_chunk(gateway_url):
    async with ChatClient(gateway_url) as client:
        await client.send(type="authorize", token="test-key")
        await client.next()
        await client.send(type="chat_message", content="Say hello to me.", audio=True)
        events = await client.until("stream_end")
    chunks = [e for e in events if e["type"] == "tts_ready_chunk"]
    assert chunks and all(base64.b64decode(c["audio"])[:4] == b"RIFF" for c in chunks)


async def test_bad_input_gets_errors_and_the_connection_survives(gateway_url):
    async with ChatClient(gateway_url) as client:
        await client.send(type="authorize", token="test-key")
        await client.next()
        for raw in (
            "{oops",
            "[1]",
            json.dumps({"type": "dance"}),
            json.dumps({"type": "chat_message", "content": 5}),
            json.dumps({"type": "chat_message", "content": "hi", "conversation_id": "bad id!"}),
            json.dumps({"type": "chat_message", "content": "hi", "agent_id": "nobody"}),
            json.dumps({"type": "interrupt_stream"}),
            "x" * 300_000,
            b"\x00",
        ):
            await client.ws.send(raw)
            assert (await client.next())["type"] == "error", raw[:30]
        await client.send(type="chat_message", content="Say hi.")
        assert (await client.until("stream_end"))[-1]["interrupted"] is False
