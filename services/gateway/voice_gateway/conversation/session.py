"""Sessions, independent of dialect: one conversation with an agent, its turns, its call log and its trace.

A dialect opens a :class:`Session` on its ``init`` (or connect), hands it :class:`Turn` s through
:meth:`Session.submit` (or :attr:`Session.runner` to cancel), and gets each turn's events through the
turn's ``emit``. The session's observers (the channels' status payloads) see every event of every turn.
Closing the session cancels the running turn, which cancels its requests on the bus.

A session's id is its call log's id, and it is settled by :meth:`Session.start`: a new log is created
create-only (:meth:`~voice_gateway.storage.call_log.CallLogStore.create`), never written over another
log. When its id is taken, the session either gets a fresh random id (``on_collision=FRESH``: the
default, for ids a carrier chose) or is refused with :class:`CallLogExists` (``REFUSE``: ids the
gateway issued, chat conversations). Only then are the session's trace, conversation and observers
made, so they all carry the id it ends up with. A session that was never started writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry import trace

from voice_bus.client import BusClient
from voice_gateway.agents import Agent, AgentStore
from voice_gateway.conversation.engine import Conversation, TurnEngine
from voice_gateway.conversation.events import Emit, OutputFormat, TurnResult
from voice_gateway.conversation.metrics import ACTIVE_SESSIONS, OBSERVED_STAGES, STAGE
from voice_gateway.conversation.runner import Turn, TurnRunner
from voice_gateway.storage.call_log import CallLog, CallLogExists, CallLogStore, TurnRecord
from voice_gateway.storage.registry import CallRegistry
from voice_runtime.tasks import cancel_and_wait
from voice_telemetry.tracing import set_content_attribute

logger = logging.getLogger(__name__)

CLOSE_GRACE_S = 10.0
# The status of a call whose gateway shut down under it: another gateway may resume it.
HANDED_OFF = "handed_off"
tracer = trace.get_tracer("voice_gateway")

# Makes a session's observer: called with the new session, returns a function every event goes to.
ObserverFactory = Callable[["Session"], Emit]

# What a new session does when a log with its id exists: take a fresh random id, or refuse.
FRESH = "fresh"
REFUSE = "refuse"
# Fresh ids tried before giving up (random 128-bit ids: the first one is all but certain to be free).
FRESH_ID_TRIES = 3


@dataclass
class GatewayContext:
    """What every session shares: the bus, the stores, the turn engine and the sessions' observers."""

    bus: BusClient
    agents: AgentStore
    calls: CallLogStore
    engine: TurnEngine
    registry: CallRegistry | None = None
    observers: list[ObserverFactory] = field(default_factory=list)
    draining: bool = False


class Session:
    """One conversation of one client with one agent.

    Args:
        context: Shared gateway services.
        agent: The agent the client asked for.
        dialect: Name of the wire protocol, for metrics, traces and the call log.
        call_log: An existing call log to continue (the dialect checked that this client may), or
            ``None`` for a new call.
        session_id: The id a new call asks for (a carrier's stream id, one the trigger endpoint issued, a
            chat conversation id); a random one if ``None``. :meth:`start` settles it.
        on_collision: When a log with ``session_id`` already exists: ``FRESH`` gives the new call a random
            id instead, ``REFUSE`` makes :meth:`start` raise :class:`CallLogExists`.
    """

    def __init__(
        self,
        context: GatewayContext,
        agent: Agent,
        dialect: str,
        call_log: CallLog | None = None,
        session_id: str | None = None,
        *,
        on_collision: str = FRESH,
    ) -> None:
        if on_collision not in (FRESH, REFUSE):
            raise ValueError(f"on_collision must be {FRESH!r} or {REFUSE!r}, not {on_collision!r}")
        self._context = context
        self.dialect = dialect
        self.agent = agent
        self._continues = call_log is not None
        self._on_collision = on_collision
        self.call_log = call_log or CallLog(
            call_log_id=session_id or uuid.uuid4().hex, agent_id=agent.id, agent_name=agent.name, dialect=dialect
        )
        self.call_log.status = "active"
        self.call_log.ended_at = None
        history: list[dict] = []
        for turn in self.call_log.turns:
            if turn.user:
                history.append({"role": "user", "content": turn.user})
            if turn.assistant:
                history.append({"role": "assistant", "content": turn.assistant})
        # start() settles the id (the conversation's too), then opens the trace and makes the observers.
        self.conversation = Conversation(session_id=self.id, agent=agent, history=history)
        self.span: trace.Span = trace.INVALID_SPAN
        self.observers: list[Emit] = []
        self.runner = TurnRunner(self)
        self._warming: asyncio.Task | None = None
        self._started = False
        self._closed = False

    @property
    def id(self) -> str:
        return self.call_log.call_log_id

    @property
    def engine(self) -> TurnEngine:
        return self._context.engine

    @property
    def started(self) -> bool:
        """Whether :meth:`start` settled the session's id and recorded its start."""
        return self._started

    async def start(self) -> None:
        """Records the call's start, then opens its trace and observers under the id it settled.

        A new log is created, never written over another: when its id is taken the session gets a
        fresh one (``FRESH``, logged) or is refused (``REFUSE``). A continued log is saved as it is.

        Raises:
            CallLogExists: ``REFUSE`` and the id is taken. The session is closed: it wrote nothing.
            RuntimeError: The session was already started or closed.
        """
        if self._started or self._closed:
            raise RuntimeError(f"session {self.id} was already {'started' if self._started else 'closed'}")
        try:
            if self._continues:
                await self._context.calls.save(self.call_log)
            else:
                await self._create_log()
        except BaseException:
            # Never opened: nothing to record, no trace, nothing counted; only the runner to stop.
            self._closed = True
            await self.runner.close(CLOSE_GRACE_S)
            raise
        self._started = True
        self.conversation.session_id = self.id
        self.span = tracer.start_span(
            "session",
            attributes={
                "voice.session_id": self.id,
                "voice.dialect": self.dialect,
                "voice.agent_id": self.agent.id,
                "gen_ai.request.model": self.agent.llm.model or "default",
                "voice.tts.voice": self.agent.voice or "default",
                "voice.agent.tools": len(self.agent.tools),
            },
        )
        self.observers = [make(self) for make in self._context.observers]
        ACTIVE_SESSIONS.labels(self.dialect).inc()

    async def _create_log(self) -> None:
        """Creates the new call log, under a fresh id when the asked one is taken (``FRESH``)."""
        asked = self.id
        for _ in range(1 + FRESH_ID_TRIES):
            if await self._context.calls.create(self.call_log):
                if self.id != asked:
                    logger.warning(
                        "%s session: a call log with id %r already exists; this session's log is %s instead",
                        self.dialect,
                        asked,
                        self.id,
                    )
                return
            if self._on_collision == REFUSE:
                raise CallLogExists(asked)
            self.call_log.call_log_id = uuid.uuid4().hex
        raise CallLogExists(asked)

    def submit(self, turn: Turn) -> None:
        """Queues a turn; it runs after the turns queued before it."""
        self.runner.submit(turn)

    def greet(self, output: OutputFormat, emit: Emit) -> None:
        """Queues the agent's greeting, spoken without asking the LLM (nothing when the agent has none),
        and meanwhile warms the LLM's prompt cache with the agent's prompt and the greeting."""
        if not self.agent.greeting:
            return
        self.submit(Turn(kind="greeting", text=self.agent.greeting, output=output, emit=emit))
        spoken = [*self.conversation.history, {"role": "assistant", "content": self.agent.greeting}]
        prefix = Conversation(session_id=self.id, agent=self.agent, history=spoken)
        self._warming = asyncio.create_task(self._warm(prefix))

    async def _warm(self, prefix: Conversation) -> None:
        with tracer.start_as_current_span(
            "llm.warm", context=trace.set_span_in_context(self.span), attributes={"voice.session_id": self.id}
        ):
            await self.engine.warm(prefix)

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
                endpointing=result.endpointing,
                speech_start_s=result.speech_s[0] if result.speech_s else None,
                speech_end_s=result.speech_s[1] if result.speech_s else None,
            )
        )
        if self._started:
            with contextlib.suppress(Exception):
                await self._context.calls.save(self.call_log)

    async def wait_idle(self) -> None:
        """Waits until every queued turn has run."""
        await self.runner.wait_idle()

    async def close(self, status: str = "completed") -> None:
        """Cancels the running turn (and its bus requests), saves the call log and ends the trace.

        A session closed because its gateway drains is saved as ``handed_off`` instead of
        ``completed``: its client may reconnect to another gateway and continue it.
        """
        if self._closed:
            return
        self._closed = True
        if not self._started:
            # Never started (or its start failed): there is no log of its own to record.
            await self.runner.close(CLOSE_GRACE_S)
            return
        if self._context.draining and status == "completed":
            status = HANDED_OFF
        await cancel_and_wait(self._warming)
        if not await self.runner.close(CLOSE_GRACE_S):
            logger.warning("session %s: the running turn ignored cancellation for %.0f s", self.id, CLOSE_GRACE_S)
        self.call_log.status = status
        self.call_log.ended_at = time.time()
        with contextlib.suppress(Exception):
            await self._context.calls.save(self.call_log)
        self.span.set_attribute("voice.session.status", status)
        self.span.set_attribute("voice.session.turns", len(self.call_log.turns))
        self.span.end()
        ACTIVE_SESSIONS.labels(self.dialect).dec()
