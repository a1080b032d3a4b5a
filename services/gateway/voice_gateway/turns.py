"""The turn engine, independent of any dialect: user audio or text in, STT → LLM → TTS over the bus,
and a stream of neutral events out that each dialect translates to its own wire messages.

Speech starts before the reply is finished: the LLM's tokens are cut into sentences as they
arrive, each sentence goes to TTS at once (requests run in parallel), and the audio is handed to
the dialect strictly in sentence order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry import trace

from voice.v1 import audio_pb2, llm_pb2, stt_pb2, tts_pb2
from voice_bus.client import BusClient
from voice_bus.errors import BusError
from voice_gateway.agents import Agent
from voice_gateway.sentences import SentenceStream
from voice_runtime.tasks import cancel_and_wait

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("voice_gateway")


@dataclass(frozen=True)
class Event:
    """Base of what a turn reports; ``kind`` names it for dialects and logs."""

    kind: str = ""


@dataclass(frozen=True)
class StageStarted(Event):
    """A stage of the turn starts: ``kind`` is ``stt_start`` or ``llm_start``."""


@dataclass(frozen=True)
class SttCompleted(Event):
    text: str = ""
    kind: str = "stt_complete"


@dataclass(frozen=True)
class LlmDelta(Event):
    chunk: str = ""
    full_text: str = ""
    kind: str = "llm_chunk"


@dataclass(frozen=True)
class LlmCompleted(Event):
    text: str = ""
    kind: str = "llm_complete"


@dataclass(frozen=True)
class SpeechAudio(Event):
    """One sentence of the agent's speech, in the encoding and rate the dialect asked for."""

    audio: bytes = b""
    sample_rate: int = 0
    text: str = ""
    sentence_index: int = 0
    kind: str = "speech_audio"


@dataclass(frozen=True)
class SpeechCompleted(Event):
    audio: bytes = b""
    sample_rate: int = 0
    kind: str = "tts_complete"


@dataclass(frozen=True)
class TurnFailed(Event):
    error: str = ""
    code: str = ""
    kind: str = "error"


Emit = Callable[[Event], Awaitable[None]]


@dataclass
class TurnResult:
    """What a finished turn leaves behind for the history and the call log."""

    user_text: str = ""
    assistant_text: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class OutputFormat:
    """Encoding and rate of the agent's audio for a dialect; rate 0 keeps the voice's own."""

    encoding: int = audio_pb2.AUDIO_ENCODING_PCM16
    sample_rate: int = 0


@dataclass
class Conversation:
    """A session's dialogue state: the agent and the chat history every turn sees."""

    session_id: str
    agent: Agent
    history: list[dict] = field(default_factory=list)

    def messages(self) -> list[llm_pb2.ChatMessage]:
        system = [llm_pb2.ChatMessage(role="system", content=self.agent.system_prompt)]
        return system + [llm_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in self.history]


class TurnEngine:
    """Runs turns on the bus for any dialect.

    Args:
        bus: Client of the STT, LLM and TTS workers.
        stt_timeout_s, llm_timeout_s, tts_timeout_s: Budgets of each bus request.
    """

    def __init__(self, bus: BusClient, *, stt_timeout_s: float, llm_timeout_s: float, tts_timeout_s: float) -> None:
        self._bus = bus
        self._stt_timeout_s = stt_timeout_s
        self._llm_timeout_s = llm_timeout_s
        self._tts_timeout_s = tts_timeout_s

    async def transcribe(self, conversation: Conversation, audio: bytes, fmt: audio_pb2.AudioFormat) -> str:
        """Speech to text through the STT workers."""
        request = stt_pb2.TranscribeRequest(
            audio=audio, format=fmt, language=conversation.agent.stt.language, session_id=conversation.session_id
        )
        async for event in self._bus.stream(
            "stt", request, timeout=self._stt_timeout_s, session_id=conversation.session_id
        ):
            if event.HasField("transcript"):
                return event.transcript.text.strip()
        return ""

    async def speak(
        self, conversation: Conversation, text: str, output: OutputFormat, emit: Emit, *, record: bool = True
    ) -> TurnResult:
        """Says ``text`` (a greeting, a fixed message) without asking the LLM."""
        started = time.perf_counter()
        speaker = _Speaker(self, conversation, output, emit, started)
        sentences = SentenceStream()
        try:
            for sentence in [*sentences.feed(text), *sentences.flush()]:
                speaker.say(sentence)
            await speaker.finish()
        finally:
            await speaker.cancel()
        if record:
            conversation.history.append({"role": "assistant", "content": text})
        return TurnResult(assistant_text=text, timings=speaker.timings)

    async def respond(
        self, conversation: Conversation, user_text: str, output: OutputFormat | None, emit: Emit, started: float
    ) -> TurnResult:
        """Streams the LLM's answer to ``user_text`` and, when ``output`` is given, speaks it sentence by sentence.

        The user's message and the answer join the conversation's history.
        """
        agent = conversation.agent
        status = SessionEvents(self._bus, conversation.session_id)
        await status.publish("Assistant is processing your request...", "started", "status")
        conversation.history.append({"role": "user", "content": user_text})
        request = llm_pb2.GenerateRequest(
            messages=conversation.messages(),
            model=agent.llm.model,
            max_tokens=agent.llm.max_tokens,
            session_id=conversation.session_id,
        )
        if agent.llm.temperature is not None:
            request.temperature = agent.llm.temperature
        result = TurnResult(user_text=user_text)
        speaker = _Speaker(self, conversation, output, emit, started) if output is not None else None
        sentences = SentenceStream()
        full_text = ""
        llm_started = time.perf_counter()
        try:
            with tracer.start_as_current_span("llm"):
                async for event in self._bus.stream(
                    "llm", request, timeout=self._llm_timeout_s, session_id=conversation.session_id
                ):
                    if event.HasField("delta") and event.delta.text:
                        if not full_text:
                            result.timings["llm_first_token_s"] = time.perf_counter() - llm_started
                            await status.publish("Assistant is responding...", "responding", "status")
                        full_text += event.delta.text
                        await status.publish(full_text, "in_progress", "response")
                        await emit(LlmDelta(chunk=event.delta.text, full_text=full_text))
                        if speaker:
                            for sentence in sentences.feed(event.delta.text):
                                result.timings.setdefault("llm_first_sentence_s", time.perf_counter() - llm_started)
                                speaker.say(sentence)
            result.timings["llm_s"] = time.perf_counter() - llm_started
            if speaker:
                for sentence in sentences.flush():
                    result.timings.setdefault("llm_first_sentence_s", time.perf_counter() - llm_started)
                    speaker.say(sentence)
            result.assistant_text = full_text.strip()
            await status.publish(result.assistant_text, "completed", "response", final=True)
            await emit(LlmCompleted(text=result.assistant_text))
            if speaker:
                await speaker.finish()
                result.timings.update(speaker.timings)
        except BusError as exc:
            await status.publish(describe(exc, "the assistant"), "error", "error", error_details=str(exc))
            raise
        finally:
            if speaker:
                await speaker.cancel()
            conversation.history.append({"role": "assistant", "content": full_text.strip()})
        return result


EVENTS_PREFIX = "voice.events."


class SessionEvents:
    """Publishes a turn's progress as the channel payloads of seed 002 on ``voice.events.<session_id>``,
    where the channel bridge (``/ws/channels``) and any observer on any gateway replica receive them."""

    def __init__(self, bus: BusClient, session_id: str) -> None:
        self._nc = bus.nc
        self._subject = EVENTS_PREFIX + session_id
        self._session_id = session_id
        self._message_id = uuid.uuid4().hex

    async def publish(
        self, message: str, status: str, type_: str, *, final: bool = False, error_details: str | None = None
    ) -> None:
        payload = {
            "message": message,
            "timestamp": time.time(),
            "status": status,
            "type": type_,
            "final_message": final,
            "message_id": self._message_id,
            "thread_id": self._session_id,
        }
        if error_details is not None:
            payload["error_details"] = error_details
        with contextlib.suppress(Exception):
            await self._nc.publish(self._subject, json.dumps(payload).encode())


class _Speaker:
    """Synthesizes sentences in parallel and emits their audio in order."""

    def __init__(
        self, engine: TurnEngine, conversation: Conversation, output: OutputFormat, emit: Emit, started: float
    ) -> None:
        self._engine = engine
        self._conversation = conversation
        self._output = output
        self._emit = emit
        self._started = started
        self._pending: list[asyncio.Task] = []
        self._player: asyncio.Task | None = None
        self._queue: asyncio.Queue[tuple[int, str, asyncio.Task] | None] = asyncio.Queue()
        self._audio: list[bytes] = []
        self._rate = 0
        self.timings: dict[str, float] = {}

    def say(self, sentence: str) -> None:
        index = len(self._pending)
        task = asyncio.create_task(self._synthesize(sentence, index))
        self._pending.append(task)
        self._queue.put_nowait((index, sentence, task))
        if self._player is None:
            self._player = asyncio.create_task(self._play())

    async def _synthesize(self, sentence: str, index: int) -> tuple[bytes, int]:
        agent = self._conversation.agent
        request = tts_pb2.SynthesizeRequest(
            text=sentence,
            voice=agent.voice,
            speaker=agent.tts.speaker,
            language=agent.tts.language,
            speed=agent.tts.speed,
            session_id=self._conversation.session_id,
            output_format=audio_pb2.AudioFormat(encoding=self._output.encoding, sample_rate=self._output.sample_rate),
        )
        pieces: list[bytes] = []
        rate = self._output.sample_rate
        requested = time.perf_counter()
        async for event in self._engine._bus.stream(
            "tts", request, timeout=self._engine._tts_timeout_s, session_id=self._conversation.session_id
        ):
            if event.HasField("chunk"):
                if index == 0 and not pieces:
                    self.timings["tts_first_chunk_s"] = time.perf_counter() - requested
                pieces.append(event.chunk.audio)
                rate = event.chunk.format.sample_rate
        return b"".join(pieces), rate

    async def _play(self) -> None:
        while (item := await self._queue.get()) is not None:
            index, sentence, task = item
            audio, rate = await task
            if not audio:
                continue
            if not self._audio:
                self.timings["first_audio_s"] = time.perf_counter() - self._started
            self._audio.append(audio)
            self._rate = rate
            await self._emit(SpeechAudio(audio=audio, sample_rate=rate, text=sentence, sentence_index=index))

    async def finish(self) -> None:
        """Waits until every sentence said so far has been emitted, then reports the whole speech."""
        if self._player is None:
            return
        self._queue.put_nowait(None)
        await self._player
        self.timings["speech_s"] = time.perf_counter() - self._started
        await self._emit(SpeechCompleted(audio=b"".join(self._audio), sample_rate=self._rate))

    async def cancel(self) -> None:
        """Stops synthesis and playback of whatever is unfinished (the bus requests are cancelled)."""
        await cancel_and_wait(*self._pending, self._player)


def describe(error: BusError, stage: str) -> str:
    """A message for the user about a failed stage."""
    if error.code_name == "INVALID_ARGUMENT":
        return f"{stage}: {error.message}"
    if error.code_name == "UNAVAILABLE":
        return f"{stage} is unavailable right now ({error.message})"
    if error.code_name == "DEADLINE_EXCEEDED":
        return f"{stage} took too long"
    return f"{stage} failed: {error.message}"
