"""Raw PCM call transport (seed 003): ``POST /api/calls/trigger``, then binary PCM16 16 kHz mono both
ways on ``/ws/pcm/{session_id}`` or the seed's path ``/api/pipecat/websocket/{session_id}``.

A session id that was never announced, has expired (not connected within 5 minutes) or is already
connected is closed with code **4404** and the reason ``unknown or expired session``; one under which
a call log already exists (the gateway issued the id, so no other log may have it) is closed with
4404 too, reason ``session id already in use``, and that log is left as it is. Text frames
and odd-length frames are counted and ignored; the call goes on. The gateway's limits close the
socket: 1013 when the gateway, or the API key that triggered the call, is at its maximum of
sessions; 1009 for a frame over ``GATEWAY_MAX_FRAME_BYTES``; 1008 past the message rate or the idle
timeout. There is no handshake to wait for: the trigger request was it. When the agent's ``end_call`` or
``transfer_call`` tool runs, the gateway closes the socket with 1000 (reason ``end_call`` or
``transfer_call``) after the answer has played; the transfer number is in the call log.
"""

from __future__ import annotations

import logging

from starlette.websockets import WebSocket

from voice_audio import Encoding
from voice_gateway.agents.templates import personalise
from voice_gateway.agents.tools import CallAction
from voice_gateway.api.limits import ConnectionGuard, LimitExceeded, Limits, close_socket
from voice_gateway.conversation.call import CallSession, MediaFormat
from voice_gateway.conversation.session import REFUSE, GatewayContext, Session
from voice_gateway.dialects.base import Connection, serve
from voice_gateway.storage.call_log import CallLogExists
from voice_gateway.storage.registry import CallRegistry

logger = logging.getLogger(__name__)

DIALECT = "pcm"
MEDIA = MediaFormat(encoding=Encoding.PCM16, sample_rate=16000, chunk_bytes=640, lead_s=0.06)
UNKNOWN_SESSION = 4404
UNKNOWN_AGENT = 4422


class PcmConnection(Connection):
    """One raw PCM call: binary frames are the caller's audio; the agent's audio goes back the same way,
    there are no marks, and ``clear`` is simply to stop sending."""

    dialect = DIALECT

    def __init__(
        self,
        websocket: WebSocket,
        context: GatewayContext,
        registry: CallRegistry,
        guard: ConnectionGuard,
        session_id: str,
    ) -> None:
        super().__init__(websocket, guard)
        self._context = context
        self._registry = registry
        self._session_id = session_id
        self._call: CallSession | None = None

    async def send_audio(self, audio: bytes) -> None:
        await self.send_bytes(audio)

    async def send_mark(self, name: str) -> bool:
        return False

    async def clear(self) -> None:
        return None

    async def hang_up(self, action: CallAction) -> None:
        """Closes the socket normally (1000); a transfer has no in-band form here and is in the call log."""
        await close_socket(self.ws, 1000, action.kind)

    async def opened(self) -> None:
        """Claims the announced call (4404 when it is unknown, expired or already connected), binds the
        API key that triggered it, and starts the call under the issued id (4404 when a log has it)."""
        pending = await self._registry.claim(self._session_id)
        if pending is None:
            self.close(UNKNOWN_SESSION, "unknown or expired session")
            return
        if pending.get("owner"):
            try:
                self.guard.bind_key(pending["owner"])
            except LimitExceeded as exc:
                logger.warning("pcm call %s closed: %s", self._session_id, exc.reason)
                self.close(exc.close_code, exc.reason)
                return
        agent = await self._context.agents.get(pending["agent_id"])
        if agent is None:
            self.close(UNKNOWN_AGENT, f"unknown agent {pending['agent_id']!r}")
            return
        variables = pending.get("variables") or {}
        session = Session(
            self._context, personalise(agent, variables), DIALECT, session_id=self._session_id, on_collision=REFUSE
        )
        call = CallSession(session, MEDIA, self)
        try:
            await call.start()
        except CallLogExists:
            logger.warning("pcm call %s refused: a call log with its id already exists", self._session_id)
            await call.close("refused")
            self.close(UNKNOWN_SESSION, "session id already in use")
            return
        except BaseException:
            await call.close("error")
            raise
        self._call = call

    async def finished(self) -> None:
        if self._call is not None:
            await self._call.close("completed")

    async def bad_frame(self, kind: str, detail: str) -> None:
        if self._call is not None:
            self._call.bad_frame(kind)
        else:
            await super().bad_frame(kind, detail)

    async def handle_frame(self, frame: dict) -> None:
        data = frame.get("bytes")
        if data is None:
            await self.bad_frame("text_frame", "")
            return
        if len(data) % 2:
            await self.bad_frame("odd_pcm_length", "")
        if data and self._call is not None:
            self._call.on_audio(data)


async def serve_pcm(
    websocket: WebSocket, context: GatewayContext, registry: CallRegistry, limits: Limits, session_id: str
) -> None:
    """Serves one raw PCM call announced by the trigger endpoint, until disconnect or a limit."""
    await serve(
        websocket,
        limits,
        PcmConnection,
        lambda guard: PcmConnection(websocket, context, registry, guard, session_id),
        handshake=False,
    )
