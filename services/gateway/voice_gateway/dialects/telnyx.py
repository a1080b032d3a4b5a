"""Telnyx Media Streaming, bidirectional RTP mode (protocols.md §4.1): the TeXML webhook and the media WebSocket.

``POST /telnyx/voice`` answers TeXML ``<Connect><Stream url="wss://…/telnyx/media?agent_id=…"
bidirectionalMode="rtp" bidirectionalCodec="PCMU">`` with the agent id (and the caller's details) as
``<Parameter>``s. Its URLs start with ``GATEWAY_PUBLIC_URL`` when set, else with what the request says
(as Twilio's webhook). When ``TELNYX_PUBLIC_KEY`` is set the webhook checks Telnyx's Ed25519 signature
(``telnyx-signature-ed25519`` over ``"<telnyx-timestamp>|<body>"``, the timestamp within five minutes)
and refuses a missing, bad or stale one with 403.

On the socket Telnyx sends ``connected``, ``start`` (top-level ``stream_id``; ``start.call_control_id``,
``start.custom_parameters``, ``start.media_format``), ``media`` (base64 RTP payload), ``dtmf``, ``mark``,
``error`` and ``stop``; the gateway sends ``media``, ``mark`` and ``clear`` with no stream id at all. Frame
order is not guaranteed: numbered frames are put back in ``sequence_number`` order, waiting for at most
:data:`REORDER_WINDOW` later frames before a missing one is given up (a media frame arriving after that is
dropped and counted; a late ``mark`` or ``dtmf`` is still delivered). ``stop`` delivers whatever is held.

The call's audio is what ``start.media_format`` says: PCMU or PCMA at 8000 Hz (PCMU when absent). The
gateway answers in the same codec and rate, in 200 ms chunks and never under 20 ms (the last one padded
with silence), so the stream's bidirectional codec must match its inbound codec. Any other encoding or
rate (L16, G722, OPUS, AMR-WB, 16 kHz) is refused: the call's log records ``refused`` with the reason and
the socket closes with 1003. An ``error`` frame (Telnyx refusing something the gateway sent) is logged
and counted; the call goes on. A ``transfer_call`` closes the stream (1000) and notes the number under the
call control id, but Telnyx's TeXML has no after-stream callback wired here: the call then hangs up.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from typing import Any
from urllib.parse import urlencode
from xml.sax.saxutils import quoteattr

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from voice_audio import Encoding
from voice_gateway.api import ed25519
from voice_gateway.api.limits import Limits
from voice_gateway.conversation.call import MediaFormat
from voice_gateway.conversation.metrics import ERRORS
from voice_gateway.conversation.session import GatewayContext
from voice_gateway.dialects.base import serve
from voice_gateway.dialects.carrier import CarrierTransport, MediaStreamConnection, StreamStart
from voice_gateway.dialects.twilio import FORWARDED_PARAMETERS, public_ws_base

logger = logging.getLogger(__name__)

DIALECT = "telnyx"
SAMPLE_RATE = 8000
# (encoding, byte of silence) per codec Telnyx names in ``media_format.encoding``.
CODECS = {"PCMU": (Encoding.MULAW, 0xFF), "PCMA": (Encoding.ALAW, 0xD5)}
CHUNK_BYTES = 1600
MIN_CHUNK_BYTES = 160
REORDER_WINDOW = 10
SIGNATURE_TOLERANCE_S = 300
MAX_SEQUENCE = 2**63


def media_format(codec: str = "PCMU") -> MediaFormat:
    """The call's audio in ``codec`` (PCMU or PCMA) at 8 kHz: 200 ms chunks, at least 20 ms."""
    encoding, silence = CODECS[codec]
    return MediaFormat(
        encoding=encoding,
        sample_rate=SAMPLE_RATE,
        chunk_bytes=CHUNK_BYTES,
        min_chunk_bytes=MIN_CHUNK_BYTES,
        pad_byte=silence,
        lead_s=0.3,
    )


def signature_valid(public_key: bytes, signature: str, timestamp: str, body: bytes, now: float | None = None) -> bool:
    """Whether ``signature`` (base64) is Telnyx's Ed25519 signature of ``"<timestamp>|<body>"`` and the
    timestamp (Unix seconds) is within :data:`SIGNATURE_TOLERANCE_S` of ``now``."""
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > SIGNATURE_TOLERANCE_S:
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    return ed25519.verify(public_key, timestamp.encode() + b"|" + body, raw)


async def voice_webhook(request: Request, public_key: bytes | None, base: str | None = None) -> Response:
    """Answers Telnyx's TeXML voice webhook with ``<Connect><Stream>`` to the media socket."""
    body = await request.body()
    if public_key is not None:
        signature = request.headers.get("telnyx-signature-ed25519", "")
        timestamp = request.headers.get("telnyx-timestamp", "")
        if not signature_valid(public_key, signature, timestamp, body):
            logger.warning("telnyx webhook %s refused: bad telnyx-signature-ed25519", request.url.path)
            return Response("invalid telnyx-signature-ed25519", status_code=403, media_type="text/plain")
    form = {key: str(value) for key, value in (await request.form()).items()}
    agent_id = request.query_params.get("agent_id") or form.get("agent_id") or "default"
    stream_url = f"{public_ws_base(request, base)}/telnyx/media?{urlencode({'agent_id': agent_id})}"
    parameters = [("agent_id", agent_id)] + [(key, form[key]) for key in FORWARDED_PARAMETERS if key in form]
    children = "".join(f"<Parameter name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in parameters)
    texml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<Response><Connect><Stream url={quoteattr(stream_url)} bidirectionalMode="rtp" '
        f'bidirectionalCodec="PCMU">{children}</Stream></Connect></Response>'
    )
    return Response(texml, media_type="application/xml")


def _parameters(raw: Any) -> dict:
    """``custom_parameters`` as an object, or as Call Control's list of ``{"name", "value"}``."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, list):
        return {
            str(item["name"]): item.get("value")
            for item in raw
            if isinstance(item, dict) and isinstance(item.get("name"), str)
        }
    return {}


def _format(start: dict) -> tuple[MediaFormat | None, str]:
    """The call's media format from ``start.media_format``, or why the gateway cannot speak it."""
    raw = start.get("media_format")
    if raw is None:
        return media_format(), ""
    raw = raw if isinstance(raw, dict) else {}
    encoding, rate = raw.get("encoding", "PCMU"), raw.get("sample_rate", SAMPLE_RATE)
    if isinstance(encoding, str) and encoding in CODECS and str(rate) == str(SAMPLE_RATE):
        if raw.get("channels", 1) in (1, "1"):
            return media_format(encoding), ""
    shown = "".join(c for c in f"{str(encoding)[:20]}/{str(rate)[:10]}" if c.isprintable())
    return None, f"unsupported media_format {shown}: PCMU or PCMA at 8000 Hz, mono"


def parse_start(message: dict, on_bad, query: dict | None = None) -> StreamStart:
    """Telnyx's ``start``: the top-level ``stream_id``, ``call_control_id``, the agent and template
    variables (``custom_parameters``, then the stream URL's query string) and the media format."""
    start = message.get("start") if isinstance(message.get("start"), dict) else {}
    parameters = {**_parameters(start.get("custom_parameters")), **(query or {})}
    media, refusal = _format(start)
    if refusal:
        on_bad("unsupported_media_format")
    return StreamStart(
        call_sid=str(start.get("call_control_id") or ""),
        stream_sid=str(message.get("stream_id") or ""),
        agent_id=str(parameters.get("agent_id") or "default"),
        variables={k: v for k, v in parameters.items() if k != "agent_id"},
        media=media,
        refusal=refusal,
    )


def sequence_of(message: dict) -> int | None:
    """A frame's ``sequence_number`` (string or number), or ``None`` when it has no usable one."""
    raw = message.get("sequence_number")
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        return None
    if isinstance(raw, str) and not (raw.isascii() and raw.isdigit() and len(raw) <= 19):
        return None
    value = int(raw)
    return value if 0 <= value < MAX_SEQUENCE else None


class Reorder:
    """Puts numbered frames back in ``sequence_number`` order, holding at most ``window`` of them."""

    def __init__(self, on_bad, window: int = REORDER_WINDOW) -> None:
        self._on_bad = on_bad
        self._window = window
        self._next: int | None = None
        self._held: dict[int, dict] = {}

    def push(self, sequence: int, message: dict) -> list[dict]:
        """The frames that can be delivered now that ``message`` (numbered ``sequence``) has arrived."""
        event = message.get("event")
        if event == "start":
            self._next = max(self._next or 0, sequence + 1)
            return [message]
        if event == "stop":
            held = [self._held[key] for key in sorted(self._held)]
            self._held.clear()
            return [*held, message]
        if self._next is None:
            return [message]
        if sequence < self._next or sequence in self._held:
            if event == "media":
                self._on_bad("late_frame" if sequence < self._next else "duplicate_sequence")
                return []
            return [message]
        self._held[sequence] = message
        ready: list[dict] = []
        while self._held:
            if self._next not in self._held:
                if len(self._held) <= self._window:
                    break
                self._on_bad("sequence_gap")
                self._next = min(self._held)
            ready.append(self._held.pop(self._next))
            self._next += 1
        return ready


class TelnyxTransport(CarrierTransport):
    """Telnyx's outbound ``media``, ``mark`` and ``clear``: no stream id on any of them."""

    async def _post(self, message: dict) -> None:
        await self._connection.send_json(message)

    async def send_audio(self, audio: bytes) -> None:
        await self._post({"event": "media", "media": {"payload": base64.b64encode(audio).decode()}})

    async def send_mark(self, name: str) -> bool:
        await self._post({"event": "mark", "mark": {"name": name}})
        return True

    async def clear(self) -> None:
        await self._post({"event": "clear"})


class TelnyxConnection(MediaStreamConnection):
    """One Telnyx media stream."""

    dialect = DIALECT
    sid_key = "stream_id"
    transport_class = TelnyxTransport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._order = Reorder(self.count_bad)

    def parse_start(self, message: dict, on_bad) -> StreamStart:
        return parse_start(message, on_bad, dict(self.ws.query_params))

    async def on_message(self, message: dict) -> None:
        if message.get("event") == "error":
            payload = message.get("payload") if isinstance(message.get("payload"), dict) else {}
            ERRORS.labels(DIALECT, "carrier_error").inc()
            logger.warning(
                "telnyx stream reports error %r: %r", str(payload.get("code"))[:20], str(payload.get("title"))[:200]
            )
            return
        sequence = sequence_of(message)
        if sequence is None and message.get("event") != "stop":
            batch = [message]
        else:
            batch = self._order.push(sequence or 0, message)
        for ready in batch:
            await super().on_message(ready)
            if self._close is not None:
                return


async def serve_telnyx(websocket: WebSocket, context: GatewayContext, limits: Limits) -> None:
    """Serves one Telnyx media stream until ``stop``, disconnect or a limit."""
    await serve(
        websocket,
        limits,
        TelnyxConnection,
        lambda guard: TelnyxConnection(websocket, context, guard, media_format()),
    )
