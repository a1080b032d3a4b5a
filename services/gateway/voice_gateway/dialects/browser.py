"""The browser voice pipeline protocol (seed 001) at ``/ws``: JSON ``{type, data}`` messages.

``/ws`` is shared with seed 002's channel clients: a socket whose first message is ``{"type": …}`` is
this dialect's (:mod:`voice_gateway.dialects.router`). Client → server: ``init`` (``agentId``, optional
``callLogId``), ``audio`` (base64 WebM/Opus, Ogg, WAV, MP3 or raw PCM16 16 kHz), ``text`` (``text``),
``end``. Fields are read from ``data`` or the top level. Server → client: ``init_success`` (seed 001's
``callLogId``, ``agentName``, ``message``, and ``channelToken``: the right to follow this session's
statuses on ``/ws/channels``, see :mod:`voice_gateway.dialects.channels`) then the greeting as one
``audio_response``; per audio turn ``processing_started``, ``stt_start``, ``stt_complete``,
``llm_start``, ``llm_chunk``…, ``llm_complete``, then the reply's speech, and ``processing_complete``;
per text turn the ``llm_*`` events and ``text_response``, then the speech and ``processing_complete``
when the agent speaks its replies (a text turn that is not spoken ends at ``text_response``); ``end``
→ ``session_ended``.

The speech goes out sentence by sentence, in the seed's order for each: ``tts_start``, ``tts_complete``
(``audio``: the sentence's WAV) and ``audio_response`` (``audio``: the same WAV, ``text``: the
sentence). A client plays one of the two, as with the seed's server; no message carries the whole reply
again. The first sentence leaves as soon as it is synthesized (often before ``llm_complete``); each
next one no earlier than :data:`PLAYBACK_LEAD_S` before the client, playing every sentence on arrival,
would finish the ones before it, so sentences never overlap. ``processing_complete`` follows the last
sentence. When the agent uses tools, ``llm_tool_call`` (``toolCallId``, ``name``,
``arguments``: JSON text) and ``llm_tool_result`` (``toolCallId``, ``name``, ``result``: the tool's
answer when its ``expose_result`` is set, else ``{"successful": …}`` as JSON text, ``successful``) come
between the ``llm_chunk`` events; a built-in ``end_call`` or ``transfer_call``
ends the session after the answer with ``session_ended`` (``reason``, ``transferNumber``). Any
invalid message, and one over ``GATEWAY_MAX_MESSAGE_BYTES``, gets an ``error`` event and the session
goes on. The gateway's limits (:mod:`voice_gateway.api.limits`) are answered with an ``error`` event and
a close: 1013 when the gateway is full, 1008 without a successful ``init`` within the handshake
timeout, after the idle timeout, or past the message rate.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

import numpy as np
from starlette.websockets import WebSocket

from voice.v1 import audio_pb2
from voice_audio import wav_bytes
from voice_gateway.agents.tools import CallAction
from voice_gateway.api.auth import ChannelTokens
from voice_gateway.api.limits import ConnectionGuard
from voice_gateway.conversation.events import (
    Event,
    LlmCompleted,
    LlmDelta,
    OutputFormat,
    SentenceAudio,
    SpeechAudio,
    SpeechCompleted,
    StageStarted,
    SttCompleted,
    ToolCalled,
    ToolFinished,
    TurnEnded,
    TurnFailed,
    TurnStarted,
)
from voice_gateway.conversation.runner import Turn
from voice_gateway.conversation.session import GatewayContext, Session
from voice_gateway.dialects.base import Connection, Route
from voice_runtime.tasks import cancel_and_wait

DIALECT = "browser"
OUTPUT = OutputFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=0)
RAW_PCM_RATE = 16000
# How long before the client would finish playing the sentences sent so far the next one leaves: enough to
# arrive and be decoded in time, so the speech has no gaps, and short enough that sentences never overlap.
PLAYBACK_LEAD_S = 0.3
CONTAINER_MAGIC = (b"RIFF", b"OggS", b"\x1a\x45\xdf\xa3", b"ID3", b"fLaC", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


def _message(type_: str, data: dict | None) -> str:
    return json.dumps({"type": type_, "data": data or {}})


def _field(message: dict, name: str) -> Any:
    data = message.get("data")
    if isinstance(data, dict) and name in data:
        return data[name]
    return message.get(name)


def audio_format(audio: bytes) -> audio_pb2.AudioFormat:
    """Encoded containers are recognised by their magic bytes; anything else is raw PCM16 at 16 kHz."""
    if audio.startswith(CONTAINER_MAGIC):
        return audio_pb2.AudioFormat(container=audio_pb2.AUDIO_CONTAINER_AUTO)
    return audio_pb2.AudioFormat(
        encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=RAW_PCM_RATE, container=audio_pb2.AUDIO_CONTAINER_RAW
    )


def wav_base64(pcm: bytes, rate: int) -> str:
    return base64.b64encode(wav_bytes(np.frombuffer(pcm, dtype="<i2"), rate)).decode()


class BrowserConnection(Connection):
    """One WebSocket speaking seed 001.

    Args:
        websocket: The accepted socket.
        context: Shared gateway services.
        guard: The connection's limits (its frame limit is the browser's maximum message size).
        max_utterance_s: Longer raw PCM utterances are refused with an ``error`` event.
        channel_tokens: Issues ``init_success``'s ``channelToken``, the right to follow this session's
            statuses on ``/ws/channels``; ``None`` leaves the field out.
    """

    dialect = DIALECT

    def __init__(
        self,
        websocket: WebSocket,
        context: GatewayContext,
        guard: ConnectionGuard,
        *,
        max_utterance_s: float,
        channel_tokens: ChannelTokens | None = None,
    ) -> None:
        super().__init__(websocket, guard)
        self._channel_tokens = channel_tokens
        self._context = context
        self._max_utterance_s = max_utterance_s
        self._session: Session | None = None
        self._ending: asyncio.Task | None = None

    @classmethod
    def error_frame(cls, message: str, code: str = "bad_request") -> str:
        return _message("error", {"error": message})

    async def send(self, type_: str, data: dict | None = None) -> None:
        await self.send_text(_message(type_, data))

    async def finished(self) -> None:
        await cancel_and_wait(self._ending)
        if self._session is not None:
            await self._session.close("disconnected")
            self._session = None

    async def on_message(self, message: dict) -> None:
        kind = message.get("type")
        handlers = {"init": self._init, "audio": self._audio, "text": self._text, "end": self._end}
        handler = handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            await self.error(f"unknown message type {kind!r}; expected init, audio, text or end")
            return
        if kind != "init" and self._session is None:
            await self.error(f"'{kind}' before 'init': send init first")
            return
        await handler(message)

    async def _init(self, message: dict) -> None:
        if self._session is not None:
            await self.error("session already initialised; send end first to start another")
            return
        agent_id = _field(message, "agentId") or "default"
        call_log_id = _field(message, "callLogId")
        if not isinstance(agent_id, str) or (call_log_id is not None and not isinstance(call_log_id, str)):
            await self.error("init: agentId and callLogId must be strings")
            return
        agent = await self._context.agents.get(agent_id)
        if agent is None:
            await self.error(f"init: unknown agent {agent_id!r}")
            return
        call_log = None
        if call_log_id:
            call_log = await self._context.calls.get(call_log_id)
            # Only a browser call can be continued here: this socket is unauthenticated, and a phone call's
            # or another user's chat history must not be readable (nor written) through it. Without a
            # callLogId the session's log is new, under a random id, created where no log has it.
            if call_log is None or call_log.dialect != DIALECT:
                await self.error(f"init: unknown callLogId {call_log_id!r}")
                return
        session = Session(self._context, agent, DIALECT, call_log)
        await session.start()
        self._session = session
        self.guard.handshake_done()
        ready = {"callLogId": session.id, "agentName": agent.name, "message": f"Connected to {agent.name}"}
        if self._channel_tokens is not None:
            # Beyond seed 001's fields (clients read the ones they know): the right to this session's channel.
            ready["channelToken"] = self._channel_tokens.issue(session.id)[0]
        await self.send("init_success", ready)
        session.greet(OUTPUT, self._greeting_events)

    async def _audio(self, message: dict) -> None:
        encoded = _field(message, "audio")
        if not isinstance(encoded, str) or not encoded:
            await self.error("audio: missing 'audio' (base64 string)")
            return
        try:
            audio = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            await self.error("audio: 'audio' is not valid base64")
            return
        if not audio:
            await self.error("audio: empty audio")
            return
        fmt = audio_format(audio)
        if fmt.container == audio_pb2.AUDIO_CONTAINER_RAW and len(audio) / (2 * RAW_PCM_RATE) > self._max_utterance_s:
            await self.error(f"audio: utterance longer than {self._max_utterance_s:.0f} s")
            return
        turn = Turn(kind="audio", audio=audio, audio_format=fmt, output=self._output(), emit=_TurnEvents(self))
        turn.attributes["voice.audio.bytes"] = len(audio)
        self._session.submit(turn)

    async def _text(self, message: dict) -> None:
        text = _field(message, "text")
        if not isinstance(text, str) or not text.strip():
            await self.error("text: missing or empty 'text'")
            return
        self._session.submit(Turn(kind="text", text=text.strip(), output=self._output(), emit=_TurnEvents(self)))

    def _output(self) -> OutputFormat | None:
        return OUTPUT if self._session.agent.pipeline.respond_with_audio else None

    async def _end(self, message: dict) -> None:
        session, self._session = self._session, None
        await session.close("completed")
        await self.send("session_ended", {"callLogId": session.id})

    def end_after_turn(self, action: CallAction) -> None:
        """A built-in tool ended (or transferred) the session: once its turns are over it is closed and
        the client gets ``session_ended`` with the reason."""
        session = self._session
        if session is None:
            return

        async def end() -> None:
            await session.wait_idle()
            if self._session is not session:
                return
            self._session = None
            await session.close("transferred" if action.kind == "transfer_call" else "completed")
            data = {"callLogId": session.id, "reason": action.kind}
            if action.number:
                data["transferNumber"] = action.number
            await self.send("session_ended", data)

        self._ending = asyncio.create_task(end())

    async def _greeting_events(self, event: Event) -> None:
        """The greeting goes out as one ``audio_response``, as the seed's first message."""
        if isinstance(event, SpeechCompleted) and self._session is not None:
            await self.send(
                "audio_response",
                {"audio": wav_base64(event.audio, event.sample_rate), "text": self._session.agent.greeting},
            )
        elif isinstance(event, TurnFailed):
            await self.error(event.error)


class _Playback:
    """When a client that plays each sentence on arrival, one after another, will have played what it got."""

    def __init__(self) -> None:
        self._ends_at = 0.0

    async def wait(self) -> None:
        """Waits until the next sentence may leave: :data:`PLAYBACK_LEAD_S` before the last one would end."""
        delay = self._ends_at - PLAYBACK_LEAD_S - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)

    def sent(self, seconds: float) -> None:
        """``seconds`` of audio were sent now."""
        self._ends_at = max(self._ends_at, asyncio.get_running_loop().time()) + seconds


class _TurnEvents:
    """Translates one turn's events into seed 001 messages."""

    def __init__(self, connection: BrowserConnection) -> None:
        self._connection = connection
        self._spoken = False
        self._said = False
        self._playback = _Playback()
        self._sentence = SentenceAudio()

    async def __call__(self, event: Event) -> None:
        send = self._connection.send
        if isinstance(event, TurnStarted):
            self._spoken = event.turn_kind == "audio"
            if self._spoken:
                await send("processing_started")
        elif isinstance(event, TurnEnded):
            if self._spoken or self._said:
                await send("processing_complete")
            if event.result.action is not None and event.result.action.ends_call and event.outcome != "cancelled":
                self._connection.end_after_turn(event.result.action)
        elif isinstance(event, SttCompleted):
            await send("stt_complete", {"text": event.text})
        elif isinstance(event, LlmDelta):
            await send("llm_chunk", {"chunk": event.chunk, "fullText": event.full_text})
        elif isinstance(event, LlmCompleted):
            await send("llm_complete", {"text": event.text})
            if not self._spoken:
                await send("text_response", {"text": event.text})
        elif isinstance(event, SpeechAudio) and (sentence := self._sentence.add(event)):
            await self._playback.wait()
            audio = wav_base64(sentence, event.sample_rate)
            self._said = True
            await send("tts_start")
            await send("tts_complete", {"audio": audio})
            await send("audio_response", {"audio": audio, "text": event.text})
            if event.sample_rate > 0:
                self._playback.sent(len(sentence) / (2 * event.sample_rate))
        elif isinstance(event, ToolCalled):
            await send(
                "llm_tool_call", {"toolCallId": event.tool_call_id, "name": event.name, "arguments": event.arguments}
            )
        elif isinstance(event, ToolFinished):
            # This socket is unauthenticated: a tool's answer is for the model, shown only when the agent says so.
            result = event.content if event.expose_result else json.dumps({"successful": event.successful})
            await send(
                "llm_tool_result",
                {
                    "toolCallId": event.tool_call_id,
                    "name": event.name,
                    "result": result,
                    "successful": event.successful,
                },
            )
        elif isinstance(event, TurnFailed):
            await self._connection.error(event.error)
        elif isinstance(event, StageStarted):
            await send(event.kind)


def route(
    websocket: WebSocket,
    context: GatewayContext,
    *,
    max_message_bytes: int,
    max_utterance_s: float,
    channel_tokens: ChannelTokens | None = None,
) -> Route:
    """How to serve ``websocket`` as seed 001 (see :class:`BrowserConnection` for the arguments)."""
    return Route(
        BrowserConnection,
        lambda guard: BrowserConnection(
            websocket, context, guard, max_utterance_s=max_utterance_s, channel_tokens=channel_tokens
        ),
        max_frame_bytes=max_message_bytes,
    )
