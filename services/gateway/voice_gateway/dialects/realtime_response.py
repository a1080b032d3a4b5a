"""One OpenAI Realtime response: the events of one turn of the conversation core, as the protocol's
server events, in the order clients expect.

``response.created``; per output item ``response.output_item.added``, ``conversation.item.added``,
``response.content_part.added``, the deltas (``response.output_audio.delta`` and
``response.output_audio_transcript.delta``, or ``response.output_text.delta``), their ``.done`` events,
``response.content_part.done``, ``response.output_item.done``, ``conversation.item.done``; a client
tool's call as a ``function_call`` item (``conversation.item.added`` with its ``call_id`` before
``response.function_call_arguments.done``); last ``response.done`` with the status and usage. The
agent's own (server-side) tools are not shown: they run on the gateway, as on every other dialect.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable

from voice_gateway.conversation.events import (
    Event,
    LlmDelta,
    SpeechAudio,
    StageStarted,
    SttCompleted,
    ToolCalled,
    TurnEnded,
    TurnFailed,
)
from voice_gateway.conversation.runner import BARGE_IN
from voice_gateway.dialects.realtime_events import (
    Wire,
    function_call_item,
    new_id,
    response_object,
    usage,
)

# Audio deltas of at most this many bytes of base64 input (about 0.5 s of 24 kHz PCM16).
DELTA_BYTES = 24000


class ResponseStream:
    """Translates one turn's events into one response's server events.

    Args:
        send: Sends one server event (JSON text; ``None`` is skipped).
        wire: The connection's protocol.
        audio: Whether the response speaks (else text only).
        conversation_id: The session's conversation id.
        user_item_id: The user's audio item this response answers (its transcription is reported).
        on_item: Called with every output item once it is done (the connection keeps its items).
    """

    def __init__(
        self,
        send: Callable[[str | None], Awaitable[None]],
        wire: Wire,
        *,
        audio: bool,
        conversation_id: str,
        user_item_id: str | None = None,
        on_item: Callable[[dict, str], None] | None = None,
    ) -> None:
        self.id = new_id("resp")
        self._send = send
        self._wire = wire
        self.audio = audio
        self._conversation_id = conversation_id
        self.user_item_id = user_item_id
        self._on_item = on_item or (lambda item, response_id: None)
        self.created = False
        self.done = False
        self.started = False
        self._output: list[dict] = []
        self._message: dict | None = None
        self._text = ""
        self._input_text = ""
        self._error: dict | None = None
        # Per sentence: its text, the milliseconds of its audio sent, and whether all of it was.
        self.spoken: list[tuple[str, float, bool]] = []
        self._in_sentence = False

    @property
    def modalities(self) -> list[str]:
        return ["audio"] if self.audio else ["text"]

    @property
    def message_id(self) -> str | None:
        return self._message["id"] if self._message else None

    def _response(self, status: str, details: dict | None = None, usage_: dict | None = None) -> dict:
        return response_object(
            self.id,
            status,
            output=self._output,
            modalities=self.modalities,
            conversation_id=self._conversation_id,
            details=details,
            usage_=usage_,
            beta=self._wire.beta,
        )

    async def create(self) -> None:
        """``response.created`` (once)."""
        if not self.created:
            self.created = True
            await self._send(self._wire.event("response.created", response=self._response("in_progress")))

    async def on_event(self, event: Event, transcribe: bool) -> None:
        """One event of the response's turn; ``transcribe``: report the user's transcript."""
        if self.done:
            return
        if isinstance(event, SttCompleted):
            self._input_text = event.text
            if transcribe and self.user_item_id:
                await self._send(self._transcribed(event.text))
        elif isinstance(event, StageStarted) and event.kind == "llm_start":
            await self.create()
        elif isinstance(event, LlmDelta):
            await self._open_message()
            self._text += event.chunk
            name = "response.output_audio_transcript.delta" if self.audio else "response.output_text.delta"
            await self._send(self._wire.event(name, **self._where(), delta=event.chunk))
        elif isinstance(event, SpeechAudio) and self.audio:
            if event.audio:
                await self._open_message()
                ms = len(event.audio) * 1000 / max(1, event.sample_rate * self._width(event))
                if self._in_sentence and self.spoken:
                    self.spoken[-1] = (self.spoken[-1][0], self.spoken[-1][1] + ms, event.final)
                else:
                    self.spoken.append((event.text, ms, event.final))
                for offset in range(0, len(event.audio), DELTA_BYTES):
                    delta = base64.b64encode(event.audio[offset : offset + DELTA_BYTES]).decode()
                    await self._send(self._wire.event("response.output_audio.delta", **self._where(), delta=delta))
            if event.final and self._in_sentence and self.spoken:
                self.spoken[-1] = (*self.spoken[-1][:2], True)
            self._in_sentence = not event.final
        elif isinstance(event, ToolCalled) and event.client:
            await self._close_message()
            await self._function_call(event)
        elif isinstance(event, TurnFailed) and event.code == "NO_SPEECH" and not self.created:
            # Noise the VAD took for speech: the user's item stays, with an empty transcript, and no response.
            self.done = True
            if transcribe and self.user_item_id:
                await self._send(self._transcribed(""))
        elif isinstance(event, TurnFailed):
            self._error = {
                "type": "server_error" if event.code != "NO_SPEECH" else "invalid_request_error",
                "code": event.code.lower(),
                "message": event.error,
            }
        elif isinstance(event, TurnEnded):
            if event.cancelled:
                reason = "turn_detected" if event.cancel_reason == BARGE_IN else "client_cancelled"
                await self.finish("cancelled", {"type": "cancelled", "reason": reason})
            elif self._error is not None:
                await self.finish("failed", {"type": "failed", "error": self._error})
            else:
                await self.finish("completed")

    def _transcribed(self, text: str) -> str | None:
        return self._wire.event(
            "conversation.item.input_audio_transcription.completed",
            item_id=self.user_item_id,
            content_index=0,
            transcript=text,
            usage={"type": "duration", "seconds": 0},
        )

    @staticmethod
    def _width(event: SpeechAudio) -> int:
        # μ-law and A-law are one byte a sample; the response knows only the rate, so 8 kHz means G.711.
        return 1 if event.sample_rate == 8000 else 2

    def _where(self) -> dict:
        return {
            "response_id": self.id,
            "item_id": self._message["id"],
            "output_index": len(self._output) - 1,
            "content_index": 0,
        }

    async def _open_message(self) -> None:
        if self._message is not None:
            return
        await self.create()
        wire = self._wire
        self._message = wire.assistant_item(new_id("item"), "in_progress", self.audio, "", content=False)
        self._output.append(self._message)
        index = len(self._output) - 1
        item = dict(self._message)
        await self._send(wire.event("response.output_item.added", response_id=self.id, output_index=index, item=item))
        await self._send(wire.event("conversation.item.added", previous_item_id=None, item=item))
        part = wire.part(self.audio, "")
        await self._send(wire.event("response.content_part.added", **self._where(), part=part))

    async def _close_message(self, status: str = "completed") -> None:
        message = self._message
        if message is None or message["status"] != "in_progress":
            return
        wire, where, text = self._wire, self._where(), self._text.strip()
        if self.audio:
            await self._send(wire.event("response.output_audio.done", **where))
            await self._send(wire.event("response.output_audio_transcript.done", **where, transcript=text))
        else:
            await self._send(wire.event("response.output_text.done", **where, text=text))
        await self._send(wire.event("response.content_part.done", **where, part=wire.part(self.audio, text)))
        message.update(wire.assistant_item(message["id"], status, self.audio, text))
        index = where["output_index"]
        await self._send(wire.event("response.output_item.done", response_id=self.id, output_index=index, item=message))
        await self._send(wire.event("conversation.item.done", previous_item_id=None, item=message))
        self._on_item(message, self.id)

    async def _function_call(self, event: ToolCalled) -> None:
        wire = self._wire
        await self.create()
        item = function_call_item(new_id("item"), event.tool_call_id, event.name, "", "in_progress")
        self._output.append(item)
        index = len(self._output) - 1
        where = {"response_id": self.id, "item_id": item["id"], "output_index": index, "call_id": event.tool_call_id}
        await self._send(wire.event("response.output_item.added", response_id=self.id, output_index=index, item=item))
        await self._send(wire.event("conversation.item.added", previous_item_id=None, item=dict(item)))
        await self._send(wire.event("response.function_call_arguments.delta", **where, delta=event.arguments))
        await self._send(
            wire.event("response.function_call_arguments.done", **where, name=event.name, arguments=event.arguments)
        )
        item.update(status="completed", arguments=event.arguments)
        await self._send(wire.event("response.output_item.done", response_id=self.id, output_index=index, item=item))
        await self._send(wire.event("conversation.item.done", previous_item_id=None, item=item))
        self._on_item(item, self.id)

    async def finish(self, status: str, details: dict | None = None) -> None:
        """Closes the open item and sends ``response.done`` (once)."""
        if self.done:
            return
        await self.create()
        self.done = True
        item_status = "completed" if status == "completed" else "incomplete"
        await self._close_message(item_status)
        report = usage(self._input_text, self._text, self.audio)
        await self._send(self._wire.event("response.done", response=self._response(status, details, report)))
