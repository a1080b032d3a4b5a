"""The one turn runner: every dialect's turns, spoken or typed, run here.

A dialect hands its session a :class:`Turn` (caller audio, a typed message, a key press, Retell's
transcript to answer, the greeting) with the function that translates the turn's events into its wire
messages. The runner runs a session's turns one at a time in the order they came, each in a ``turn``
span under the session's span, and for every one of them:

- emits :class:`TurnStarted` first and :class:`TurnEnded` last, and passes every event to the
  session's observers (the channels' status payloads) before the dialect;
- runs STT for audio, then the LLM and tool loop and speech (:class:`TurnEngine`), or only speech for
  the greeting;
- counts it: ``voice_gateway_turns_total{dialect, kind, outcome}``, time to first audio, stage timings,
  and the gateway-wide in-flight count that a draining gateway waits on;
- turns failures into :class:`TurnFailed` and an error in the call log (never a crash of the session);
- records it in the call log.

Cancellation goes through the runner too: a barge-in (:meth:`TurnRunner.cancel` with what the caller
heard), a caller who went on speaking before any of a spoken turn's answer was sent (``continued``: the
turn is given up and its user message taken back out of the history; once its tools ran, it is a
barge-in), a superseding request such as Retell's newer ``response_id`` (:meth:`TurnRunner.replace`), a
chat ``interrupt_stream``, or the session closing. Cancelling the turn's task cancels its requests on
the bus. A cancelled turn is recorded as interrupted with the answer the user got (unless it was
superseded, or the dialect keeps its own history and said ``keep_if_cut_off=False``). A closing
session first lets the transcriptions of the caller's last spoken turns finish (``LAST_WORDS_S`` at
most), the running one's and those still queued, so that the call log keeps what the caller said.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from voice.v1 import audio_pb2
from voice_bus.errors import BusError
from voice_gateway.conversation.engine import Conversation
from voice_gateway.conversation.events import (
    Emit,
    Event,
    LlmDelta,
    OutputFormat,
    StageStarted,
    SttCompleted,
    TurnEnded,
    TurnFailed,
    TurnResult,
    TurnStarted,
    describe,
)
from voice_gateway.conversation.metrics import ERRORS, FIRST_AUDIO, TURNS, TURNS_IN_FLIGHT
from voice_runtime.tasks import cancel_and_wait, wait_quietly
from voice_telemetry.tracing import clamp_attribute

if TYPE_CHECKING:
    from voice_gateway.agents import Agent
    from voice_gateway.conversation.session import Session

logger = logging.getLogger(__name__)

BARGE_IN = "barge_in"
CONTINUED = "continued"
SUPERSEDED = "superseded"
INTERRUPTED = "interrupted"
SESSION_CLOSED = "session_closed"
NO_SPEECH = "no speech was recognised in the audio"
CUT_OFF = "the call ended before the answer"
# How long a closing session waits for the transcription of the caller's last words (a spoken turn being
# transcribed, or waiting its turn), so that the call log keeps what the caller said before hanging up.
LAST_WORDS_S = 5.0


@dataclass(eq=False)
class Turn:
    """One turn for the runner: what the user said or typed, and where its events go.

    Attributes:
        kind: ``audio``, ``text``, ``dtmf``, ``greeting``, ``response`` (Retell), ``chat``: the call
            log's and the metrics' name for it.
        emit: The dialect's translation of this turn's events into wire messages.
        output: Encoding and rate of the spoken answer; ``None`` answers with text only.
        text: The user's message (typed, a key press, Retell's last utterance) or the greeting's text.
        audio: The user's utterance, for a spoken turn; transcribed first.
        audio_format: Format of ``audio``.
        history: Answer against this history instead of the session's (Retell sends the transcript,
            which knows what the caller actually heard).
        endpointing_s: How long endpointing waited after the caller's last voiced sample (``None`` when the
            call ended the utterance).
        endpointing: How the spoken turn's end was decided (``semantic``, ``max_silence``, ``hang_up``, ...).
        speech_s: Where the utterance lies in the call's inbound audio: the stream times (seconds since
            its first frame) of the start of its first voiced frame and the end of its last.
        transcript: The utterance's transcription, already started (speculative STT at a pause);
            the runner awaits it instead of transcribing ``audio`` again, and cancels it with the turn.
        keep_if_cut_off: Record the turn in the call log when the session closes under it.
        agent: Answer as this agent instead of the session's (a dialect's per-response overrides: prompt,
            tools, limits), on the session's history unless ``history`` is given.
        attributes: Extra attributes of the turn's span.
    """

    kind: str
    emit: Emit
    output: OutputFormat | None = None
    text: str = ""
    audio: bytes | None = None
    audio_format: audio_pb2.AudioFormat | None = None
    history: list[dict] | None = None
    endpointing_s: float | None = None
    endpointing: str = ""
    speech_s: tuple[float, float] | None = None
    transcript: asyncio.Task | None = None
    keep_if_cut_off: bool = True
    agent: Agent | None = None
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict)
    cancel_reason: str = ""
    heard: str | None = None
    partial: str = ""
    task: asyncio.Task | None = None


class TurnRunner:
    """Runs one session's turns in order; see the module's docstring.

    Args:
        session: The session whose conversation, call log, span and observers the turns use.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._queue: asyncio.Queue[Turn | None] = asyncio.Queue()
        self._current: Turn | None = None
        self._loop = asyncio.create_task(self._run())
        self._closed = False
        self._markers: dict[Turn, asyncio.Event] = {}

    @property
    def busy(self) -> bool:
        """A turn runs or waits to run."""
        return self._current is not None or not self._queue.empty()

    @property
    def current(self) -> Turn | None:
        """The running turn."""
        return self._current

    def submit(self, turn: Turn) -> None:
        """Queues ``turn`` after the turns already queued."""
        if self._closed:
            return
        TURNS_IN_FLIGHT.begin()
        self._queue.put_nowait(turn)

    def replace(self, turn: Turn, reason: str = SUPERSEDED) -> None:
        """Drops the queued turns, cancels the running one (``reason``) and queues ``turn`` to run next."""
        for dropped in self._drop_queued():
            if dropped.transcript is not None:
                dropped.transcript.cancel()
        self.interrupt(reason)
        self.submit(turn)

    def interrupt(self, reason: str, *, heard: str | None = None) -> asyncio.Task | None:
        """Cancels the running turn without waiting; returns its task (``None`` when none runs).

        Args:
            reason: Why: ``barge_in``, ``continued``, ``superseded``, ``interrupted`` or ``session_closed``.
            heard: For a barge-in, what the user heard of the answer: it becomes the recorded answer
                (``None``: what was produced so far, as for any other cancellation).
        """
        turn = self._current
        if turn is None or turn.task is None or turn.task.done():
            return None
        if not turn.cancel_reason:
            turn.cancel_reason, turn.heard = reason, heard
        turn.task.cancel()
        return turn.task

    async def cancel(self, reason: str, *, heard: str | None = None) -> bool:
        """Cancels the running turn and waits until it has unwound; returns whether one was running."""
        task = self.interrupt(reason, heard=heard)
        if task is not None:
            await wait_quietly(task)
        return task is not None

    async def wait_idle(self) -> None:
        """Waits until every turn queued so far has run."""
        if self._loop.done():
            return
        marker = Turn(kind="", emit=_ignore)
        done = self._markers[marker] = asyncio.Event()
        self._queue.put_nowait(marker)
        await done.wait()

    async def close(self, timeout_s: float) -> bool:
        """Drops the queued turns, cancels the running one and stops; False if it ignored cancellation.

        The caller's words in the spoken turns it ends are still transcribed and recorded (see the
        module's docstring); the rest of those turns is not run.
        """
        if self._closed:
            return True
        self._closed = True
        unanswered = []
        for turn in self._drop_queued():
            if _keeps_last_words(turn):
                self._transcription(turn)
                unanswered.append(turn)
            elif turn.transcript is not None:
                turn.transcript.cancel()
        self._queue.put_nowait(None)
        current = self._current
        if current is not None and current.task is not None and not current.task.done():
            current.cancel_reason = current.cancel_reason or SESSION_CLOSED
        tasks = [current.task] if current is not None and current.task is not None else []
        stopped = await cancel_and_wait(*tasks, self._loop, timeout=timeout_s)
        for turn in unanswered:
            await self._record_unanswered(turn)
        return stopped

    def _drop_queued(self) -> list[Turn]:
        """Empties the queue; returns the turns it held, which are no longer in flight."""
        dropped = []
        while not self._queue.empty():
            turn = self._queue.get_nowait()
            if turn is not None and turn.kind:
                dropped.append(turn)
                TURNS_IN_FLIGHT.end()
            elif turn is not None:
                self._markers.pop(turn).set()
        return dropped

    def _conversation(self, turn: Turn) -> Conversation:
        """The conversation ``turn`` answers in: the session's, or the turn's own history or agent."""
        session = self._session
        if turn.history is None and turn.agent is None:
            return session.conversation
        history = turn.history if turn.history is not None else session.conversation.history
        return Conversation(session_id=session.id, agent=turn.agent or session.agent, history=history)

    def _transcription(self, turn: Turn) -> asyncio.Task:
        """The spoken turn's transcription: the one a pause started, else one started now."""
        if turn.transcript is None:
            engine = self._session.engine
            turn.transcript = asyncio.create_task(
                engine.transcribe(self._conversation(turn), turn.audio, turn.audio_format)
            )
            turn.transcript.add_done_callback(_retrieved)
        return turn.transcript

    async def _last_words(self, turn: Turn) -> str:
        """The transcript of a spoken turn the session closes under, given ``LAST_WORDS_S`` ("" if none)."""
        transcript = self._transcription(turn)
        if not await wait_quietly(transcript, timeout=LAST_WORDS_S):
            transcript.cancel()
            return ""
        if transcript.cancelled() or transcript.exception() is not None:
            return ""
        return transcript.result()

    async def _record_unanswered(self, turn: Turn) -> None:
        """Records a spoken turn the session closed before it ran: what the caller said, and no answer."""
        session = self._session
        text = await self._last_words(turn)
        if not text:
            return
        result = TurnResult(user_text=text, error=CUT_OFF, endpointing=turn.endpointing, speech_s=turn.speech_s)
        if turn.endpointing_s is not None:
            result.timings["endpointing_s"] = turn.endpointing_s
        with session.turn_span(turn.kind) as span:
            span.add_event("cancelled", {"voice.cancel.reason": SESSION_CLOSED})
            TURNS.labels(session.dialect, turn.kind, "cancelled").inc()
            await session.record(turn.kind, result, interrupted=True)

    async def _run(self) -> None:
        while (turn := await self._queue.get()) is not None:
            if not turn.kind:
                self._markers.pop(turn).set()
                continue
            self._current = turn
            turn.task = asyncio.create_task(self._execute(turn))
            try:
                await wait_quietly(turn.task)
            finally:
                if turn.task.done() and not turn.task.cancelled() and turn.task.exception() is not None:
                    logger.error("turn crashed in session %s", self._session.id, exc_info=turn.task.exception())
                    ERRORS.labels(self._session.dialect, "turn_crashed").inc()
                self._current = None
                TURNS_IN_FLIGHT.end()

    async def _execute(self, turn: Turn) -> None:
        session = self._session
        started = time.perf_counter()
        result = TurnResult(user_text=turn.text if turn.kind != "greeting" else "")
        outcome = "ok"
        emit = self._emitter(turn)
        history = self._conversation(turn).history
        mark = len(history)
        with session.turn_span(turn.kind) as span:
            for name, value in turn.attributes.items():
                span.set_attribute(name, clamp_attribute(value))
            result.endpointing, result.speech_s = turn.endpointing, turn.speech_s
            if turn.endpointing_s is not None:
                result.timings["endpointing_s"] = turn.endpointing_s
                span.add_event(
                    "endpointing",
                    {
                        "voice.endpointing.wait_s": round(turn.endpointing_s, 4),
                        "voice.endpointing.decision": turn.endpointing,
                    },
                )
            await emit(TurnStarted(turn_kind=turn.kind))
            try:
                outcome = await self._stages(turn, result, emit, started)
                if turn.cancel_reason:
                    # The cancellation was lost inside a library call; the turn still ends as cancelled.
                    raise asyncio.CancelledError
            except asyncio.CancelledError:
                outcome = "cancelled"
                reason = turn.cancel_reason or SESSION_CLOSED
                if reason == CONTINUED and not self._give_up(turn, history, mark):
                    reason = turn.cancel_reason = BARGE_IN
                span.add_event("cancelled", {"voice.cancel.reason": reason})
                if reason == SESSION_CLOSED and _keeps_last_words(turn) and not result.user_text:
                    result.user_text = await self._last_words(turn)
                self._cut_off(turn, result, reason)
            except BusError as exc:
                outcome = exc.code_name.lower()
                stage = "speech recognition" if turn.audio is not None and not result.user_text else "the assistant"
                if turn.kind == "greeting":
                    stage = "the greeting"
                result.error = describe(exc, stage)
                span.set_attribute("voice.error", exc.code_name)
                logger.warning("turn failed in session %s: %s", session.id, exc)
                await emit(TurnFailed(error=result.error, code=exc.code_name, details=str(exc)))
            except Exception as exc:
                outcome = "internal"
                logger.exception("turn failed in session %s", session.id)
                ERRORS.labels(session.dialect, "turn_crashed").inc()
                result.error = f"the assistant failed: {type(exc).__name__}"
                span.set_attribute("voice.error", "INTERNAL")
                await emit(TurnFailed(error=result.error, code="INTERNAL", details=str(exc)))
            if turn.transcript is not None and not turn.transcript.done():
                turn.transcript.cancel()
            result.timings["total_s"] = time.perf_counter() - started
            TURNS.labels(session.dialect, turn.kind, outcome).inc()
            if "first_audio_s" in result.timings:
                FIRST_AUDIO.labels(session.dialect, turn.kind).observe(result.timings["first_audio_s"])
                span.set_attribute("voice.time_to_first_audio_s", result.timings["first_audio_s"])
            if self._keeps(turn, result, outcome):
                await session.record(turn.kind, result, interrupted=outcome == "cancelled")
            ended = TurnEnded(turn_kind=turn.kind, outcome=outcome, result=result, cancel_reason=turn.cancel_reason)
            with contextlib.suppress(Exception):
                await emit(ended)
        if outcome == "cancelled":
            raise asyncio.CancelledError

    async def _stages(self, turn: Turn, result: TurnResult, emit: Emit, started: float) -> str:
        """Runs the turn's stages; returns its outcome."""
        engine = self._session.engine
        conversation = self._conversation(turn)
        if turn.kind == "greeting":
            spoken = await engine.speak(conversation, turn.text, turn.output, emit)
            result.assistant_text, result.timings = spoken.assistant_text, {**result.timings, **spoken.timings}
            return "ok"
        if turn.audio is not None:
            await emit(StageStarted(kind="stt_start"))
            # Shielded: a session closing under the turn still waits for the caller's words.
            result.user_text = await asyncio.shield(self._transcription(turn))
            result.timings["stt_s"] = time.perf_counter() - started
            await emit(SttCompleted(text=result.user_text))
            if not result.user_text:
                result.error = NO_SPEECH
                await emit(TurnFailed(error=NO_SPEECH, code="NO_SPEECH"))
                return "no_speech"
        await emit(StageStarted(kind="llm_start"))
        answer = await engine.respond(conversation, result.user_text, turn.output, emit, started)
        answer.timings = {**result.timings, **answer.timings}
        for name in ("assistant_text", "timings", "error", "error_code", "fallback", "tools", "action"):
            setattr(result, name, getattr(answer, name))
        # Answered with the agent's fallback message: still counted as the LLM's failure.
        return answer.error_code.lower() if answer.error_code else "ok"

    def _emitter(self, turn: Turn) -> Emit:
        observers = self._session.observers

        async def emit(event: Event) -> None:
            if isinstance(event, LlmDelta):
                turn.partial = event.full_text
            for observer in observers:
                try:
                    await observer(event)
                except Exception:
                    logger.debug("session observer failed on %s", event.kind, exc_info=True)
            await turn.emit(event)

        return emit

    @staticmethod
    def _cut_off(turn: Turn, result: TurnResult, reason: str) -> None:
        """What a cancelled turn leaves: the answer the user heard (barge-in) or got so far."""
        if reason == BARGE_IN and turn.heard is not None:
            result.assistant_text = turn.heard
        elif turn.kind == "greeting":
            result.assistant_text = turn.text
        else:
            result.assistant_text = turn.partial.strip()
        if reason == SESSION_CLOSED:
            result.error = CUT_OFF

    @staticmethod
    def _give_up(turn: Turn, history: list[dict], mark: int) -> bool:
        """Takes a spoken turn the caller went on from back out of the history; False once tools ran."""
        added = history[mark:]
        if turn.audio is None or any(m.get("role") not in ("user", "assistant") or m.get("tool_calls") for m in added):
            return False
        del history[mark:]
        return True

    @staticmethod
    def _keeps(turn: Turn, result: TurnResult, outcome: str) -> bool:
        """Whether the call log records this turn."""
        if outcome == "no_speech":
            return False
        if outcome != "cancelled":
            return bool(result.user_text or result.assistant_text or result.error)
        if turn.cancel_reason in (SUPERSEDED, CONTINUED) or not turn.keep_if_cut_off:
            return False
        return bool(result.user_text or result.assistant_text)


async def _ignore(event: Event) -> None:
    return None


def _keeps_last_words(turn: Turn) -> bool:
    """Whether a closing session transcribes and records what the caller said in ``turn``."""
    return turn.audio is not None and turn.keep_if_cut_off


def _retrieved(task: asyncio.Task) -> None:
    """Retrieves a transcription's failure: one its turn stopped waiting for is nobody's to report."""
    if not task.cancelled():
        task.exception()
