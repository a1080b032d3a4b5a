"""Sessions, independent of dialect: one conversation with an agent, its turns, its call log and its trace.

A dialect creates a :class:`Session` on its ``init`` (or connect), hands it user audio or text, and
translates the :mod:`voice_gateway.turns` events it receives back into its own wire messages.
Turns run one at a time in the order they arrive; closing the session cancels the running turn,
which cancels its requests on the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from voice.v1 import audio_pb2
from voice_bus.client import BusClient
from voice_bus.errors import BusError
from voice_gateway.agents import Agent, AgentStore
from voice_gateway.call_registry import CallRegistry
from voice_gateway.calls import CallLog, CallLogStore, TurnRecord
from voice_gateway.turns import (
    Conversation,
    Emit,
    OutputFormat,
    StageStarted,
    SttCompleted,
    TurnEngine,
    TurnFailed,
    TurnResult,
    describe,
)
from voice_runtime.tasks import cancel_and_wait
from voice_telemetry.metrics import LATENCY_BUCKETS_S
from voice_telemetry.tracing import set_content_attribute

logger = logging.getLogger(__name__)

CLOSE_GRACE_S = 10.0
# The status of a call whose gateway shut down under it: another gateway may resume it.
HANDED_OFF = "handed_off"
tracer = trace.get_tracer("voice_gateway")

ACTIVE_SESSIONS = Gauge("voice_gateway_active_sessions", "Sessions open on this gateway", ["dialect"])
TURNS = Counter("voice_gateway_turns_total", "Turns finished, by kind and outcome", ["dialect", "kind", "outcome"])
FIRST_AUDIO = Histogram(
    "voice_gateway_time_to_first_audio_seconds",
    "From the user's complete input to the first audio of the answer",
    ["dialect", "kind"],
    buckets=LATENCY_BUCKETS_S,
)
ERRORS = Counter(
    "voice_gateway_errors_total", "Unexpected failures outside the turns' own outcomes", ["dialect", "kind"]
)
# Turn timings observed per stage (``voice_gateway_stage_seconds{stage="stt"|"llm_first_token"|…}``).
OBSERVED_STAGES = frozenset({"endpointing_s", "stt_s", "llm_first_token_s", "llm_s", "tts_first_chunk_s"})
STAGE = Histogram("voice_gateway_stage_seconds", "Duration of each turn stage", ["stage"], buckets=LATENCY_BUCKETS_S)


@dataclass
class GatewayContext:
    """What every session shares: the bus, the stores and the turn engine."""

    bus: BusClient
    agents: AgentStore
    calls: CallLogStore
    engine: TurnEngine
    registry: CallRegistry | None = None
    draining: bool = False


class _TurnsInFlight:
    """Counts the turns running on this gateway, so a draining gateway can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.count += 1
        self._idle.clear()

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits until no turn runs; returns whether that happened within ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


TURNS_IN_FLIGHT = _TurnsInFlight()


class Session:
    """One conversation of one client with one agent.

    Args:
        context: Shared gateway services.
        agent: The agent the client asked for.
        dialect: Name of the wire protocol, for metrics, traces and the call log.
        call_log: An existing call log to continue, or ``None`` for a new call.
        session_id: Id of a new call (e.g. announced by the trigger endpoint); a random one if ``None``.
    """

    def __init__(
        self,
        context: GatewayContext,
        agent: Agent,
        dialect: str,
        call_log: CallLog | None = None,
        session_id: str | None = None,
    ) -> None:
        self._context = context
        self.dialect = dialect
        self.agent = agent
        self.call_log = call_log or CallLog(
            call_log_id=session_id or uuid.uuid4().hex, agent_id=agent.id, agent_name=agent.name, dialect=dialect
        )
        self.call_log.status = "active"
        self.call_log.ended_at = None
        self.conversation = Conversation(session_id=self.call_log.call_log_id, agent=agent)
        for turn in self.call_log.turns:
            if turn.user:
                self.conversation.history.append({"role": "user", "content": turn.user})
            if turn.assistant:
                self.conversation.history.append({"role": "assistant", "content": turn.assistant})
        self.span = tracer.start_span(
            "session",
            attributes={
                "voice.session_id": self.id,
                "voice.dialect": dialect,
                "voice.agent_id": agent.id,
                "gen_ai.request.model": agent.llm.model or "default",
                "voice.tts.voice": agent.voice or "default",
                "voice.agent.tools": len(agent.tools),
            },
        )
        self._turns: asyncio.Queue[Callable[[], Awaitable[None]] | None] = asyncio.Queue()
        self._runner = asyncio.create_task(self._run_turns())
        self._closed = False
        ACTIVE_SESSIONS.labels(dialect).inc()

    @property
    def id(self) -> str:
        return self.call_log.call_log_id

    async def start(self) -> None:
        """Records the call's start."""
        await self._context.calls.save(self.call_log)

    def greet(self, output: OutputFormat, emit: Emit) -> None:
        """Queues the agent's greeting, spoken without asking the LLM."""
        if not self.agent.greeting:
            return

        async def turn() -> None:
            with self.turn_span("greeting") as span:
                try:
                    result = await self._context.engine.speak(self.conversation, self.agent.greeting, output, emit)
                except BusError as exc:
                    result = TurnResult(error=describe(exc, "the greeting"))
                    span.set_attribute("voice.error", exc.code_name)
                    await emit(TurnFailed(error=result.error, code=exc.code_name))
            await self.record("greeting", result)

        self._turns.put_nowait(turn)

    def text_turn(self, text: str, output: OutputFormat | None, emit: Emit, *, before=None, after=None) -> None:
        """Queues a typed turn; ``output`` None answers with text only."""
        self._queue_turn("text", None, None, text, output, emit, before, after)

    def audio_turn(
        self,
        audio: bytes,
        fmt: audio_pb2.AudioFormat,
        output: OutputFormat | None,
        emit: Emit,
        *,
        before=None,
        after=None,
    ) -> None:
        """Queues a spoken turn: ``audio`` (one utterance) in ``fmt``."""
        self._queue_turn("audio", audio, fmt, "", output, emit, before, after)

    def _queue_turn(self, kind, audio, fmt, text, output, emit, before, after) -> None:
        async def turn() -> None:
            started = time.perf_counter()
            result = TurnResult(user_text=text)
            outcome = "ok"
            with self.turn_span(kind) as span:
                try:
                    if before:
                        await before()
                    if audio is not None:
                        span.set_attribute("voice.audio.bytes", len(audio))
                        stt_started = time.perf_counter()
                        await emit(StageStarted(kind="stt_start"))
                        user_text = await self._context.engine.transcribe(self.conversation, audio, fmt)
                        result.timings["stt_s"] = time.perf_counter() - stt_started
                        await emit(SttCompleted(text=user_text))
                        if not user_text:
                            result.error = "no speech was recognised in the audio"
                            await emit(TurnFailed(error=result.error, code="NO_SPEECH"))
                            outcome = "no_speech"
                            return
                        result.user_text = user_text
                    await emit(StageStarted(kind="llm_start"))
                    answer = await self._context.engine.respond(
                        self.conversation, result.user_text, output, emit, started
                    )
                    answer.timings.update(result.timings)
                    result = answer
                    if result.error_code:
                        # Answered with the agent's fallback message: still counted as the LLM's failure.
                        outcome = result.error_code.lower()
                    if "first_audio_s" in result.timings:
                        FIRST_AUDIO.labels(self.dialect, kind).observe(result.timings["first_audio_s"])
                        span.set_attribute("voice.time_to_first_audio_s", result.timings["first_audio_s"])
                except asyncio.CancelledError:
                    span.add_event("cancelled", {"voice.cancel.reason": "session_closed"})
                    raise
                except BusError as exc:
                    stage = "speech recognition" if not result.user_text and audio is not None else "the assistant"
                    result.error = describe(exc, stage)
                    outcome = exc.code_name.lower()
                    span.set_attribute("voice.error", exc.code_name)
                    await emit(TurnFailed(error=result.error, code=exc.code_name))
                finally:
                    result.timings["total_s"] = time.perf_counter() - started
                    TURNS.labels(self.dialect, kind, outcome).inc()
                    if after:
                        with contextlib.suppress(Exception):
                            await after()
                    if result.user_text or result.assistant_text or result.error:
                        await self.record(kind, result)

        self._turns.put_nowait(turn)

    def turn_span(self, kind: str):
        """A ``turn`` span under the session's span: the bus carries it to the workers' spans."""
        return tracer.start_as_current_span(
            "turn",
            context=trace.set_span_in_context(self.span),
            attributes={"voice.session_id": self.id, "voice.turn.kind": kind, "voice.dialect": self.dialect},
        )

    async def record(self, kind: str, result: TurnResult, *, interrupted: bool = False) -> None:
        """Adds a finished turn to the call log (and its timings, and text if opted in, to the turn's span)."""
        span = trace.get_current_span()
        for name, seconds in result.timings.items():
            span.set_attribute(f"voice.timing.{name}", round(seconds, 4))
            if name in OBSERVED_STAGES:
                STAGE.labels(name.removesuffix("_s")).observe(seconds)
        span.set_attribute("voice.turn.interrupted", interrupted)
        if result.tools:
            span.set_attribute("voice.turn.tool_calls", len(result.tools))
        set_content_attribute(span, "voice.user_text", result.user_text)
        set_content_attribute(span, "voice.assistant_text", result.assistant_text)
        self.call_log.turns.append(
            TurnRecord(
                index=len(self.call_log.turns),
                kind=kind,
                user=result.user_text,
                assistant=result.assistant_text,
                started_at=time.time() - result.timings.get("total_s", 0.0),
                timings={k: round(v, 4) for k, v in result.timings.items()},
                interrupted=interrupted,
                error=result.error,
                fallback=result.fallback,
                tools=result.tools,
                action=dataclasses.asdict(result.action) if result.action else None,
            )
        )
        with contextlib.suppress(Exception):
            await self._context.calls.save(self.call_log)

    async def _run_turns(self) -> None:
        while (turn := await self._turns.get()) is not None:
            TURNS_IN_FLIGHT.begin()
            try:
                await turn()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("turn failed in session %s", self.id)
                ERRORS.labels(self.dialect, "turn_crashed").inc()
            finally:
                TURNS_IN_FLIGHT.end()

    async def wait_idle(self) -> None:
        """Waits until every queued turn has run."""
        done = asyncio.Event()

        async def mark() -> None:
            done.set()

        self._turns.put_nowait(mark)
        await done.wait()

    async def close(self, status: str = "completed") -> None:
        """Cancels the running turn (and its bus requests), saves the call log and ends the trace.

        A session closed because its gateway drains is saved as ``handed_off`` instead of
        ``completed``: its client may reconnect to another gateway and continue it.
        """
        if self._closed:
            return
        self._closed = True
        if self._context.draining and status == "completed":
            status = HANDED_OFF
        while not self._turns.empty():
            self._turns.get_nowait()
        # The sentinel ends the runner even if a library swallowed the cancellation (Python 3.11's
        # wait_for does when the awaited result lands in the same loop iteration as the cancel).
        self._turns.put_nowait(None)
        if not await cancel_and_wait(self._runner, timeout=CLOSE_GRACE_S):
            logger.warning("session %s: the running turn ignored cancellation for %.0f s", self.id, CLOSE_GRACE_S)
        self.call_log.status = status
        self.call_log.ended_at = time.time()
        with contextlib.suppress(Exception):
            await self._context.calls.save(self.call_log)
        self.span.set_attribute("voice.session.status", status)
        self.span.set_attribute("voice.session.turns", len(self.call_log.turns))
        self.span.end()
        ACTIVE_SESSIONS.labels(self.dialect).dec()
