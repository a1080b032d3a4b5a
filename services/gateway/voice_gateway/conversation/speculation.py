"""What a call starts for the caller's utterance before its end is decided, and what joins that utterance.

A gap of ``TRANSCRIBE_AFTER_MS`` in the caller's speech starts the utterance's transcription (speculative
STT). With semantic turn detection the short pause that may follow asks the end-of-turn model
(:mod:`~voice_gateway.conversation.turn_model`) whether the caller has finished; a yes ends the turn at once,
its transcript ready or nearly. With silence detection the transcription runs while the silence does.
When the caller goes on, both are void: cancelled (the transcription on the bus too), so nothing of them
reaches the LLM or the history.

A spoken turn that the call gave up because the caller went on before any of its answer was sent
(:mod:`~voice_gateway.conversation.call`) leaves its audio here: it joins the utterance in progress, so the
transcription, the end-of-turn model and the turn all hear the two as one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from voice_gateway.conversation.metrics import SPECULATIONS
from voice_gateway.conversation.runner import Turn
from voice_gateway.conversation.turn_model import SmartTurn
from voice_gateway.conversation.vad import SpeechEnded, SpeechGap, SpeechPaused
from voice_runtime.tasks import wait_quietly

# The speculative transcription starts after this much non-speech (or at the pause, if that is sooner); the
# end-of-turn model is still asked at the pause. Whisper's transcripts of 18 Piper sentences were the same
# with 40, 60, 100 or 150 ms kept after the last voiced frame, and 22 utterances had 8 gaps of 100 ms inside
# them against 7 of 150 ms (docs/latency.md, run I).
TRANSCRIBE_AFTER_MS = 100
# The longest silence kept between a given-up turn's audio and the utterance it joins.
JOIN_GAP_S = 1.0

_Heard = TypeVar("_Heard", SpeechEnded, SpeechPaused)


@dataclass(frozen=True)
class SpokenTurn:
    """A spoken turn and where its audio lies in the stream (the times of its first sample and onset)."""

    turn: Turn
    start_s: float
    onset_s: float

    @property
    def audio(self) -> np.ndarray:
        """The turn's audio, as the endpointer cut it (int16 at its rate)."""
        return np.frombuffer(self.turn.audio, dtype="<i2")


@dataclass(eq=False)
class _Speculation:
    transcript: asyncio.Task
    verdict: asyncio.Task | None = None
    joined: bool = False  # its audio began with a given-up turn's


def _seen(task: asyncio.Task) -> None:
    """Retrieves a speculative task's failure: a discarded one is nobody's to report."""
    if not task.cancelled():
        task.exception()


class Speculator:
    """The speculative work and the joining audio of one call's utterance in progress.

    Args:
        transcribe: Transcribes PCM16 audio at ``rate`` (over the bus).
        rate: The endpointer's sample rate.
        threshold: The end-of-turn model's probability at or above which the caller has finished.
        finished: Called when the model says the caller has finished and nothing changed since the pause.
    """

    def __init__(
        self,
        transcribe: Callable[[bytes], Coroutine[Any, Any, str]],
        rate: int,
        threshold: float,
        finished: Callable[[], None],
    ) -> None:
        self._transcribe = transcribe
        self._rate = rate
        self._threshold = threshold
        self._finished = finished
        self._speculation: _Speculation | None = None
        self.carry: SpokenTurn | None = None

    def gap(self, event: SpeechGap) -> None:
        """A gap in the speech: transcribe what was said so far, in case the pause that may follow ends the turn."""
        self.discard()
        pcm = np.ascontiguousarray(self.joined(event).audio, dtype="<i2").tobytes()
        transcript = asyncio.create_task(self._transcribe(pcm))
        transcript.add_done_callback(_seen)
        self._speculation = _Speculation(transcript=transcript, joined=self.carry is not None)

    def pause(self, event: SpeechPaused) -> None:
        """A short pause: ask the end-of-turn model, while the transcription started at the gap goes on."""
        speculation = self._speculation
        if speculation is None or speculation.verdict is not None:
            return
        speculation.verdict = asyncio.create_task(self._judge(speculation, self.joined(event).audio))
        speculation.verdict.add_done_callback(_seen)

    async def _judge(self, speculation: _Speculation, audio: np.ndarray) -> None:
        probability = await asyncio.to_thread(SmartTurn.load().probability, audio, self._rate)
        if speculation is self._speculation and probability >= self._threshold:
            self._finished()

    def discard(self) -> None:
        """The caller went on: what started at the gap and the pause is void and its bus work is cancelled."""
        speculation, self._speculation = self._speculation, None
        if speculation is not None:
            _cancel(speculation)

    def drop(self) -> None:
        """Forgets the utterance in progress: its speculative work and the audio joining it."""
        self.discard()
        self.carry = None

    async def close(self) -> None:
        """Cancels the speculative work and waits until it has stopped."""
        speculation, self._speculation = self._speculation, None
        self.carry = None
        if speculation is not None:
            _cancel(speculation)
            await wait_quietly(speculation.verdict, speculation.transcript)

    def take(self, event: SpeechEnded, *, use: bool) -> tuple[SpeechEnded, asyncio.Task | None]:
        """The utterance ended: returns it with any joining audio, and its speculative transcription if
        ``use`` and it transcribed this same audio (else it is cancelled)."""
        speculation, self._speculation = self._speculation, None
        carried = self.carry is not None
        joined, self.carry = self.joined(event), None
        if speculation is None:
            return joined, None
        if not use or speculation.joined != carried:
            _cancel(speculation)
            return joined, None
        if speculation.verdict not in (None, asyncio.current_task()):
            speculation.verdict.cancel()
        SPECULATIONS.labels("used").inc()
        return joined, speculation.transcript

    def joined(self, event: _Heard) -> _Heard:
        """The utterance with the given-up turn's audio before it, if one joins it."""
        carry = self.carry
        if carry is None:
            return event
        gap = round((event.start_s - carry.start_s) * self._rate) - carry.audio.size
        silence = np.zeros(min(max(gap, 0), round(JOIN_GAP_S * self._rate)), dtype=np.int16)
        audio = np.concatenate([carry.audio, silence, event.audio[max(-gap, 0) :]])
        return dataclasses.replace(event, audio=audio, onset_s=carry.onset_s, start_s=carry.start_s)


def _cancel(speculation: _Speculation) -> None:
    """Cancels the speculation's tasks (not the verdict, if it is the caller) and counts it discarded."""
    if speculation.verdict not in (None, asyncio.current_task()):
        speculation.verdict.cancel()
    speculation.transcript.cancel()
    SPECULATIONS.labels("discarded").inc()
