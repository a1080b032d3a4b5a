"""The turn engine, independent of any dialect: user audio or text in, STT → LLM → TTS over the bus,
and a stream of neutral events out that each dialect translates to its own wire messages.

Speech starts before the reply is finished: the LLM's tokens are cut into sentences as they
arrive, each sentence goes to TTS at once (requests run in parallel), and the audio is handed to
the dialect strictly in sentence order.

When the LLM stage fails before it produced any answer text (its backend is down, no LLM worker
runs, the deadline passed), the turn is answered with the agent's ``fallback_message`` instead:
it goes out through the same events as an answer (``LlmDelta``, ``LlmCompleted``, ``SpeechAudio``,
``SpeechCompleted``), so every dialect delivers it without code of its own, and the call goes on.
The turn's result keeps the error for the call log. A failure after some answer text was streamed
is not papered over (the caller already heard part of an answer): the turn fails as before.
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

import httpx
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from voice.v1 import audio_pb2, llm_pb2, stt_pb2, tts_pb2
from voice_bus.client import BusClient
from voice_bus.errors import BusError
from voice_gateway.agents import Agent
from voice_gateway.sentences import SentenceStream
from voice_gateway.tools import CallAction, Toolbox
from voice_runtime.tasks import cancel_and_wait
from voice_telemetry.metrics import LATENCY_BUCKETS_S
from voice_telemetry.tracing import set_content_attribute

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("voice_gateway")

TOOL_CALLS = Counter(
    "voice_gateway_tool_calls_total", "Tool calls run for the model, by tool and outcome", ["tool", "outcome"]
)
TOOL_SECONDS = Histogram("voice_gateway_tool_seconds", "Duration of one tool call", buckets=LATENCY_BUCKETS_S)
FALLBACKS = Counter(
    "voice_gateway_fallbacks_total",
    "Turns answered with the agent's fallback message because the LLM failed, by the failure's code",
    ["reason"],
)


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
class ToolCalled(Event):
    """The model called a tool; ``arguments`` is the JSON text it produced."""

    tool_call_id: str = ""
    name: str = ""
    arguments: str = ""
    kind: str = "tool_call"


@dataclass(frozen=True)
class ToolFinished(Event):
    """A tool's result, as the model will read it."""

    tool_call_id: str = ""
    name: str = ""
    content: str = ""
    successful: bool = True
    kind: str = "tool_result"


@dataclass(frozen=True)
class CallActionRequested(Event):
    """A built-in tool asks the call to end or be transferred; sent after the answer is spoken."""

    action: CallAction | None = None
    kind: str = "call_action"


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
    """What a finished turn leaves behind for the history and the call log.

    Attributes:
        error: Why the turn (or its LLM stage) failed, for the call log; empty when it did not.
        error_code: The bus error code behind ``error`` (``UNAVAILABLE``, ...), for metrics.
        fallback: The answer is the agent's fallback message, given because the LLM failed.
    """

    user_text: str = ""
    assistant_text: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    error: str = ""
    error_code: str = ""
    fallback: bool = False
    tools: list[dict] = field(default_factory=list)
    action: CallAction | None = None


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
        return system + [_chat_message(m) for m in self.history]


def _chat_message(message: dict) -> llm_pb2.ChatMessage:
    """History entries are OpenAI-shaped dicts; tool calls and tool results keep their ids."""
    return llm_pb2.ChatMessage(
        role=message["role"],
        content=message.get("content") or "",
        name=message.get("name", ""),
        tool_call_id=message.get("tool_call_id", ""),
        tool_calls=[llm_pb2.ToolCall(**call) for call in message.get("tool_calls", ())],
    )


class TurnEngine:
    """Runs turns on the bus for any dialect.

    Args:
        bus: Client of the STT, LLM and TTS workers.
        stt_timeout_s, llm_timeout_s, tts_timeout_s: Budgets of each bus request.
        http: Client for the agents' webhook tools (one is made when not given).
    """

    def __init__(
        self,
        bus: BusClient,
        *,
        stt_timeout_s: float,
        llm_timeout_s: float,
        tts_timeout_s: float,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._bus = bus
        self._http = http or httpx.AsyncClient()
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

        When the agent has tools, the model's tool calls are run, their results fed back, and the
        model asked again (at most ``llm.max_tool_rounds`` rounds with tools, then a plain answer).
        The user's message, the tool calls and results, and the answer join the conversation's history.
        """
        agent = conversation.agent
        status = SessionEvents(self._bus, conversation.session_id)
        await status.publish("Assistant is processing your request...", "started", "status")
        conversation.history.append({"role": "user", "content": user_text})
        toolbox = Toolbox(agent, self._http)
        result = TurnResult(user_text=user_text)
        speaker = _Speaker(self, conversation, output, emit, started) if output is not None else None
        sentences = SentenceStream()
        full_text = ""
        round_text = ""
        unanswered: list[llm_pb2.ToolCall] = []
        llm_started = time.perf_counter()
        failure: BusError | None = None
        try:
            try:
                for round_index in range(agent.llm.max_tool_rounds + 1):
                    tool_choice = ""
                    if toolbox:
                        last_round = round_index == agent.llm.max_tool_rounds or result.action is not None
                        tool_choice = "none" if last_round else agent.llm.tool_choice if round_index == 0 else "auto"
                    request = self._llm_request(conversation, toolbox, tool_choice)
                    round_text = ""
                    calls: list[llm_pb2.ToolCall] = []
                    with tracer.start_as_current_span("llm") as span:
                        span.set_attribute("voice.llm.round", round_index)
                        async for event in self._bus.stream(
                            "llm", request, timeout=self._llm_timeout_s, session_id=conversation.session_id
                        ):
                            if event.HasField("delta") and event.delta.text:
                                if not full_text:
                                    result.timings["llm_first_token_s"] = time.perf_counter() - llm_started
                                    await status.publish("Assistant is responding...", "responding", "status")
                                full_text += event.delta.text
                                round_text += event.delta.text
                                await status.publish(full_text, "in_progress", "response")
                                await emit(LlmDelta(chunk=event.delta.text, full_text=full_text))
                                if speaker:
                                    for sentence in sentences.feed(event.delta.text):
                                        result.timings.setdefault(
                                            "llm_first_sentence_s", time.perf_counter() - llm_started
                                        )
                                        speaker.say(sentence)
                            elif event.HasField("completion") and tool_choice not in ("", "none"):
                                calls = [_with_id(call) for call in event.completion.tool_calls]
                    if not calls:
                        break
                    conversation.history.append(
                        {
                            "role": "assistant",
                            "content": round_text.strip(),
                            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls],
                        }
                    )
                    round_text = ""
                    unanswered = list(calls)
                    await self._run_tools(conversation, toolbox, calls, emit, status, result, unanswered)
            except BusError as exc:
                if full_text.strip() or not agent.fallback_message:
                    raise
                failure = exc
                round_text = await self._fall_back(conversation, exc, result, status)
                full_text += round_text
                await emit(LlmDelta(chunk=round_text, full_text=full_text))
                if speaker:
                    for sentence in [*sentences.feed(round_text), *sentences.flush()]:
                        speaker.say(sentence)
            else:
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
            if failure is not None:
                FALLBACKS.labels(failure.code_name.lower()).inc()
            if result.action is not None:
                await emit(CallActionRequested(action=result.action))
        except BusError as exc:
            await status.publish(describe(exc, "the assistant"), "error", "error", error_details=str(exc))
            if failure is not None:
                # The fallback could not be spoken either (TTS failed): the turn fails with the LLM's error.
                raise failure from exc
            raise
        finally:
            if speaker:
                await speaker.cancel()
            for call in unanswered:
                # A turn cut off while its tools ran: every call still gets an answer, as the API requires.
                conversation.history.append(
                    {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": '{"error": "interrupted"}'}
                )
            conversation.history.append({"role": "assistant", "content": round_text.strip()})
        return result

    async def _fall_back(
        self, conversation: Conversation, error: BusError, result: TurnResult, status: SessionEvents
    ) -> str:
        """Notes an LLM failure that the agent's fallback message will answer, and returns the message.

        The error goes into ``result`` (for the call log and the turn metrics), onto the turn's span,
        into the log and, as an ``error`` status, onto the session's channel; the caller gets the
        message as the answer.
        """
        fallback = conversation.agent.fallback_message
        result.error = describe(error, "the assistant")
        result.error_code = error.code_name
        result.fallback = True
        span = trace.get_current_span()
        span.set_attribute("voice.error", error.code_name)
        span.add_event("fallback", {"voice.fallback.reason": error.code_name})
        logger.warning(
            "session %s: the LLM failed, answering with the fallback message: %s", conversation.session_id, error
        )
        await status.publish(result.error, "error", "error", error_details=str(error))
        return fallback

    def _llm_request(self, conversation: Conversation, toolbox: Toolbox, tool_choice: str) -> llm_pb2.GenerateRequest:
        agent = conversation.agent
        request = llm_pb2.GenerateRequest(
            messages=conversation.messages(),
            model=agent.llm.model,
            max_tokens=agent.llm.max_tokens,
            session_id=conversation.session_id,
        )
        if tool_choice:
            request.tools.extend(toolbox.specs())
            request.tool_choice = tool_choice
        if agent.llm.temperature is not None:
            request.temperature = agent.llm.temperature
        return request

    async def _run_tools(
        self,
        conversation: Conversation,
        toolbox: Toolbox,
        calls: list[llm_pb2.ToolCall],
        emit: Emit,
        status: SessionEvents,
        result: TurnResult,
        unanswered: list[llm_pb2.ToolCall],
    ) -> None:
        """Runs one round's tool calls concurrently and appends their results to the history in order."""
        for call in calls:
            await emit(ToolCalled(tool_call_id=call.id, name=call.name, arguments=call.arguments))
            await status.publish(f"Executing {call.name}...", "processing", "tool")

        async def run(call: llm_pb2.ToolCall):
            with tracer.start_as_current_span(f"tool {call.name}") as span:
                span.set_attribute("gen_ai.operation.name", "execute_tool")
                span.set_attribute("gen_ai.tool.name", call.name)
                span.set_attribute("gen_ai.tool.call.id", call.id)
                tool_started = time.perf_counter()
                set_content_attribute(span, "gen_ai.tool.call.arguments", call.arguments)
                outcome = await toolbox.run(call, conversation.session_id)
                set_content_attribute(span, "gen_ai.tool.call.result", outcome.content)
                span.set_attribute("voice.tool.successful", outcome.successful)
                TOOL_CALLS.labels(call.name, "ok" if outcome.successful else "error").inc()
                TOOL_SECONDS.observe(time.perf_counter() - tool_started)
                return outcome

        outcomes = await asyncio.gather(*(run(call) for call in calls))
        for call, outcome in zip(calls, outcomes, strict=True):
            conversation.history.append(
                {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": outcome.content}
            )
            unanswered.remove(call)
            result.tools.append(
                {
                    "tool_call_id": call.id,
                    "name": call.name,
                    "arguments": call.arguments,
                    "result": outcome.content,
                    "successful": outcome.successful,
                }
            )
            if outcome.action is not None and result.action is None:
                result.action = outcome.action
            await emit(
                ToolFinished(
                    tool_call_id=call.id, name=call.name, content=outcome.content, successful=outcome.successful
                )
            )
            if outcome.successful:
                await status.publish(f"{call.name} finished", "completed", "tool")
            else:
                await status.publish(f"{call.name} failed", "error", "tool", error_details=outcome.content)


def _with_id(call: llm_pb2.ToolCall) -> llm_pb2.ToolCall:
    """Some backends leave a tool call's id empty; the tool message must still name it."""
    return (
        call
        if call.id
        else llm_pb2.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=call.name, arguments=call.arguments)
    )


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
        for task in (*self._pending, self._player):
            if task is not None and task.done() and not task.cancelled():
                # Marks a failure as seen: the first one already ended the turn through finish(); the
                # others (every sentence fails alike when TTS is down) would be logged as unretrieved.
                task.exception()


def describe(error: BusError, stage: str) -> str:
    """A message for the user about a failed stage."""
    if error.code_name == "INVALID_ARGUMENT":
        return f"{stage}: {error.message}"
    if error.code_name == "UNAVAILABLE":
        return f"{stage} is unavailable right now ({error.message})"
    if error.code_name == "DEADLINE_EXCEEDED":
        return f"{stage} took too long"
    return f"{stage} failed: {error.message}"
