"""What the telephony dialects share: reading JSON frames, counting the bad ones, opening the call."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_gateway.call import BAD_FRAMES, CallSession, CallTransport, MediaFormat
from voice_gateway.session import GatewayContext, Session
from voice_gateway.templates import personalise

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 256 * 1024
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


async def frames(websocket: WebSocket, dialect: str, on_bad) -> Any:
    """Yields each inbound JSON object; malformed, binary and oversized frames are counted and skipped."""
    while True:
        try:
            frame = await websocket.receive()
        except WebSocketDisconnect:
            return
        if frame["type"] == "websocket.disconnect":
            return
        if frame.get("bytes") is not None:
            on_bad("binary_frame")
            continue
        text = frame.get("text") or ""
        if len(text) > MAX_FRAME_BYTES:
            on_bad("oversized_frame")
            continue
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
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
    return stream_sid if stream_sid and _SAFE_ID.match(stream_sid) else None


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
