"""The maximum call length (``GATEWAY_MAX_CALL_SECONDS``): a call that reaches it ends the way a limit
ends it in its dialect, with the normal close 1000, so that a carrier hangs up as after ``end_call``;
and the cap is what bounds the Helm chart's drain (preStop wait, grace period)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
from pathlib import Path

import httpx
import pytest
import websockets

from tests.support.gateway import FakeClock, FakeSocket, api_client
from voice_gateway.api.limits import LimitExceeded, Limits, LimitSettings
from voice_gateway.config import Settings
from voice_runtime.config import ConfigError

KEY = "max-call-key"
MAX_CALL_S = 2
PROBE = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "probe.py"


def voice_probe():
    """deploy/docker/probe.py, the image's ``voice-probe`` that the chart's preStop hook runs."""
    if "voice_deploy_probe" not in sys.modules:
        spec = importlib.util.spec_from_file_location("voice_deploy_probe", PROBE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["voice_deploy_probe"] = module
        spec.loader.exec_module(module)
    return sys.modules["voice_deploy_probe"]


def test_the_cap_is_read_from_the_environment_and_checked(monkeypatch):
    assert Settings.from_env().limits.max_call_s == 0.0, "no cap unless asked"
    monkeypatch.setenv("GATEWAY_MAX_CALL_SECONDS", "3600")
    assert Settings.from_env().limits.max_call_s == 3600.0
    for value, message in (("-1", "at least 0"), ("inf", "finite"), ("an hour", "")):
        monkeypatch.setenv("GATEWAY_MAX_CALL_SECONDS", value)
        with pytest.raises(ConfigError, match=re.escape("GATEWAY_MAX_CALL_SECONDS")) as error:
            Settings.from_env()
        assert message in str(error.value)


async def test_the_guard_ends_a_busy_call_at_the_cap_with_a_normal_close():
    clock = FakeClock()
    frame = {"type": "websocket.receive", "text": "{}"}
    guard = Limits(LimitSettings(max_call_s=60), clock=clock).admit(FakeSocket(*[frame] * 10), "twilio")
    guard.handshake_done()
    clock.now = 59.9
    assert await guard.receive() == frame, "frames flow until the cap"
    clock.now = 60.0
    with pytest.raises(LimitExceeded) as capped:
        await guard.receive()
    assert (capped.value.limit, capped.value.close_code) == ("max_call", 1000)
    assert "maximum call length of 60 s" in capped.value.reason


async def test_the_guard_ends_a_silent_call_at_the_cap_before_the_idle_timeout():
    guard = Limits(LimitSettings(max_call_s=0.2, idle_timeout_s=30)).admit(FakeSocket(), "chat")
    guard.handshake_done()
    with pytest.raises(LimitExceeded) as capped:
        await guard.receive()
    assert capped.value.limit == "max_call"
    observer = Limits(LimitSettings(max_call_s=0.2)).admit(FakeSocket(), "channels")
    assert observer.call_time_left() is None, "channels subscribers observe calls, they are not one"
    uncapped = Limits(LimitSettings(idle_timeout_s=1)).admit(FakeSocket(), "chat")
    uncapped.handshake_done()
    assert uncapped.call_time_left() is None
    with pytest.raises(LimitExceeded) as idle:
        await uncapped.receive()
    assert idle.value.limit == "idle"


@pytest.fixture(scope="module")
def capped(start_bare_gateway):
    """A gateway whose calls last at most MAX_CALL_S seconds (no workers: the greeting fails quietly)."""
    return start_bare_gateway(GATEWAY_API_KEYS=KEY, GATEWAY_MAX_CALL_SECONDS=str(MAX_CALL_S))


def ws_url(gateway, path: str) -> str:
    return gateway.url.replace("http://", "ws://") + path


async def closed(ws, timeout: float = 30) -> tuple[int, str, list]:
    """Reads until the server closes; returns the close code, reason and the messages before it."""
    received = []
    with pytest.raises(websockets.ConnectionClosed) as error:
        while True:
            received.append(await asyncio.wait_for(ws.recv(), timeout))
    return error.value.rcvd.code, error.value.rcvd.reason, received


async def test_a_twilio_call_at_the_cap_ends_and_twilio_is_told_to_hang_up(capped):
    """The chart's preStop (``voice-probe drain``) starts while the call is in flight; the call ends at
    its cap with a hang-up, not a 1012, and the drain then finds no session left."""
    sid, call_sid = "MZmaxcall0001", "CAmaxcall0001"
    probe = voice_probe()
    async with websockets.connect(ws_url(capped, "/twilio/media")) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        start = {"streamSid": sid, "callSid": call_sid, "customParameters": {}}
        await ws.send(json.dumps({"event": "start", "streamSid": sid, "start": start}))

        async def talk() -> None:
            # Real-time media, one 20 ms frame of μ-law silence at a time, until the gateway ends the call.
            payload = "/" * 216
            while True:
                await ws.send(json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}}))
                await asyncio.sleep(0.02)

        talking = asyncio.create_task(talk())
        metrics_url = capped.url + "/metrics/"
        try:
            while not await asyncio.to_thread(probe.drain, metrics_url, 0, 0):
                await asyncio.sleep(0.05)  # until the call's session is counted
            # As the chart's preStop: wait for the sessions to end, at most the cap and a margin.
            draining = asyncio.create_task(asyncio.to_thread(probe.drain, metrics_url, 0, MAX_CALL_S + 30))
            code, reason, _ = await closed(ws)
            left = await draining
        finally:
            talking.cancel()
            await asyncio.gather(talking, return_exceptions=True)
    assert code == 1000 and "maximum call length of 2 s" in reason
    assert left == 0, "the drain ends once the capped call has ended"
    # The stream ended without a transfer: Twilio's <Connect action> gets <Hangup/>, the call ends cleanly.
    async with httpx.AsyncClient(base_url=capped.url) as http:
        answer = await http.post("/twilio/after-stream", data={"CallSid": call_sid})
    assert answer.status_code == 200 and "<Hangup/>" in answer.text
    async with httpx.AsyncClient(base_url=capped.url) as http:
        metrics = (await http.get("/metrics/")).text
    assert re.search(r'voice_gateway_limit_refusals_total\{dialect="twilio",limit="max_call"\} [1-9]', metrics)
    async with api_client(capped.url, KEY) as http:
        for _ in range(50):
            log = (await http.get(f"/api/calls/{sid}")).json()
            if log.get("status") != "active":
                break
            await asyncio.sleep(0.1)
    assert log["status"] == "completed", "a call the platform ended at its cap is complete, not a lost connection"


async def test_a_chat_connection_at_the_cap_is_told_why_in_its_error_event(capped):
    async with websockets.connect(ws_url(capped, "/v1/chat/stream")) as ws:
        await ws.send(json.dumps({"type": "authorize", "token": KEY}))
        code, reason, received = await closed(ws)
    assert code == 1000 and "maximum call length" in reason
    errors = [json.loads(m) for m in received if json.loads(m).get("type") == "error"]
    assert errors and errors[-1]["code"] == "limit" and "maximum call length" in errors[-1]["error"]
