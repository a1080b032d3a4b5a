"""The gateway's limits (voice_gateway.api.limits): sessions per gateway and per key, frame size, message rate,
handshake and idle timeouts, each answered in the dialect's own terms; and their settings."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time

import httpx
import pytest
import websockets

from tests.support.gateway import FakeClock, FakeSocket, api_client
from voice_gateway.api.limits import (
    LimitExceeded,
    Limits,
    LimitSettings,
    MessageTooLarge,
    TokenBucket,
    close_reason,
    frame_size,
)
from voice_gateway.config import Settings
from voice_gateway.dialects.chat import MAX_OPEN_CONVERSATIONS
from voice_runtime.config import ConfigError

KEY, OTHER_KEY = "limits-key-1", "limits-key-2"
MAX_SESSIONS = 3
MAX_FRAME = 4096
RATE, BURST = 50, 20


# -- units -------------------------------------------------------------------------------------------------


def test_token_bucket_allows_the_rate_and_the_burst_and_no_more():
    clock = FakeClock()
    bucket = TokenBucket(rate=50, burst=10, clock=clock)
    assert all(bucket.take() for _ in range(10))
    assert not bucket.take()
    clock.now += 0.1
    assert sum(bucket.take() for _ in range(20)) == 5
    # Real-time carrier media, one frame every 20 ms for a minute, never runs out.
    bucket = TokenBucket(rate=LimitSettings().max_messages_per_second, burst=LimitSettings().message_burst, clock=clock)
    for _ in range(3000):
        clock.now += 0.02
        assert bucket.take()


def test_sessions_are_counted_per_gateway_and_per_key_and_given_back():
    limits = Limits(LimitSettings(max_sessions=2, max_sessions_per_key=1))
    first = limits.admit(FakeSocket(), "chat")
    second = limits.admit(FakeSocket(), "chat")
    with pytest.raises(LimitExceeded) as full:
        limits.admit(FakeSocket(), "twilio")
    assert (full.value.limit, full.value.close_code) == ("sessions", 1013)
    first.bind_key("key:a")
    with pytest.raises(LimitExceeded) as per_key:
        second.bind_key("key:a")
    assert (per_key.value.limit, per_key.value.close_code) == ("sessions_per_key", 1013)
    second.bind_key("key:b")
    assert (limits.active, limits.active_for("key:a"), limits.active_for("key:b")) == (2, 1, 1)
    first.release()
    first.release()
    assert (limits.active, limits.active_for("key:a")) == (1, 0)
    limits.admit(FakeSocket(), "twilio").bind_key("key:a")


async def test_the_guard_checks_size_and_rate_and_times_out_the_handshake():
    clock = FakeClock()
    limits = Limits(LimitSettings(max_frame_bytes=1024, max_messages_per_second=50, message_burst=2), clock=clock)
    frames = [{"type": "websocket.receive", "text": "x" * 2000}, {"type": "websocket.receive", "bytes": b"ok"}]
    guard = limits.admit(FakeSocket(*frames), "browser")
    with pytest.raises(MessageTooLarge) as big:
        await guard.receive()
    assert big.value.close_code == 1009 and "exceeds the limit of 1024" in big.value.reason
    assert (await guard.receive())["bytes"] == b"ok"
    guard._ws.frames.append({"type": "websocket.receive", "text": "{}"})
    with pytest.raises(LimitExceeded) as fast:
        await guard.receive()
    assert (fast.value.limit, fast.value.close_code) == ("message_rate", 1008)

    slow = Limits(LimitSettings(handshake_timeout_s=0.05, idle_timeout_s=0.1)).admit(FakeSocket(), "twilio")
    with pytest.raises(LimitExceeded) as handshake:
        await slow.receive()
    assert (handshake.value.limit, handshake.value.close_code) == ("handshake", 1008)
    slow.handshake_done()
    with pytest.raises(LimitExceeded) as idle:
        await slow.receive()
    assert idle.value.limit == "idle"

    async def deliver(times: int) -> None:
        for _ in range(times):
            await asyncio.sleep(0.05)
            slow.activity()

    # What a dialect delivers counts as activity where it reports it (channels): the timeout starts again.
    delivering = asyncio.create_task(deliver(6))
    started = time.monotonic()
    with pytest.raises(LimitExceeded) as idle_after_deliveries:
        await slow.receive()
    assert idle_after_deliveries.value.limit == "idle" and time.monotonic() - started >= 0.35
    await delivering


async def test_a_connection_waiting_on_its_answer_is_never_idle():
    guard = Limits(LimitSettings(idle_timeout_s=0.1)).admit(FakeSocket(), "chat", handshake=False)
    # The answer begins before the receive (a turn submitted) and while it waits (a turn started meanwhile).
    guard.answering(True)
    receiving = asyncio.create_task(guard.receive())
    await asyncio.sleep(0.5)
    assert not receiving.done()
    guard.answering(False)
    with pytest.raises(LimitExceeded) as idle:
        await receiving
    assert idle.value.limit == "idle"
    receiving = asyncio.create_task(guard.receive())
    await asyncio.sleep(0.05)
    guard.answering(True)
    guard.activity()
    await asyncio.sleep(0.5)
    assert not receiving.done()
    receiving.cancel()


def test_frame_size_counts_utf8_bytes_where_it_matters_and_close_reasons_fit_a_frame():
    assert frame_size({"text": "é" * 300}, 1024) == 600
    assert frame_size({"text": "a" * 5000}, 1024) == 5000
    assert frame_size({"bytes": b"\x00" * 7}, 1024) == 7
    for reason in ("short", "x" * 500, "é" * 200, "😀" * 100):
        cut = close_reason(reason)
        assert len(cut.encode()) <= 123 and reason.startswith(cut.removesuffix("..."))


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GATEWAY_MAX_SESSIONS", "0", "at least 1"),
        ("GATEWAY_MAX_SESSIONS", "many", "integer"),
        ("GATEWAY_MAX_SESSIONS_PER_KEY", "-3", "at least 1"),
        ("GATEWAY_MAX_FRAME_BYTES", "100", "at least 1024"),
        ("GATEWAY_MAX_MESSAGES_PER_SECOND", "10", "at least 50"),
        ("GATEWAY_MAX_MESSAGES_PER_SECOND", "nan", "finite"),
        ("GATEWAY_MESSAGE_BURST", "0", "at least 1"),
        ("GATEWAY_HANDSHAKE_TIMEOUT_SECONDS", "inf", "finite"),
        ("GATEWAY_IDLE_TIMEOUT_SECONDS", "0.5", "at least 1"),
    ],
)
def test_bad_limit_settings_fail_fast_naming_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=re.escape(variable)) as error:
        Settings.from_env()
    assert message in str(error.value)


def test_limit_settings_are_read_from_the_environment(monkeypatch):
    assert Settings.from_env().limits == LimitSettings()
    for variable, value in {
        "GATEWAY_MAX_SESSIONS": "7",
        "GATEWAY_MAX_SESSIONS_PER_KEY": "2",
        "GATEWAY_MAX_FRAME_BYTES": "2048",
        "GATEWAY_MAX_MESSAGES_PER_SECOND": "75.5",
        "GATEWAY_MESSAGE_BURST": "30",
        "GATEWAY_HANDSHAKE_TIMEOUT_SECONDS": "2.5",
        "GATEWAY_IDLE_TIMEOUT_SECONDS": "60",
    }.items():
        monkeypatch.setenv(variable, value)
    assert Settings.from_env().limits == LimitSettings(7, 2, 2048, 75.5, 30, 2.5, 60.0)


# -- against a real gateway (no workers: no turn has to finish) ---------------------------------------------


@pytest.fixture(scope="module")
def limited(start_bare_gateway):
    """A gateway with small limits and patient timeouts."""
    return start_bare_gateway(
        GATEWAY_API_KEYS=f"{KEY},{OTHER_KEY}",
        GATEWAY_MAX_SESSIONS=str(MAX_SESSIONS),
        GATEWAY_MAX_SESSIONS_PER_KEY="1",
        GATEWAY_MAX_FRAME_BYTES=str(MAX_FRAME),
        GATEWAY_MAX_MESSAGE_BYTES=str(MAX_FRAME),
        GATEWAY_MAX_MESSAGES_PER_SECOND=str(RATE),
        GATEWAY_MESSAGE_BURST=str(BURST),
        GATEWAY_HANDSHAKE_TIMEOUT_SECONDS="30",
        GATEWAY_IDLE_TIMEOUT_SECONDS="30",
    )


@pytest.fixture(scope="module")
def impatient(start_bare_gateway):
    """A gateway with short handshake and idle timeouts."""
    return start_bare_gateway(
        GATEWAY_API_KEYS=KEY, GATEWAY_HANDSHAKE_TIMEOUT_SECONDS="1", GATEWAY_IDLE_TIMEOUT_SECONDS="2"
    )


def ws_url(gateway, path: str) -> str:
    return gateway.url.replace("http://", "ws://") + path


async def metrics(gateway) -> str:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        return (await http.get("/metrics/")).text


def metric_value(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(part in line for part in wanted.split(",")):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def connections_drop_to_zero(gateway, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while metric_value(await metrics(gateway), "voice_gateway_connections") > 0:
        assert time.monotonic() < deadline, "connections were not given back"
        await asyncio.sleep(0.05)


async def closed(ws, timeout: float = 10) -> tuple[int, str, list]:
    """Reads until the server closes; returns the close code, reason and the messages before it."""
    received = []
    with pytest.raises(websockets.ConnectionClosed) as error:
        while True:
            received.append(await asyncio.wait_for(ws.recv(), timeout))
    return error.value.rcvd.code, error.value.rcvd.reason, received


async def test_a_full_gateway_refuses_every_dialect_with_1013(limited):
    await connections_drop_to_zero(limited)
    held = [await websockets.connect(ws_url(limited, "/ws/channels")) for _ in range(MAX_SESSIONS)]
    try:
        for ws in held:
            await ws.send(json.dumps({"channel": "subscription", "payload": {"action": "subscribe", "channel": "c"}}))
            await asyncio.wait_for(ws.recv(), 5)
        for path in ("/ws", "/twilio/media", "/exotel/media", "/v1/chat/stream", "/ws/channels", "/ws-default/c1"):
            async with websockets.connect(ws_url(limited, path)) as ws:
                code, reason, received = await closed(ws)
            assert code == 1013 and "limit of 3 sessions" in reason, path
            if path in ("/ws", "/v1/chat/stream", "/ws/channels"):
                assert "limit of 3 sessions" in received[0], (path, received)
    finally:
        for ws in held:
            await ws.close()
    await connections_drop_to_zero(limited)
    async with websockets.connect(ws_url(limited, "/ws")) as ws:
        await ws.send(json.dumps({"type": "dance"}))
        assert "unknown message type" in await asyncio.wait_for(ws.recv(), 5)
    counted = await metrics(limited)
    assert metric_value(counted, "voice_gateway_limit_refusals_total", dialect="twilio", limit="sessions") >= 1


async def test_each_key_has_its_own_maximum_of_sessions(limited):
    await connections_drop_to_zero(limited)
    url = ws_url(limited, "/v1/chat/stream")
    async with websockets.connect(url) as first:
        await first.send(json.dumps({"type": "authorize", "token": KEY}))
        assert json.loads(await first.recv())["type"] == "authorize_success"
        async with websockets.connect(url) as second:
            await second.send(json.dumps({"type": "authorize", "token": KEY}))
            code, _, received = await closed(second)
            error = json.loads(received[0])
            assert code == 1013 and error["type"] == "error" and error["code"] == "capacity"
        async with websockets.connect(url) as other:
            await other.send(json.dumps({"type": "authorize", "token": OTHER_KEY}))
            assert json.loads(await other.recv())["type"] == "authorize_success"
        # The REST trigger of a raw PCM call counts against its key too.
        async with api_client(limited.url, KEY) as http:
            busy = await http.post("/api/calls/trigger", json={"agent_id": "default"})
        assert busy.status_code == 429 and "sessions open" in busy.json()["detail"]
    await connections_drop_to_zero(limited)
    async with api_client(limited.url, KEY) as http:
        session = (await http.post("/api/calls/trigger", json={"agent_id": "default"})).json()["session_id"]
        second = (await http.post("/api/calls/trigger", json={"agent_id": "default"})).json()["session_id"]
    async with websockets.connect(ws_url(limited, f"/ws/pcm/{session}")) as call:
        await call.send(b"\x00\x00" * 160)
        async with websockets.connect(ws_url(limited, f"/ws/pcm/{second}")) as over:
            code, reason, _ = await closed(over)
        assert code == 1013 and "sessions open" in reason
    counted = await metrics(limited)
    assert metric_value(counted, "voice_gateway_limit_refusals_total", dialect="pcm", limit="sessions_per_key") >= 1


async def test_oversized_frames_are_refused_in_each_dialects_terms(limited):
    await connections_drop_to_zero(limited)
    big = json.dumps({"type": "text", "data": {"text": "x" * MAX_FRAME}})
    # Dialects with an error event refuse the message and go on.
    async with websockets.connect(ws_url(limited, "/ws")) as ws:
        await ws.send(big)
        assert "exceeds the limit of 4096" in json.loads(await ws.recv())["data"]["error"]
        await ws.send(json.dumps({"type": "dance"}))
        assert "unknown message type" in json.loads(await ws.recv())["data"]["error"]
    async with websockets.connect(ws_url(limited, "/v1/chat/stream")) as ws:
        await ws.send(big)
        assert json.loads(await ws.recv())["code"] == "too_large"
        await ws.send(json.dumps({"type": "authorize", "token": OTHER_KEY}))
        assert json.loads(await ws.recv())["type"] == "authorize_success"
    async with websockets.connect(ws_url(limited, "/ws/channels")) as ws:
        await ws.send(big)
        assert "exceeds the limit" in json.loads(await ws.recv())["payload"]["error"]
    # The others have no error event: the socket is closed with 1009.
    start = {"event": "start", "streamSid": "MZbig", "start": {"streamSid": "MZbig", "customParameters": {}}}
    for path, first in (("/twilio/media", start), ("/exotel/media", None), ("/ws-default/callbig", None)):
        async with websockets.connect(ws_url(limited, path)) as ws:
            if first:
                await ws.send(json.dumps(first))
            await ws.send(big)
            code, reason, _ = await closed(ws)
        assert code == 1009 and "exceeds the limit of 4096" in reason, path
    async with api_client(limited.url, KEY) as http:
        session = (await http.post("/api/calls/trigger", json={"agent_id": "default"})).json()["session_id"]
    async with websockets.connect(ws_url(limited, f"/ws/pcm/{session}")) as ws:
        await ws.send(b"\x00" * (MAX_FRAME + 2))
        code, _, _ = await closed(ws)
    assert code == 1009
    # HTTP bodies have the same limit.
    async with api_client(limited.url, KEY) as http:
        response = await http.put("/api/agents/huge", json={"name": "x", "system_prompt": "y" * MAX_FRAME})
    assert response.status_code == 413
    counted = await metrics(limited)
    for dialect in ("browser", "chat", "channels", "twilio", "exotel", "retell", "pcm", "http"):
        assert metric_value(counted, "voice_gateway_limit_refusals_total", dialect=dialect, limit="frame_size"), dialect


async def test_real_time_media_passes_the_rate_limit_and_a_flood_does_not(limited):
    await connections_drop_to_zero(limited)
    payload = base64.b64encode(b"\xff" * 160).decode()
    sid = "MZrate"
    start = {"event": "start", "streamSid": sid, "start": {"streamSid": sid, "customParameters": {}}}
    media = json.dumps({"event": "media", "streamSid": sid, "media": {"track": "inbound", "payload": payload}})
    async with websockets.connect(ws_url(limited, "/twilio/media")) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps(start))
        clock = time.monotonic()
        for _ in range(100):  # 2 s of 20 ms frames at the lowest rate the settings allow (50/s)
            clock += 0.02
            await asyncio.sleep(max(0.0, clock - time.monotonic()))
            await ws.send(media)
        await ws.send(json.dumps({"event": "stop", "streamSid": sid, "stop": {}}))
        code, _, _ = await closed(ws)
    assert code == 1000, "real-time media was refused"
    async with websockets.connect(ws_url(limited, "/twilio/media")) as ws:
        await ws.send(json.dumps(start))
        for _ in range(BURST * 3):
            await ws.send(media)
        code, reason, _ = await closed(ws)
    assert code == 1008 and "messages per second" in reason
    async with websockets.connect(ws_url(limited, "/v1/chat/stream")) as ws:
        for _ in range(BURST * 3):
            await ws.send(json.dumps({"type": "pong"}))
        code, reason, received = await closed(ws)
    assert code == 1008 and any(json.loads(m).get("code") == "limit" for m in received)


async def test_slow_clients_are_closed_after_the_handshake_timeout(impatient):
    async with websockets.connect(ws_url(impatient, "/ws")) as ws:
        await ws.send(json.dumps({"type": "text", "data": {"text": "hi"}}))  # not init: no handshake
        started = time.monotonic()
        code, reason, received = await closed(ws)
    assert code == 1008 and "within 1 s" in reason and time.monotonic() - started < 5
    assert any("within 1 s" in json.loads(m)["data"]["error"] for m in received)
    for path in ("/twilio/media", "/exotel/media", "/ws-default/call_slow"):
        async with websockets.connect(ws_url(impatient, path)) as ws:
            if path.startswith("/twilio"):
                await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            code, reason, _ = await closed(ws)
        assert code == 1008 and "within 1 s" in reason, path
    async with websockets.connect(ws_url(impatient, "/v1/chat/stream")) as ws:
        code, _, received = await closed(ws)
    assert code == 4401 and json.loads(received[0])["code"] == "unauthorized"
    counted = await metrics(impatient)
    assert metric_value(counted, "voice_gateway_limit_refusals_total", dialect="twilio", limit="handshake") >= 1


async def test_idle_connections_are_closed_but_receiving_subscribers_are_kept(impatient):
    async with (
        websockets.connect(ws_url(impatient, "/ws/channels")) as idle,
        websockets.connect(ws_url(impatient, "/ws/channels")) as listener,
        websockets.connect(ws_url(impatient, "/ws/channels")) as publisher,
    ):
        await listener.send(json.dumps({"channel": "subscription", "payload": {"action": "subscribe", "channel": "x"}}))
        await asyncio.wait_for(listener.recv(), 5)

        async def publish() -> None:
            for n in range(8):
                await publisher.send(json.dumps({"channel": "x", "payload": {"n": n}}))
                await asyncio.sleep(0.5)

        publishing = asyncio.create_task(publish())
        code, reason, received = await closed(idle)
        assert code == 1008 and "idle" in reason and "idle" in json.loads(received[0])["payload"]["error"]
        await publishing
        # The listener never sent anything after subscribing, for twice the idle timeout, but kept receiving.
        got = [json.loads(await asyncio.wait_for(listener.recv(), 5))["payload"]["n"] for _ in range(8)]
        assert got == list(range(8))
    sid = "MZidle"
    async with websockets.connect(ws_url(impatient, "/twilio/media")) as ws:
        await ws.send(json.dumps({"event": "start", "streamSid": sid, "start": {"streamSid": sid}}))
        code, reason, _ = await closed(ws)
    assert code == 1008 and "idle" in reason


async def test_a_chat_connection_keeps_a_bounded_number_of_conversations_open(limited):
    await connections_drop_to_zero(limited)
    async with websockets.connect(ws_url(limited, "/v1/chat/stream")) as ws:
        await ws.send(json.dumps({"type": "authorize", "token": KEY}))
        assert json.loads(await ws.recv())["type"] == "authorize_success"
        for index in range(MAX_OPEN_CONVERSATIONS + 3):
            await ws.send(json.dumps({"type": "chat_message", "content": "Hi.", "conversation_id": f"lru-{index}"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "stream_end":
                pass
        open_now = metric_value(await metrics(limited), "voice_gateway_active_sessions", dialect="chat")
        assert open_now == MAX_OPEN_CONVERSATIONS
        # The least recently used were closed, not lost: they can be continued.
        await ws.send(json.dumps({"type": "chat_message", "content": "Again.", "conversation_id": "lru-0"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "stream_start"


def test_no_limit_left_a_traceback_in_the_logs(limited, impatient):
    for gateway in (limited, impatient):
        log = gateway.log.getvalue()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
