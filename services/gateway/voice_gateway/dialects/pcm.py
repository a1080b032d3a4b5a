"""Raw PCM call transport (seed 003): ``POST /api/calls/trigger``, then binary PCM16 16 kHz mono both
ways on ``/ws/pcm/{session_id}`` or the seed's path ``/api/pipecat/websocket/{session_id}``.

A session id that was never announced, has expired (not connected within 5 minutes) or is already
connected is closed with code **4404** and the reason ``unknown or expired session``. Text frames
and odd-length frames are counted and ignored; the call goes on. When the agent's ``end_call`` or
``transfer_call`` tool runs, the gateway closes the socket with 1000 (reason ``end_call`` or
``transfer_call``) after the answer has played; the transfer number is in the call log.
"""

from __future__ import annotations

import contextlib
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_audio import Encoding
from voice_gateway.call import CallSession, MediaFormat
from voice_gateway.call_registry import CallRegistry
from voice_gateway.dialects.carrier import MAX_FRAME_BYTES, open_call
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


async def serve(websocket: WebSocket, context: GatewayContext, registry: CallRegistry, session_id: str) -> None:
    """Serves one raw PCM call announced by the trigger endpoint."""
    await websocket.accept()
    pending = await registry.claim(session_id)
    if pending is None:
        await websocket.close(code=UNKNOWN_SESSION, reason="unknown or expired session")
        return
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
        await websocket.close(code=UNKNOWN_AGENT, reason=f"unknown agent {pending['agent_id']!r}")
        return
    try:
        while True:
            try:
                frame = await websocket.receive()
            except WebSocketDisconnect:
                break
            if frame["type"] == "websocket.disconnect":
                break
            data = frame.get("bytes")
            if data is None:
                call.bad_frame("text_frame")
                continue
            if len(data) > MAX_FRAME_BYTES:
                call.bad_frame("oversized_frame")
                continue
            if len(data) % 2:
                call.bad_frame("odd_pcm_length")
            if data:
                call.on_audio(data)
    finally:
        await call.close("completed")
