"""Exotel Voicebot / AgentStream, bidirectional (protocols.md §3): ``/exotel/media?sample-rate=…``.

Exotel sends ``connected``, ``start``, ``media`` (base64 PCM16 little-endian mono at the chosen rate:
8000 by default, 16000 or 24000 via ``?sample-rate=``), ``dtmf``, ``mark`` and ``stop``; both
``stream_sid`` and ``streamSid`` spellings are accepted. The gateway sends ``media`` in chunks that
are multiples of 320 bytes and at least 3200 bytes (the tail zero-padded), ``mark`` and ``clear``,
with the documented ``stream_sid``. The agent comes from ``agent_id`` in the query string (Exotel
passes custom parameters there) or in ``start.custom_parameters``.
"""

from __future__ import annotations

import base64
import logging

from starlette.websockets import WebSocket

from voice_audio import Encoding
from voice_gateway.call import CallSession, MediaFormat
from voice_gateway.dialects.carrier import (
    JsonSocket,
    bad_frame_counter,
    decode_payload,
    frames,
    open_call,
    safe_id,
)
from voice_gateway.session import GatewayContext

logger = logging.getLogger(__name__)

DIALECT = "exotel"
SAMPLE_RATES = (8000, 16000, 24000)
CHUNK_MULTIPLE = 320
MIN_CHUNK = 3200


def media_format(sample_rate: int) -> MediaFormat:
    """Exotel's PCM16 at ``sample_rate``: about 100 ms chunks, multiples of 320 B, at least 3200 B."""
    chunk = max(MIN_CHUNK, sample_rate * 2 // 10 // CHUNK_MULTIPLE * CHUNK_MULTIPLE)
    return MediaFormat(
        encoding=Encoding.PCM16,
        sample_rate=sample_rate,
        chunk_bytes=chunk,
        pad_to=CHUNK_MULTIPLE,
        min_chunk_bytes=MIN_CHUNK,
        lead_s=0.3,
    )


class ExotelTransport:
    """Sends agent audio, marks and clears as Exotel expects them."""

    def __init__(self, socket: JsonSocket) -> None:
        self._socket = socket
        self.stream_sid = ""

    async def send_audio(self, audio: bytes) -> None:
        payload = base64.b64encode(audio).decode()
        await self._socket.send({"event": "media", "stream_sid": self.stream_sid, "media": {"payload": payload}})

    async def send_mark(self, name: str) -> bool:
        await self._socket.send({"event": "mark", "stream_sid": self.stream_sid, "mark": {"name": name}})
        return True

    async def clear(self) -> None:
        await self._socket.send({"event": "clear", "stream_sid": self.stream_sid})


def _sid(message: dict, start: dict) -> str:
    for source in (message, start):
        for key in ("stream_sid", "streamSid"):
            if source.get(key):
                return str(source[key])
    return ""


async def serve(websocket: WebSocket, context: GatewayContext) -> None:
    """Serves one Exotel media stream until ``stop`` or disconnect."""
    query = websocket.query_params
    raw_rate = query.get("sample-rate") or query.get("sample_rate") or "8000"
    await websocket.accept()
    if not raw_rate.isdigit() or int(raw_rate) not in SAMPLE_RATES:
        await websocket.close(code=1008, reason=f"sample-rate must be one of {SAMPLE_RATES}")
        return
    media = media_format(int(raw_rate))
    transport = ExotelTransport(JsonSocket(websocket))
    call_ref: list[CallSession | None] = [None]
    on_bad = bad_frame_counter(DIALECT, call_ref)
    status = "disconnected"
    try:
        async for message in frames(websocket, DIALECT, on_bad):
            event = message.get("event")
            call = call_ref[0]
            if event == "media":
                if call is None:
                    on_bad("media_before_start")
                    continue
                audio = decode_payload((message.get("media") or {}).get("payload"), on_bad)
                if audio:
                    if len(audio) % 2:
                        on_bad("odd_pcm_length")
                    call.on_audio(audio)
            elif event == "start":
                if call is not None:
                    on_bad("duplicate_start")
                    continue
                start = message.get("start") if isinstance(message.get("start"), dict) else {}
                transport.stream_sid = _sid(message, start)
                parameters = start.get("custom_parameters") or start.get("customParameters") or {}
                parameters = parameters if isinstance(parameters, dict) else {}
                agent_id = str(query.get("agent_id") or parameters.get("agent_id") or "default")
                variables = {
                    k: v
                    for k, v in {**parameters, **query}.items()
                    if k not in ("agent_id", "sample-rate", "sample_rate")
                }
                call_ref[0] = await open_call(
                    context, DIALECT, agent_id, variables, media, transport, session_id=safe_id(transport.stream_sid)
                )
                if call_ref[0] is None:
                    await websocket.close(code=1008, reason=f"unknown agent {agent_id!r}")
                    return
            elif event == "mark":
                if call is not None and isinstance(message.get("mark"), dict):
                    call.on_mark(str(message["mark"].get("name", "")))
            elif event == "dtmf":
                if call is not None and isinstance(message.get("dtmf"), dict):
                    call.on_dtmf(str(message["dtmf"].get("digit", "")))
            elif event == "stop":
                status = "completed"
                break
            elif event != "connected":
                on_bad("unknown_event")
    finally:
        if call_ref[0] is not None:
            await call_ref[0].close(status)
