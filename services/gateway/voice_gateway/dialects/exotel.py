"""Exotel Voicebot / AgentStream, bidirectional (protocols.md §3): ``/exotel/media?sample-rate=…``.

Exotel sends ``connected``, ``start``, ``media`` (base64 PCM16 little-endian mono at the chosen rate:
8000 by default, 16000 or 24000 via ``?sample-rate=``), ``dtmf``, ``mark`` and ``stop``; both
``stream_sid`` and ``streamSid`` spellings are accepted. The gateway sends ``media`` in chunks that
are multiples of 320 bytes and at least 3200 bytes (the tail zero-padded), ``mark`` and ``clear``,
with the documented ``stream_sid``. The agent comes from ``agent_id`` in the query string (Exotel
passes custom parameters there) or in ``start.custom_parameters``.

Transfer: Exotel cannot be told to transfer over the stream; its Voicebot applet ends when the server
closes the socket, and the call flow goes on to the next applet. So the agent's ``transfer_call`` notes
the number under the call's ``call_sid`` in the gateway's registry and closes the stream (1000, reason
``transfer_call``), and ``GET /exotel/transfer?CallSid=…`` tells the flow what next: 200 with the Connect
applet's dynamic-URL answer (``{"fetch_after_attempt": false, "destination": {"numbers": ["+91…"]}}``)
when the agent transferred the call, 404 when it did not (or the id is malformed). Build the flow as
Voicebot → Passthru (this URL; 200 goes on) → Connect (dynamic URL: this URL), with Passthru's other
branch to Hangup, so that a call the agent ended hangs up and a transferred one is dialled through.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from voice_audio import Encoding
from voice_gateway.api.limits import CLOSE_POLICY_VIOLATION, Limits, close_socket
from voice_gateway.conversation.call import MediaFormat
from voice_gateway.conversation.session import GatewayContext
from voice_gateway.dialects.base import serve
from voice_gateway.dialects.carrier import MediaStreamConnection, StreamStart
from voice_gateway.storage.registry import CallRegistry

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


async def transfer_webhook(request: Request, registry: CallRegistry | None) -> Response:
    """Exotel's Passthru / Connect dynamic URL after the Voicebot applet: the number the agent's
    ``transfer_call`` chose for ``CallSid``, as the Connect applet reads it, else 404."""
    call_sid = request.query_params.get("CallSid", "")
    number = await registry.transfer_of(call_sid) if registry is not None else None
    if not number:
        return Response("no transfer for this call", status_code=404, media_type="text/plain")
    return JSONResponse({"fetch_after_attempt": False, "destination": {"numbers": [number]}})
