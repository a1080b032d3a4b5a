"""What the telephony dialects share: reading JSON frames, counting the bad ones, opening the call.

Bad frames (malformed JSON, binary frames, unknown events, bad payloads) are counted and skipped: the
call goes on. The gateway's limits close the stream instead, since a carrier has no error event:
1013 when the gateway is full, 1009 for a frame over ``GATEWAY_MAX_FRAME_BYTES``, 1008 without a
``start`` within the handshake timeout, after the idle timeout, or past the message rate.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_audio import Encoding
from voice_gateway.call import BAD_FRAMES, CallSession, CallTransport, MediaFormat
from voice_gateway.call_registry import CallRegistry
from voice_gateway.limits import ConnectionGuard, LimitExceeded, Limits, close_socket
from voice_gateway.messages import InvalidJson, parse_json
from voice_gateway.session import ERRORS, GatewayContext, Session
from voice_gateway.templates import personalise
from voice_gateway.tools import CallAction

logger = logging.getLogger(__name__)

MAX_MEDIA_PAYLOAD_BYTES = 64 * 1024
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class JsonSocket:
    """Sends JSON frames on a WebSocket, dropping them once the socket is gone."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def send(self, message: dict) -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            try:
                await self.websocket.send_text(json.dumps(message, separators=(",", ":")))
            except (RuntimeError, WebSocketDisconnect):
                pass


async def frames(guard: ConnectionGuard, on_bad: Callable[[str], None]) -> AsyncIterator[dict]:
    """Yields each inbound JSON object until the peer goes away; malformed and binary frames are counted
    and skipped.

    Raises:
        LimitExceeded: From :meth:`ConnectionGuard.receive` (too big, too fast, too slow).
    """
    while True:
        try:
            frame = await guard.receive()
        except WebSocketDisconnect:
            return
        if frame["type"] == "websocket.disconnect":
            return
        if frame.get("bytes") is not None:
            on_bad("binary_frame")
            continue
        try:
            message = parse_json(frame.get("text") or "")
        except InvalidJson:
            on_bad("invalid_json")
            continue
        if not isinstance(message, dict):
            on_bad("not_an_object")
            continue
        yield message


def decode_payload(payload: Any, on_bad) -> bytes | None:
    """The audio bytes of a base64 ``media.payload``, or ``None`` (counted) when it is malformed."""
    if not isinstance(payload, str) or not payload:
        on_bad("missing_payload")
        return None
    if len(payload) > MAX_MEDIA_PAYLOAD_BYTES * 4 // 3 + 4:
        on_bad("oversized_payload")
        return None
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        on_bad("invalid_base64")
        return None


def safe_id(stream_sid: str) -> str | None:
    """The carrier's stream id as the call's session id (so its call log is found by it), if it is usable."""
    return stream_sid if stream_sid and _SAFE_ID.fullmatch(stream_sid) else None


def bad_frame_counter(dialect: str, call_ref: list[CallSession | None]):
    """A callback that counts a bad frame on the call (or the dialect, before the call exists) and logs it."""

    def on_bad(kind: str) -> None:
        call = call_ref[0]
        if call is not None:
            call.bad_frame(kind)
        else:
            BAD_FRAMES.labels(dialect, kind).inc()
        logger.warning("%s: %s frame ignored", dialect, kind)

    return on_bad


async def open_call(
    context: GatewayContext,
    dialect: str,
    agent_id: str,
    variables: dict,
    media: MediaFormat,
    transport: CallTransport,
    session_id: str | None = None,
) -> CallSession | None:
    """Starts a call with the agent (its prompt and greeting personalised); ``None`` for an unknown agent."""
    agent = await context.agents.get(agent_id)
    if agent is None:
        return None
    session = Session(context, personalise(agent, variables), dialect, session_id=session_id)
    call = CallSession(context, session, media, transport)
    await call.start()
    return call


class CarrierTransport:
    """Sends agent audio, marks and ``clear`` as JSON events carrying the stream id under ``sid_key``
    (Twilio's ``streamSid``, Exotel's ``stream_sid``)."""

    def __init__(self, socket: JsonSocket, sid_key: str, registry: CallRegistry | None = None) -> None:
        self._socket = socket
        self._sid_key = sid_key
        self._registry = registry
        self.stream_sid = ""
        self.call_sid = ""

    async def send_audio(self, audio: bytes) -> None:
        payload = base64.b64encode(audio).decode()
        await self._socket.send({"event": "media", self._sid_key: self.stream_sid, "media": {"payload": payload}})

    async def send_mark(self, name: str) -> bool:
        await self._socket.send({"event": "mark", self._sid_key: self.stream_sid, "mark": {"name": name}})
        return True

    async def clear(self) -> None:
        await self._socket.send({"event": "clear", self._sid_key: self.stream_sid})

    async def hang_up(self, action: CallAction) -> None:
        """Closes the media stream (1000). A transfer is noted under the carrier's call id first, for the
        carrier's next step to read (Twilio's ``<Connect action>``, Exotel's dynamic Connect URL)."""
        if action.kind == "transfer_call" and self._registry is not None and self.call_sid:
            try:
                await self._registry.note_transfer(self.call_sid, action.number)
            except Exception:
                logger.exception("transfer of call %s could not be noted", self.call_sid)
                ERRORS.labels("carrier", "transfer_not_noted").inc()
        websocket = self._socket.websocket
        if websocket.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await websocket.close(code=1000, reason=action.kind)


@dataclass(frozen=True)
class StreamStart:
    """What a carrier's ``start`` event says about the call."""

    stream_sid: str
    agent_id: str
    variables: dict
    call_sid: str = ""


async def serve_media_stream(
    websocket: WebSocket,
    context: GatewayContext,
    limits: Limits,
    *,
    dialect: str,
    media: MediaFormat,
    sid_key: str,
    parse_start: Callable[[dict, Callable[[str], None]], StreamStart],
) -> None:
    """Serves a carrier media stream (Twilio, Exotel): ``connected``, ``start``, ``media``, ``dtmf``,
    ``mark``, ``stop`` in; ``media``, ``mark``, ``clear`` out. Bad frames are counted, never fatal; a
    limit closes the stream with its code."""
    try:
        guard = limits.admit(websocket, dialect)
    except LimitExceeded as exc:
        await close_socket(websocket, exc.close_code, exc.reason)
        return
    async with guard:
        try:
            await _serve_stream(websocket, context, guard, dialect, media, sid_key, parse_start)
        except LimitExceeded as exc:
            logger.warning("%s stream closed: %s", dialect, exc.reason)
            await close_socket(websocket, exc.close_code, exc.reason)
    await close_socket(websocket, 1000)


async def _serve_stream(
    websocket: WebSocket,
    context: GatewayContext,
    guard: ConnectionGuard,
    dialect: str,
    media: MediaFormat,
    sid_key: str,
    parse_start: Callable[[dict, Callable[[str], None]], StreamStart],
) -> None:
    transport = CarrierTransport(JsonSocket(websocket), sid_key, context.registry)
    call_ref: list[CallSession | None] = [None]
    on_bad = bad_frame_counter(dialect, call_ref)
    status = "disconnected"
    try:
        async for message in frames(guard, on_bad):
            event = message.get("event")
            call = call_ref[0]
            if event == "media":
                payload = message.get("media") if isinstance(message.get("media"), dict) else {}
                if call is None:
                    on_bad("media_before_start")
                elif payload.get("track", "inbound") == "inbound":
                    audio = decode_payload(payload.get("payload"), on_bad)
                    if audio and media.encoding == Encoding.PCM16 and len(audio) % 2:
                        on_bad("odd_pcm_length")
                    if audio:
                        call.on_audio(audio)
            elif event == "start":
                start = parse_start(message, on_bad)
                if call is not None:
                    on_bad("duplicate_start")
                    continue
                transport.stream_sid = start.stream_sid
                transport.call_sid = start.call_sid if _SAFE_ID.fullmatch(start.call_sid) else ""
                call_ref[0] = await open_call(
                    context,
                    dialect,
                    start.agent_id,
                    start.variables,
                    media,
                    transport,
                    session_id=safe_id(start.stream_sid),
                )
                if call_ref[0] is None:
                    logger.warning("%s stream %s: unknown agent %r; closing", dialect, start.stream_sid, start.agent_id)
                    await close_socket(websocket, 1008, f"unknown agent {start.agent_id!r}")
                    return
                guard.handshake_done()
            elif event in ("mark", "dtmf"):
                body = message.get(event)
                if call is not None and isinstance(body, dict):
                    if event == "mark":
                        call.on_mark(str(body.get("name", "")))
                    else:
                        call.on_dtmf(str(body.get("digit", "")))
            elif event == "stop":
                status = "completed"
                break
            elif event != "connected":
                on_bad("unknown_event")
    finally:
        if call_ref[0] is not None:
            await call_ref[0].close(status)
