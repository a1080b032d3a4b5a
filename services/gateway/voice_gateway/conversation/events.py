"""What a turn reports, independent of any dialect: neutral events that each dialect translates into its
own wire messages, and the data a finished turn leaves behind.

A turn emits, in order: :class:`TurnStarted`; for spoken input ``stt_start`` and :class:`SttCompleted`;
``llm_start``; :class:`LlmDelta` per chunk of the answer (with :class:`ToolCalled` and
:class:`ToolFinished` between them when the agent uses tools, and :class:`FallbackUsed` when the LLM
failed and the agent's fallback message answers instead); :class:`LlmCompleted`; :class:`SpeechAudio`
per sentence and :class:`SpeechCompleted` when the answer is spoken; :class:`CallActionRequested` when a
built-in tool ends or transfers the call; :class:`TurnFailed` when a stage fails; and always, last,
:class:`TurnEnded` with the outcome.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from voice.v1 import audio_pb2
from voice_bus.errors import BusError
from voice_gateway.agents.tools import CallAction


@dataclass(frozen=True)
class Event:
    """Base of what a turn reports; ``kind`` names it for dialects and logs."""

    kind: str = ""


@dataclass(frozen=True)
class TurnStarted(Event):
    """A queued turn starts running; ``turn_kind`` is ``audio``, ``text``, ``greeting``, ``dtmf``, ..."""

    turn_kind: str = ""
    kind: str = "turn_start"


@dataclass(frozen=True)
class StageStarted(Event):
    """A stage of the turn starts: ``kind`` is ``stt_start`` or ``llm_start``."""


@dataclass(frozen=True)
class SttCompleted(Event):
    text: str = ""
    kind: str = "stt_complete"


@dataclass(frozen=True)
class LlmDelta(Event):
    chunk: str = ""
    full_text: str = ""
    kind: str = "llm_chunk"


@dataclass(frozen=True)
class LlmCompleted(Event):
    text: str = ""
    kind: str = "llm_complete"


@dataclass(frozen=True)
class FallbackUsed(Event):
    """The LLM failed before answering; the agent's fallback message is the answer (``error`` says why)."""

    error: str = ""
    details: str = ""
    kind: str = "fallback"


@dataclass(frozen=True)
class ToolCalled(Event):
    """The model called a tool; ``arguments`` is the JSON text it produced. ``client``: the client runs
    it (a client tool): no :class:`ToolFinished` follows, and the turn ends at the call."""

    tool_call_id: str = ""
    name: str = ""
    arguments: str = ""
    client: bool = False
    kind: str = "tool_call"


@dataclass(frozen=True)
class ToolFinished(Event):
    """A tool's result, as the model will read it; ``expose_result``: the agent lets unauthenticated
    clients see ``content`` (the tool's ``expose_result``)."""

    tool_call_id: str = ""
    name: str = ""
    content: str = ""
    successful: bool = True
    expose_result: bool = False
    kind: str = "tool_result"


@dataclass(frozen=True)
class CallActionRequested(Event):
    """A built-in tool asks the call to end or be transferred; sent after the answer is spoken."""

    action: CallAction | None = None
    kind: str = "call_action"


@dataclass(frozen=True)
class SpeechAudio(Event):
    """A piece of one sentence of the agent's speech, in the encoding and rate the dialect asked for: a
    sentence's pieces come in order as they are synthesized, each with the sentence's text and index, and
    the one with ``final`` set (its audio may be empty) ends the sentence."""

    audio: bytes = b""
    sample_rate: int = 0
    text: str = ""
    sentence_index: int = 0
    final: bool = True
    kind: str = "speech_audio"


class SentenceAudio:
    """Joins each sentence's :class:`SpeechAudio` pieces, for dialects whose clients take whole sentences."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []

    def add(self, event: SpeechAudio) -> bytes | None:
        """Keeps a piece; returns the sentence's whole audio at its final piece (``None`` before it)."""
        self._pieces.append(event.audio)
        if not event.final:
            return None
        audio = b"".join(self._pieces)
        self._pieces.clear()
        return audio


@dataclass(frozen=True)
class SpeechCompleted(Event):
    audio: bytes = b""
    sample_rate: int = 0
    kind: str = "tts_complete"


@dataclass(frozen=True)
class TurnFailed(Event):
    """A stage failed: ``error`` is for the user, ``code`` the bus error code, ``details`` the raw message."""

    error: str = ""
    code: str = ""
    details: str = ""
    kind: str = "error"


@dataclass
class TurnResult:
    """What a finished turn leaves behind for the history and the call log.

    Attributes:
        error: Why the turn (or its LLM stage) failed, for the call log; empty when it did not.
        error_code: The bus error code behind ``error`` (``UNAVAILABLE``, ...), for metrics.
        fallback: The answer is the agent's fallback message, given because the LLM failed.
        endpointing: How the spoken turn ended (see :class:`~voice_gateway.storage.call_log.TurnRecord`).
        speech_s: The spoken turn's stream times (see :class:`~voice_gateway.conversation.runner.Turn`).
    """

    user_text: str = ""
    assistant_text: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    error: str = ""
    error_code: str = ""
    fallback: bool = False
    tools: list[dict] = field(default_factory=list)
    action: CallAction | None = None
    endpointing: str = ""
    speech_s: tuple[float, float] | None = None


@dataclass(frozen=True)
class TurnEnded(Event):
    """The turn is over (always the last event of a turn).

    Attributes:
        turn_kind: As in :class:`TurnStarted`.
        outcome: ``ok``, ``no_speech``, ``cancelled``, or the failure's code in lower case
            (``unavailable``, ...; also when the fallback message answered).
        result: What the turn produced (also the partial answer of a cancelled turn).
        cancel_reason: Why a cancelled turn was cancelled: ``barge_in``, ``superseded``,
            ``interrupted`` or ``session_closed``.
    """

    turn_kind: str = ""
    outcome: str = "ok"
    result: TurnResult = field(default_factory=TurnResult)
    cancel_reason: str = ""
    kind: str = "turn_end"

    @property
    def cancelled(self) -> bool:
        return self.outcome == "cancelled"


Emit = Callable[[Event], Awaitable[None]]


@dataclass(frozen=True)
class OutputFormat:
    """Encoding and rate of the agent's audio for a dialect; rate 0 keeps the voice's own."""

    encoding: int = audio_pb2.AUDIO_ENCODING_PCM16
    sample_rate: int = 0


def describe(error: BusError, stage: str) -> str:
    """A message for the user about a failed stage."""
    if error.code_name == "INVALID_ARGUMENT":
        return f"{stage}: {error.message}"
    if error.code_name == "UNAVAILABLE":
        return f"{stage} is unavailable right now ({error.message})"
    if error.code_name == "DEADLINE_EXCEEDED":
        return f"{stage} took too long"
    return f"{stage} failed: {error.message}"
