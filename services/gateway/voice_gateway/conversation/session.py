"""Sessions, independent of dialect: one conversation with an agent, its turns, its call log and its trace.

A dialect opens a :class:`Session` on its ``init`` (or connect), hands it :class:`Turn` s through
:meth:`Session.submit` (or :attr:`Session.runner` to cancel), and gets each turn's events through the
turn's ``emit``. The session's observers (the channels' status payloads) see every event of every turn.
Closing the session cancels the running turn, which cancels its requests on the bus.
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
from voice_gateway.storage.call_log import CallLog, CallLogStore, TurnRecord
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
        self.observers: list[Emit] = [make(self) for make in context.observers]
        self.runner = TurnRunner(self)
        self._warming: asyncio.Task | None = None
        self._closed = False
        ACTIVE_SESSIONS.labels(dialect).inc()

    @property
    def id(self) -> str:
        return self.call_log.call_log_id

    @property
    def engine(self) -> TurnEngine:
        return self._context.engine

    async def start(self) -> None:
        """Records the call's start."""
        await self._context.calls.save(self.call_log)

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
            )
        )
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
