"""OpenAI Realtime (protocols.md §6) at ``/v1/realtime``: apps written against the ``openai`` SDK's realtime
client talk to the self-hosted stack by changing their base URL.

The socket is a real-time call of the conversation core (:class:`~voice_gateway.conversation.call.CallSession`):
appended audio goes through the core's VAD and turn detection (``server_vad`` is the ``silence`` detector,
``semantic_vad`` the end-of-turn model with its ``eagerness``), barge-in cancels the turn in flight, and the
turns run on the one turn runner. This module only translates: it is the call's
:class:`~voice_gateway.conversation.call.CallListener` (speech started and stopped, held utterances, every
turn event) and turns client events into turns; :mod:`.realtime_response` writes a turn's events as a
response, :mod:`.realtime_session` maps the session configuration, :mod:`.realtime_items` keeps the
conversation's items, :mod:`.realtime_audio` the input audio buffer. Output audio is sent as soon as it
is synthesized, as OpenAI does.

``?model=`` names an agent (an unknown name, such as ``gpt-realtime``, gets the default agent). The API key
comes as ``Authorization: Bearer`` or, from browsers, as the subprotocol ``openai-insecure-api-key.<key>``,
and is checked like the REST API's (static ``GATEWAY_API_KEYS``); ``realtime`` is selected when offered,
never required. ``OpenAI-Beta: realtime=v1`` or the subprotocol ``openai-beta.realtime-v1`` selects the
beta protocol (``GATEWAY_REALTIME_PROTOCOL`` forces ``ga`` or ``beta``). Bad events get the protocol's
``error`` event and the session goes on; a missing or wrong key gets ``error`` and close 1008.
"""

from __future__ import annotations

import logging

from starlette.websockets import WebSocket

from voice.v1 import audio_pb2
from voice_gateway.agents import AGENT_ID, Agent
from voice_gateway.agents.tools import CallAction
from voice_gateway.api.auth import BEARER, Authenticator
from voice_gateway.api.limits import ConnectionGuard, LimitExceeded, Limits, close_socket
from voice_gateway.conversation.call import CallSession
from voice_gateway.conversation.events import Event, SttCompleted, TurnEnded, TurnStarted
from voice_gateway.conversation.runner import INTERRUPTED, Turn
from voice_gateway.conversation.session import GatewayContext, Session
from voice_gateway.dialects.base import Connection, serve
from voice_gateway.dialects.realtime_audio import InputAudio
from voice_gateway.dialects.realtime_events import INBOUND_ALIASES, Wire, new_id, to_wire
from voice_gateway.dialects.realtime_items import Items
from voice_gateway.dialects.realtime_outbox import Outbox
from voice_gateway.dialects.realtime_response import ResponseStream
from voice_gateway.dialects.realtime_session import (
    ConfigError,
    RealtimeConfig,
    agent_for,
    apply_update,
    media_formats,
    response_config,
)
from voice_runtime.tasks import wait_quietly

logger = logging.getLogger(__name__)

DIALECT = "realtime"
POLICY = 1008
KEY_PROTOCOL = "openai-insecure-api-key."
BETA_PROTOCOL = "openai-beta.realtime-v1"


def client_protocol(websocket: WebSocket, setting: str) -> tuple[bool, str | None, str]:
    """Whether the client speaks beta, the subprotocol to select, and the key it sent."""
    offered = list(websocket.scope.get("subprotocols") or [])
    beta = "realtime=v1" in websocket.headers.get("openai-beta", "").replace(" ", "") or BETA_PROTOCOL in offered
    beta = setting == "beta" or (setting == "auto" and beta)
    selected = "realtime" if "realtime" in offered else None
    authorization = websocket.headers.get("authorization", "")
    key = authorization[len(BEARER) :].strip() if authorization[: len(BEARER)].lower() == BEARER else ""
    for protocol in offered:
        if protocol.startswith(KEY_PROTOCOL) and not key:
            key = protocol[len(KEY_PROTOCOL) :]
    return beta, selected, key


class RealtimeConnection(Connection):
    """One OpenAI Realtime session."""

    dialect = DIALECT

    def __init__(
        self,
        websocket: WebSocket,
        context: GatewayContext,
        guard: ConnectionGuard,
        *,
        auth: tuple[bool, str],
        model: str,
        beta: bool,
    ) -> None:
        super().__init__(websocket, guard)
        self._context = context
        self._auth = auth
        self._model = model
        self.wire = Wire(beta)
        self._outbox = Outbox(super().send_text)
        self._base: Agent | None = None
        self.config: RealtimeConfig | None = None
        self.call: CallSession | None = None
        self.items = Items()
        self._streams: dict[Turn, ResponseStream] = {}
        self._active: ResponseStream | None = None
        self.audio = InputAudio(0.0)
        self._held: tuple[Turn, str] | None = None
        self._speech_item: str | None = None
        self._client_event_id = None

    @classmethod
    def error_frame(cls, message: str, code: str = "bad_request") -> str:
        return Wire(False).error(message, code=code)

    async def send_text(self, text: str | None) -> None:
        """Queues one server event; events leave in the order they were queued (see :class:`Outbox`)."""
        if text:
            self._outbox.put(text)

    async def error(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        await self.send_text(self.wire.error(message, code=code, param=param, event_id=self._client_event_id))

    # -- the call's transport: audio goes out in the response events, and the client keeps its own playback --

    async def send_audio(self, audio: bytes) -> None:
        return None

    async def send_mark(self, name: str) -> bool:
        return False

    async def clear(self) -> None:
        return None

    async def hang_up(self, action: CallAction) -> None:
        await self._outbox.drain()
        await close_socket(self.ws, 1000, action.kind)

    # -- the socket --

    async def opened(self) -> None:
        ok, identity = self._auth
        if not ok:
            await self.error(f"unauthorized: {identity}", "invalid_api_key")
            self.close(POLICY, "unauthorized")
            return
        try:
            self.guard.bind_key(identity)
        except LimitExceeded as exc:
            await self.error(exc.reason, "session_limit")
            self.close(exc.close_code, exc.reason)
            return
        agent = await self._context.agents.get(self._model) if AGENT_ID.fullmatch(self._model) else None
        if agent is None:
            agent = await self._context.agents.get("default")
        if agent is None:
            await self.error("no default agent is configured", "server_error")
            self.close(POLICY, "no agent")
            return
        self._base = agent
        self.audio = InputAudio(agent.pipeline.max_utterance_s)
        self.config = RealtimeConfig.from_agent(agent)
        media_in, media_out = media_formats(self.config)
        session = Session(self._context, agent_for(self.config, agent), DIALECT)
        self.call = CallSession(session, media_in, self, media_out)
        self.call.listener = self
        await session.start()
        self.guard.handshake_done()
        await self.send_text(self.wire.event("session.created", session=self._session_wire()))

    def _session_wire(self) -> dict:
        return to_wire(self.config, self.call.session.id, self._model or "default", self.wire.beta)

    async def finished(self) -> None:
        if self.call is not None:
            await self.call.close("completed")
        await self._outbox.close()

    async def handle_frame(self, frame: dict) -> None:
        self._client_event_id = None
        await super().handle_frame(frame)

    async def on_message(self, message: dict) -> None:
        kind = message.get("type")
        kind = INBOUND_ALIASES.get(kind, kind) if isinstance(kind, str) else kind
        event_id = message.get("event_id")
        self._client_event_id = event_id if isinstance(event_id, str) and len(event_id) <= 128 else None
        handler = HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            shown = kind[:64] if isinstance(kind, str) else type(kind).__name__
            await self.bad_frame("unknown_event", f"unknown event type {shown!r}")
            return
        if self.call is None:
            await self.error("the session is not open", "session_not_open")
            return
        try:
            await handler(self, message)
        except ConfigError as exc:
            await self.error(str(exc), "invalid_value", exc.param)

    # -- session --

    async def _session_update(self, message: dict) -> None:
        config, notes = apply_update(self.config, message.get("session"))
        agent = agent_for(config, self._base)
        for note in notes:
            logger.info("realtime session %s: %s", self.call.session.id, note)
        self.config = config
        media_in, media_out = media_formats(config)
        self.call.reconfigure(agent, media_in, media_out)
        self.audio.clear()
        await self.send_text(self.wire.event("session.updated", session=self._session_wire()))

    # -- input audio --

    async def _append(self, message: dict) -> None:
        media_in, _ = media_formats(self.config)
        samples, data = self.audio.decode(message, "audio", media_in)
        vad = self.config.turn_detection is not None
        self.audio.append(samples, media_in, rolling=vad)
        if vad:
            self.call.on_audio(data)

    async def _commit(self, message: dict) -> None:
        pcm, fmt = self.audio.commit(media_formats(self.config)[0])
        item_id = new_id("item")
        self._held = (Turn(kind="audio", audio=pcm, audio_format=fmt, emit=_nothing), item_id)
        await self._committed(item_id)

    async def _committed(self, item_id: str) -> None:
        previous = self.items.last_id()
        await self.send_text(
            self.wire.event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        )
        await self._add_item(self.wire.user_item(item_id, transcript=None))

    async def _clear(self, message: dict) -> None:
        self.audio.clear()
        if self.call is not None:
            self.call.drop_utterance()
        self._speech_item = None
        await self.send_text(self.wire.event("input_audio_buffer.cleared"))

    # -- the call's listener --

    def speech_started(self, onset_s: float) -> None:
        self._speech_item = new_id("item")
        event = self.wire.event(
            "input_audio_buffer.speech_started", audio_start_ms=int(onset_s * 1000), item_id=self._speech_item
        )
        self._outbox.put(event)

    def utterance(self, turn: Turn, last_voiced_s: float) -> bool:
        item_id, self._speech_item = self._speech_item or new_id("item"), None
        self.audio.clear()
        end_ms = int(last_voiced_s * 1000)
        self._outbox.put(self.wire.event("input_audio_buffer.speech_stopped", audio_end_ms=end_ms, item_id=item_id))
        previous = self.items.last_id()
        committed = self.wire.event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        self._outbox.put(committed)
        for text in self._item_events(self.wire.user_item(item_id, transcript=None)):
            self._outbox.put(text)
        if not self.config.create_response:
            self._held = (turn, item_id)
            return False
        self._flush_texts()
        if not self.config.speaks:
            turn.output = None
        self._stream(turn, user_item_id=item_id, audio=self.config.speaks)
        return True

    async def on_event(self, event: Event) -> None:
        turn = self.call.session.runner.current
        stream = self._streams.get(turn) if turn is not None else None
        if stream is None:
            return
        if isinstance(event, TurnStarted):
            self.items.turn_started(self.call.session.conversation.history)
            self._active = stream
            if stream.done:
                self.call.session.runner.interrupt(INTERRUPTED)
        elif isinstance(event, SttCompleted) and stream.user_item_id:
            self.items.transcribed(stream.user_item_id, event.text)
        await stream.on_event(event, transcribe=self.config.transcription is not None)
        if isinstance(event, TurnEnded):
            self._streams.pop(turn, None)
            if self._active is stream:
                self._active = None
            self.items.turn_ended(self.call.session, stream.user_item_id, stream.spoken)

    def _stream(self, turn: Turn, *, user_item_id: str | None, audio: bool) -> ResponseStream:
        stream = ResponseStream(
            self.send_text,
            self.wire,
            audio=audio,
            conversation_id=self.call.session.id,
            user_item_id=user_item_id,
            on_item=self.items.output_item,
        )
        self._streams[turn] = stream
        if self._active is None or self._active.done:
            # Else it waits behind the running response (speech that did not interrupt it) until its turn starts.
            self._active = stream
        return stream

    def _flush_texts(self) -> None:
        """Typed messages no response has answered yet join the history before spoken input is answered."""
        for item_id, text in self.items.pending:
            self.items.append_history(
                self.call.session.conversation.history, {"role": "user", "content": text}, item_id
            )
        self.items.pending.clear()

    # -- conversation --

    def _item_events(self, item: dict) -> list[str]:
        previous = self.items.last_id()
        self.items.add(item)
        events = [self.wire.event("conversation.item.added", previous_item_id=previous, item=item)]
        events.append(self.wire.event("conversation.item.done", previous_item_id=previous, item=item))
        return [event for event in events if event]

    async def _add_item(self, item: dict) -> None:
        for text in self._item_events(item):
            await self.send_text(text)

    async def _item_create(self, message: dict) -> None:
        history = self.call.session.conversation.history
        item, entry, pending = self.items.from_client(message.get("item"), self.wire)
        if pending is not None:
            self.items.pending.append((item["id"], pending))
        elif entry is not None:
            self._flush_texts()
            self.items.append_history(history, entry, item["id"])
        if item.get("type") == "message" and item["content"][0]["type"] == "input_audio":
            media_in, _ = media_formats(self.config)
            samples, _ = self.audio.decode(item["content"][0], "item.content[0].audio", media_in)
            fmt = audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=media_in.sample_rate)
            turn = Turn(kind="audio", audio=samples.astype("<i2").tobytes(), audio_format=fmt, emit=_nothing)
            self._held = (turn, item["id"])
            item["content"][0].pop("audio", None)
        await self._add_item(item)

    async def _item_retrieve(self, message: dict) -> None:
        item = self.items.get(message.get("item_id"))
        await self.send_text(self.wire.event("conversation.item.retrieved", item=item))

    async def _item_delete(self, message: dict) -> None:
        item_id = message.get("item_id")
        self.items.delete(item_id, self.call.session.conversation.history)
        await self.send_text(self.wire.event("conversation.item.deleted", item_id=item_id))

    async def _item_truncate(self, message: dict) -> None:
        item_id, end_ms = message.get("item_id"), message.get("audio_end_ms")
        active = self._active
        in_progress = active is not None and not active.done and active.message_id == item_id
        self.items.truncate(item_id, end_ms, self.call.session, spoken=active.spoken if in_progress else None)
        event = self.wire.event("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=end_ms)
        await self.send_text(event)

    # -- responses --

    async def _response_create(self, message: dict) -> None:
        if self._active is not None and not self._active.done:
            raise ConfigError(
                "Conversation already has an active response in progress: wait for response.done", "response"
            )
        config, notes = response_config(self.config, message.get("response"))
        for note in notes:
            logger.info("realtime session %s: %s", self.call.session.id, note)
        agent = agent_for(config, self._base, "response") if config is not self.config else None
        user_item = None
        if self._held is not None:
            (turn, user_item), self._held = self._held, None
            self._flush_texts()
        else:
            text = "\n\n".join(text for _, text in self.items.pending)
            user_item = self.items.pending[-1][0] if self.items.pending else None
            self.items.pending.clear()
            turn = Turn(kind="text" if text else "response", text=text, emit=_nothing)
        turn.agent = agent
        stream = self._stream(turn, user_item_id=user_item, audio=config.speaks)
        await stream.create()
        self.call.respond(turn, speak=config.speaks)

    async def _response_cancel(self, message: dict) -> None:
        stream = self._active
        if stream is None or stream.done:
            raise ConfigError("Cancellation failed: no active response found", "response_id")
        runner = self.call.session.runner
        if runner.current is not None and self._streams.get(runner.current) is stream:
            # Its TurnEnded sends response.done (cancelled) once the turn has unwound (its bus requests too).
            await wait_quietly(runner.interrupt(INTERRUPTED))
        # A queued turn (or one cancelled before it began) has no TurnEnded to wait for; it stops when it starts.
        await stream.finish("cancelled", {"type": "cancelled", "reason": "client_cancelled"})
        if self._active is stream:
            self._active = None

    async def _ignored(self, message: dict) -> None:
        logger.info(
            "realtime session %s: %s is not supported on WebSocket; ignored", self.call.session.id, message["type"]
        )


async def _nothing(event: Event) -> None:
    return None


HANDLERS = {
    "session.update": RealtimeConnection._session_update,
    "input_audio_buffer.append": RealtimeConnection._append,
    "input_audio_buffer.commit": RealtimeConnection._commit,
    "input_audio_buffer.clear": RealtimeConnection._clear,
    "conversation.item.create": RealtimeConnection._item_create,
    "conversation.item.retrieve": RealtimeConnection._item_retrieve,
    "conversation.item.delete": RealtimeConnection._item_delete,
    "conversation.item.truncate": RealtimeConnection._item_truncate,
    "response.create": RealtimeConnection._response_create,
    "response.cancel": RealtimeConnection._response_cancel,
    "output_audio_buffer.clear": RealtimeConnection._ignored,
}


async def serve_realtime(
    websocket: WebSocket, context: GatewayContext, authenticator: Authenticator, limits: Limits, protocol: str = "auto"
) -> None:
    """Serves one OpenAI Realtime session (``protocol``: ``auto``, ``ga`` or ``beta``)."""
    beta, selected, key = client_protocol(websocket, protocol)
    auth = authenticator.check_api_key(key)
    model = websocket.query_params.get("model", "")
    await websocket.accept(subprotocol=selected)
    await serve(
        websocket,
        limits,
        RealtimeConnection,
        lambda guard: RealtimeConnection(websocket, context, guard, auth=auth, model=model, beta=beta),
        handshake=False,
    )
