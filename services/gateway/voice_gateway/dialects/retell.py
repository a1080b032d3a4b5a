"""Retell's custom-LLM WebSocket (seed 000, protocols.md §1) at ``/{OBFUSCATED_WS_PATH}/{call_id}``.

Retell connects per call and talks text only. On connect the gateway sends ``config``
(``auto_reconnect``, ``call_details``, ``transcript_with_tool_calls``); after ``call_details`` it
sends the begin message (``response`` with ``response_id`` 0: the agent's greeting). ``ping_pong``
is echoed at once; ``update_only`` transcripts are recorded; ``response_required`` and
``reminder_required`` are answered by streaming ``response`` events (``content``,
``content_complete``, ``response_id``) from the LLM. Retell's transcript is the conversation's
history (it knows what was actually heard): ``transcript_with_tool_calls`` (``config`` asks for it)
when present, so earlier tool calls and their results are in it
(:mod:`~voice_gateway.dialects.retell_transcript`). A newer ``response_required`` cancels the older
answer at once, including its LLM request on the bus, and nothing more is sent under the old id.

Every response type of the socket (protocols.md §1.4):

- ``response``: the answer's chunks, the last with ``content_complete: true``; that last one carries
  the turn's call action, at most one by Retell's precedence: ``end_call`` (built-in ``end_call``) >
  ``transfer_number`` (``transfer_call``; with ``show_transferee_as_caller: true`` when the tool sets
  it) > ``digit_to_press`` (``press_digit``). A failed turn ends with an apology as its content.
- ``agent_interrupt``: sent unprompted only when a ``reminder_required`` arrives while the previous
  answer is still being made (a slow webhook tool, a slow LLM): the caller said nothing new, so that
  answer is not cancelled. The reminder is answered at once with an empty, complete ``response``, and
  the rest of the running answer goes out as ``agent_interrupt`` under a new ``interrupt_id`` (one per
  such answer, counting from 1; a newer id discards the older ones on Retell's side), its last chunk
  with ``content_complete`` and the action (``show_transferee_as_caller`` is not part of this event).
  A ``response_required`` (the caller spoke) still cancels it, and nothing more is sent under it.
- ``no_interruption_allowed: true``: on every ``response`` chunk (the begin message too) of an agent
  whose ``pipeline.enable_interruptions`` is false, and on every ``agent_interrupt`` chunk (Retell
  recommends it there: the agent speaks over whatever happens).
- ``tool_call_invocation`` / ``tool_call_result``: each tool call of the answer and its result, as
  they happen (bookkeeping for ``transcript_with_tool_calls``).
- ``metadata``: after each answer's last chunk, ``{"call_log_id", "response_id", "interrupt_id"?,
  "tools"?: [{"tool_call_id", "name", "successful", "result"?}], "action"?}`` for the web call's
  frontend; a tool's ``result`` only when the agent's ``expose_result`` allows it (that frontend is as
  unauthenticated as ``/ws``). Not sent for a cancelled answer.
- ``config``, ``ping_pong``: as above. ``update_agent`` is not sent.

Every message is handled in its own task; all of them are cancelled on disconnect. A binary frame
closes the socket with 1007; a server error with 1011; an unknown agent (when even ``default`` is
gone) with 1008. The gateway's limits close it too: 1013 when the gateway is full, 1009 for a frame
over ``GATEWAY_MAX_FRAME_BYTES``, 1008 when no message at all arrives within the handshake timeout
(Retell sends ``call_details`` and pings right away), after the idle timeout, or past the message
rate.

Retell sends no credentials: the path segment is the socket's only secret (see docs/security.md).

When Retell reconnects (``auto_reconnect``) with a call id whose call log is still open (``active``,
or ``handed_off`` by a gateway that drained with 1012), the session resumes from that log on
whichever gateway it reaches: the same call log id, its turns kept, no second greeting. Only its own
call: the log must be a Retell log of the agent this connection resolves (the path's secret is the
same for every call, so the agent is what tells calls apart). A call id that names any other log
(another agent's call, a finished call, a chat conversation, a phone call) gets a fresh call log
under a random id instead, with a warning; that log is neither read nor written.

The agent comes from ``?agent_id=`` on the URL, else ``call.metadata.agent_id`` in ``call_details``,
else ``default``; ``retell_llm_dynamic_variables`` fill the agent's ``{{name}}`` template variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.websockets import WebSocket

from voice_gateway.agents.templates import personalise
from voice_gateway.agents.tools import CallAction
from voice_gateway.api.limits import CLOSE_POLICY_VIOLATION, ConnectionGuard, Limits, close_socket
from voice_gateway.conversation.events import Event, LlmDelta, ToolCalled, ToolFinished, TurnEnded, TurnFailed
from voice_gateway.conversation.runner import Turn
from voice_gateway.conversation.session import HANDED_OFF, GatewayContext, Session
from voice_gateway.dialects.base import Connection, serve
from voice_gateway.dialects.retell_transcript import history_from_transcript
from voice_gateway.storage.call_log import CallLog, valid_call_log_id

logger = logging.getLogger(__name__)

__all__ = ["RetellConnection", "history_from_transcript", "serve_retell"]

DIALECT = "retell"
CALL_DETAILS_WAIT_S = 5.0
# Call-log statuses a reconnecting Retell call continues ("active": its gateway died without closing it).
RESUMABLE = frozenset({"active", HANDED_OFF})
INVALID_FRAME = 1007
REMINDER_HINT = "(The user has not responded in a while. Gently check whether they are still there.)"
SORRY = "Sorry, I had a problem there."


class RetellConnection(Connection):
    """One Retell call."""

    dialect = DIALECT

    def __init__(self, websocket: WebSocket, context: GatewayContext, guard: ConnectionGuard, call_id: str) -> None:
        super().__init__(websocket, guard)
        self._context = context
        self._call_id = call_id
        self._session: Session | None = None
        self._tasks: set[asyncio.Task] = set()
        self._current_response_id = -1
        # The latest response turn's translation, and the latest agent_interrupt id handed out.
        self._answering: _ResponseEvents | None = None
        self._interrupt_id = 0
        self._begin_lock = asyncio.Lock()
        self._begun = False
        self._details_timer: asyncio.Task | None = None
        self.resumed = False
        self.transcript: list = []

    async def opened(self) -> None:
        await self.send_json(
            {
                "response_type": "config",
                "config": {"auto_reconnect": True, "call_details": True, "transcript_with_tool_calls": True},
                "response_id": 1,
            }
        )
        self._details_timer = self._spawn(self._begin_without_details())

    async def finished(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            crashed = self._close is not None and self._close[0] == 1011
            await self._session.close("error" if crashed else "completed")

    async def on_binary(self, data: bytes) -> None:
        self.guard.handshake_done()
        await self.bad_frame("binary_frame", "")
        self.close(INVALID_FRAME, "binary frames are not part of this protocol")

    async def on_message(self, message: dict) -> None:
        self.guard.handshake_done()
        kind = message.get("interaction_type")
        if kind == "ping_pong":
            timestamp = message.get("timestamp")
            if isinstance(timestamp, bool) or not isinstance(timestamp, int):
                # Retell still needs its pong to keep the call: answer with the gateway's clock.
                await self.bad_frame("bad_timestamp", "")
                timestamp = int(time.time() * 1000)
            self._spawn(self.send_json({"response_type": "ping_pong", "timestamp": timestamp}))
        elif kind == "call_details":
            self._spawn(self._begin(message.get("call") if isinstance(message.get("call"), dict) else {}))
        elif kind == "update_only":
            self.transcript = _transcript(message) or self.transcript
        elif kind in ("response_required", "reminder_required"):
            response_id = message.get("response_id")
            if not isinstance(response_id, int) or isinstance(response_id, bool) or response_id < 0:
                await self.bad_frame("bad_response_id", "")
                return
            if response_id <= self._current_response_id:
                return
            self._current_response_id = response_id
            answering = self._answering
            if kind == "reminder_required" and answering is not None and not answering.finished:
                # The caller said nothing new: the answer still being made goes on, as agent_interrupt.
                if answering.interrupt_id is None:
                    self._interrupt_id += 1
                    answering.interrupt_id = self._interrupt_id
                self._spawn(self.send_json(_chunk("response", response_id, "", True)))
                return
            self._answering = None
            transcript = _transcript(message) or self.transcript
            self._spawn(self._respond(response_id, transcript, reminder=kind == "reminder_required"))
        else:
            await self.bad_frame("unknown_event", "")

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _open_session(self, call: dict) -> Session | None:
        """The call's session with its agent, or ``None`` when neither that agent nor ``default`` exists."""
        query = self.ws.query_params
        metadata = call.get("metadata") if isinstance(call.get("metadata"), dict) else {}
        agent_id = str(query.get("agent_id") or metadata.get("agent_id") or "default")
        agent = await self._context.agents.get(agent_id)
        if agent is None:
            logger.warning("retell %s: unknown agent %r, using the default agent", self._call_id, agent_id)
            agent = await self._context.agents.get("default")
        if agent is None:
            return None
        variables = call.get("retell_llm_dynamic_variables")
        variables = (
            {k: v for k, v in variables.items() if isinstance(v, (str, int, float, bool))}
            if isinstance(variables, dict)
            else {}
        )
        call_log_id = _safe(self._call_id)
        previous = await self._resumable(call_log_id, agent.id)
        # A new call's log is created only where no log has its id; else it gets a fresh id (FRESH).
        session = Session(
            self._context, personalise(agent, variables), DIALECT, call_log=previous, session_id=call_log_id
        )
        await session.start()
        self.resumed = previous is not None
        if self.resumed:
            logger.info("retell call %s resumed after %d turn(s)", session.id, len(previous.turns))
        return session

    async def _resumable(self, call_log_id: str | None, agent_id: str) -> CallLog | None:
        """The call's log when Retell reconnects (``auto_reconnect``) to continue a call that another
        gateway, or this one, held and did not end; ``None`` for a new call.

        Only a call this connection proves is its own: a Retell log, still open, of ``agent_id`` (the agent
        this connection resolved). Any other log under the id is not this call's.
        """
        if call_log_id is None:
            return None
        with contextlib.suppress(Exception):
            previous = await self._context.calls.get(call_log_id)
            if (
                previous is not None
                and previous.dialect == DIALECT
                and previous.status in RESUMABLE
                and previous.agent_id == agent_id
            ):
                return previous
        return None

    async def _begin(self, call: dict) -> None:
        """Opens the session and sends the begin message, once; a concurrent caller waits for it."""
        async with self._begin_lock:
            if self._begun:
                return
            self._begun = True
            self._session = await self._open_session(call)
        if self._session is None:
            self.close(CLOSE_POLICY_VIOLATION, "unknown agent and no default agent")
            async with self._send_lock:
                await close_socket(self.ws, CLOSE_POLICY_VIOLATION, "unknown agent and no default agent")
            return
        if self.resumed:
            return
        begin = _chunk("response", 0, self._session.agent.greeting, True)
        if not self._session.agent.pipeline.enable_interruptions:
            begin["no_interruption_allowed"] = True
        await self.send_json(begin)

    async def _begin_without_details(self) -> None:
        await asyncio.sleep(CALL_DETAILS_WAIT_S)
        await self._begin({})

    async def _respond(self, response_id: int, transcript: list, *, reminder: bool) -> None:
        """Hands the runner Retell's transcript to answer; a newer ``response_id`` supersedes the older."""
        await self._begin({})
        session = self._session
        if session is None or response_id != self._current_response_id:
            return
        history = history_from_transcript(transcript)
        if reminder or not history or history[-1]["role"] != "user":
            user_text = REMINDER_HINT
        else:
            user_text = history.pop()["content"]
        events = _ResponseEvents(self, session, response_id)
        turn = Turn(
            kind="response",
            text=user_text,
            history=history,
            keep_if_cut_off=False,
            attributes={"voice.retell.response_id": response_id},
            emit=events,
        )
        self._answering = events
        session.runner.replace(turn)

    def is_current(self, events: _ResponseEvents) -> bool:
        """Whether ``events`` may still send: its ``response_id`` is the latest one, or it goes on as the
        latest ``agent_interrupt`` and no response was asked for since."""
        if events.interrupt_id is None:
            return events.response_id == self._current_response_id
        return events is self._answering and events.interrupt_id == self._interrupt_id


class _ResponseEvents:
    """Translates one response turn's events into Retell events: ``response`` chunks under its
    ``response_id`` or, once Retell moved on with a reminder, ``agent_interrupt`` chunks under its
    ``interrupt_id``; then ``metadata``. Nothing is sent once a newer request superseded it."""

    def __init__(self, connection: RetellConnection, session: Session, response_id: int) -> None:
        self._connection = connection
        self._session = session
        self.response_id = response_id
        self.interrupt_id: int | None = None
        self.finished = False
        self._tools: list[dict] = []
        self._uninterruptible = not session.agent.pipeline.enable_interruptions

    def _chunk(self, content: str, complete: bool) -> dict:
        if self.interrupt_id is None:
            chunk = _chunk("response", self.response_id, content, complete)
        else:
            chunk = _chunk("agent_interrupt", self.interrupt_id, content, complete)
        if self._uninterruptible or self.interrupt_id is not None:
            chunk["no_interruption_allowed"] = True
        return chunk

    async def __call__(self, event: Event) -> None:
        if isinstance(event, TurnEnded):
            self.finished = True
        connection = self._connection
        if not connection.is_current(self):
            return
        if isinstance(event, LlmDelta):
            await connection.send_json(self._chunk(event.chunk, False))
        elif isinstance(event, ToolCalled):
            await connection.send_json(
                {
                    "response_type": "tool_call_invocation",
                    "tool_call_id": event.tool_call_id,
                    "name": event.name,
                    "arguments": event.arguments,
                }
            )
        elif isinstance(event, ToolFinished):
            await connection.send_json(
                {
                    "response_type": "tool_call_result",
                    "tool_call_id": event.tool_call_id,
                    "content": event.content,
                    "successful": event.successful,
                }
            )
            tool = {"tool_call_id": event.tool_call_id, "name": event.name, "successful": event.successful}
            if event.expose_result:
                tool["result"] = event.content
            self._tools.append(tool)
        elif isinstance(event, TurnFailed):
            logger.warning("retell response %d: %s", self.response_id, event.error)
        elif isinstance(event, TurnEnded) and not event.cancelled:
            result = event.result
            final = self._chunk(SORRY if result.error and not result.fallback else "", True)
            final.update(action_fields(result.action, agent_interrupt=self.interrupt_id is not None))
            await connection.send_json(final)
            await connection.send_json({"response_type": "metadata", "metadata": self._metadata(result.action)})

    def _metadata(self, action: CallAction | None) -> dict:
        """What the web call's frontend learns of the answer: the call log, the tools (their results only
        where the agent's ``expose_result`` allows) and the call action."""
        metadata: dict = {"call_log_id": self._session.id, "response_id": self.response_id}
        if self.interrupt_id is not None:
            metadata["interrupt_id"] = self.interrupt_id
        if self._tools:
            metadata["tools"] = self._tools
        if action is not None:
            metadata["action"] = action.kind
        return metadata


def action_fields(action: CallAction | None, *, agent_interrupt: bool = False) -> dict:
    """The final chunk's action: one of ``end_call``, ``transfer_number`` (with ``show_transferee_as_caller``
    when set; ``response`` only) and ``digit_to_press``. The engine already kept the one that wins by
    Retell's precedence (``end_call`` > ``transfer_number`` > ``digit_to_press``)."""
    if action is None:
        return {}
    if action.kind == "end_call":
        return {"end_call": True}
    if action.kind == "transfer_call":
        fields: dict = {"transfer_number": action.number}
        if action.show_transferee_as_caller and not agent_interrupt:
            fields["show_transferee_as_caller"] = True
        return fields
    if action.kind == "press_digit":
        return {"digit_to_press": action.digit}
    return {}


def _chunk(response_type: str, id_: int, content: str, complete: bool) -> dict:
    id_key = "interrupt_id" if response_type == "agent_interrupt" else "response_id"
    return {"response_type": response_type, id_key: id_, "content": content, "content_complete": complete}


def _transcript(message: dict) -> list | None:
    """The request's transcript: ``transcript_with_tool_calls`` (asked for in ``config``) when it is a list,
    else ``transcript``; ``None`` when neither is."""
    for key in ("transcript_with_tool_calls", "transcript"):
        if isinstance(message.get(key), list):
            return message[key]
    return None


def _safe(call_id: str) -> str | None:
    return call_id if valid_call_log_id(call_id) else None


async def serve_retell(websocket: WebSocket, context: GatewayContext, limits: Limits, call_id: str) -> None:
    """Serves one Retell custom-LLM socket."""
    await serve(websocket, limits, RetellConnection, lambda guard: RetellConnection(websocket, context, guard, call_id))
