"""Exotel Voicebot / AgentStream, bidirectional (protocols.md §3): ``/exotel/media?sample-rate=…``.

Exotel sends ``connected``, ``start``, ``media`` (base64 PCM16 little-endian mono at the chosen rate:
8000 by default, 16000 or 24000 via ``?sample-rate=``), ``dtmf``, ``mark`` and ``stop``; both
``stream_sid`` and ``streamSid`` spellings are accepted. The gateway sends ``media`` in chunks that
are multiples of 320 bytes and at least 3200 bytes (the tail zero-padded), ``mark`` and ``clear``,
with the documented ``stream_sid``. The agent comes from ``agent_id`` in the query string (Exotel
passes custom parameters there) or in ``start.custom_parameters``.
"""

from __future__ import annotations

import logging

from starlette.websockets import WebSocket

from voice_audio import Encoding
from voice_gateway.api.limits import CLOSE_POLICY_VIOLATION, Limits, close_socket
from voice_gateway.conversation.call import MediaFormat
from voice_gateway.conversation.session import GatewayContext
from voice_gateway.dialects.base import serve
from voice_gateway.dialects.carrier import MediaStreamConnection, StreamStart

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


def _sid(message: dict, start: dict) -> str:
    for source in (message, start):
        for key in ("stream_sid", "streamSid"):
            if source.get(key):
                return str(source[key])
    return ""


def parse_start(message: dict, on_bad, query: dict) -> StreamStart:
    """Exotel's ``start``: the stream sid (either spelling), the agent and template variables from the
    URL's query string (custom parameters) and ``start.custom_parameters``."""
    start = message.get("start") if isinstance(message.get("start"), dict) else {}
    parameters = start.get("custom_parameters") or start.get("customParameters") or {}
    parameters = parameters if isinstance(parameters, dict) else {}
    reserved = ("agent_id", "sample-rate", "sample_rate")
    return StreamStart(
        call_sid=str(start.get("call_sid") or start.get("callSid") or ""),
        stream_sid=_sid(message, start),
        agent_id=str(query.get("agent_id") or parameters.get("agent_id") or "default"),
        variables={k: v for k, v in {**parameters, **query}.items() if k not in reserved},
    )


class ExotelConnection(MediaStreamConnection):
    """One Exotel media stream."""

    dialect = DIALECT
    sid_key = "stream_sid"

    def parse_start(self, message: dict, on_bad) -> StreamStart:
        return parse_start(message, on_bad, dict(self.ws.query_params))


async def serve_exotel(websocket: WebSocket, context: GatewayContext, limits: Limits) -> None:
    """Serves one Exotel media stream until ``stop``, disconnect or a limit."""
    query = websocket.query_params
    raw_rate = query.get("sample-rate") or query.get("sample_rate") or "8000"
    await websocket.accept()
    if raw_rate not in {str(rate) for rate in SAMPLE_RATES}:
        await close_socket(websocket, CLOSE_POLICY_VIOLATION, f"sample-rate must be one of {SAMPLE_RATES}")
        return
    media = media_format(int(raw_rate))
    await serve(websocket, limits, ExotelConnection, lambda guard: ExotelConnection(websocket, context, guard, media))
