"""The channels client (``voice_channels.WebSocketService``) against real gateways on one NATS.

Fan-out across two gateway processes, reconnecting and resubscribing across a gateway restart on
the same port with no message lost once resubscribed, unsubscribe, and a dead port (all on free
channels, as seed 002 uses them); a session's channel followed with a channel token, sent again when
the client resubscribes after the gateway closed it for idling, and refused without one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from tests.gateway.test_channels import channel_token, chat_turn
from tests.support.gateway import API_KEY, TOKEN_SECRET
from tests.support.workers import _Tee
from voice_channels import (
    ChannelConnectionError,
    ChannelError,
    ChannelMessage,
    ChannelSubscriptionError,
    WebSocketService,
)
from voicectl.local import GatewayProcess, free_port

RECEIVE_TIMEOUT_S = 10.0
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def channels_url(http_url: str) -> str:
    """The ``/ws/channels`` URL of a gateway's base HTTP URL."""
    return http_url.replace("http://", "ws://", 1) + "/ws/channels"


def fresh_channel(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def channels_client(url: str, **options) -> AsyncIterator[WebSocketService]:
    """A connected client with test-sized delays; closed on exit."""
    service = WebSocketService(url, **{"retry_delay": 0.1, "max_retry_delay": 0.5, "ack_timeout": 5.0, **options})
    await service.connect()
    try:
        yield service
    finally:
        await service.close()


async def until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> None:
    """Waits for ``condition`` to hold, failing the test after ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, f"condition not met within {timeout_s}s"
        await asyncio.sleep(step_s)


@pytest.fixture
def start_gateway(nats_url) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory: starts an extra gateway process on the session's NATS; all are stopped after the test."""
    started: list[GatewayProcess] = []

    def start(port: int = 0) -> GatewayProcess:
        process = GatewayProcess(nats_url, {"OTEL_TRACES_EXPORTER": "none"}, sink=_Tee(io.StringIO()), port=port)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


class SilentServer:
    """Completes WebSocket handshakes, then never answers: no pongs, no acknowledgements."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/ws/channels"

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            key = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", request).group(1)
            accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.connections += 1
            while await reader.read(65536):
                pass
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def status_payload(message: str, **extra) -> dict:
    """A session status payload as the seed describes it."""
    return {
        "message": message,
        "timestamp": time.time(),
        "status": "in_progress",
        "type": "response",
        "final_message": False,
        "message_id": uuid.uuid4().hex,
        "thread_id": "thread_test",
        **extra,
    }


async def test_publishing_fans_out_to_subscribers_on_two_gateways(gateway_url, start_gateway):
    second = await asyncio.to_thread(start_gateway)
    channel = fresh_channel("fanout")
    async with (
        channels_client(channels_url(gateway_url)) as a,
        channels_client(channels_url(second.url)) as b,
    ):
        stream_a, stream_b = a.messages(), b.messages()
        await a.subscribe(channel)
        await b.subscribe(channel)
        assert a.subscribed_channels == b.subscribed_channels == {channel}

        payload = status_payload("from A")
        await a.send_message(channel, payload)
        for stream in (stream_a, stream_b):
            assert await stream.get(RECEIVE_TIMEOUT_S) == ChannelMessage(channel, payload)

        reply = status_payload("from B", status="completed", final_message=True)
        await b.send_message(channel, reply)
        for stream in (stream_a, stream_b):
            assert await stream.get(RECEIVE_TIMEOUT_S) == ChannelMessage(channel, reply)


async def test_on_message_callback_gets_what_the_stream_gets(gateway_url):
    channel = fresh_channel("callback")
    seen: list[ChannelMessage] = []
    arrived = asyncio.Event()

    async def on_message(message: ChannelMessage) -> None:
        seen.append(message)
        arrived.set()

    async with channels_client(channels_url(gateway_url), on_message=on_message) as service:
        stream = service.messages()
        await service.subscribe(channel)
        await service.send_message(channel, {"n": 1})
        received = await stream.get(RECEIVE_TIMEOUT_S)
        await asyncio.wait_for(arrived.wait(), RECEIVE_TIMEOUT_S)
    assert seen == [received] == [ChannelMessage(channel, {"n": 1})]


async def test_reconnects_and_resubscribes_after_a_gateway_restart_without_losing_messages(gateway_url, start_gateway):
    first = await asyncio.to_thread(start_gateway)
    channels = [fresh_channel("restart_a"), fresh_channel("restart_b")]
    sequence = itertools.count()
    published: list[tuple[int, str]] = []  # appended before sending: everything past an index was sent after it

    async def publish_continuously(publisher: WebSocketService, stop: asyncio.Event) -> None:
        while not stop.is_set():
            n = next(sequence)
            channel = channels[n % len(channels)]
            published.append((n, channel))
            await publisher.send_message(channel, {"n": n})
            await asyncio.sleep(0.02)

    async with (
        channels_client(channels_url(first.url), ping_interval=1.0) as subscriber,
        channels_client(channels_url(gateway_url)) as publisher,
    ):
        stream = subscriber.messages(maxsize=100_000)
        for channel in channels:
            await subscriber.subscribe(channel)
        await publisher.send_message(channels[0], {"n": "before"})
        assert await stream.get(RECEIVE_TIMEOUT_S) == ChannelMessage(channels[0], {"n": "before"})

        stop = asyncio.Event()
        publishing = asyncio.create_task(publish_continuously(publisher, stop))
        await asyncio.to_thread(first.stop)
        await until(lambda: not subscriber.connected, timeout_s=10)
        await asyncio.to_thread(start_gateway, first.port)
        await subscriber.wait_ready(timeout=20)
        resubscribed_at = len(published)
        await until(lambda: len(published) >= resubscribed_at + 50, timeout_s=10)
        stop.set()
        await asyncio.wait_for(publishing, 5)

        assert subscriber.reconnects == 1
        assert subscriber.subscribed_channels == set(channels)
        last = published[-1][0]
        received: list[ChannelMessage] = []
        while not received or received[-1].payload["n"] != last:
            received.append(await stream.get(RECEIVE_TIMEOUT_S))

    numbers = [message.payload["n"] for message in received]
    assert numbers == sorted(set(numbers)), "duplicated or out of order"
    must_have = published[resubscribed_at:]
    got = {(message.payload["n"], message.channel) for message in received}
    missing = [item for item in must_have if item not in got]
    assert not missing, f"lost {len(missing)} of {len(must_have)} published after resubscription: {missing[:5]}"


async def test_unsubscribe_stops_delivery(gateway_url):
    channel = fresh_channel("unsub")
    async with (
        channels_client(channels_url(gateway_url)) as a,
        channels_client(channels_url(gateway_url)) as b,
    ):
        stream_a, stream_b = a.messages(), b.messages()
        await a.subscribe(channel)
        await b.subscribe(channel)
        await a.send_message(channel, {"n": 1})
        for stream in (stream_a, stream_b):
            assert (await stream.get(RECEIVE_TIMEOUT_S)).payload == {"n": 1}

        await b.unsubscribe(channel)
        assert channel not in b.subscribed_channels
        await a.send_message(channel, {"n": 2})
        assert (await stream_a.get(RECEIVE_TIMEOUT_S)).payload == {"n": 2}
        with pytest.raises(TimeoutError):
            await stream_b.get(timeout=0.5)


async def test_close_ends_the_message_stream_and_later_calls_fail(gateway_url):
    service = WebSocketService(channels_url(gateway_url))
    await service.connect()
    stream = service.messages()
    await service.subscribe(fresh_channel("close"))
    await service.close()
    assert [message async for message in stream] == []
    assert not service.connected
    with pytest.raises(ChannelError, match="closed"):
        await service.send_message("anything", {"n": 1})


async def test_invalid_channel_names_are_refused_before_sending(gateway_url):
    async with channels_client(channels_url(gateway_url)) as service:
        for bad in ("", "has space", "x" * 129, "subscription", "error"):
            with pytest.raises(ValueError):
                await service.subscribe(bad)
        with pytest.raises(TypeError):
            await service.send_message("ok", ["not", "an", "object"])  # type: ignore[arg-type]


async def test_connecting_to_a_dead_port_fails_after_max_retries(caplog):
    url = f"ws://127.0.0.1:{free_port()}/ws/channels"
    service = WebSocketService(url, max_retries=3, retry_delay=0.05)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="voice_channels.client"):
        with pytest.raises(ChannelConnectionError, match=r"could not connect to .* after 3 attempt\(s\)") as failure:
            await service.connect()
    assert time.monotonic() - started < 5
    assert isinstance(failure.value.__cause__, OSError)
    assert sum("connect to" in record.getMessage() for record in caplog.records) == 3
    assert not service.connected
    with pytest.raises(ChannelError, match="connect"):
        await service.send_message("anything", {"n": 1})


async def test_a_missing_pong_triggers_a_reconnect():
    async with SilentServer() as server:
        service = WebSocketService(
            server.url, ping_interval=0.2, ping_timeout=0.2, close_timeout=0.2, retry_delay=0.05, max_retry_delay=0.1
        )
        await service.connect()
        try:
            await until(lambda: server.connections >= 3, timeout_s=10)
            assert service.reconnects >= 2
        finally:
            await service.close()


async def test_an_unacknowledged_subscribe_fails_after_max_retries():
    async with SilentServer() as server:
        service = WebSocketService(server.url, max_retries=2, retry_delay=0.05, ping_interval=None, close_timeout=0.2)
        await service.connect()
        try:
            with pytest.raises(ChannelSubscriptionError, match=r"subscribe 'room' not acknowledged after 2"):
                await service.subscribe("room", timeout=0.2)
            assert "room" not in service.subscribed_channels
        finally:
            await service.close()


# -- a session's channel -----------------------------------------------------------------------------------

IDLE_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def keyed_gateway(start_bare_gateway):
    """A gateway without workers (a chat turn gets the fallback message at once, with its statuses), with
    API keys, the token secret and a short idle timeout."""
    return start_bare_gateway(
        GATEWAY_API_KEYS=API_KEY, GATEWAY_TOKEN_SECRET=TOKEN_SECRET, GATEWAY_IDLE_TIMEOUT_SECONDS=str(IDLE_TIMEOUT_S)
    )


async def test_a_token_follows_a_session_and_is_sent_again_after_an_idle_close(keyed_gateway):
    conversation = fresh_channel("conv")
    token = await channel_token(keyed_gateway.url, conversation)
    async with channels_client(channels_url(keyed_gateway.url)) as service:
        stream = service.messages()
        await service.subscribe(conversation, token=token)
        # Nothing to receive and nothing sent: the gateway closes the socket; the client reconnects and
        # resubscribes with the token.
        await until(lambda: service.reconnects >= 1, timeout_s=IDLE_TIMEOUT_S + 10)
        await service.wait_ready(timeout=10)
        assert service.subscribed_channels == {conversation}
        await chat_turn(keyed_gateway.url, conversation)
        statuses: list[ChannelMessage] = []
        while not statuses or not statuses[-1].payload.get("final_message"):
            message = await stream.get(RECEIVE_TIMEOUT_S)
            if message.is_error:
                assert "idle" in message.payload["error"], message
                continue
            statuses.append(message)
    assert {message.channel for message in statuses} == {conversation}
    assert statuses[0].payload["status"] == "started" and statuses[-1].payload["status"] == "completed"


async def test_subscribing_to_a_sessions_channel_without_a_token_fails(keyed_gateway):
    conversation = fresh_channel("conv")
    await chat_turn(keyed_gateway.url, conversation)
    async with channels_client(channels_url(keyed_gateway.url), max_retries=1, ack_timeout=5.0) as service:
        with pytest.raises(ChannelSubscriptionError, match="need proof"):
            await service.subscribe(conversation)
        assert conversation not in service.subscribed_channels
        with pytest.raises(ChannelSubscriptionError, match="another channel"):
            await service.subscribe(conversation, token=await channel_token(keyed_gateway.url, "elsewhere"))
        await service.subscribe(conversation, token=API_KEY)
        assert service.subscribed_channels == {conversation}
