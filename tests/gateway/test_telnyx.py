"""Telnyx Media Streaming (protocols.md §4.1) and Exotel's transfer: the TeXML webhook and its Ed25519
signature, the media socket's refusals and limits, frame reordering, a call hung up mid-turn, and the URL
Exotel's flow asks for the transfer number."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
import websockets
from starlette.websockets import WebSocketState

from tests.gateway.test_calls import SENTENCE, bus_is_idle
from tests.support.gateway import API_KEY, api_client
from tests.support.speech import speak
from voice_bus.connection import connect
from voice_gateway.agents.tools import CallAction
from voice_gateway.api import ed25519
from voice_gateway.config import Settings
from voice_gateway.dialects.carrier import CarrierTransport
from voice_gateway.dialects.telnyx import Reorder, parse_start, sequence_of, signature_valid
from voice_gateway.storage.registry import CallRegistry
from voice_runtime.config import ConfigError
from voicectl.callers import call

SEED = bytes(range(32))
PUBLIC_URL = "https://voice.example.com"


def _encode(point) -> bytes:
    x, y, z, _ = point
    inverse = pow(z, ed25519._P - 2, ed25519._P)
    x, y = x * inverse % ed25519._P, y * inverse % ed25519._P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _key_pair(seed: bytes) -> tuple[int, bytes, bytes]:
    digest = hashlib.sha512(seed).digest()
    scalar = int.from_bytes(digest[:32], "little") & ((1 << 254) - 8) | (1 << 254)
    return scalar, digest[32:], _encode(ed25519._multiply(scalar, ed25519._G))


def sign(seed: bytes, message: bytes) -> bytes:
    """RFC 8032's Ed25519 signature (the test plays Telnyx, which holds the private key)."""
    scalar, prefix, public = _key_pair(seed)
    r = int.from_bytes(hashlib.sha512(prefix + message).digest(), "little") % ed25519._L
    big_r = _encode(ed25519._multiply(r, ed25519._G))
    k = int.from_bytes(hashlib.sha512(big_r + public + message).digest(), "little") % ed25519._L
    return big_r + ((r + k * scalar) % ed25519._L).to_bytes(32, "little")


PUBLIC_KEY = _key_pair(SEED)[2]


def telnyx_headers(body: bytes, seed: bytes = SEED, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    signature = base64.b64encode(sign(seed, stamp.encode() + b"|" + body)).decode()
    return {"telnyx-signature-ed25519": signature, "telnyx-timestamp": stamp}


@pytest.fixture(scope="module")
def bare(start_bare_gateway):
    return start_bare_gateway(
        GATEWAY_API_KEYS=API_KEY,
        TELNYX_PUBLIC_KEY=base64.b64encode(PUBLIC_KEY).decode(),
        GATEWAY_PUBLIC_URL=PUBLIC_URL,
        GATEWAY_MAX_FRAME_BYTES="65536",
    )


def start_message(stream_id: str, media_format: dict | None = None, sequence: int = 1) -> str:
    start = {
        "call_control_id": "v3:abc",
        "custom_parameters": {"agent_id": "default"},
        **({"media_format": media_format} if media_format is not None else {}),
    }
    return json.dumps({"event": "start", "sequence_number": str(sequence), "stream_id": stream_id, "start": start})


# -- in process -----------------------------------------------------------------------------------------------


def test_ed25519_verifies_rfc_8032_vectors_and_refuses_anything_else():
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    signature = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0"
        "595bbe24655141438e7a100b"
    )
    assert ed25519.verify(public, b"", signature)
    assert not ed25519.verify(public, b"x", signature)
    assert not ed25519.verify(public, b"", signature[:-1] + bytes([signature[-1] ^ 1]))
    # S + L is the same point equation, but a malleable signature: refused.
    s = int.from_bytes(signature[32:], "little") + ed25519._L
    assert s < 2**256 and not ed25519.verify(public, b"", signature[:32] + s.to_bytes(32, "little"))
    assert not ed25519.verify(public[:31], b"", signature) and not ed25519.verify(public, b"", b"")
    assert ed25519.verify(PUBLIC_KEY, b"hello", sign(SEED, b"hello"))


def test_signature_needs_a_fresh_timestamp_and_the_exact_body():
    headers = telnyx_headers(b"a=1")
    signature, stamp = headers["telnyx-signature-ed25519"], headers["telnyx-timestamp"]
    assert signature_valid(PUBLIC_KEY, signature, stamp, b"a=1")
    assert not signature_valid(PUBLIC_KEY, signature, stamp, b"a=2")
    assert not signature_valid(PUBLIC_KEY, signature, stamp, b"a=1", now=int(stamp) + 301)
    assert not signature_valid(PUBLIC_KEY, "%%%", stamp, b"a=1")
    assert not signature_valid(PUBLIC_KEY, signature, "١٢٣", b"a=1")


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"k" * 31).decode()])
def test_a_malformed_public_key_is_refused_at_start(monkeypatch, value):
    monkeypatch.setenv("TELNYX_PUBLIC_KEY", value)
    with pytest.raises(ConfigError, match="TELNYX_PUBLIC_KEY"):
        Settings.from_env()
    monkeypatch.setenv("TELNYX_PUBLIC_KEY", base64.b64encode(PUBLIC_KEY).decode())
    assert Settings.from_env().telnyx_public_key == PUBLIC_KEY


def test_start_reads_the_top_level_stream_id_and_the_media_format():
    bad: list[str] = []
    start = parse_start(json.loads(start_message("s-1", {"encoding": "PCMA", "sample_rate": "8000"})), bad.append)
    assert (start.stream_sid, start.call_sid, start.agent_id, start.refusal) == ("s-1", "v3:abc", "default", "")
    assert start.media is not None and start.media.encoding.name == "ALAW" and start.media.pad_byte == 0xD5
    listed = {"event": "start", "start": {"custom_parameters": [{"name": "agent_id", "value": "talker"}]}}
    assert parse_start(listed, bad.append).agent_id == "talker" and parse_start(listed, bad.append).media is not None
    g722 = parse_start(json.loads(start_message("s-2", {"encoding": "G722", "sample_rate": 16000})), bad.append)
    assert g722.media is None and "G722/16000" in g722.refusal and bad == ["unsupported_media_format"]


def test_frames_are_put_back_in_sequence_order():
    bad: list[str] = []
    order = Reorder(bad.append, window=3)

    def push(sequence: int, event: str = "media") -> list[int]:
        return [m["n"] for m in order.push(sequence, {"event": event, "n": sequence})]

    assert push(1, "start") == [1]
    assert push(3) == [] and push(2) == [2, 3]
    assert push(5) == [] and push(6) == [] and push(7) == [] and push(8) == [5, 6, 7, 8]
    assert bad == ["sequence_gap"]
    assert push(4) == [] and bad[-1] == "late_frame"
    assert push(4, "dtmf") == [4]
    assert push(8) == [] and bad[-1] == "late_frame"
    assert push(10) == [] and push(11, "stop") == [10, 11]
    assert [sequence_of({"sequence_number": v}) for v in ("7", 7, "x", -1, True, "9" * 30)] == [7, 7] + [None] * 4


# -- against a gateway with no workers ----------------------------------------------------------------------------


async def test_texml_webhook_connects_a_stream_and_checks_the_signature(bare):
    url = f"{bare.url}/telnyx/voice?agent_id=talker"
    body = b"CallSid=v3%3Aabc&From=%2B13125550100&To=%2B13125550199"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    async with httpx.AsyncClient() as http:
        accepted = await http.post(url, content=body, headers={**form, **telnyx_headers(body)})
        forged = await http.post(url, content=body, headers={**form, **telnyx_headers(body, seed=b"\x01" * 32)})
        unsigned = await http.post(url, content=body, headers=form)
        tampered = await http.post(url, content=body + b"1", headers={**form, **telnyx_headers(body)})
        stale = await http.post(url, content=body, headers={**form, **telnyx_headers(body, timestamp=1_000_000)})
    assert accepted.status_code == 200, accepted.text
    assert accepted.headers["content-type"].startswith("application/xml")
    assert '<Response><Connect><Stream url="wss://voice.example.com/telnyx/media?agent_id=talker"' in accepted.text
    assert 'bidirectionalMode="rtp"' in accepted.text and '<Parameter name="agent_id" value="talker"/>' in accepted.text
    assert '<Parameter name="From" value="+13125550100"/>' in accepted.text
    assert [forged.status_code, unsigned.status_code, tampered.status_code, stale.status_code] == [403] * 4


async def test_an_unsupported_encoding_closes_1003_with_the_reason_in_the_call_log(bare):
    stream_id = str(uuid.uuid4())
    async with websockets.connect(bare.url.replace("http://", "ws://") + "/telnyx/media") as ws:
        await ws.send(json.dumps({"event": "connected", "version": "1.0.0"}))
        await ws.send(start_message(stream_id, {"encoding": "L16", "sample_rate": 16000, "channels": 1}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 1003
    assert "unsupported media_format L16/16000" in closed.value.rcvd.reason
    async with api_client(bare.url) as http:
        log = (await http.get(f"/api/calls/{stream_id}")).json()
    assert log["status"] == "refused" and "L16/16000" in log["reason"] and log["dialect"] == "telnyx"


async def test_an_oversized_frame_closes_1009(bare):
    async with websockets.connect(bare.url.replace("http://", "ws://") + "/telnyx/media", max_size=None) as ws:
        await ws.send(start_message(str(uuid.uuid4())))
        await ws.send(json.dumps({"event": "media", "media": {"payload": "A" * 70_000}}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 1009


class ClosingSocket:
    """The socket side of an Exotel stream, enough for the transport to close it."""

    application_state = WebSocketState.CONNECTED

    def __init__(self) -> None:
        self.closed: tuple[int, str] | None = None

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)
        self.application_state = WebSocketState.DISCONNECTED


async def test_exotel_flow_reads_the_transfer_number_after_the_stream(bare, nats_url):
    call_sid = uuid.uuid4().hex
    socket = ClosingSocket()
    nc = await connect(nats_url, name="transfer-test")
    try:
        stream = SimpleNamespace(sid_key="stream_sid", ws=socket)
        transport = CarrierTransport(stream, await CallRegistry.open(nc.jetstream()))
        transport.call_sid = call_sid
        await transport.hang_up(CallAction(kind="transfer_call", number="+919876500000"))
    finally:
        await nc.close()
    assert socket.closed == (1000, "transfer_call")
    async with httpx.AsyncClient(base_url=bare.url) as http:
        transferred = await http.get("/exotel/transfer", params={"CallSid": call_sid})
        ended = await http.get("/exotel/transfer", params={"CallSid": uuid.uuid4().hex})
        malformed = await http.get("/exotel/transfer", params={"CallSid": "../x\n"})
    assert transferred.status_code == 200
    assert transferred.json() == {"fetch_after_attempt": False, "destination": {"numbers": ["+919876500000"]}}
    assert [ended.status_code, malformed.status_code] == [404, 404]


# -- with the model-backed workers ----------------------------------------------------------------------------


async def test_hanging_up_mid_turn_leaves_no_work_on_the_bus(gateway_url, nats_url):
    samples, rate = speak(SENTENCE)
    speech_at = 4.0
    hang_up = speech_at + len(samples) / rate + 1.0
    result = await call(
        "telnyx", gateway_url, samples, rate, speech_at_s=speech_at, hang_up_after_s=hang_up, listen_s=0.5
    )
    assert result.problems == [], result.problems
    assert await bus_is_idle(nats_url)
