"""Vonage Voice API WebSocket (protocols.md §4.3): the NCCO answer webhook and the media WebSocket.

``/vonage/answer`` (GET with query parameters, or POST with a JSON body) answers an NCCO ``connect``
action to a ``websocket`` endpoint ``wss://…/vonage/media`` whose ``headers`` carry ``agent_id`` and the
call's ``uuid``, ``from`` and ``to``; ``?content_type=`` picks ``audio/l16;rate=16000`` (the default) or
``audio/l16;rate=8000``.

On the socket the first message is text, ``{"event": "websocket:connected", "content-type": …}`` with the
headers flattened into it; every later audio message is a binary frame of 16-bit little-endian PCM at
that rate. Text events: ``websocket:dtmf`` (``digit``, or ``dtmf.digit``), ``websocket:notify`` (a notify
was played: its ``payload.mark``), ``websocket:cleared``. There are no ids on the socket besides the
headers, no ``start`` and no ``stop``: the socket closing ends the call. The gateway sends binary frames
of exactly 20 ms (640 B at 16 kHz, 320 B at 8 kHz; the last one zero-padded), ``{"action": "notify",
"payload": {"mark": …}}`` after each sentence and ``{"action": "clear"}`` on barge-in. An unsupported
``content-type`` closes the stream with 1003, the reason in the call's log; the call's log id is the
call's ``uuid``.

When ``VONAGE_SIGNATURE_SECRET`` is set the answer webhook must carry Vonage's signed-callback JWT in
``Authorization: Bearer``: HS256 with that secret, not expired, and, for a request with a body, a
``payload_hash`` claim equal to the body's SHA-256; otherwise 403.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from voice_audio import Encoding
from voice_gateway.api.limits import Limits
from voice_gateway.conversation.call import MediaFormat
from voice_gateway.conversation.session import GatewayContext
from voice_gateway.dialects.base import serve
from voice_gateway.dialects.carrier import CarrierTransport, MediaStreamConnection, StreamStart
from voice_gateway.dialects.twilio import public_ws_base

logger = logging.getLogger(__name__)

DIALECT = "vonage"
MEDIA_PATH = "/vonage/media"
DEFAULT_CONTENT_TYPE = "audio/l16;rate=16000"
# Exact 20 ms frames both ways.
MEDIA_FORMATS = {
    "audio/l16;rate=16000": MediaFormat(encoding=Encoding.PCM16, sample_rate=16000, chunk_bytes=640, pad_to=640),
    "audio/l16;rate=8000": MediaFormat(encoding=Encoding.PCM16, sample_rate=8000, chunk_bytes=320, pad_to=320),
}
FORWARDED_FIELDS = ("uuid", "conversation_uuid", "from", "to")
MAX_HEADERS_BYTES = 512
CLOCK_SKEW_S = 300
_HEADER_VALUE = re.compile(r"^[A-Za-z0-9_+.:@-]{1,128}$")
_CONTROL = frozenset({"event", "content-type"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_jwt(secret: str, claims: Mapping[str, object]) -> str:
    """An HS256 JWT of ``claims`` (what Vonage sends; the tests and ``voicectl`` sign with it)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(signature)}"


def jwt_problem(token: str, secret: str, body: bytes, now: float | None = None) -> str:
    """Why Vonage's signed-callback JWT ``token`` is not valid for a request with ``body``; ``""`` if it is."""
    parts = token.split(".")
    if len(parts) != 3:
        return "not a JWT"
    try:
        header, claims = json.loads(_unb64url(parts[0])), json.loads(_unb64url(parts[1]))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return "malformed JWT"
    if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
        return "not an HS256 JWT"
    expected = _b64url(hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected.encode(), parts[2].encode()):
        return "bad signature"
    now = time.time() if now is None else now
    exp, iat = claims.get("exp"), claims.get("iat")
    if isinstance(exp, int | float) and not isinstance(exp, bool) and exp < now - CLOCK_SKEW_S:
        return "expired"
    if isinstance(iat, int | float) and not isinstance(iat, bool) and iat > now + CLOCK_SKEW_S:
        return "issued in the future"
    if body and claims.get("payload_hash") != hashlib.sha256(body).hexdigest():
        return "payload_hash does not match the body"
    return ""


async def answer_webhook(request: Request, signature_secret: str | None, base: str | None = None) -> Response:
    """Answers Vonage's answer URL with an NCCO that connects the call to the media WebSocket."""
    body = await request.body() if request.method == "POST" else b""
    if signature_secret:
        authorization = request.headers.get("authorization", "")
        token = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        problem = jwt_problem(token, signature_secret, body) if token else "no Authorization: Bearer JWT"
        if problem:
            logger.warning("vonage webhook %s refused: %s", request.url.path, problem)
            return Response(f"invalid Vonage signature: {problem}", status_code=403, media_type="text/plain")
    fields: dict[str, str] = {key: value for key, value in request.query_params.items()}
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            return Response("the body must be a JSON object", status_code=400, media_type="text/plain")
        if not isinstance(parsed, dict):
            return Response("the body must be a JSON object", status_code=400, media_type="text/plain")
        fields.update({k: str(v) for k, v in parsed.items() if isinstance(v, str | int | float)})
    content_type = fields.get("content_type") or DEFAULT_CONTENT_TYPE
    if content_type not in MEDIA_FORMATS:
        return Response(
            f"content_type must be one of {', '.join(MEDIA_FORMATS)}", status_code=400, media_type="text/plain"
        )
    agent_id = fields.get("agent_id") or "default"
    headers = {"agent_id": agent_id}
    for key in FORWARDED_FIELDS:
        value = fields.get(key, "")
        if _HEADER_VALUE.fullmatch(value) and len(json.dumps({**headers, key: value})) <= MAX_HEADERS_BYTES:
            headers[key] = value
    uri = public_ws_base(request, base) + MEDIA_PATH
    endpoint = {"type": "websocket", "uri": uri, "content-type": content_type, "headers": headers}
    return JSONResponse([{"action": "connect", "endpoint": [endpoint]}])


def parse_connected(message: dict, on_bad: Callable[[str], None], query: Mapping[str, str]) -> StreamStart:
    """Vonage's ``websocket:connected``: the ``content-type`` and the NCCO's headers, flattened."""
    raw = message.get("content-type")
    content_type = raw.replace(" ", "").lower() if isinstance(raw, str) else ""
    refusal = ""
    if content_type not in MEDIA_FORMATS:
        on_bad("unsupported_media_format")
        refusal = f"unsupported content-type {content_type[:60]!r}; expected one of {', '.join(MEDIA_FORMATS)}"
    headers = {k: v for k, v in message.items() if k not in _CONTROL and isinstance(v, str | int | float)}
    parameters = {**{k: str(v) for k, v in headers.items()}, **query}
    return StreamStart(
        call_sid=parameters.get("uuid", ""),
        stream_sid=parameters.get("uuid", ""),
        agent_id=parameters.get("agent_id") or "default",
        variables={k: v for k, v in parameters.items() if k != "agent_id"},
        media=MEDIA_FORMATS.get(content_type),
        refusal=refusal,
    )


class VonageTransport(CarrierTransport):
    """Vonage's side: agent audio as binary frames, ``notify`` as marks, ``clear``."""

    async def send_audio(self, audio: bytes) -> None:
        await self._connection.send_bytes(audio)

    async def send_mark(self, name: str) -> bool:
        await self._send({"action": "notify", "payload": {"mark": name}})
        return True

    async def clear(self) -> None:
        await self._send({"action": "clear"})


class VonageConnection(MediaStreamConnection):
    """One Vonage Voice API WebSocket."""

    dialect = DIALECT
    transport_class = VonageTransport
    closed_status = "completed"

    def parse_start(self, message: dict, on_bad) -> StreamStart:
        return parse_connected(message, on_bad, dict(self.ws.query_params))

    async def on_message(self, message: dict) -> None:
        event, call = message.get("event"), self._call
        if event == "websocket:connected":
            await self._start(message)
        elif event == "websocket:dtmf":
            nested = message.get("dtmf") if isinstance(message.get("dtmf"), dict) else {}
            digit = message.get("digit", nested.get("digit", ""))
            if call is not None and isinstance(digit, str | int) and not isinstance(digit, bool):
                call.on_dtmf(str(digit))
        elif event == "websocket:notify":
            payload = message.get("payload")
            if call is not None and isinstance(payload, dict):
                call.on_mark(str(payload.get("mark", "")))
        elif event != "websocket:cleared":
            self.count_bad("unknown_event")

    async def on_binary(self, data: bytes) -> None:
        if self._call is None:
            self.count_bad("media_before_start")
            return
        if len(data) % 2:
            self.count_bad("odd_pcm_length")
        if data:
            self._call.on_audio(data)


async def serve_vonage(websocket: WebSocket, context: GatewayContext, limits: Limits) -> None:
    """Serves one Vonage WebSocket until it closes or a limit is hit."""
    media = MEDIA_FORMATS[DEFAULT_CONTENT_TYPE]
    await serve(websocket, limits, VonageConnection, lambda guard: VonageConnection(websocket, context, guard, media))
