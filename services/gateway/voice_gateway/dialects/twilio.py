"""Twilio Media Streams, bidirectional (protocols.md §2): the TwiML webhook and the media WebSocket.

``POST /twilio/voice`` answers ``<Connect><Stream>`` pointing at ``/twilio/media`` with the agent id
(and the caller's details) as ``<Parameter>``s. On the socket Twilio sends ``connected``, ``start``,
``media`` (μ-law 8 kHz, base64), ``dtmf``, ``mark`` and ``stop``; the gateway sends ``media``,
``mark`` and ``clear``, each with the ``streamSid``. When ``TWILIO_AUTH_TOKEN`` is set the webhook
checks ``X-Twilio-Signature`` and refuses a bad one with 403.

The URLs in the TwiML, and the URL the signature covers, start with ``GATEWAY_PUBLIC_URL`` when it
is set; otherwise with what the request says (``X-Forwarded-Proto``/``X-Forwarded-Host`` from a
TLS-terminating proxy, else ``Host``), used only when well-formed.

The ``<Connect>`` verb carries ``action="/twilio/after-stream"``: when the agent ends the stream
(its ``end_call`` or ``transfer_call`` tool), Twilio asks that URL what next, and gets ``<Dial>``
with the transfer number or ``<Hangup/>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from xml.sax.saxutils import escape, quoteattr

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from voice_audio import Encoding
from voice_gateway.api.http_security import valid_host
from voice_gateway.api.limits import Limits
from voice_gateway.conversation.call import MediaFormat
from voice_gateway.conversation.session import GatewayContext
from voice_gateway.dialects.base import serve
from voice_gateway.dialects.carrier import MediaStreamConnection, StreamStart
from voice_gateway.storage.registry import CallRegistry

logger = logging.getLogger(__name__)

DIALECT = "twilio"
MEDIA = MediaFormat(encoding=Encoding.MULAW, sample_rate=8000, chunk_bytes=1600, lead_s=0.3)
FORWARDED_PARAMETERS = ("From", "To", "CallSid", "Direction")


def expected_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's request signature: HMAC-SHA1 over the URL and the sorted POST parameters, base64."""
    payload = url + "".join(key + params[key] for key in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def public_base(request: Request, configured: str | None = None) -> str:
    """The gateway's public ``scheme://host[:port]``: ``configured`` (``GATEWAY_PUBLIC_URL``), else the
    request's, honouring a TLS-terminating proxy's X-Forwarded-Proto/Host when they are well-formed."""
    if configured:
        return configured
    proto = request.headers.get("x-forwarded-proto", "")
    proto = proto if proto in ("http", "https") else request.url.scheme
    host = request.headers.get("x-forwarded-host", "")
    host = host if valid_host(host) else request.url.netloc
    return f"{proto}://{host}"


def public_ws_base(request: Request, configured: str | None = None) -> str:
    """:func:`public_base` as a WebSocket origin (``https`` → ``wss``, ``http`` → ``ws``), for answer
    webhooks that tell a carrier where its media stream connects."""
    origin = public_base(request, configured)
    return ("wss:" if origin.startswith("https:") else "ws:") + origin.split(":", 1)[1]


def public_url(request: Request, configured: str | None = None) -> str:
    """The URL Twilio called (what its signature covers); see :func:`public_base`."""
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{public_base(request, configured)}{request.url.path}{query}"


async def _signed_form(request: Request, auth_token: str | None, base: str | None) -> dict[str, str] | Response:
    """The webhook's form parameters, or a 403 response when the signature is wrong."""
    form = {key: str(value) for key, value in (await request.form()).items()}
    if auth_token:
        signature = request.headers.get("x-twilio-signature", "")
        if not hmac.compare_digest(signature, expected_signature(auth_token, public_url(request, base), form)):
            logger.warning("twilio webhook %s refused: bad X-Twilio-Signature", request.url.path)
            return Response("invalid X-Twilio-Signature", status_code=403, media_type="text/plain")
    return form


async def voice_webhook(request: Request, auth_token: str | None, base: str | None = None) -> Response:
    """Answers Twilio's voice webhook with TwiML that connects the call to the media stream."""
    form = await _signed_form(request, auth_token, base)
    if isinstance(form, Response):
        return form
    agent_id = request.query_params.get("agent_id") or form.get("agent_id") or "default"
    stream_url = public_ws_base(request, base) + "/twilio/media"
    action_url = f"{public_base(request, base)}/twilio/after-stream"
    parameters = [("agent_id", agent_id)] + [(key, form[key]) for key in FORWARDED_PARAMETERS if key in form]
    body = "".join(f"<Parameter name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in parameters)
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Connect action={quoteattr(action_url)}><Stream url={quoteattr(stream_url)}>{body}</Stream>"
        "</Connect></Response>"
    )
    return Response(twiml, media_type="application/xml")


async def after_stream_webhook(
    request: Request, auth_token: str | None, registry: CallRegistry | None, base: str | None = None
) -> Response:
    """Twilio asks what to do once the media stream has ended: ``<Dial>`` the number the agent's
    ``transfer_call`` tool chose, or hang up."""
    form = await _signed_form(request, auth_token, base)
    if isinstance(form, Response):
        return form
    number = await registry.transfer_of(form.get("CallSid", "")) if registry is not None else None
    verb = f"<Dial>{escape(number)}</Dial>" if number else "<Hangup/>"
    return Response(f'<?xml version="1.0" encoding="UTF-8"?><Response>{verb}</Response>', media_type="application/xml")


def parse_start(message: dict, on_bad) -> StreamStart:
    """Twilio's ``start``: ``streamSid``, ``customParameters`` (``agent_id`` and template variables)."""
    start = message.get("start") if isinstance(message.get("start"), dict) else {}
    media_format = start.get("mediaFormat") if isinstance(start.get("mediaFormat"), dict) else {}
    if media_format.get("encoding", "audio/x-mulaw") != "audio/x-mulaw":
        on_bad("unsupported_media_format")
    parameters = start.get("customParameters") if isinstance(start.get("customParameters"), dict) else {}
    return StreamStart(
        call_sid=str(start.get("callSid") or parameters.get("CallSid") or ""),
        stream_sid=str(message.get("streamSid") or start.get("streamSid") or ""),
        agent_id=str(parameters.get("agent_id") or parameters.get("agentId") or "default"),
        variables={k: v for k, v in parameters.items() if k not in ("agent_id", "agentId")},
    )


class TwilioConnection(MediaStreamConnection):
    """One Twilio media stream."""

    dialect = DIALECT
    sid_key = "streamSid"

    def parse_start(self, message: dict, on_bad) -> StreamStart:
        return parse_start(message, on_bad)


async def serve_twilio(websocket: WebSocket, context: GatewayContext, limits: Limits) -> None:
    """Serves one Twilio media stream until ``stop``, disconnect or a limit."""
    await serve(websocket, limits, TwilioConnection, lambda guard: TwilioConnection(websocket, context, guard, MEDIA))
