"""Seed 002's status payloads of a session: what ``/ws/channels`` subscribers of a session's channel see.

:class:`SessionStatus` is an observer every session gets. It turns the session's neutral turn events
into seed 002's payloads (``message``, ``timestamp``, ``status``, ``type``, ``final_message``,
``message_id``, ``thread_id``, ``error_details``) with their English texts, and publishes them on the
session's status subject, which only the gateway writes (see :mod:`voice_gateway.dialects.channels`).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

from voice_bus.catalog import status_subject
from voice_gateway.conversation.events import (
    Event,
    FallbackUsed,
    LlmCompleted,
    LlmDelta,
    StageStarted,
    ToolCalled,
    ToolFinished,
    TurnFailed,
)
from voice_gateway.conversation.session import Session


def _tool_error(content: str) -> str:
    """A failed tool's error message (``{"error": …}``), without the body its service answered (``detail``):
    that is for the model, not for whoever follows the session."""
    try:
        error = json.loads(content).get("error")
    except (ValueError, AttributeError):
        error = None
    return error if isinstance(error, str) else "the tool failed"


class SessionStatus:
    """Publishes a session's turns as seed 002 status payloads on its status subject
    (:func:`~voice_bus.catalog.status_subject` of its id), where ``/ws/channels`` subscribers with the
    right to the session's channel, and any observer on any gateway replica, receive them.

    Args:
        nc: The NATS connection to publish on.
        session: The session to follow.
    """

    def __init__(self, nc, session: Session) -> None:
        self._nc = nc
        self._subject = status_subject(session.id)
        self._session_id = session.id
        self._message_id = uuid.uuid4().hex
        # False before the first token of an answer, True after it, None for the fallback message.
        self._responding: bool | None = False

    async def __call__(self, event: Event) -> None:
        if isinstance(event, StageStarted) and event.kind == "llm_start":
            self._message_id = uuid.uuid4().hex
            self._responding = False
            await self._publish("Assistant is processing your request...", "started", "status")
        elif isinstance(event, LlmDelta):
            if self._responding is None:
                return
            if not self._responding:
                self._responding = True
                await self._publish("Assistant is responding...", "responding", "status")
            await self._publish(event.full_text, "in_progress", "response")
        elif isinstance(event, LlmCompleted):
            await self._publish(event.text, "completed", "response", final=True)
        elif isinstance(event, ToolCalled):
            await self._publish(f"Executing {event.name}...", "processing", "tool")
        elif isinstance(event, ToolFinished):
            if event.successful:
                await self._publish(f"{event.name} finished", "completed", "tool")
            else:
                await self._publish(f"{event.name} failed", "error", "tool", error_details=_tool_error(event.content))
        elif isinstance(event, FallbackUsed):
            self._responding = None
            await self._publish(event.error, "error", "error", error_details=event.details)
        elif isinstance(event, TurnFailed) and event.code != "NO_SPEECH":
            await self._publish(event.error, "error", "error", error_details=event.details or event.error)

    async def _publish(
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
