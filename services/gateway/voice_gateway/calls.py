"""Call logs: each session's agent, start and end, and turns with their texts and stage timings,
kept in the JetStream stream ``CALLS`` (one subject per session, the latest snapshot wins)."""

from __future__ import annotations

import re
import time

from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field

STREAM = "CALLS"
SUBJECT_PREFIX = "voice.calls."
# Every call log id the gateway makes fits (hex and UUIDs, carrier stream sids, Retell call ids, chat
# conversation ids); anything else is refused before it reaches a NATS subject.
CALL_LOG_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
RETENTION_S = 90 * 24 * 3600


def valid_call_log_id(value: object) -> bool:
    """Whether ``value`` can be a call log id: 1-128 ASCII letters, digits, ``-`` or ``_``."""
    return isinstance(value, str) and CALL_LOG_ID.fullmatch(value) is not None


class TurnRecord(BaseModel):
    """One exchange: what the user said or typed, what the agent answered, and how long each stage took."""

    index: int
    kind: str
    user: str
    assistant: str
    started_at: float
    timings: dict[str, float] = Field(default_factory=dict)
    interrupted: bool = False
    error: str = ""
    tools: list[dict] = Field(default_factory=list)
    action: dict | None = None


class CallLog(BaseModel):
    """A session's record."""

    call_log_id: str = Field(serialization_alias="callLogId")
    agent_id: str = Field(serialization_alias="agentId")
    agent_name: str = Field(serialization_alias="agentName")
    dialect: str
    started_at: float = Field(default_factory=time.time, serialization_alias="startedAt")
    ended_at: float | None = Field(default=None, serialization_alias="endedAt")
    status: str = "active"
    turns: list[TurnRecord] = Field(default_factory=list)
    # The identity of the credential that opened it (``voice_gateway.auth``), never the credential itself:
    # only the same credential may continue the conversation.
    owner: str | None = None

    model_config = {"populate_by_name": True}


class CallLogStore:
    """Reads and writes call-log snapshots on ``voice.calls.<call_log_id>``."""

    def __init__(self, js) -> None:
        self._js = js

    @classmethod
    async def open(cls, js) -> CallLogStore:
        """Creates the ``CALLS`` stream (file storage) if it is missing."""
        config = StreamConfig(
            name=STREAM,
            subjects=[SUBJECT_PREFIX + "*"],
            storage=StorageType.FILE,
            max_msgs_per_subject=20,
            max_age=RETENTION_S,
        )
        try:
            await js.stream_info(STREAM)
        except NotFoundError:
            await js.add_stream(config)
        return cls(js)

    async def save(self, log: CallLog) -> None:
        await self._js.publish(SUBJECT_PREFIX + log.call_log_id, log.model_dump_json().encode(), stream=STREAM)

    async def get(self, call_log_id: str) -> CallLog | None:
        """The call's latest log, or ``None`` when there is none (or the id cannot be one)."""
        if not valid_call_log_id(call_log_id):
            return None
        try:
            msg = await self._js.get_last_msg(STREAM, SUBJECT_PREFIX + call_log_id)
        except NotFoundError:
            return None
        return CallLog.model_validate_json(msg.data)
