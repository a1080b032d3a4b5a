"""What the carriers' media streams share (Twilio, Exotel): one loop over ``connected``, ``start``,
``media``, ``dtmf``, ``mark``, ``stop`` in and ``media``, ``mark``, ``clear`` out, each carrying the
stream id under the carrier's key; a carrier module only says how its ``start`` reads.

Bad frames (malformed JSON, binary frames, unknown events, bad payloads) are counted and skipped: the
call goes on. The gateway's limits close the stream instead, since a carrier has no error event:
1013 when the gateway is full, 1009 for a frame over ``GATEWAY_MAX_FRAME_BYTES``, 1008 without a
``start`` within the handshake timeout, after the idle timeout, or past the message rate; 1003 for a
``start`` whose media format the gateway cannot serve (the call's log records the reason).

The stream id is what the call's log asks to be called, never a way into another log: when a log
with that id already exists (another call's, a chat conversation's), the call gets a fresh log under
a random id, a warning is logged, and the wire keeps the carrier's stream id (see
:mod:`voice_gateway.storage.call_log`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.websockets import WebSocket

from voice_audio import Encoding
from voice_gateway.agents.templates import personalise
from voice_gateway.agents.tools import CallAction
from voice_gateway.api.limits import MAX_CALL, ConnectionGuard, LimitExceeded, close_socket
from voice_gateway.conversation.call import CallSession, MediaFormat, open_call
from voice_gateway.conversation.metrics import BAD_FRAMES, ERRORS
from voice_gateway.conversation.session import GatewayContext, Session
from voice_gateway.dialects.base import Connection
from voice_gateway.storage.registry import CallRegistry

logger = logging.getLogger(__name__)

MAX_MEDIA_PAYLOAD_BYTES = 64 * 1024
CLOSE_UNSUPPORTED = 1003
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class StreamStart:
    """What a carrier's ``start`` event says about the call."""

    stream_sid: str
    agent_id: str
    variables: dict
    call_sid: str = ""
    # The call's audio when the ``start`` chooses it (Plivo's ``mediaFormat``), else the connection's.
    media: MediaFormat | None = None
    # Why the gateway cannot serve this stream (e.g. an unsupported encoding): recorded, then closed 1003.
    refusal: str = ""


def decode_payload(payload: Any, on_bad: Callable[[str], None]) -> bytes | None:
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
    """The carrier's stream id as the id the call's log asks for (so it is found by it), if it is usable.

    Only asked: a new session creates its log create-only, and takes a fresh random id when a log with
    this one exists (:data:`~voice_gateway.conversation.session.FRESH`).
    """
    return stream_sid if stream_sid and _SAFE_ID.fullmatch(stream_sid) else None


class CarrierTransport:
    """Sends agent audio, marks and ``clear`` as JSON events carrying the stream id under ``sid_key``."""

    def __init__(self, connection: MediaStreamConnection, registry: CallRegistry | None = None) -> None:
        self._connection = connection
        self._sid_key = connection.sid_key
        self._registry = registry
        self.stream_sid = ""
        self.call_sid = ""

    async def _send(self, message: dict) -> None:
        await self._connection.send_text(json.dumps(message, separators=(",", ":")))

    async def send_audio(self, audio: bytes) -> None:
        payload = base64.b64encode(audio).decode()
        await self._send({"event": "media", self._sid_key: self.stream_sid, "media": {"payload": payload}})

    async def send_mark(self, name: str) -> bool:
        await self._send({"event": "mark", self._sid_key: self.stream_sid, "mark": {"name": name}})
        return True

    async def clear(self) -> None:
        await self._send({"event": "clear", self._sid_key: self.stream_sid})

    async def hang_up(self, action: CallAction) -> None:
        """Closes the media stream (1000). A transfer is noted under the carrier's call id first, for the
        carrier's next step to read (Twilio's ``<Connect action>``, Exotel's dynamic Connect URL)."""
        if action.kind == "transfer_call" and self._registry is not None and self.call_sid:
            try:
                await self._registry.note_transfer(self.call_sid, action.number)
            except Exception:
                logger.exception("transfer of call %s could not be noted", self.call_sid)
                ERRORS.labels("carrier", "transfer_not_noted").inc()
        await close_socket(self._connection.ws, 1000, action.kind)


class MediaStreamConnection(Connection):
    """A carrier's bidirectional media stream; a subclass names its dialect and ``sid_key`` and reads
    its ``start`` (:meth:`parse_start`)."""

    sid_key: ClassVar[str] = "streamSid"
    # How the carrier's verbs go out (Plivo's ``playAudio``, Vonage's binary frames override it).
    transport_class: ClassVar[type[CarrierTransport]] = CarrierTransport
    # The call's status when the socket closes without a ``stop`` (Plivo and Vonage have none: "completed").
    closed_status: ClassVar[str] = "disconnected"

    def __init__(self, websocket: WebSocket, context: GatewayContext, guard: ConnectionGuard, media: MediaFormat):
        super().__init__(websocket, guard)
        self._context = context
        self._media = media
        self._transport = self.transport_class(self, context.registry)
        self._call: CallSession | None = None
        self._status = self.closed_status

    async def on_limit(self, error: LimitExceeded) -> None:
        if error.limit == MAX_CALL:
            # The platform ended the call at its maximum length, as the agent's end_call would.
            self._status = "completed"
        await super().on_limit(error)

    def parse_start(self, message: dict, on_bad: Callable[[str], None]) -> StreamStart:
        """What the carrier's ``start`` event says; malformed parts are counted through ``on_bad``."""
        raise NotImplementedError

    def count_bad(self, kind: str) -> None:
        """Counts a bad frame on the call (or the dialect, before the call exists) and logs it."""
        if self._call is not None:
            self._call.bad_frame(kind)
        else:
            BAD_FRAMES.labels(self.dialect, kind).inc()
        logger.warning("%s: %s frame ignored", self.dialect, kind)

    async def bad_frame(self, kind: str, detail: str) -> None:
        self.count_bad(kind)

    async def finished(self) -> None:
        if self._call is not None:
            await self._call.close(self._status)

    async def on_message(self, message: dict) -> None:
        event, call = message.get("event"), self._call
        if event == "media":
            payload = message.get("media") if isinstance(message.get("media"), dict) else {}
            if call is None:
                self.count_bad("media_before_start")
            elif payload.get("track", "inbound") == "inbound":
                audio = decode_payload(payload.get("payload"), self.count_bad)
                if audio and self._media.encoding == Encoding.PCM16 and len(audio) % 2:
                    self.count_bad("odd_pcm_length")
                if audio:
                    call.on_audio(audio)
        elif event == "start":
            await self._start(message)
        elif event in ("mark", "dtmf"):
            body = message.get(event)
            if call is not None and isinstance(body, dict):
                if event == "mark":
                    call.on_mark(str(body.get("name", "")))
                else:
                    call.on_dtmf(str(body.get("digit", "")))
        elif event == "stop":
            self._status = "completed"
            self.close(1000)
        elif event != "connected":
            self.count_bad("unknown_event")

    async def _start(self, message: dict) -> None:
        start = self.parse_start(message, self.count_bad)
        if self._call is not None:
            self.count_bad("duplicate_start")
            return
        if start.refusal:
            await self._refuse(start)
            return
        if start.media is not None:
            self._media = start.media
        self._transport.stream_sid = start.stream_sid
        self._transport.call_sid = start.call_sid if _SAFE_ID.fullmatch(start.call_sid) else ""
        self._call = await open_call(
            self._context,
            self.dialect,
            start.agent_id,
            start.variables,
            self._media,
            self._transport,
            session_id=safe_id(start.stream_sid),
        )
        if self._call is None:
            logger.warning("%s stream %s: unknown agent %r; closing", self.dialect, start.stream_sid, start.agent_id)
            self.close(1008, f"unknown agent {start.agent_id!r}")
            return
        self.guard.handshake_done()

    async def _refuse(self, start: StreamStart) -> None:
        """A stream the gateway cannot serve: the call's log records why (status ``refused``, ``reason``),
        then the stream closes with 1003 and the reason."""
        agent = await self._context.agents.get(start.agent_id)
        if agent is None:
            self.close(1008, f"unknown agent {start.agent_id!r}")
            return
        logger.warning("%s stream %s refused: %s", self.dialect, start.stream_sid, start.refusal)
        agent = personalise(agent, start.variables)
        session = Session(self._context, agent, self.dialect, session_id=safe_id(start.stream_sid))
        session.call_log.reason = start.refusal
        try:
            await session.start()
            await session.close("refused")
        finally:
            self.close(CLOSE_UNSUPPORTED, start.refusal)
