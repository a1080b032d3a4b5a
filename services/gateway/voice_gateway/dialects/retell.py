"""Retell's custom-LLM WebSocket (seed 000, protocols.md §1) at ``/{OBFUSCATED_WS_PATH}/{call_id}``.

Retell connects per call and talks text only. On connect the gateway sends ``config``
(``auto_reconnect``, ``call_details``); after ``call_details`` it sends the begin message
(``response`` with ``response_id`` 0: the agent's greeting). ``ping_pong`` is echoed at once;
``update_only`` transcripts are recorded; ``response_required`` and ``reminder_required`` are
answered by streaming ``response`` events (``content``, ``content_complete``, ``response_id``) from
the LLM. Retell's transcript is the conversation's history (it knows what was actually heard). A
newer ``response_id`` cancels the older answer at once, including its LLM request on the bus, and
nothing more is sent under the old id. Every message is handled in its own task; all of them are
cancelled on disconnect. A binary frame closes the socket with 1007; a server error with 1011; an
unknown agent (when even ``default`` is gone) with 1008. The gateway's limits close it too: 1013 when
the gateway is full, 1009 for a frame over ``GATEWAY_MAX_FRAME_BYTES``, 1008 when no message at all
arrives within the handshake timeout (Retell sends ``call_details`` and pings right away), after the
idle timeout, or past the message rate.

Retell sends no credentials: the path segment is the socket's only secret (see docs/security.md).

When Retell reconnects (``auto_reconnect``) with a call id whose call log is still open (``active``,
or ``handed_off`` by a gateway that drained with 1012), the session resumes from that log on
whichever gateway it reaches: the same call log id, its turns kept, no second greeting.

The agent comes from ``?agent_id=`` on the URL, else ``call.metadata.agent_id`` in ``call_details``,
else ``default``; ``retell_llm_dynamic_variables`` fill the agent's ``{{name}}`` template variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_gateway.call import BAD_FRAMES
from voice_gateway.calls import CallLog, valid_call_log_id
from voice_gateway.limits import CLOSE_POLICY_VIOLATION, ConnectionGuard, LimitExceeded, Limits, close_socket
from voice_gateway.messages import InvalidJson, parse_json
from voice_gateway.session import ERRORS, HANDED_OFF, GatewayContext, Session
from voice_gateway.templates import personalise
from voice_gateway.turns import Conversation, Event, LlmDelta, ToolCalled, ToolFinished, TurnFailed

logger = logging.getLogger(__name__)

DIALECT = "retell"
CALL_DETAILS_WAIT_S = 5.0
# Call-log statuses a reconnecting Retell call continues ("active": its gateway died without closing it).
RESUMABLE = frozenset({"active", HANDED_OFF})
SERVER_ERROR = 1011
REMINDER_HINT = "(The user has not responded in a while. Gently check whether they are still there.)"
UNINTELLIGIBLE = "(unintelligible audio)"


def history_from_transcript(transcript: object) -> list[dict]:
    """Chat messages from Retell's transcript: ``agent`` → assistant, anything else → user.

    ``transcript_with_tool_calls`` items are understood too: a ``tool_call_invocation`` becomes an
    assistant message carrying the call, a ``tool_call_result`` the ``tool`` message answering it.
    """
    messages: list[dict] = []
    for utterance in transcript if isinstance(transcript, list) else []:
        if not isinstance(utterance, dict):
            continue
        if utterance.get("role") == "tool_call_invocation":
            call = {
                "id": str(utterance.get("tool_call_id") or ""),
                "name": str(utterance.get("name") or ""),
                "arguments": str(utterance.get("arguments") or "{}"),
            }
            if call["id"] and call["name"]:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            continue
        if utterance.get("role") == "tool_call_result":
            call_id = str(utterance.get("tool_call_id") or "")
            if any(call_id == c["id"] for m in messages for c in m.get("tool_calls", ())):
                messages.append({"role": "tool", "tool_call_id": call_id, "content": str(utterance.get("content"))})
            continue
        if not isinstance(utterance.get("content"), str):
            continue
        role = "assistant" if utterance.get("role") == "agent" else "user"
        content = utterance["content"].strip()
        if not content:
            continue
        if messages and messages[-1]["role"] == role and "tool_calls" not in messages[-1]:
            messages[-1]["content"] += " " + content
        else:
            messages.append({"role": role, "content": content})
    answered = {m["tool_call_id"] for m in messages if m["role"] == "tool"}
    return [m for m in messages if not m.get("tool_calls") or m["tool_calls"][0]["id"] in answered]


class RetellConnection:
    """One Retell call."""

    def __init__(self, websocket: WebSocket, context: GatewayContext, guard: ConnectionGuard, call_id: str) -> None:
        self._ws = websocket
        self._context = context
        self._guard = guard
        self._call_id = call_id
        self._session: Session | None = None
        self._tasks: set[asyncio.Task] = set()
        self._current_response_id = -1
        self._answer: asyncio.Task | None = None
        self._send_lock = asyncio.Lock()
        self._begin_lock = asyncio.Lock()
        self._begun = False
        self.resumed = False
        self.transcript: list = []

    async def send(self, message: dict) -> None:
        async with self._send_lock:
            if self._ws.application_state == WebSocketState.CONNECTED:
                with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                    await self._ws.send_text(json.dumps(message))

    async def run(self) -> None:
        await self.send(
            {
                "response_type": "config",
                "config": {"auto_reconnect": True, "call_details": True, "transcript_with_tool_calls": True},
                "response_id": 1,
            }
        )
        fallback = asyncio.create_task(self._begin_without_details())
        close_code, reason = 1000, ""
        try:
            while True:
                try:
                    frame = await self._guard.receive()
                except WebSocketDisconnect:
                    break
                except LimitExceeded as exc:
                    close_code, reason = exc.close_code, exc.reason
                    break
                if frame["type"] == "websocket.disconnect":
                    break
                self._guard.handshake_done()
                if frame.get("bytes") is not None:
                    BAD_FRAMES.labels(DIALECT, "binary_frame").inc()
                    close_code, reason = 1007, "binary frames are not part of this protocol"
                    break
                self._dispatch(frame.get("text") or "")
        except Exception as exc:
            logger.exception("retell call %s failed", self._call_id)
            ERRORS.labels(DIALECT, "connection_crashed").inc()
            close_code, reason = SERVER_ERROR, f"server error: {type(exc).__name__}"
        finally:
            fallback.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, fallback, return_exceptions=True)
            if self._session is not None:
                await self._session.close("error" if close_code == SERVER_ERROR else "completed")
            if close_code != 1000:
                await close_socket(self._ws, close_code, reason)

    def _dispatch(self, text: str) -> None:
        try:
            message = parse_json(text)
        except InvalidJson:
            BAD_FRAMES.labels(DIALECT, "invalid_json").inc()
            logger.warning("retell %s: invalid JSON ignored", self._call_id)
            return
        if not isinstance(message, dict):
            BAD_FRAMES.labels(DIALECT, "not_an_object").inc()
            return
        kind = message.get("interaction_type")
        if kind == "ping_pong":
            self._spawn(self.send({"response_type": "ping_pong", "timestamp": message.get("timestamp")}))
        elif kind == "call_details":
            self._spawn(self._begin(message.get("call") if isinstance(message.get("call"), dict) else {}))
        elif kind == "update_only":
            if isinstance(message.get("transcript"), list):
                self.transcript = message["transcript"]
        elif kind in ("response_required", "reminder_required"):
            response_id = message.get("response_id")
            if not isinstance(response_id, int) or isinstance(response_id, bool) or response_id < 0:
                BAD_FRAMES.labels(DIALECT, "bad_response_id").inc()
                logger.warning("retell %s: %s without an integer response_id ignored", self._call_id, kind)
                return
            if response_id <= self._current_response_id:
                return
            self._current_response_id = response_id
            if self._answer is not None and not self._answer.done():
                self._answer.cancel()
            transcript = message.get("transcript") if isinstance(message.get("transcript"), list) else self.transcript
            self._answer = self._spawn(self._respond(response_id, transcript, reminder=kind == "reminder_required"))
        else:
            BAD_FRAMES.labels(DIALECT, "unknown_event").inc()
            logger.warning("retell %s: unknown interaction_type %r ignored", self._call_id, kind)

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _open_session(self, call: dict) -> Session | None:
        """The call's session with its agent, or ``None`` when neither that agent nor ``default`` exists."""
        query = self._ws.query_params
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
        previous = await self._resumable(_safe(self._call_id))
        session = Session(
            self._context, personalise(agent, variables), DIALECT, call_log=previous, session_id=_safe(self._call_id)
        )
        self.resumed = previous is not None
        if self.resumed:
            logger.info("retell call %s resumed after %d turn(s)", session.id, len(previous.turns))
        await session.start()
        return session

    async def _resumable(self, call_log_id: str | None) -> CallLog | None:
        """The call's log when Retell reconnects (``auto_reconnect``) to continue a call that another
        gateway, or this one, held and did not end; ``None`` for a new call."""
        if call_log_id is None:
            return None
        with contextlib.suppress(Exception):
            previous = await self._context.calls.get(call_log_id)
            if previous is not None and previous.dialect == DIALECT and previous.status in RESUMABLE:
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
            await close_socket(self._ws, CLOSE_POLICY_VIOLATION, "unknown agent and no default agent")
            return
        if self.resumed:
            return
        greeting = self._session.agent.greeting
        await self.send({"response_type": "response", "response_id": 0, "content": greeting, "content_complete": True})

    async def _begin_without_details(self) -> None:
        await asyncio.sleep(CALL_DETAILS_WAIT_S)
        await self._begin({})

    async def _respond(self, response_id: int, transcript: list, *, reminder: bool) -> None:
        await self._begin({})
        session = self._session
        if session is None:
            return
        history = history_from_transcript(transcript)
        if reminder or not history or history[-1]["role"] != "user":
            user_text = REMINDER_HINT
        else:
            user_text = history.pop()["content"]
        conversation = Conversation(session_id=session.id, agent=session.agent, history=history)
        started = time.perf_counter()

        async def emit(event: Event) -> None:
            if response_id != self._current_response_id:
                raise asyncio.CancelledError
            if isinstance(event, LlmDelta):
                await self.send(
                    {
                        "response_type": "response",
                        "response_id": response_id,
                        "content": event.chunk,
                        "content_complete": False,
                    }
                )
            elif isinstance(event, ToolCalled):
                await self.send(
                    {
                        "response_type": "tool_call_invocation",
                        "tool_call_id": event.tool_call_id,
                        "name": event.name,
                        "arguments": event.arguments,
                    }
                )
            elif isinstance(event, ToolFinished):
                await self.send(
                    {
                        "response_type": "tool_call_result",
                        "tool_call_id": event.tool_call_id,
                        "content": event.content,
                        "successful": event.successful,
                    }
                )
            elif isinstance(event, TurnFailed):
                logger.warning("retell %s: %s", self._call_id, event.error)

        with session.turn_span("response") as span:
            span.set_attribute("voice.retell.response_id", response_id)
            try:
                result = await self._context.engine.respond(conversation, user_text, None, emit, started)
            except asyncio.CancelledError:
                span.add_event("cancelled", {"voice.cancel.reason": "superseded"})
                raise
            except Exception as exc:
                logger.warning("retell %s: response %d failed: %s", self._call_id, response_id, exc)
                if response_id == self._current_response_id:
                    await self.send(
                        {
                            "response_type": "response",
                            "response_id": response_id,
                            "content": "Sorry, I had a problem there.",
                            "content_complete": True,
                        }
                    )
                return
            if response_id == self._current_response_id:
                final = {
                    "response_type": "response",
                    "response_id": response_id,
                    "content": "",
                    "content_complete": True,
                }
                if result.action is not None and result.action.kind == "end_call":
                    final["end_call"] = True
                elif result.action is not None and result.action.kind == "transfer_call":
                    final["transfer_number"] = result.action.number
                await self.send(final)
                await session.record("response", result)


def _safe(call_id: str) -> str | None:
    return call_id if valid_call_log_id(call_id) else None


async def serve(websocket: WebSocket, context: GatewayContext, limits: Limits, call_id: str) -> None:
    """Serves one Retell custom-LLM socket."""
    await websocket.accept()
    try:
        guard = limits.admit(websocket, DIALECT)
    except LimitExceeded as exc:
        await close_socket(websocket, exc.close_code, exc.reason)
        return
    async with guard:
        await RetellConnection(websocket, context, guard, call_id).run()
