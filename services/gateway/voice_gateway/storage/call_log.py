"""Call logs: each session's agent, start and end, and turns with their texts and stage timings,
kept in the JetStream stream ``CALLS`` (one subject per session, the latest snapshot wins).

When NATS lost the stream (a restart with an empty store), the store creates it again on its next use.

Who may write a log
-------------------
An id chosen by a client never addresses a log that client did not create. A new log is written
with :meth:`CallLogStore.create`, a create-only publish (``Nats-Expected-Last-Subject-Sequence: 0``
on the log's subject): the stream refuses it when any snapshot of that id exists, atomically, so two
gateways racing for one id cannot both create it. Only the session that created a log, or one that
continues it under the rules below, writes its later snapshots (:meth:`CallLogStore.save`).

When a new log's id is taken, the dialect decides (``Session(on_collision=...)``):

- Ids a carrier or Retell chooses (Twilio ``streamSid``, Exotel ``stream_sid``, Retell's call id in
  the socket's path): the call gets a fresh log under a new random id (a warning is logged); the wire
  keeps the carrier's id.
- Ids the gateway issued, or a client owns: a raw PCM session id (issued by the trigger API) is
  refused with 4404; a chat ``conversation_id`` is refused with ``forbidden``.

An existing log is continued (and so written again) only by: a chat connection of the credential that
opened it (chat logs only); the browser socket's ``callLogId`` (browser logs only); a Retell reconnect
under the same call id whose log is a Retell log still open (``active`` or ``handed_off``) of the
same agent as the one the reconnect resolves. Anything else never reads nor writes another log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from nats.js.api import Header, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError
from pydantic import BaseModel, Field

from voice_bus.connection import ensure_stream, is_missing

logger = logging.getLogger(__name__)

STREAM = "CALLS"
SUBJECT_PREFIX = "voice.calls."
# Every call log id the gateway makes fits (hex and UUIDs, carrier stream sids, Retell call ids, chat
# conversation ids); anything else is refused before it reaches a NATS subject.
CALL_LOG_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
RETENTION_S = 90 * 24 * 3600
# JetStream's optimistic concurrency on one subject: a publish with Header.EXPECTED_LAST_SUBJECT_SEQUENCE is
# stored only when the subject's last sequence is that value (0: the subject has none). nats.py raises a
# mismatch as BadRequestError with one of these err_codes (JSStreamWrongLastSequenceErrF and
# JSStreamWrongLastSequenceConstantErr), as its own KeyValue.update reads it.
WRONG_LAST_SEQUENCE = frozenset({10071, 10164})


class CallLogExists(Exception):
    """A new call log's id is taken: nothing was written, the existing log is untouched."""

    def __init__(self, call_log_id: str) -> None:
        super().__init__(f"a call log with id {call_log_id!r} already exists")
        self.call_log_id = call_log_id


def valid_call_log_id(value: object) -> bool:
    """Whether ``value`` can be a call log id: 1-128 ASCII letters, digits, ``-`` or ``_``."""
    return isinstance(value, str) and CALL_LOG_ID.fullmatch(value) is not None


class TurnRecord(BaseModel):
    """One exchange: what the user said or typed, what the agent answered, and how long each stage took.

    ``error`` says why the turn failed; with ``fallback`` true, the LLM failed and ``assistant`` is the
    agent's fallback message, which the caller got instead of an answer. ``endpointing`` says how a
    spoken turn of a call ended: ``semantic`` (the end-of-turn model heard a finished turn at a pause),
    ``max_silence`` (it did not; the maximum silence passed), ``silence`` (silence turn detection),
    ``max_utterance`` (the utterance was cut at its maximum length) or ``hang_up`` (the call ended during
    the utterance or before its end was decided: recorded with the caller's words and no answer).
    ``speech_start_s`` and ``speech_end_s`` place a spoken turn of a call in the call's inbound audio: the
    stream times (seconds since its first frame) of the start of the utterance's first voiced frame and
    the end of its last, as the gateway's VAD heard them; ``None`` for every other turn.
    """

    index: int
    kind: str
    user: str
    assistant: str
    started_at: float
    timings: dict[str, float] = Field(default_factory=dict)
    interrupted: bool = False
    error: str = ""
    fallback: bool = False
    tools: list[dict] = Field(default_factory=list)
    action: dict | None = None
    endpointing: str = ""
    speech_start_s: float | None = None
    speech_end_s: float | None = None


class CallLog(BaseModel):
    """A session's record."""

    call_log_id: str = Field(serialization_alias="callLogId")
    agent_id: str = Field(serialization_alias="agentId")
    agent_name: str = Field(serialization_alias="agentName")
    dialect: str
    started_at: float = Field(default_factory=time.time, serialization_alias="startedAt")
    ended_at: float | None = Field(default=None, serialization_alias="endedAt")
    status: str = "active"
    # Why the call ended as it did, when its status alone does not say (e.g. a ``refused`` media format).
    reason: str = ""
    turns: list[TurnRecord] = Field(default_factory=list)
    # The identity of the credential that opened it (``voice_gateway.api.auth``), never the credential itself:
    # only the same credential may continue the conversation.
    owner: str | None = None

    model_config = {"populate_by_name": True}


class CallLogStore:
    """Reads and writes call-log snapshots on ``voice.calls.<call_log_id>``."""

    def __init__(self, js, config: StreamConfig) -> None:
        self._js = js
        self._config = config
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, js, *, replicas: int = 1) -> CallLogStore:
        """Creates the ``CALLS`` stream (file storage) if it is missing, or brings it up to date.

        Args:
            js: A JetStream context.
            replicas: Replicas of the stream (``NATS_STREAM_REPLICAS``).
        """
        config = StreamConfig(
            name=STREAM,
            subjects=[SUBJECT_PREFIX + "*"],
            storage=StorageType.FILE,
            max_msgs_per_subject=20,
            max_age=RETENTION_S,
            num_replicas=replicas,
        )
        await ensure_stream(js, config)
        return cls(js, config)

    async def create(self, log: CallLog) -> bool:
        """Writes the first snapshot of a new log, only if no log has its id; returns whether it did.

        Atomic on the stream: of concurrent creates of one id (on any gateway) exactly one returns
        ``True``; the others write nothing and return ``False``.
        """
        try:
            await self._publish(log, {Header.EXPECTED_LAST_SUBJECT_SEQUENCE: "0"})
        except APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                return False
            raise
        return True

    async def save(self, log: CallLog) -> None:
        """Writes a new snapshot of a log this gateway created, or continues (see the module's docstring)."""
        await self._publish(log)

    async def _publish(self, log: CallLog, headers: dict[str, str] | None = None) -> None:
        subject, data = SUBJECT_PREFIX + log.call_log_id, log.model_dump_json().encode()
        try:
            await self._js.publish(subject, data, stream=STREAM, headers=headers)
            return
        except Exception as exc:
            if not is_missing(exc):
                raise
        await self._recreate()
        await self._js.publish(subject, data, stream=STREAM, headers=headers)

    async def get(self, call_log_id: str) -> CallLog | None:
        """The call's latest log, or ``None`` when there is none (or the id cannot be one)."""
        if not valid_call_log_id(call_log_id):
            return None
        try:
            msg = await self._js.get_last_msg(STREAM, SUBJECT_PREFIX + call_log_id)
        except NotFoundError as exc:
            if is_missing(exc):
                await self._recreate()
            return None
        return CallLog.model_validate_json(msg.data)

    async def _recreate(self) -> None:
        async with self._lock:
            try:
                await self._js.stream_info(STREAM)
            except NotFoundError:
                logger.warning("stream %s is gone (NATS lost its store?); creating it again", STREAM)
                await ensure_stream(self._js, self._config)
