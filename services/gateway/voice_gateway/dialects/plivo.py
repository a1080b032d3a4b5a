"""Plivo Audio Streaming, bidirectional (protocols.md §4.2): the answer XML and the media WebSocket.

``/plivo/answer`` (GET or POST) answers ``<Stream bidirectional="true" keepCallAlive="true"
contentType="…">`` whose text is ``wss://…/plivo/media?agent_id=…``; the agent id and the caller's
details also travel in ``extraHeaders``. ``?content_type=`` on the answer URL picks the audio:
``audio/x-mulaw;rate=8000`` (the default), ``audio/x-l16;rate=8000`` or ``audio/x-l16;rate=16000``.

On the socket Plivo sends ``start`` (``start.streamId``, ``start.callId``, ``start.mediaFormat``), ``media``
(base64 μ-law or 16-bit little-endian PCM, as ``mediaFormat`` says), ``dtmf``, ``playedStream`` (a checkpoint
was played) and ``clearedAudio``; there is no ``connected`` and no ``stop``: the socket closing ends the
call. ``sequenceNumber`` is a number. The gateway sends ``playAudio`` (with ``contentType`` and
``sampleRate``), ``checkpoint`` after each sentence, and ``clearAudio`` on barge-in, each with the
``streamId``. A ``mediaFormat`` the gateway cannot serve closes the stream with 1003, the reason recorded
in the call's log.

When ``PLIVO_AUTH_TOKEN`` is set the answer webhook checks Plivo's V3 signature
(``X-Plivo-Signature-V3``, ``X-Plivo-Signature-V3-Nonce``) and refuses a bad one with 403. The URL it
covers starts with ``GATEWAY_PUBLIC_URL`` when set (as for Twilio).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Mapping
from xml.sax.saxutils import escape

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from voice_audio import Encoding
from voice_gateway.api.limits import Limits
from voice_gateway.conversation.call import MediaFormat
from voice_gateway.conversation.session import GatewayContext
from voice_gateway.dialects.base import serve
from voice_gateway.dialects.carrier import CarrierTransport, MediaStreamConnection, StreamStart
from voice_gateway.dialects.twilio import public_url, public_ws_base

logger = logging.getLogger(__name__)

DIALECT = "plivo"
MEDIA_PATH = "/plivo/media"
DEFAULT_CONTENT_TYPE = "audio/x-mulaw;rate=8000"
# Outbound chunks of 200 ms; L16 chunks are zero-padded to whole 20 ms frames (μ-law is never padded:
# a zero byte is not silence in μ-law).
MEDIA_FORMATS = {
    "audio/x-mulaw;rate=8000": MediaFormat(encoding=Encoding.MULAW, sample_rate=8000, chunk_bytes=1600),
    "audio/x-l16;rate=8000": MediaFormat(encoding=Encoding.PCM16, sample_rate=8000, chunk_bytes=3200, pad_to=320),
    "audio/x-l16;rate=16000": MediaFormat(encoding=Encoding.PCM16, sample_rate=16000, chunk_bytes=6400, pad_to=640),
}
FORWARDED_PARAMETERS = ("From", "To", "CallUUID", "Direction")
_HEADER_VALUE = re.compile(r"^[A-Za-z0-9_+.:@-]{1,128}$")


def signature_base(method: str, url: str, params: Mapping[str, str]) -> str:
    """What Plivo's V3 signature covers, before the nonce: the URL without its query, then ``?`` and the
    query parameters sorted (``k=v`` joined by ``&``), and for a POST a ``.`` and the body parameters
    sorted (``kv`` concatenated), as Plivo's SDKs build it."""
    parts = urllib.parse.urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    body = dict(params) if method.upper() == "POST" else {}
    if method.upper() != "POST":
        query.update(params)
    query_string = "&".join(f"{key}={value}" for key, value in sorted(query.items()))
    if query_string or body:
        base += "?" + query_string
    if query_string and body:
        base += "."
    return base + "".join(f"{key}{body[key]}" for key in sorted(body))


def expected_signature(auth_token: str, method: str, url: str, params: Mapping[str, str], nonce: str) -> str:
    """Plivo's ``X-Plivo-Signature-V3``: HMAC-SHA256 with the auth token over ``base + "." + nonce``, base64."""
    payload = f"{signature_base(method, url, params)}.{nonce}".encode()
    return base64.b64encode(hmac.new(auth_token.encode(), payload, hashlib.sha256).digest()).decode()


def signature_ok(auth_token: str, method: str, url: str, params: Mapping[str, str], headers: Mapping[str, str]) -> bool:
    """Whether one of the (comma-separated) V3 signatures in ``headers`` is right."""
    nonce = headers.get("x-plivo-signature-v3-nonce", "")
    given = headers.get("x-plivo-signature-v3", "")
    if not nonce or not given:
        return False
    expected = expected_signature(auth_token, method, url, params, nonce)
    return any(hmac.compare_digest(expected.encode(), candidate.strip().encode()) for candidate in given.split(","))


async def answer_webhook(request: Request, auth_token: str | None, base: str | None = None) -> Response:
    """Answers Plivo's answer URL with ``<Stream>`` XML connecting the call to the media WebSocket."""
    params = {key: str(value) for key, value in (await request.form()).items()} if request.method == "POST" else {}
    if auth_token and not signature_ok(auth_token, request.method, public_url(request, base), params, request.headers):
        logger.warning("plivo webhook %s refused: bad X-Plivo-Signature-V3", request.url.path)
        return Response("invalid X-Plivo-Signature-V3", status_code=403, media_type="text/plain")
    fields = {**dict(request.query_params), **params}
    content_type = fields.get("content_type") or DEFAULT_CONTENT_TYPE
    if content_type not in MEDIA_FORMATS:
        return Response(
            f"content_type must be one of {', '.join(MEDIA_FORMATS)}", status_code=400, media_type="text/plain"
        )
    agent_id = fields.get("agent_id") or "default"
    stream_url = public_ws_base(request, base) + MEDIA_PATH
    stream_url += "?" + urllib.parse.urlencode({"agent_id": agent_id})
    headers = [("agent_id", agent_id)] + [(key, fields[key]) for key in FORWARDED_PARAMETERS if key in fields]
    extra = ",".join(f"{key}={value}" for key, value in headers if _HEADER_VALUE.fullmatch(value))
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><Response>'
        f'<Stream bidirectional="true" keepCallAlive="true" audioTrack="inbound" contentType="{content_type}"'
        f' extraHeaders="{extra}">{escape(stream_url)}</Stream></Response>'
    )
    return Response(xml, media_type="application/xml")


def extra_headers(raw: object) -> dict[str, str]:
    """Plivo's ``extra_headers``: a JSON object, or ``a=1,b=2``; anything else is empty."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items() if isinstance(v, str | int | float)}
    if not isinstance(raw, str):
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return extra_headers(parsed)
    pairs = (item.split("=", 1) for item in raw.split(",") if "=" in item)
    return {key.strip(): value.strip() for key, value in pairs if key.strip()}


def content_type_of(media_format: object) -> str:
    """``start.mediaFormat`` as a ``contentType`` (``audio/x-l16;rate=16000``); ``""`` when unreadable."""
    if not isinstance(media_format, dict):
        return ""
    encoding, rate = media_format.get("encoding"), media_format.get("sampleRate")
    if not isinstance(encoding, str) or isinstance(rate, bool) or not isinstance(rate, int | float | str):
        return ""
    if isinstance(rate, float) and rate.is_integer():
        rate = int(rate)
    return f"{encoding.strip().lower()};rate={str(rate).strip()}"


def parse_start(message: dict, on_bad: Callable[[str], None], query: Mapping[str, str]) -> StreamStart:
    """Plivo's ``start``: ``streamId``, ``callId``, ``mediaFormat`` (μ-law 8 kHz when absent), the agent and
    template variables from the stream URL's query and ``extra_headers``."""
    start = message.get("start") if isinstance(message.get("start"), dict) else {}
    headers = extra_headers(start.get("extra_headers", message.get("extra_headers")))
    parameters = {**headers, **query}
    media = DEFAULT_CONTENT_TYPE
    if "mediaFormat" in start:
        media = content_type_of(start["mediaFormat"])
    refusal = ""
    if media not in MEDIA_FORMATS:
        on_bad("unsupported_media_format")
        refusal = f"unsupported mediaFormat {media[:60]!r}; expected one of {', '.join(MEDIA_FORMATS)}"
    stream_id = start.get("streamId") or message.get("streamId") or ""
    return StreamStart(
        call_sid=str(start.get("callId") or headers.get("CallUUID") or ""),
        stream_sid=str(stream_id) if isinstance(stream_id, str) else "",
        agent_id=str(parameters.get("agent_id") or "default"),
        variables={k: v for k, v in parameters.items() if k != "agent_id"},
        media=MEDIA_FORMATS.get(media),
        refusal=refusal,
    )


class PlivoTransport(CarrierTransport):
    """Plivo's verbs: ``playAudio`` (with the call's ``contentType``/``sampleRate``), ``checkpoint`` and
    ``clearAudio``, each with the ``streamId``."""

    async def send_audio(self, audio: bytes) -> None:
        media = self._connection.media
        await self._send(
            {
                "event": "playAudio",
                "streamId": self.stream_sid,
                "media": {
                    "contentType": "audio/x-mulaw" if media.encoding == Encoding.MULAW else "audio/x-l16",
                    "sampleRate": media.sample_rate,
                    "payload": base64.b64encode(audio).decode(),
                },
            }
        )

    async def send_mark(self, name: str) -> bool:
        await self._send({"event": "checkpoint", "streamId": self.stream_sid, "name": name})
        return True

    async def clear(self) -> None:
        await self._send({"event": "clearAudio", "streamId": self.stream_sid})


class PlivoConnection(MediaStreamConnection):
    """One Plivo audio stream."""

    dialect = DIALECT
    sid_key = "streamId"
    transport_class = PlivoTransport
    closed_status = "completed"

    @property
    def media(self) -> MediaFormat:
        """The call's audio format (the ``start``'s, once it came)."""
        return self._media

    def parse_start(self, message: dict, on_bad) -> StreamStart:
        return parse_start(message, on_bad, dict(self.ws.query_params))

    async def on_message(self, message: dict) -> None:
        event = message.get("event")
        if event == "playedStream":
            if self._call is not None:
                self._call.on_mark(str(message.get("name", "")))
        elif event == "clearedAudio":
            return
        elif event in ("connected", "mark"):
            self.count_bad("unknown_event")
        else:
            await super().on_message(message)


async def serve_plivo(websocket: WebSocket, context: GatewayContext, limits: Limits) -> None:
    """Serves one Plivo audio stream until the socket closes or a limit is hit."""
    media = MEDIA_FORMATS[DEFAULT_CONTENT_TYPE]
    await serve(websocket, limits, PlivoConnection, lambda guard: PlivoConnection(websocket, context, guard, media))
