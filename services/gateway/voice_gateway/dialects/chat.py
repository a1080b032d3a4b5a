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
An id that is another credential's conversation, or any other kind of call log, is answered
``error`` with code ``forbidden``; a new conversation's log is created atomically, so of two
credentials racing for one new id only one has it (the other is answered ``forbidden``).
Invalid messages, and messages over ``GATEWAY_MAX_FRAME_BYTES``, get an ``error`` event and the
connection goes on. The gateway's other limits answer ``error`` and close: 1013 when the gateway or
the credential is at its maximum of sessions, 1008 past the message rate or the idle timeout.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import time
import uuid

import numpy as np
from starlette.websockets import WebSocket

from voice.v1 import audio_pb2
from voice_audio import wav_bytes
from voice_gateway.api.auth import Authenticator
from voice_gateway.api.limits import HANDSHAKE, ConnectionGuard, LimitExceeded, Limits, close_socket
from voice_gateway.conversation.events import (
    Event,
    LlmDelta,
    OutputFormat,
    SentenceAudio,
    SpeechAudio,
    ToolCalled,
    ToolFinished,
    TurnEnded,
    TurnFailed,
    TurnStarted,
)
from voice_gateway.conversation.runner import INTERRUPTED, Turn
from voice_gateway.conversation.session import REFUSE, GatewayContext, Session
from voice_gateway.dialects.base import Connection, serve
from voice_gateway.storage.call_log import CallLogExists
from voice_text import SentenceSplitter

logger = logging.getLogger(__name__)

DIALECT = "chat"
UNAUTHORIZED = 4401
HEARTBEAT_TIMEOUT = 4408
MAX_CONTENT_CHARS = 8000
MAX_OPEN_CONVERSATIONS = 16
MIN_CHUNK_CHARS = 12
CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _message(type_: str, **fields) -> str:
    return json.dumps({"type": type_, **fields})


class ChatConnection(Connection):
    """One chat stream connection."""

    dialect = DIALECT

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
        super().__init__(websocket, guard)
        self._context = context
        self._auth = authenticator
        self._identity = ""
        self._ping_interval_s = ping_interval_s
        self._pong_timeout_s = pong_timeout_s
        self.connection_id = uuid.uuid4().hex
        self._authorized = False
        self._last_pong = time.monotonic()
        self._sessions: dict[str, Session] = {}
        self._streaming: Session | None = None
        self._heartbeat: asyncio.Task | None = None

    @classmethod
    def error_frame(cls, message: str, code: str = "bad_request") -> str:
        return _message("error", error=message, code=code)

    async def send(self, type_: str, **fields) -> None:
        await self.send_text(_message(type_, **fields))

    async def opened(self) -> None:
        self._heartbeat = asyncio.create_task(self._beat())

    async def on_limit(self, error: LimitExceeded) -> None:
        if error.limit == HANDSHAKE:
            timeout_s = self.guard.settings.handshake_timeout_s
            await self.error(f"authorize within {timeout_s:g} seconds of connecting", "unauthorized")
            self.close(UNAUTHORIZED, "authorization timeout")
        else:
            await super().on_limit(error)

    async def finished(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        for session in self._sessions.values():
            await session.close("completed")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._ping_interval_s)
            if not self._authorized:
                continue
            if time.monotonic() - self._last_pong > self._ping_interval_s + self._pong_timeout_s:
                self.close(HEARTBEAT_TIMEOUT, "heartbeat timeout: no pong")
                async with self._send_lock:
                    await close_socket(self.ws, HEARTBEAT_TIMEOUT, "heartbeat timeout: no pong")
                return
            await self.send("ping", timestamp=int(time.time() * 1000))

    async def on_message(self, message: dict) -> None:
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
            if self._streaming is not None:
                self._streaming.runner.interrupt(INTERRUPTED)
            else:
                await self.error("no stream to interrupt")
        else:
            await self.bad_frame("unknown_event", f"unknown message type {kind!r}")

    async def _authorize(self, message: dict) -> None:
        if self._authorized:
            await self.error("already authorized")
            return
        ok, detail = self._auth.check(message.get("token"))
        if not ok:
            await self.error(f"unauthorized: {detail}", "unauthorized")
            self.close(UNAUTHORIZED, "unauthorized")
            return
        try:
            self.guard.bind_key(detail)
        except LimitExceeded as exc:
            await self.error(exc.reason, "capacity")
            self.close(exc.close_code, exc.reason)
            return
        self.guard.handshake_done()
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
        if self._streaming is not None:
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
        output = OutputFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=0) if with_audio else None
        self._streaming = session
        self.guard.answering(True)
        session.submit(
            Turn(kind="chat", text=content.strip(), output=output, emit=_AnswerEvents(self, session.id, with_audio))
        )

    async def _session(self, conversation_id: str, agent_id: str) -> Session | None:
        """The conversation's session, opened (or continued from its call log) on first use; ``None`` for an
        unknown agent.

        Raises:
            PermissionError: The id belongs to a conversation another credential opened, or to a call
                (a new conversation's log is created only where no log has its id: atomically).
        """
        session = self._sessions.pop(conversation_id, None)
        if session is None:
            agent = await self._context.agents.get(agent_id)
            if agent is None:
                return None
            refused = PermissionError(f"conversation_id {conversation_id!r} belongs to another conversation")
            previous = await self._context.calls.get(conversation_id)
            if previous is not None and (previous.dialect != DIALECT or previous.owner != self._identity):
                raise refused
            session = Session(self._context, agent, DIALECT, previous, session_id=conversation_id, on_collision=REFUSE)
            session.call_log.owner = self._identity
            try:
                await session.start()
            except CallLogExists:
                # Another connection created a log with this id since it was looked up.
                raise refused from None
            await self._close_least_recently_used()
        self._sessions[conversation_id] = session
        return session

    async def _close_least_recently_used(self) -> None:
        """Makes room for one more conversation within MAX_OPEN_CONVERSATIONS by closing the least recently
        used ones (no answer is streaming: a new message is refused while one is). Their call logs stay,
        so they can be continued."""
        while len(self._sessions) >= MAX_OPEN_CONVERSATIONS:
            oldest = next(iter(self._sessions))
            await self._sessions.pop(oldest).close("completed")

    def stream_ended(self) -> None:
        self._streaming = None
        self.guard.answering(False)


class _AnswerEvents:
    """Translates one answer's events into ``stream_start``, ``tts_ready_chunk``…, ``stream_end``."""

    def __init__(self, connection: ChatConnection, conversation_id: str, with_audio: bool) -> None:
        self._connection = connection
        self._ids = {"message_id": uuid.uuid4().hex, "conversation_id": conversation_id}
        self._sentences = SentenceSplitter(min_chars=MIN_CHUNK_CHARS)
        self._index = 0
        self._with_audio = with_audio
        self._sentence = SentenceAudio()

    async def _chunk(self, sentence: str, audio: str | None = None) -> None:
        fields = {"chunk": sentence, "index": self._index, **self._ids}
        if audio is not None:
            fields["audio"] = audio
        self._index += 1
        await self._connection.send("tts_ready_chunk", **fields)

    async def __call__(self, event: Event) -> None:
        send, ids = self._connection.send, self._ids
        if isinstance(event, TurnStarted):
            await send("stream_start", **ids)
        elif isinstance(event, LlmDelta):
            if not self._with_audio:
                for sentence in self._sentences.feed(event.chunk):
                    await self._chunk(sentence)
        elif isinstance(event, SpeechAudio) and (sentence := self._sentence.add(event)):
            wav = wav_bytes(np.frombuffer(sentence, dtype="<i2"), event.sample_rate)
            await self._chunk(event.text, base64.b64encode(wav).decode())
        elif isinstance(event, ToolCalled):
            try:
                arguments = json.loads(event.arguments or "{}")
            except json.JSONDecodeError:
                arguments = event.arguments
            await send("tool_call", tool_call_id=event.tool_call_id, name=event.name, arguments=arguments, **ids)
        elif isinstance(event, ToolFinished):
            await send(
                "tool_result",
                tool_call_id=event.tool_call_id,
                name=event.name,
                content=event.content,
                successful=event.successful,
                **ids,
            )
        elif isinstance(event, TurnFailed):
            await self._connection.error(event.error, "turn_failed")
        elif isinstance(event, TurnEnded):
            await self._end(event)

    async def _end(self, event: TurnEnded) -> None:
        self._connection.stream_ended()
        result = event.result
        if event.cancelled or (result.error and not result.fallback):
            await self._connection.send("stream_end", content=result.assistant_text, interrupted=True, **self._ids)
            return
        if not self._with_audio:
            for sentence in self._sentences.flush():
                await self._chunk(sentence)
        action = {"action": dataclasses.asdict(result.action)} if result.action else {}
        await self._connection.send(
            "stream_end", content=result.assistant_text, interrupted=False, **self._ids, **action
        )


async def serve_chat(
    websocket: WebSocket, context: GatewayContext, authenticator: Authenticator, limits: Limits, **options
) -> None:
    """Accepts and serves one chat stream connection; a full gateway answers ``error`` and closes 1013."""
    await serve(
        websocket,
        limits,
        ChatConnection,
        lambda guard: ChatConnection(websocket, context, authenticator, guard, **options),
    )
