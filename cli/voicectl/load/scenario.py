"""What the callers of ``voicectl load`` say and when: the questions, the options, the turn-taking script.

A caller listens to the greeting, asks one of a few questions (rendered once with Piper, or by the TTS
worker), waits for the answer, listens to it, pauses and asks again; a fraction of the answers it
interrupts (barge-in). ``Conversation`` is that caller as a ``CallScript`` of the simulated carriers; it
records every answered turn and barge-in in the run's ``LoadStats``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voice_audio import resample
from voicectl.callers import CallScript, LiveCall, first_voiced_s, last_voiced_s

__all__ = [
    "INTERRUPTION",
    "QUESTIONS",
    "Conversation",
    "LoadOptions",
    "LoadStats",
    "Run",
    "Utterance",
    "render_utterances",
]

QUESTIONS = (
    "What time do you open tomorrow?",
    "Can you help me with my order?",
    "I would like to book a table for two people.",
    "Do you have any vegetarian dishes on the menu?",
)
INTERRUPTION = "Sorry, wait a moment please."
# The caller waits this long for a greeting before speaking first.
GREETING_WAIT_S = 4.0
# ... and pauses this long after the agent went quiet before speaking again.
THINK_S = 0.8
# A barge-in starts this long after the first audio of the answer it interrupts.
BARGE_IN_AFTER_S = 0.4
# No new question when the call would end before the answer could come.
END_ROOM_S = 4.0


@dataclass(frozen=True)
class Utterance:
    """Something the caller says: int16 mono speech with its voiced span.

    Attributes:
        text: The words.
        samples: int16 mono samples.
        rate: Their sample rate in Hz.
        onset_s: Offset of the first voiced 10 ms window.
        last_voiced_s: Offset of the end of the last voiced 10 ms window.
    """

    text: str
    samples: np.ndarray
    rate: int
    onset_s: float
    last_voiced_s: float

    @classmethod
    def of(cls, text: str, samples: np.ndarray, rate: int) -> Utterance:
        """Wrap speech, finding its voiced span.

        Raises:
            ValueError: If the speech is silent.
        """
        samples = np.ascontiguousarray(samples, dtype=np.int16).reshape(-1)
        onset, last = first_voiced_s(samples, rate), last_voiced_s(samples, rate)
        if onset is None or last is None:
            raise ValueError(f"the speech for {text!r} is silent")
        return cls(text, samples, rate, onset, last)

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return self.samples.size / self.rate

    def at(self, rate: int) -> Utterance:
        """The same speech resampled to ``rate``."""
        if rate == self.rate:
            return self
        return Utterance.of(self.text, resample(self.samples, self.rate, rate), rate)


async def render_utterances(texts: Sequence[str], *, nats_url: str = "", timeout: float = 60.0) -> list[Utterance]:
    """Speak ``texts`` once: with Piper in this process when it is installed, else with the TTS worker.

    Args:
        texts: What to say.
        nats_url: The bus, for the TTS worker fallback.
        timeout: Seconds to wait for each synthesis through the bus.

    Returns:
        One utterance per text, in order.

    Raises:
        RuntimeError: If neither Piper nor the TTS worker can speak.
    """
    from voicectl import speech

    if speech.piper_available():
        spoken = [await asyncio.to_thread(speech.speak, text) for text in texts]
        return [Utterance.of(text, samples, rate) for text, (samples, rate) in zip(texts, spoken, strict=True)]
    from voice.v1 import audio_pb2, tts_pb2
    from voice_bus.client import BusClient
    from voice_bus.connection import connect

    try:
        nc = await connect(nats_url, name="voicectl-load", connect_timeout_s=3)
    except Exception as exc:
        raise RuntimeError(f"Piper is not installed here and the bus at {nats_url} is unreachable: {exc}") from exc
    try:
        out = []
        for text in texts:
            request = tts_pb2.SynthesizeRequest(text=text, output_format=audio_pb2.AudioFormat(sample_rate=16000))
            events = await BusClient(nc).collect("tts", request, timeout=timeout)
            pcm = b"".join(event.chunk.audio for event in events if event.HasField("chunk"))
            out.append(Utterance.of(text, np.frombuffer(pcm, dtype="<i2"), 16000))
        return out
    finally:
        await nc.close()


@dataclass
class LoadOptions:
    """What to run.

    Attributes:
        gateway: The gateway's base URL.
        dialect: ``twilio``, ``exotel``, ``pcm`` or ``browser``.
        calls: Concurrent calls.
        duration_s: Length of the run, from the first call to the hang-ups.
        ramp_s: The calls start evenly spread over this many seconds.
        barge_in_rate: Fraction of the answers the caller interrupts (not for ``browser``).
        agent: The agent to call.
        api_key: Bearer key for the REST API (the PCM trigger).
        sample_rate: Exotel's sample rate.
        answer_timeout_s: An answer that has not started this long after the caller stopped is an error.
        seed: Seeds the choice of questions and of the answers to interrupt.
    """

    gateway: str = "http://127.0.0.1:8000"
    dialect: str = "twilio"
    calls: int = 4
    duration_s: float = 60.0
    ramp_s: float = 0.0
    barge_in_rate: float = 0.0
    agent: str = "default"
    api_key: str = ""
    sample_rate: int = 8000
    answer_timeout_s: float = 20.0
    seed: int | None = None


@dataclass
class LoadStats:
    """What the calls measured and what went wrong, as it happens.

    Attributes:
        turns: ``(call, run time the caller stopped talking, voice-to-voice s)`` of each answered turn.
        barge_ins: ``(call, run time of the interruption's onset, latency s or None if the agent went on)``.
        errors: Count of each kind of error.
        error_examples: The first message seen of each kind.
        calls_placed: Calls dialled (replacements included).
        calls_completed: Calls that lasted until the run's end.
        active: Calls up right now.
        underruns: Playback underruns the callers heard (agent audio arriving slower than real time).
        unplanned_interruptions: ``clear`` messages that no planned barge-in asked for.
        loop_lags: How late each probe of the callers' event loop woke up, in seconds.
    """

    turns: list[tuple[int, float, float]] = field(default_factory=list)
    barge_ins: list[tuple[int, float, float | None]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    calls_placed: int = 0
    calls_completed: int = 0
    active: int = 0
    underruns: int = 0
    unplanned_interruptions: int = 0
    loop_lags: list[float] = field(default_factory=list)

    def error(self, kind: str, message: str = "") -> None:
        """Count an error of ``kind``, keeping the first message of each kind."""
        self.errors[kind] += 1
        if message and kind not in self.error_examples:
            self.error_examples[kind] = message[:300]


@dataclass
class Run:
    """What the calls of one run share."""

    options: LoadOptions
    stats: LoadStats
    questions: list[Utterance]
    interruption: Utterance
    started_at: float
    ends_at: float
    rng: random.Random

    def clock(self) -> float:
        return asyncio.get_running_loop().time()


@dataclass
class _Awaiting:
    """A caller utterance waiting for its answer (call seconds)."""

    last_voiced_at: float
    deadline: float


@dataclass
class _BargeIn:
    onset_at: float
    checked: bool = False
    attempted: bool = False
    latency_s: float | None = None


class Conversation(CallScript):
    """The turn-taking caller of one carrier call: listen, ask, wait for the answer, maybe interrupt it."""

    def __init__(self, index: int, run: Run, questions: list[Utterance], interruption: Utterance) -> None:
        self.index = index
        self.run = run
        self.questions = questions
        self.interruption = interruption
        self.next_question = run.rng.randrange(len(questions))
        self.state = "listening"
        self.heard_anything = False
        self.quiet_since: float | None = None
        self.awaiting: _Awaiting | None = None
        self.barge: _BargeIn | None = None
        self.offset = 0.0
        self.stop_event = "clear received"

    def on_start(self, call: LiveCall) -> None:
        self.offset = self.run.clock() - call.now() - self.run.started_at
        self.stop_event = "playback end" if call.dialect == "pcm" else "clear received"

    def _ask(self, call: LiveCall, t: float) -> None:
        question = self.questions[self.next_question % len(self.questions)]
        if t + question.duration_s + END_ROOM_S > call.end_s:
            self.state = "done"
            return
        self.next_question += 1
        start = call.say(question.samples)
        last = start + question.last_voiced_s
        self.awaiting = _Awaiting(last, last + self.run.options.answer_timeout_s)
        self.state = "awaiting"

    def on_tick(self, call: LiveCall, t: float) -> None:
        barge = self.barge
        if barge is not None and not barge.checked and t >= barge.onset_at:
            barge.checked = True
            barge.attempted = call.agent_playing or barge.latency_s is not None
        if self.state == "awaiting" and self.awaiting is not None and t > self.awaiting.deadline:
            timeout = self.run.options.answer_timeout_s
            self.run.stats.error("no answer", f"no agent audio {timeout:g} s after the caller stopped talking")
            self.awaiting = None
            self.finish_barge()
            self.state = "listening"
            self.quiet_since = None
        if self.state != "listening":
            return
        if call.agent_playing:
            self.heard_anything = True
            self.quiet_since = None
            return
        if self.quiet_since is None:
            self.quiet_since = t
        if not self.heard_anything and t < GREETING_WAIT_S:
            return
        if t - self.quiet_since >= THINK_S or not self.heard_anything:
            self._ask(call, t)

    def on_event(self, call: LiveCall, t: float, what: str, details: dict[str, Any]) -> None:
        stats = self.run.stats
        if what == "agent audio start":
            self.heard_anything = True
            awaiting = self.awaiting
            if self.state == "awaiting" and awaiting is not None and t >= awaiting.last_voiced_at:
                stats.turns.append((self.index, self.offset + awaiting.last_voiced_at, t - awaiting.last_voiced_at))
                self.awaiting = None
                self.finish_barge()
                if self.run.options.barge_in_rate > 0 and self.run.rng.random() < self.run.options.barge_in_rate:
                    self._interrupt(call, t)
                else:
                    self.state = "listening"
                    self.quiet_since = None
        elif what == "clear received" and not (self.barge and self.stop_event == what):
            stats.unplanned_interruptions += 1
        elif what == "playback end" and details.get("underruns"):
            stats.underruns += int(details["underruns"])
        barge = self.barge
        if what == self.stop_event and barge is not None and barge.latency_s is None and t >= barge.onset_at:
            if what == "clear received" or barge.attempted:
                barge.latency_s = t - barge.onset_at
                barge.attempted = True

    def _interrupt(self, call: LiveCall, t: float) -> None:
        speech = self.interruption
        if t + BARGE_IN_AFTER_S + speech.duration_s + END_ROOM_S > call.end_s:
            self.state = "done"
            return
        start = call.say(speech.samples, t + BARGE_IN_AFTER_S)
        last = start + speech.last_voiced_s
        self.barge = _BargeIn(start + speech.onset_s)
        self.awaiting = _Awaiting(last, last + self.run.options.answer_timeout_s)
        self.state = "awaiting"

    def finish_barge(self) -> None:
        """Record the barge-in under way, if the caller attempted one."""
        barge, self.barge = self.barge, None
        if barge is not None and barge.attempted:
            self.run.stats.barge_ins.append((self.index, self.offset + barge.onset_at, barge.latency_s))
