"""The authorized chat stream (seed 004) at ``/v1/chat/stream``: text in, sentences out for the
client's own speech synthesis.

``authorize`` (``token``, optional ``agent_id``) → ``authorize_success`` (``connection_id``, and the
agent's ``avatar`` and ``background`` when configured), or ``error`` and close **4401**.
``chat_message`` (``content``, ``user_id``, ``agent_id``, ``conversation_id``, optional ``audio``:
true) → ``stream_start``, ``tts_ready_chunk`` (``chunk``: one complete sentence each; with ``audio``
the sentence's speech as base64 WAV too), ``tool_call`` (``tool_call_id``, ``name``, ``arguments``:
an object) / ``tool_result`` (``tool_call_id``, ``name``, ``content``, ``successful``) when the agent
uses tools, ``stream_end`` (``content``: the whole answer; ``interrupted``; ``action`` when a
built-in tool ended or transferred the conversation). ``interrupt_stream`` cancels the
answer in flight. The server sends ``ping`` every ``GATEWAY_CHAT_PING_INTERVAL_SECONDS`` and closes
with **4408** a connection that misses its ``pong`` for ``GATEWAY_CHAT_PONG_TIMEOUT_SECONDS``; a
connection that does not authorize within ``GATEWAY_HANDSHAKE_TIMEOUT_SECONDS`` (30 s) is closed with
4401. Conversations persist by ``conversation_id`` (their history is the call log of that id); only
the credential that opened one may continue it, and a connection keeps at most
:data:`MAX_OPEN_CONVERSATIONS` open (the least recently used is closed; it can be continued later).
Invalid messages, and messages over ``GATEWAY_MAX_FRAME_BYTES``, get an ``error`` event and the
connection goes on. The gateway's other limits answer ``error`` and close: 1013 when the gateway or
the credential is at its maximum of sessions, 1008 past the message rate or the idle timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice.v1 import audio_pb2
from voice_audio import wav_bytes
from voice_gateway.auth import Authenticator
from voice_gateway.call import BAD_FRAMES
from voice_gateway.limits import (
    HANDSHAKE,
    ConnectionGuard,
    LimitExceeded,
    Limits,
    MessageTooLarge,
    close_socket,
    refuse,
)
from voice_gateway.messages import InvalidJson, parse_json
from voice_gateway.sentences import SentenceStream
from voice_gateway.session import GatewayContext, Session
from voice_gateway.turns import Event, LlmDelta, OutputFormat, SpeechAudio, ToolCalled, ToolFinished, TurnFailed

logger = logging.getLogger(__name__)

DIALECT = "chat"
UNAUTHORIZED = 4401
HEARTBEAT_TIMEOUT = 4408
MAX_CONTENT_CHARS = 8000
MAX_OPEN_CONVERSATIONS = 16
CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class ChatConnection:
    """One chat stream connection."""

    def __init__(
        self,
        websocket: WebSocket,
        context: GatewayContext,
        authenticator: Authenticator,
        guard: ConnectionGuard,
        *,
        ping_interval_s: float,
        pong_timeout_s: float,
    ) -> None:
        self._ws = websocket
        self._context = context
        self._auth = authenticator
        self._guard = guard
        self._identity = ""
        self._ping_interval_s = ping_interval_s
        self._pong_timeout_s = pong_timeout_s
        self.connection_id = uuid.uuid4().hex
        self._authorized = False
        self._last_pong = time.monotonic()
        self._sessions: dict[str, Session] = {}
        self._stream: asyncio.Task | None = None
        self._interrupted = False
        self._send_lock = asyncio.Lock()
        self._close: tuple[int, str] | None = None

    async def send(self, type_: str, **fields) -> None:
        async with self._send_lock:
            if self._ws.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                    await self._ws.send_text(_message(type_, **fields))

    async def error(self, message: str, code: str = "bad_request") -> None:
        await self.send("error", error=message, code=code)

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while self._close is None:
                try:
                    frame = await self._guard.receive()
                except MessageTooLarge as exc:
                    BAD_FRAMES.labels(DIALECT, "oversized_frame").inc()
                    await self.error(exc.reason, "too_large")
                    continue
                except LimitExceeded as exc:
                    if exc.limit == HANDSHAKE:
                        timeout_s = self._guard.settings.handshake_timeout_s
                        await self.error(f"authorize within {timeout_s:g} seconds of connecting", "unauthorized")
                        self._close = (UNAUTHORIZED, "authorization timeout")
                    else:
                        await self.error(exc.reason, "limit")
                        self._close = (exc.close_code, exc.reason)
                    break
                except WebSocketDisconnect:
                    break
                if frame["type"] == "websocket.disconnect":
                    break
                await self._handle(frame)
        finally:
            heartbeat.cancel()
            if self._stream is not None and not self._stream.done():
                self._stream.cancel()
            await asyncio.gather(heartbeat, *([self._stream] if self._stream else []), return_exceptions=True)
            for session in self._sessions.values():
                await session.close("completed")
            if self._close is not None:
                await close_socket(self._ws, *self._close)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._ping_interval_s)
            if not self._authorized:
                continue
            if time.monotonic() - self._last_pong > self._ping_interval_s + self._pong_timeout_s:
                self._close = (HEARTBEAT_TIMEOUT, "heartbeat timeout: no pong")
                with contextlib.suppress(Exception):
                    await self._ws.close(code=HEARTBEAT_TIMEOUT, reason="heartbeat timeout: no pong")
                return
            await self.send("ping", timestamp=int(time.time() * 1000))

    async def _handle(self, frame: dict) -> None:
        if frame.get("bytes") is not None:
            BAD_FRAMES.labels(DIALECT, "binary_frame").inc()
            await self.error("binary frames are not part of this protocol; send JSON text")
            return
        try:
            message = parse_json(frame.get("text") or "")
        except InvalidJson as exc:
            BAD_FRAMES.labels(DIALECT, "invalid_json").inc()
            await self.error(f"invalid JSON: {exc}")
            return
        if not isinstance(message, dict):
            await self.error("a message must be a JSON object with a 'type'")
            return
        kind = message.get("type")
        if kind == "authorize":
            await self._authorize(message)
        elif not self._authorized:
            await self.error(f"'{kind}' before 'authorize'", "unauthorized")
        elif kind == "pong":
            self._last_pong = time.monotonic()
        elif kind == "chat_message":
            await self._chat(message)
        elif kind == "interrupt_stream":
            if self._stream is not None and not self._stream.done():
                self._interrupted = True
                self._stream.cancel()
            else:
                await self.error("no stream to interrupt")
        else:
            BAD_FRAMES.labels(DIALECT, "unknown_event").inc()
            await self.error(f"unknown message type {kind!r}")

    async def _authorize(self, message: dict) -> None:
        if self._authorized:
            await self.error("already authorized")
            return
        ok, detail = self._auth.check(message.get("token"))
        if not ok:
            await self.error(f"unauthorized: {detail}", "unauthorized")
            self._close = (UNAUTHORIZED, "unauthorized")
            return
        try:
            self._guard.bind_key(detail)
        except LimitExceeded as exc:
            await self.error(exc.reason, "capacity")
            self._close = (exc.close_code, exc.reason)
            return
        self._guard.handshake_done()
        self._identity = detail
        self._authorized = True
        self._last_pong = time.monotonic()
        fields: dict = {"connection_id": self.connection_id}
        agent_id = message.get("agent_id")
        if isinstance(agent_id, str) and agent_id:
            agent = await self._context.agents.get(agent_id)
            if agent is not None and agent.avatar_url:
                fields["avatar"] = agent.avatar_url
            if agent is not None and agent.background_url:
                fields["background"] = agent.background_url
        await self.send("authorize_success", **fields)

    async def _chat(self, message: dict) -> None:
        content = message.get("content")
        conversation_id = message.get("conversation_id") or self.connection_id
        agent_id = message.get("agent_id") or "default"
        if not isinstance(content, str) or not content.strip():
            await self.error("chat_message: 'content' must be a non-empty string")
            return
        if len(content) > MAX_CONTENT_CHARS:
            await self.error(f"chat_message: content longer than {MAX_CONTENT_CHARS} characters")
            return
        if not isinstance(conversation_id, str) or not CONVERSATION_ID.fullmatch(conversation_id):
            await self.error("chat_message: conversation_id must be 1-128 letters, digits, '-' or '_'")
            return
        if not isinstance(agent_id, str):
            await self.error("chat_message: agent_id must be a string")
            return
        if self._stream is not None and not self._stream.done():
            await self.error("a response is still streaming; wait for stream_end or send interrupt_stream")
            return
        try:
            session = await self._session(conversation_id, agent_id)
        except PermissionError as exc:
            await self.error(f"chat_message: {exc}", "forbidden")
            return
        if session is None:
            await self.error(f"chat_message: unknown agent {agent_id!r}")
            return
        with_audio = message.get("audio") is True
        self._interrupted = False
        self._stream = asyncio.create_task(self._answer(session, content.strip(), with_audio))

    async def _session(self, conversation_id: str, agent_id: str) -> Session | None:
        """The conversation's session, opened (or continued from its call log) on first use; ``None`` for an
        unknown agent.

        Raises:
            PermissionError: The id belongs to a conversation another credential opened, or to a call.
        """
        session = self._sessions.pop(conversation_id, None)
        if session is None:
            agent = await self._context.agents.get(agent_id)
            if agent is None:
                return None
            previous = await self._context.calls.get(conversation_id)
            if previous is not None and (previous.dialect != DIALECT or previous.owner != self._identity):
                raise PermissionError(f"conversation_id {conversation_id!r} belongs to another conversation")
            await self._close_least_recently_used()
            session = Session(self._context, agent, DIALECT, previous, session_id=conversation_id)
            session.call_log.owner = self._identity
            await session.start()
        self._sessions[conversation_id] = session
        return session

    async def _close_least_recently_used(self) -> None:
        """Makes room for one more conversation within MAX_OPEN_CONVERSATIONS by closing the least recently
        used ones (no answer is streaming: a new message is refused while one is). Their call logs stay,
        so they can be continued."""
        while len(self._sessions) >= MAX_OPEN_CONVERSATIONS:
            oldest = next(iter(self._sessions))
            await self._sessions.pop(oldest).close("completed")

    async def _answer(self, session: Session, content: str, with_audio: bool) -> None:
        message_id = uuid.uuid4().hex
        ids = {"message_id": message_id, "conversation_id": session.id}
        await self.send("stream_start", **ids)
        sentences = SentenceStream()
        index = 0
        full_text = ""
        started = time.perf_counter()

        async def chunk(sentence: str, audio: str | None = None) -> None:
            nonlocal index
            fields = {"chunk": sentence, "index": index, **ids}
            if audio is not None:
                fields["audio"] = audio
            index += 1
            await self.send("tts_ready_chunk", **fields)

        async def emit(event: Event) -> None:
            nonlocal full_text
            if self._interrupted:
                raise asyncio.CancelledError
            if isinstance(event, LlmDelta):
                full_text = event.full_text
                if not with_audio:
                    for sentence in sentences.feed(event.chunk):
                        await chunk(sentence)
            elif isinstance(event, SpeechAudio):
                wav = wav_bytes(np.frombuffer(event.audio, dtype="<i2"), event.sample_rate)
                await chunk(event.text, base64.b64encode(wav).decode())
            elif isinstance(event, ToolCalled):
                try:
                    arguments = json.loads(event.arguments or "{}")
                except json.JSONDecodeError:
                    arguments = event.arguments
                await self.send(
                    "tool_call", tool_call_id=event.tool_call_id, name=event.name, arguments=arguments, **ids
                )
            elif isinstance(event, ToolFinished):
                await self.send(
                    "tool_result",
                    tool_call_id=event.tool_call_id,
                    name=event.name,
                    content=event.content,
                    successful=event.successful,
                    **ids,
                )
            elif isinstance(event, TurnFailed):
                await self.error(event.error, "turn_failed")

        output = OutputFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=0) if with_audio else None
        try:
            with session.turn_span("chat"):
                result = await self._context.engine.respond(session.conversation, content, output, emit, started)
            if self._interrupted:
                # The interrupt's cancellation was lost inside a library call; the answer still ends here.
                raise asyncio.CancelledError
            if not with_audio:
                for sentence in sentences.flush():
                    await chunk(sentence)
            await session.record("chat", result)
            action = {"action": dataclasses.asdict(result.action)} if result.action else {}
            await self.send("stream_end", content=result.assistant_text, interrupted=False, **ids, **action)
        except asyncio.CancelledError:
            await self.send("stream_end", content=full_text.strip(), interrupted=True, **ids)
            raise
        except Exception as exc:
            logger.warning("chat %s: answer failed: %s", session.id, exc)
            await self.error(f"the assistant failed: {exc}", "turn_failed")
            await self.send("stream_end", content=full_text.strip(), interrupted=True, **ids)


def _message(type_: str, **fields) -> str:
    return json.dumps({"type": type_, **fields})


async def serve(
    websocket: WebSocket, context: GatewayContext, authenticator: Authenticator, limits: Limits, **options
) -> None:
    """Accepts and serves one chat stream connection; a full gateway answers ``error`` and closes 1013."""
    await websocket.accept()
    try:
        guard = limits.admit(websocket, DIALECT)
    except LimitExceeded as exc:
        await refuse(websocket, exc, _message("error", error=exc.reason, code="capacity"))
        return
    async with guard:
        await ChatConnection(websocket, context, authenticator, guard, **options).run()
