"""Security of the gateway: API keys on the REST API, Retell's secret path, conversation ownership in the
chat stream, and no secrets or personal data in the logs."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
import websockets

from tests.support.gateway import api_client
from voice_gateway.api.auth import Authenticator, key_identity, sign_token
from voice_gateway.api.redaction import PathRedactor
from voice_gateway.app import is_loopback, warn_about_unsafe_settings
from voice_gateway.config import Settings

KEY, OTHER_KEY = "auth-key-0123456789", "auth-key-abcdefghij"
SECRET = "auth-token-secret"
RETELL_PATH = "retell-7f3a9c1e5b2d4a6f"
CALLER_NUMBER = "+15557654321"


@pytest.fixture(scope="module")
def secured(start_bare_gateway):
    return start_bare_gateway(
        GATEWAY_API_KEYS=f"{KEY},{OTHER_KEY}", GATEWAY_TOKEN_SECRET=SECRET, OBFUSCATED_WS_PATH=RETELL_PATH
    )


@pytest.fixture(scope="module")
def keyless(start_bare_gateway):
    return start_bare_gateway()


REST_CALLS = [
    ("GET", "/api/agents/default", None),
    ("PUT", "/api/agents/someone", {"name": "Someone"}),
    ("DELETE", "/api/agents/someone", None),
    ("GET", "/api/calls/anything", None),
    ("POST", "/api/calls/trigger", {"agent_id": "default"}),
]


@pytest.mark.parametrize(("method", "path", "body"), REST_CALLS)
async def test_the_rest_api_needs_an_api_key(secured, method, path, body):
    async with httpx.AsyncClient(base_url=secured.url) as http:
        for headers, reason in (
            ({}, "missing API key"),
            ({"Authorization": "Bearer wrong-key"}, "invalid API key"),
            ({"X-API-Key": "wrong-key"}, "invalid API key"),
            ({"Authorization": f"Basic {KEY}"}, "missing API key"),
            ({"Authorization": f"Bearer {sign_token(SECRET, 'user')}"}, "invalid API key"),
        ):
            response = await http.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert reason in response.json()["detail"] and response.headers["www-authenticate"] == "Bearer"
        for headers in (
            {"Authorization": f"Bearer {KEY}"},
            {"authorization": f"bearer {OTHER_KEY}"},
            {"X-API-Key": KEY},
        ):
            response = await http.request(method, path, json=body, headers=headers)
            assert response.status_code not in (401, 403), (headers, response.text)


async def test_without_configured_keys_the_rest_api_refuses_everything(keyless):
    async with httpx.AsyncClient(base_url=keyless.url) as http:
        for method, path, body in REST_CALLS:
            response = await http.request(method, path, json=body, headers={"Authorization": "Bearer dev-key"})
            assert response.status_code == 401 and "GATEWAY_API_KEYS" in response.json()["detail"], path
        assert (await http.get("/healthz")).status_code == 200
    assert "GATEWAY_API_KEYS is not set" in keyless.log.getvalue()


async def test_retell_answers_only_on_its_secret_path_and_the_path_stays_out_of_the_logs(secured):
    base = secured.url.replace("http://", "ws://")
    for wrong in ("ws-default", RETELL_PATH[:-1], "x" + RETELL_PATH[1:]):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"{base}/{wrong}/call_1")
        assert refused.value.response.status_code == 403
    async with websockets.connect(f"{base}/{RETELL_PATH}/call_secret1?caller={CALLER_NUMBER}") as retell:
        assert json.loads(await retell.recv())["response_type"] == "config"
        await retell.send(json.dumps({"interaction_type": "ping_pong", "timestamp": 7}))
        assert json.loads(await asyncio.wait_for(retell.recv(), 10)) == {"response_type": "ping_pong", "timestamp": 7}
    async with websockets.connect(f"{base}/exotel/media?sample-rate=8000&from={CALLER_NUMBER}&agent_id=default"):
        pass
    await asyncio.sleep(0.3)
    log = secured.log.getvalue()
    assert "/<secret>/call_secret1" in log and "agent_id=default" in log
    assert RETELL_PATH not in log and CALLER_NUMBER not in log and KEY not in log


async def test_a_chat_conversation_belongs_to_the_credential_that_opened_it(secured):
    url = secured.url.replace("http://", "ws://") + "/v1/chat/stream"

    async def chat(token: str, conversation_id: str) -> dict:
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "authorize", "token": token}))
            assert json.loads(await ws.recv())["type"] == "authorize_success"
            await ws.send(json.dumps({"type": "chat_message", "content": "Hi.", "conversation_id": conversation_id}))
            return json.loads(await asyncio.wait_for(ws.recv(), 10))

    assert (await chat(KEY, "conv-owned-1"))["type"] == "stream_start"
    assert (await chat(KEY, "conv-owned-1"))["type"] == "stream_start"
    refused = await chat(OTHER_KEY, "conv-owned-1")
    assert refused["type"] == "error" and refused["code"] == "forbidden"
    assert (await chat(sign_token(SECRET, "alice"), "conv-owned-2"))["type"] == "stream_start"
    assert (await chat(sign_token(SECRET, "bob"), "conv-owned-2"))["code"] == "forbidden"
    async with api_client(secured.url, KEY) as http:
        log = (await http.get("/api/calls/conv-owned-1")).json()
    assert log["owner"] == key_identity(KEY) and KEY not in json.dumps(log)
    # Nor can the unauthenticated browser socket continue it.
    async with websockets.connect(secured.url.replace("http://", "ws://") + "/ws") as ws:
        await ws.send(json.dumps({"type": "init", "data": {"callLogId": "conv-owned-1"}}))
        assert "unknown callLogId" in json.loads(await ws.recv())["data"]["error"]


async def test_http_only_mounts_refuse_websockets_without_a_traceback(secured):
    base = secured.url.replace("http://", "ws://")
    for path in ("/metrics/", "/static/index.html"):
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(base + path)
    assert "Traceback" not in secured.log.getvalue()


def test_authenticator_tells_keys_tokens_and_garbage_apart():
    auth = Authenticator((KEY,), SECRET)
    assert auth.check_api_key(KEY) == (True, key_identity(KEY))
    assert auth.check(KEY) == (True, key_identity(KEY))
    assert auth.check(sign_token(SECRET, "alice")) == (True, "sub:alice")
    assert auth.check_api_key(sign_token(SECRET, "alice"))[0] is False
    assert auth.check(sign_token(SECRET, "alice", ttl_s=-5)) == (False, "token expired")
    assert auth.check(sign_token("another-secret", "alice")) == (False, "invalid token")
    for garbage in (None, 42, "", "\ud800", "a.b", "..", "é.é", KEY + "\x00"):
        assert auth.check(garbage)[0] is False
        assert auth.check_api_key(garbage)[0] is False
    assert Authenticator((), None).check(KEY)[0] is False
    assert "GATEWAY_API_KEYS" in Authenticator((), SECRET).check_api_key(KEY)[1]
    assert len(key_identity(KEY)) == len("key:") + 12 and KEY not in key_identity(KEY)


def test_unsafe_settings_are_warned_about_at_start(caplog, monkeypatch):
    monkeypatch.setenv("GATEWAY_HOST", "0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="voice_gateway.app"):
        warn_about_unsafe_settings(Settings.from_env())
    text = caplog.text
    assert "OBFUSCATED_WS_PATH" in text and "GATEWAY_API_KEYS" in text and "TWILIO_AUTH_TOKEN" in text
    caplog.clear()
    monkeypatch.setenv("GATEWAY_HOST", "127.0.0.1")
    monkeypatch.setenv("GATEWAY_API_KEYS", KEY)
    with caplog.at_level(logging.WARNING, logger="voice_gateway.app"):
        warn_about_unsafe_settings(Settings.from_env())
    assert caplog.text == ""
    assert is_loopback("localhost") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_the_log_redactor_hides_secret_segments_and_query_values():
    redactor = PathRedactor([RETELL_PATH])
    line = f'/{RETELL_PATH}/call_1?agent_id=support&from=%2B15550001&token=abc" [accepted]'
    assert redactor.redact(line) == '/<secret>/call_1?agent_id=support&from=redacted&token=redacted" [accepted]'
    assert redactor.redact(f"/{RETELL_PATH}x/call") == f"/{RETELL_PATH}x/call"
    record = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, '%s - "WebSocket %s"', ("1.2.3.4", line), None)
    redactor.filter(record)
    assert RETELL_PATH not in record.getMessage() and "15550001" not in record.getMessage()


def test_no_request_left_a_traceback_in_the_logs(secured, keyless):
    for gateway in (secured, keyless):
        log = gateway.log.getvalue()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
