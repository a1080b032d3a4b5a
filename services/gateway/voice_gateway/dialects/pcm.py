"""Raw PCM call transport (seed 003): ``POST /api/calls/trigger``, then binary PCM16 16 kHz mono both
ways on ``/ws/pcm/{session_id}`` or the seed's path ``/api/pipecat/websocket/{session_id}``.

A session id that was never announced, has expired (not connected within 5 minutes) or is already
connected is closed with code **4404** and the reason ``unknown or expired session``. Text frames
and odd-length frames are counted and ignored; the call goes on. The gateway's limits close the
socket: 1013 when the gateway, or the API key that triggered the call, is at its maximum of
sessions; 1009 for a frame over ``GATEWAY_MAX_FRAME_BYTES``; 1008 past the message rate or the idle
timeout. There is no handshake to wait for: the trigger request was it. When the agent's ``end_call`` or
``transfer_call`` tool runs, the gateway closes the socket with 1000 (reason ``end_call`` or
``transfer_call``) after the answer has played; the transfer number is in the call log.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_audio import Encoding
from voice_gateway.call import CallSession, MediaFormat
from voice_gateway.call_registry import CallRegistry
from voice_gateway.dialects.carrier import open_call
from voice_gateway.limits import ConnectionGuard, LimitExceeded, Limits, close_socket
from voice_gateway.session import GatewayContext
from voice_gateway.tools import CallAction

logger = logging.getLogger(__name__)

DIALECT = "pcm"
MEDIA = MediaFormat(encoding=Encoding.PCM16, sample_rate=16000, chunk_bytes=640, lead_s=0.06)
UNKNOWN_SESSION = 4404
UNKNOWN_AGENT = 4422


class PcmTransport:
    """Sends agent audio as binary frames; there are no marks and ``clear`` is simply to stop sending."""

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket

    async def send_audio(self, audio: bytes) -> None:
        if self._websocket.application_state == WebSocketState.CONNECTED:
            try:
                await self._websocket.send_bytes(audio)
            except (RuntimeError, WebSocketDisconnect):
                pass

    async def send_mark(self, name: str) -> bool:
        return False

    async def clear(self) -> None:
        return None

    async def hang_up(self, action: CallAction) -> None:
        """Closes the socket normally (1000); a transfer has no in-band form here and is in the call log."""
        if self._websocket.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self._websocket.close(code=1000, reason=action.kind)


async def serve(
    websocket: WebSocket, context: GatewayContext, registry: CallRegistry, limits: Limits, session_id: str
) -> None:
    """Serves one raw PCM call announced by the trigger endpoint, until disconnect or a limit."""
    await websocket.accept()
    try:
        guard = limits.admit(websocket, DIALECT, handshake=False)
    except LimitExceeded as exc:
        await close_socket(websocket, exc.close_code, exc.reason)
        return
    async with guard:
        try:
            pending = await registry.claim(session_id)
            if pending is None:
                await close_socket(websocket, UNKNOWN_SESSION, "unknown or expired session")
                return
            if pending.get("owner"):
                guard.bind_key(pending["owner"])
            await _serve_call(websocket, context, guard, pending, session_id)
        except LimitExceeded as exc:
            logger.warning("pcm call %s closed: %s", session_id, exc.reason)
            await close_socket(websocket, exc.close_code, exc.reason)


async def _serve_call(
    websocket: WebSocket, context: GatewayContext, guard: ConnectionGuard, pending: dict[str, Any], session_id: str
) -> None:
    call: CallSession | None = await open_call(
        context,
        DIALECT,
        pending["agent_id"],
        pending.get("variables") or {},
        MEDIA,
        PcmTransport(websocket),
        session_id=session_id,
    )
    if call is None:
        await close_socket(websocket, UNKNOWN_AGENT, f"unknown agent {pending['agent_id']!r}")
        return
    try:
        while True:
            try:
                frame = await guard.receive()
            except WebSocketDisconnect:
                break
            if frame["type"] == "websocket.disconnect":
                break
            data = frame.get("bytes")
            if data is None:
                call.bad_frame("text_frame")
                continue
            if len(data) % 2:
                call.bad_frame("odd_pcm_length")
            if data:
                call.on_audio(data)
    finally:
        await call.close("completed")
