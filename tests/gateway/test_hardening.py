"""Issue #14's input and HTTP defects, each reproduced as the attacker's probe did it and shown to fail
safely: numbers that overflow, control characters aimed at the log, huge client ids in spans, a forged
``Host``, the API docs, missing security headers, wrong ``Allow`` headers and unlimited triggers."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
import websockets

from tests.support.gateway import api_client
from voice_gateway.api.messages import INT_MAX, INT_MIN, InvalidJson, parse_json
from voice_telemetry.logs import OneLineFormatter, escape_controls
from voice_telemetry.tracing import INT64_MAX, INT64_MIN, clamp_attribute

KEY = "hardening-key"
PUBLIC_URL = "https://voice.example.com"
FORGED = "FORGED-LINE level=ERROR"


@pytest.fixture(scope="module")
def open_gateway(start_bare_gateway):
    """Development defaults: any well-formed Host, no public URL."""
    return start_bare_gateway(GATEWAY_API_KEYS=KEY, GATEWAY_MAX_PENDING_TRIGGERS_PER_KEY="2")


@pytest.fixture(scope="module")
def strict_gateway(start_bare_gateway):
    """A production-like configuration: allowed hosts and a public URL."""
    return start_bare_gateway(
        GATEWAY_API_KEYS=KEY, GATEWAY_ALLOWED_HOSTS="voice.example.com,127.0.0.1", GATEWAY_PUBLIC_URL=PUBLIC_URL
    )


def ws_url(gateway, path: str) -> str:
    return gateway.url.replace("http", "ws", 1) + path


# -- one number policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["1e400", "-1e400", "[1E+999]", '{"a": 2e308}', str(INT_MAX + 1), str(INT_MIN - 1), "1" * 40]
)
def test_numbers_that_overflow_are_refused_by_the_parser(text):
    with pytest.raises(InvalidJson, match="out of range"):
        parse_json(text)


def test_numbers_in_range_parse_exactly():
    assert parse_json(f"[{INT_MAX}, {INT_MIN}, 1e308, -0, 0.5]") == [INT_MAX, INT_MIN, 1e308, 0, 0.5]


async def test_an_agent_put_with_an_overflowing_number_is_a_422_with_the_reason(open_gateway):
    async with api_client(open_gateway.url, KEY) as http:
        body = '{"name": "Overflow", "llm": {"temperature": 1e400}}'
        response = await http.put("/api/agents/overflow", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422 and "out of range" in response.json()["detail"]
        trigger = '{"agent_id": "default", "count": 1e400}'
        response = await http.post("/api/calls/trigger", content=trigger)
        assert response.status_code == 422 and "out of range" in response.json()["detail"]
        assert (await http.get("/api/agents/default")).status_code == 200


async def test_retell_never_echoes_a_number_that_is_not_json(open_gateway):
    async with websockets.connect(ws_url(open_gateway, "/ws-default/call_overflow")) as ws:
        await ws.send('{"interaction_type": "ping_pong", "timestamp": 1e400}')
        await ws.send('{"interaction_type": "ping_pong", "timestamp": "soon"}')
        await ws.send('{"interaction_type": "ping_pong", "timestamp": 1733000000000}')
        stamps = []
        while len(stamps) < 2:
            message = parse_json(await asyncio.wait_for(ws.recv(), 10))
            if message.get("response_type") == "ping_pong":
                stamps.append(message["timestamp"])
        assert all(isinstance(stamp, int) for stamp in stamps) and stamps[-1] == 1733000000000
        await ws.send(json.dumps({"interaction_type": "response_required", "response_id": 10**30, "transcript": []}))
        await ws.send('{"interaction_type": "ping_pong", "timestamp": 1}')
        while (message := parse_json(await asyncio.wait_for(ws.recv(), 10))).get("response_type") != "ping_pong":
            pass
        assert message["timestamp"] == 1


async def test_the_browser_dialect_answers_an_overflowing_number_with_its_error_event(open_gateway):
    async with websockets.connect(ws_url(open_gateway, "/ws")) as ws:
        await ws.send('{"type": "init", "data": {"agentId": "default", "volume": 1e400}}')
        message = parse_json(await asyncio.wait_for(ws.recv(), 10))
        assert message["type"] == "error" and "out of range" in json.dumps(message)


# -- logs and spans ----------------------------------------------------------------------------------------


def test_control_characters_never_reach_a_log_line():
    record = logging.LogRecord("x", logging.WARNING, "", 0, "stream %s: %r", ("abc\nFORGED\x1b[31m\u2028", "\r"), None)
    line = OneLineFormatter("%(message)s").format(record)
    assert "\n" not in line and "\x1b" not in line and "\u2028" not in line and "\r" not in line
    assert line == "stream abc\\nFORGED\\x1b[31m\\u2028: '\\r'"
    assert escape_controls("plain é 😀") == "plain é 😀"


async def test_a_stream_id_with_a_newline_cannot_forge_a_log_line(open_gateway):
    sid = f"MZ-forge\n{FORGED}"
    async with websockets.connect(ws_url(open_gateway, "/twilio/media")) as ws:
        start = {"event": "start", "streamSid": sid, "start": {"customParameters": {"agent_id": f"nobody\n{FORGED}"}}}
        await ws.send(json.dumps(start))
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    await asyncio.sleep(0.5)
    lines = open_gateway.log.getvalue().splitlines()
    assert not any(line.startswith(FORGED) for line in lines)
    assert any(f"\\n{FORGED}" in line for line in lines)


def test_client_values_are_clamped_to_what_a_span_can_carry():
    assert clamp_attribute(10**30) == INT64_MAX and clamp_attribute(-(10**30)) == INT64_MIN
    assert clamp_attribute(7) == 7 and clamp_attribute(True) is True
    assert clamp_attribute(float("inf")) == "inf" and clamp_attribute("x" * 1000) == "x" * 256
    assert clamp_attribute({"a": 1}) == "{'a': 1}"


# -- HTTP --------------------------------------------------------------------------------------------------


async def test_the_api_docs_are_not_served(open_gateway):
    async with httpx.AsyncClient(base_url=open_gateway.url) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await http.get(path)).status_code == 404, path


async def test_every_response_carries_the_security_headers(open_gateway):
    async with httpx.AsyncClient(base_url=open_gateway.url) as http:
        for path in ("/", "/static/app.js", "/healthz", "/api/agents/default", "/nowhere"):
            headers = (await http.get(path)).headers
            assert headers["x-content-type-options"] == "nosniff", path
            assert headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
            assert "script-src 'self'" in headers["content-security-policy"]


async def test_a_forged_host_is_never_echoed(open_gateway):
    async with httpx.AsyncClient(base_url=open_gateway.url) as http:
        response = await http.get("/metrics", headers={"host": "evil.example"})
        assert response.status_code in (307, 308) and response.headers["location"] == "/metrics/"
        for host in ('evil"><x', "a b", "host/path"):
            assert (await http.get("/healthz", headers={"host": host})).status_code == 400, host


async def test_allowed_hosts_refuse_others_and_twiml_uses_the_public_url(strict_gateway):
    async with httpx.AsyncClient(base_url=strict_gateway.url) as http:
        response = await http.get("/", headers={"host": "evil.example"})
        assert response.status_code == 400 and response.json()["detail"] == "invalid Host header"
        assert (await http.get("/", headers={"host": "voice.example.com"})).status_code == 200
        # Kubelets and Prometheus name the pod's address: probes and scrapes answer whatever the host.
        assert (await http.get("/healthz", headers={"host": "10.1.2.3:8000"})).status_code in (200, 503)
        twiml = await http.post("/twilio/voice", data={"CallSid": "CA1"}, headers={"x-forwarded-host": "evil.example"})
        assert twiml.status_code == 200
        assert 'url="wss://voice.example.com/twilio/media"' in twiml.text
        assert 'action="https://voice.example.com/twilio/after-stream"' in twiml.text
        assert "evil" not in twiml.text
    port = strict_gateway.url.rsplit(":", 1)[1]
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(f"ws://localhost:{port}/ws"):
            pass


async def test_405_answers_list_every_method_of_the_path(open_gateway):
    async with api_client(open_gateway.url, KEY) as http:
        response = await http.patch("/api/agents/default", json={})
        assert response.status_code == 405
        assert set(response.headers["allow"].split(", ")) >= {"GET", "PUT", "DELETE"}
        response = await http.get("/api/calls/trigger")
        assert response.status_code in (404, 405)


async def test_pending_triggers_are_limited_per_key(open_gateway):
    async with api_client(open_gateway.url, KEY) as http:
        for _ in range(2):
            assert (await http.post("/api/calls/trigger", json={"agent_id": "default"})).status_code == 200
        refused = await http.post("/api/calls/trigger", json={"agent_id": "default"})
        assert refused.status_code == 429 and "waiting to connect" in refused.json()["detail"]
