"""The turn engine, independent of any dialect: STT, the LLM and tool loop, and speech over the bus.

Speech starts before the reply is finished: the LLM's tokens are cut into sentences as they arrive
and each goes to the :class:`~voice_gateway.conversation.speaker.Speaker` at once; the first one is cut
short, at the first clause boundary (a comma or dash after a few words), so the caller hears the answer
start sooner, and later ones stay sentence-sized. :meth:`TurnEngine.warm` sends the agent's prompt to
the LLM while the greeting plays, so the backend's prompt cache holds it for the first turn.

When the LLM stage fails before it produced any answer text (its backend is down, no LLM worker
runs, the deadline passed), the turn is answered with the agent's ``fallback_message`` instead:
:class:`FallbackUsed` says so, then the message goes out through the same events as an answer
(``LlmDelta``, ``LlmCompleted``, ``SpeechAudio``, ``SpeechCompleted``), so every dialect delivers it
without code of its own, and the call goes on. The turn's result keeps the error for the call log. A
failure after some answer text was streamed is not papered over (the caller already heard part of an
answer): the turn fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from opentelemetry import trace

from voice.v1 import audio_pb2, llm_pb2, stt_pb2
from voice_bus.client import BusClient
from voice_bus.errors import BusError
from voice_gateway.agents import Agent
from voice_gateway.agents.egress_client import EgressClient
from voice_gateway.agents.tools import Toolbox
from voice_gateway.conversation.events import (
    CallActionRequested,
    Emit,
    FallbackUsed,
    LlmCompleted,
    LlmDelta,
    OutputFormat,
    ToolCalled,
    ToolFinished,
    TurnResult,
    describe,
)
from voice_gateway.conversation.metrics import FALLBACKS, TOOL_CALLS, TOOL_SECONDS
from voice_gateway.conversation.speaker import Speaker, SpeechCache
from voice_telemetry.tracing import set_content_attribute
from voice_text import SentenceSplitter

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("voice_gateway")
# A sentence shorter than this is joined to the next one ("Sure." is not synthesized alone).
MIN_SENTENCE_CHARS = 12
# The first piece of speech ends at a clause boundary once this many words came before it.
FIRST_CLAUSE_WORDS = 3
WARM_TIMEOUT_S = 10.0


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
    """The stages of a turn on the bus, for any dialect.

    Args:
        bus: Client of the STT, LLM and TTS workers.
        stt_timeout_s, llm_timeout_s, tts_timeout_s: Budgets of each bus request.
        egress: Client for the agents' webhook tools, with the gateway's egress policy (one with the
            default policy, no allow-list, is made when not given).
    """

    def __init__(
        self,
        bus: BusClient,
        *,
        stt_timeout_s: float,
        llm_timeout_s: float,
        tts_timeout_s: float,
        egress: EgressClient | None = None,
    ) -> None:
        self._bus = bus
        self._egress = egress or EgressClient()
        self._stt_timeout_s = stt_timeout_s
        self._llm_timeout_s = llm_timeout_s
        self._tts_timeout_s = tts_timeout_s
        self._speech_cache = SpeechCache()

    def speaker(self, conversation: Conversation, output: OutputFormat, emit: Emit, started: float) -> Speaker:
        """A speaker of one answer in the agent's voice."""
        return Speaker(
            self._bus,
            self._tts_timeout_s,
            conversation.agent,
            conversation.session_id,
            output,
            emit,
            started,
            cache=self._speech_cache,
        )

    async def warm(self, conversation: Conversation) -> None:
        """Asks the LLM for one token of an answer to the conversation so far (the agent's prompt, the
        greeting), so the backend's prompt cache holds that prefix when the first turn comes; any
        failure is ignored."""
        request = llm_pb2.GenerateRequest(
            messages=conversation.messages(),
            model=conversation.agent.llm.model,
            max_tokens=1,
            session_id=conversation.session_id,
        )
        try:
            async for _ in self._bus.stream("llm", request, timeout=WARM_TIMEOUT_S, session_id=conversation.session_id):
                pass
        except BusError as exc:
            logger.debug("session %s: warming the LLM failed: %s", conversation.session_id, exc)

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
        speaker = self.speaker(conversation, output, emit, time.perf_counter())
        sentences = SentenceSplitter(min_chars=MIN_SENTENCE_CHARS, first_clause_min_words=FIRST_CLAUSE_WORDS)
        try:
            for sentence in [*sentences.feed(text), *sentences.flush()]:
                speaker.say(sentence, fixed=True)
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
        if user_text:
            # Without one the answer continues the history as it is (a client tool's result, items a dialect added).
            conversation.history.append({"role": "user", "content": user_text})
        toolbox = Toolbox(agent, self._egress)
        result = TurnResult(user_text=user_text)
        speaker = self.speaker(conversation, output, emit, started) if output is not None else None
        sentences = SentenceSplitter(min_chars=MIN_SENTENCE_CHARS, first_clause_min_words=FIRST_CLAUSE_WORDS)
        full_text = ""
        round_text = ""
        unanswered: list[llm_pb2.ToolCall] = []
        awaiting_client = False
        llm_started = time.perf_counter()
        failure: BusError | None = None

        def say(pieces: list[str], *, fixed: bool = False) -> None:
            for sentence in pieces:
                result.timings.setdefault("llm_first_sentence_s", time.perf_counter() - llm_started)
                speaker.say(sentence, fixed=fixed)

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
                                full_text += event.delta.text
                                round_text += event.delta.text
                                await emit(LlmDelta(chunk=event.delta.text, full_text=full_text))
                                if speaker:
                                    say(sentences.feed(event.delta.text))
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
                    on_client = [c for c in calls if toolbox.runs_on_client(c.name)]
                    calls = [c for c in calls if c not in on_client]
                    unanswered = list(calls)
                    await self._run_tools(conversation, toolbox, calls, emit, result, unanswered)
                    if on_client:
                        # The client runs these: the answer ends here, and the client's results come as history.
                        awaiting_client = True
                        for call in on_client:
                            result.tools.append(
                                {
                                    "tool_call_id": call.id,
                                    "name": call.name,
                                    "arguments": call.arguments,
                                    "client": True,
                                }
                            )
                            await emit(
                                ToolCalled(tool_call_id=call.id, name=call.name, arguments=call.arguments, client=True)
                            )
                        break
            except BusError as exc:
                if full_text.strip() or not agent.fallback_message:
                    raise
                failure = exc
                round_text = await self._fall_back(conversation, exc, result, emit)
                full_text += round_text
                await emit(LlmDelta(chunk=round_text, full_text=full_text))
                if speaker:
                    say([*sentences.feed(round_text), *sentences.flush()], fixed=True)
            else:
                result.timings["llm_s"] = time.perf_counter() - llm_started
            if speaker:
                say(sentences.flush())
            result.assistant_text = full_text.strip()
            await emit(LlmCompleted(text=result.assistant_text))
            if speaker:
                await speaker.finish()
                result.timings.update(speaker.timings)
            if failure is not None:
                FALLBACKS.labels(failure.code_name.lower()).inc()
            if result.action is not None and result.action.ends_call:
                await emit(CallActionRequested(action=result.action))
        except BusError as exc:
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
            if not awaiting_client:
                conversation.history.append({"role": "assistant", "content": round_text.strip()})
        return result

    async def _fall_back(self, conversation: Conversation, error: BusError, result: TurnResult, emit: Emit) -> str:
        """Notes an LLM failure that the agent's fallback message will answer, and returns the message.

        The error goes into ``result`` (for the call log and the turn metrics), onto the turn's span,
        into the log and, as :class:`FallbackUsed`, to the session's observers; the caller gets the
        message as the answer.
        """
        result.error = describe(error, "the assistant")
        result.error_code = error.code_name
        result.fallback = True
        span = trace.get_current_span()
        span.set_attribute("voice.error", error.code_name)
        span.add_event("fallback", {"voice.fallback.reason": error.code_name})
        logger.warning(
            "session %s: the LLM failed, answering with the fallback message: %s", conversation.session_id, error
        )
        await emit(FallbackUsed(error=result.error, details=str(error)))
        return conversation.agent.fallback_message

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
        result: TurnResult,
        unanswered: list[llm_pb2.ToolCall],
    ) -> None:
        """Runs one round's tool calls concurrently and appends their results to the history in order."""
        for call in calls:
            await emit(ToolCalled(tool_call_id=call.id, name=call.name, arguments=call.arguments))

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
            if outcome.action is not None and outcome.action.outranks(result.action):
                result.action = outcome.action
            await emit(
                ToolFinished(
                    tool_call_id=call.id,
                    name=call.name,
                    content=outcome.content,
                    successful=outcome.successful,
                    expose_result=toolbox.exposes_result(call.name),
                )
            )


def _with_id(call: llm_pb2.ToolCall) -> llm_pb2.ToolCall:
    """Some backends leave a tool call's id empty; the tool message must still name it."""
    return (
        call
        if call.id
        else llm_pb2.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=call.name, arguments=call.arguments)
    )
