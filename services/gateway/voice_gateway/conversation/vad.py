"""Voice activity detection and endpointing for real-time calls.

``Endpointer`` turns a stream of PCM16 mono samples into speech events: ``SpeechStarted`` once the
caller has talked for ``min_speech_ms`` (the barge-in signal) and ``SpeechEnded`` with the whole
utterance once ``silence_ms`` of non-speech follows it (the end of the caller's turn), or when the
utterance reaches ``max_utterance_s``.

With ``pause_ms`` set (semantic turn detection), a shorter run of non-speech inside an utterance emits
``SpeechPaused`` with the utterance so far: the caller's end-of-turn model starts then, and
:meth:`Endpointer.end_turn` ends the utterance at once when the model says the caller has finished.
With ``transcribe_ms`` set (with or without pauses), an even shorter run emits ``SpeechGap`` first, with the
same audio, for a speculative transcription. Voiced audio after either emits ``SpeechResumed`` (the
speculation is void). The utterance's audio then always ends ``min(pre_roll_ms, transcribe_ms or pause_ms)``
after the last voiced frame, so the audio transcribed at the gap is exactly the audio of the turn, whichever
way it ends.

(About 480 lines, on purpose: the frame loop, its settings and the five events it emits are one
state machine, read and changed together.)

A 20 ms frame is voiced when WebRTC's VAD (package ``webrtcvad-wheels``) says speech AND its RMS
level passes two energy gates: a fixed floor (-55 dBFS) and a margin (6 dB) above a tracked noise
floor. Measured on Piper speech: the WebRTC model alone (mode 2) calls steady white noise speech in
about half of its frames at -60 to -40 dBFS, and in every frame at -30 dBFS; a fixed -45 dBFS gate
stops that but misses quiet callers (speech 20 dB below full scale), while the adaptive gate rejects
white noise up to -20 dBFS and keeps such speech. Non-stationary noise (babble, music, bursts) can
still pass both gates and is left to the VAD. The cost is a few microseconds per frame and no
allocation except a copy of each frame of an utterance in progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import webrtcvad

__all__ = [
    "VAD_SAMPLE_RATES",
    "Endpointer",
    "EndpointingConfig",
    "SpeechEnded",
    "SpeechGap",
    "SpeechPaused",
    "SpeechResumed",
    "SpeechStarted",
]

VAD_SAMPLE_RATES = (8000, 16000, 32000, 48000)
FRAME_MS = 20
_ONSET_GAP_MS = 200  # a non-voiced gap this long abandons a not-yet-confirmed onset
_NOISE_FLOOR_RISE_DB_PER_S = 3.0
_NOISE_FLOOR_RISE_FRACTION = 0.01  # per frame, of the distance to a louder frame (2 s time constant)
_SILENT_DB = -100.0


@dataclass(frozen=True)
class EndpointingConfig:
    """How speech onsets and turn ends are decided.

    Times are rounded up to whole 20 ms frames.

    Attributes:
        silence_ms: Trailing non-speech that ends a turn.
        min_speech_ms: Voiced time needed before speech counts as started. Voiced frames add up
            across gaps shorter than 200 ms (or ``silence_ms`` when smaller); a longer gap before
            the total is reached discards the candidate without any event, so coughs, clicks and
            short backchannels are ignored.
        max_utterance_s: An utterance this long (measured from its onset) is cut and ended there.
        pre_roll_ms: Audio kept from before the onset and prepended to the utterance; the same
            amount of audio after the last voiced frame (at most ``silence_ms``) is appended.
        aggressiveness: WebRTC VAD mode, 0 (least) to 3 (most eager to call audio non-speech).
        energy_threshold_dbfs: Frames whose RMS level is below this are non-speech whatever the
            VAD says; None disables the fixed gate.
        noise_margin_db: Frames must also be this far above the tracked noise floor (the running
            minimum of frame levels; it rises towards louder frames by 3 dB/s or 1% of the distance
            per frame, whichever is more; all-zero frames are ignored once audio was seen); None
            disables the adaptive gate.
        pause_ms: Non-speech inside an utterance that emits ``SpeechPaused`` (semantic turn
            detection); ``None`` turns pauses off. Shorter than ``silence_ms``.
        transcribe_ms: Non-speech inside an utterance that emits ``SpeechGap``: at most ``pause_ms``
            when pauses are on, else shorter than ``silence_ms``; ``None``: no gaps.
    """

    silence_ms: int = 600
    min_speech_ms: int = 200
    max_utterance_s: float = 30.0
    pre_roll_ms: int = 300
    aggressiveness: int = 2
    energy_threshold_dbfs: float | None = -55.0
    noise_margin_db: float | None = 6.0
    pause_ms: int | None = None
    transcribe_ms: int | None = None

    def __post_init__(self) -> None:
        """Validate the settings.

        Raises:
            ValueError: If a setting is out of range.
        """
        if self.silence_ms <= 0:
            raise ValueError(f"silence_ms must be positive, got {self.silence_ms}")
        if self.min_speech_ms < 0:
            raise ValueError(f"min_speech_ms must be >= 0, got {self.min_speech_ms}")
        if not self.max_utterance_s > 0:
            raise ValueError(f"max_utterance_s must be positive, got {self.max_utterance_s}")
        if self.pre_roll_ms < 0:
            raise ValueError(f"pre_roll_ms must be >= 0, got {self.pre_roll_ms}")
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0-3, got {self.aggressiveness}")
        if self.energy_threshold_dbfs is not None and not self.energy_threshold_dbfs <= 0:
            raise ValueError(f"energy_threshold_dbfs must be <= 0, got {self.energy_threshold_dbfs}")
        if self.noise_margin_db is not None and not self.noise_margin_db >= 0:
            raise ValueError(f"noise_margin_db must be >= 0, got {self.noise_margin_db}")
        if self.pause_ms is not None and not 0 < self.pause_ms < self.silence_ms:
            raise ValueError(f"pause_ms must be between 0 and silence_ms ({self.silence_ms}), got {self.pause_ms}")
        gap = self.transcribe_ms
        if gap is not None and self.pause_ms is not None and not 0 < gap <= self.pause_ms:
            raise ValueError(f"transcribe_ms must be between 0 and pause_ms ({self.pause_ms}), got {gap}")
        if gap is not None and not 0 < gap < self.silence_ms:
            raise ValueError(f"transcribe_ms must be positive and below silence_ms ({self.silence_ms}), got {gap}")


@dataclass(frozen=True)
class SpeechStarted:
    """The caller started speaking.

    Attributes:
        onset_s: Stream time of the start of the first voiced frame.
        confirmed_s: Stream time at which ``min_speech_ms`` of voiced audio was reached (the event
            is emitted then).
    """

    onset_s: float
    confirmed_s: float


@dataclass(frozen=True)
class SpeechEnded:
    """The caller finished an utterance.

    Attributes:
        audio: The utterance as int16 mono samples at the endpointer's rate, pre-roll included,
            ending ``min(pre_roll_ms, silence_ms)`` after the last voiced frame (or at the cut).
        onset_s: Stream time of the start of the first voiced frame.
        start_s: Stream time of ``audio``'s first sample.
        last_voiced_s: Stream time of the end of the last voiced frame.
        ended_s: Stream time at which the end was decided: ``last_voiced_s + silence_ms``, or the
            cut point when capped.
        capped: True when the utterance was cut at ``max_utterance_s``.
    """

    audio: np.ndarray
    onset_s: float
    last_voiced_s: float
    ended_s: float
    capped: bool
    start_s: float


@dataclass(frozen=True)
class SpeechPaused:
    """The caller paused inside an utterance for ``pause_ms`` (only with ``pause_ms`` set).

    Attributes:
        audio: The utterance so far, as :class:`SpeechEnded` would carry it if it ended now.
        onset_s: Stream time of the start of the first voiced frame.
        last_voiced_s: Stream time of the end of the last voiced frame.
        paused_s: Stream time at which the pause was decided.
        start_s: Stream time of ``audio``'s first sample.
    """

    audio: np.ndarray
    onset_s: float
    last_voiced_s: float
    paused_s: float
    start_s: float


@dataclass(frozen=True)
class SpeechGap(SpeechPaused):
    """The caller stopped inside an utterance for ``transcribe_ms`` (only with it set): the utterance so
    far, as at the pause that may follow, to transcribe speculatively. ``paused_s`` is when the gap was
    decided."""


@dataclass(frozen=True)
class SpeechResumed:
    """The caller spoke again after a ``SpeechGap`` or ``SpeechPaused``: what started there is void.

    Attributes:
        resumed_s: Stream time of the start of the voiced frame.
    """

    resumed_s: float


Event = SpeechStarted | SpeechEnded | SpeechPaused | SpeechGap | SpeechResumed


class _State(Enum):
    IDLE = 0
    CANDIDATE = 1
    SPEECH = 2


def _frames(ms: float) -> int:
    return math.ceil(ms / FRAME_MS)


class Endpointer:
    """Streaming speech onset and end-of-turn detector for one call.

    Feed every sample of the caller's audio to ``process`` in order; it may be called with any
    number of samples and buffers them into 20 ms frames. Stream times count all samples fed since
    construction; ``reset`` does not rewind them. Not thread-safe: use one instance per stream.

    Example:
        >>> ep = Endpointer(EndpointingConfig(silence_ms=500))
        >>> events = ep.process(np.zeros(320, dtype=np.int16))
        >>> events, ep.in_speech
        ([], False)
    """

    def __init__(self, config: EndpointingConfig | None = None, sample_rate: int = 16000) -> None:
        """Create an endpointer.

        Args:
            config: Endpointing settings; the defaults when None.
            sample_rate: Rate of the samples given to ``process``: 8000, 16000, 32000 or 48000.

        Raises:
            ValueError: If the sample rate is not supported by the VAD.
        """
        if sample_rate not in VAD_SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {VAD_SAMPLE_RATES}, got {sample_rate}")
        self.config = config if config is not None else EndpointingConfig()
        self.sample_rate = sample_rate
        self._frame_len = sample_rate * FRAME_MS // 1000
        self._frame_s = FRAME_MS / 1000
        self._vad = webrtcvad.Vad(self.config.aggressiveness)

        cfg = self.config
        self._silence_frames = max(1, _frames(cfg.silence_ms))
        self._min_speech_frames = max(1, _frames(cfg.min_speech_ms))
        self._max_frames = max(1, _frames(cfg.max_utterance_s * 1000))
        self._pre_roll_frames = _frames(cfg.pre_roll_ms)
        self._pause_frames = _frames(cfg.pause_ms) if cfg.pause_ms else 0
        self._gap_frames = _frames(cfg.transcribe_ms) if cfg.transcribe_ms else 0
        self._held_frames = self._gap_frames or self._pause_frames  # the first stop that hands the audio out
        self._tail_frames = min(self._pre_roll_frames, self._silence_frames, self._held_frames or self._silence_frames)
        self._onset_gap_frames = max(1, min(self._silence_frames, _frames(_ONSET_GAP_MS)))
        self._gate_db = _SILENT_DB if cfg.energy_threshold_dbfs is None else cfg.energy_threshold_dbfs
        self._margin_db = cfg.noise_margin_db
        self._floor_rise_db = _NOISE_FLOOR_RISE_DB_PER_S * self._frame_s
        self._noise_floor_db: float | None = None
        self._power_scale = 1.0 / (self._frame_len * 32768.0 * 32768.0)

        longest_candidate = self._min_speech_frames + (self._min_speech_frames - 1) * (self._onset_gap_frames - 1)
        self._ring = np.zeros((self._pre_roll_frames + longest_candidate + 1, self._frame_len), dtype=np.int16)
        self._ring_bytes = [memoryview(slot).cast("B") for slot in self._ring]
        self._energy_buf = np.empty(self._frame_len, dtype=np.float32)
        self._pending = np.zeros(self._frame_len, dtype=np.int16)
        self._pending_len = 0
        self._samples_fed = 0
        self._frame_index = 0
        self._reset_state()

    @property
    def in_speech(self) -> bool:
        """Whether a confirmed utterance is in progress (after ``SpeechStarted``, before ``SpeechEnded``)."""
        return self._state is _State.SPEECH

    @property
    def stream_s(self) -> float:
        """Seconds of audio fed so far, including samples still waiting to fill a frame."""
        return self._samples_fed / self.sample_rate

    def reset(self) -> None:
        """Forget any onset or utterance in progress, without emitting an event.

        Audio already fed is never reconsidered: the next utterance's pre-roll starts no earlier
        than the reset. Samples waiting to fill a frame are kept, so stream times stay exact.
        """
        self._reset_state()

    @property
    def paused(self) -> bool:
        """Whether the utterance in progress is in a pause (after ``SpeechPaused``, before anything else)."""
        return self._state is _State.SPEECH and self._pause_frames > 0 and self._gap >= self._pause_frames

    def end_turn(self) -> SpeechEnded | None:
        """Ends the utterance in a pause now (the end-of-turn model said the caller has finished).

        Returns:
            The ``SpeechEnded`` of the utterance, its audio the same as the pause's; ``None`` when no
            utterance is paused (the caller spoke again, or it already ended).
        """
        if not self.paused:
            return None
        return self.flush()

    def flush(self) -> SpeechEnded | None:
        """Ends the utterance in progress now, wherever it stands (the caller's audio stopped: a hang-up).

        Returns:
            The ``SpeechEnded`` of the utterance, its audio cut as an ended utterance's is (all of it when
            the caller was mid-word); ``None`` when no utterance is in progress (nothing, or an onset
            shorter than ``min_speech_ms``).
        """
        if self._state is not _State.SPEECH:
            return None
        events: list[Event] = []
        self._end(self._frame_index - 1, capped=False, events=events)
        return events[0]

    def process(self, samples: np.ndarray) -> list[Event]:
        """Feed audio and collect the events it completes.

        Args:
            samples: int16 mono samples at ``sample_rate``, of any length (empty is fine).

        Returns:
            The events decided by this audio, in stream order (usually none).

        Raises:
            ValueError: If ``samples`` is not a 1-D int16 array.
        """
        if not isinstance(samples, np.ndarray) or samples.dtype != np.int16 or samples.ndim != 1:
            raise ValueError(
                "Endpointer.process needs a 1-D int16 numpy array, got "
                + (
                    f"dtype {samples.dtype} shape {samples.shape}"
                    if isinstance(samples, np.ndarray)
                    else type(samples).__name__
                )
            )
        events: list[Event] = []
        total = samples.shape[0]
        frame_len = self._frame_len
        pos = 0
        if self._pending_len:
            take = min(frame_len - self._pending_len, total)
            self._pending[self._pending_len : self._pending_len + take] = samples[:take]
            self._pending_len += take
            pos = take
            if self._pending_len == frame_len:
                self._pending_len = 0
                self._frame(self._pending, events)
        while total - pos >= frame_len:
            self._frame(samples[pos : pos + frame_len], events)
            pos += frame_len
        rest = total - pos
        if rest:
            self._pending[:rest] = samples[pos:]
            self._pending_len = rest
        self._samples_fed += total
        return events

    def _reset_state(self) -> None:
        self._state = _State.IDLE
        self._floor = self._frame_index
        self._onset = 0
        self._voiced_count = 0
        self._gap = 0
        self._last_voiced = 0
        self._chunks: list[np.ndarray] = []
        self._chunks_start = 0

    def _frame(self, frame: np.ndarray, events: list[Event]) -> None:
        k = self._frame_index
        self._frame_index = k + 1
        ring_slot = k % len(self._ring)
        slot = self._ring[ring_slot]
        slot[:] = frame
        loud = self._loud_enough(slot)
        voiced = self._vad.is_speech(self._ring_bytes[ring_slot], self.sample_rate) and loud

        state = self._state
        if state is _State.SPEECH:
            self._chunks.append(slot.copy())
            if voiced:
                if self._held_frames and self._gap >= self._held_frames:
                    events.append(SpeechResumed(resumed_s=k * self._frame_s))
                self._last_voiced = k
                self._gap = 0
            else:
                self._gap += 1
                if self._gap == self._gap_frames:
                    events.append(self._paused(k, SpeechGap))
                if self._gap == self._pause_frames:
                    events.append(self._paused(k))
                if self._gap >= self._silence_frames:
                    self._end(k, capped=False, events=events)
                    return
            if k + 1 - self._onset >= self._max_frames:
                self._end(k, capped=True, events=events)
            return

        if state is _State.IDLE:
            if not voiced:
                return
            self._state = _State.CANDIDATE
            self._onset = k
            self._voiced_count = 0
            self._gap = 0
        if voiced:
            self._voiced_count += 1
            self._last_voiced = k
            self._gap = 0
            if self._voiced_count >= self._min_speech_frames:
                self._confirm(k, events)
        else:
            self._gap += 1
            if self._gap >= self._onset_gap_frames:
                self._state = _State.IDLE

    def _loud_enough(self, slot: np.ndarray) -> bool:
        buf = self._energy_buf
        np.copyto(buf, slot, casting="unsafe")
        power = float(np.dot(buf, buf)) * self._power_scale
        if power <= 1e-10:
            # Digital silence says nothing about the line's noise once it is known (lost packets), but
            # before any audio it means a quiet line.
            if self._noise_floor_db is None:
                self._noise_floor_db = _SILENT_DB
            return False
        level_db = 10.0 * math.log10(power)
        threshold = self._gate_db
        if self._margin_db is not None:
            floor = level_db if self._noise_floor_db is None else self._noise_floor_db
            threshold = max(threshold, floor + self._margin_db)
            if level_db < floor:
                self._noise_floor_db = level_db
            else:
                rise = max(self._floor_rise_db, (level_db - floor) * _NOISE_FLOOR_RISE_FRACTION)
                self._noise_floor_db = min(level_db, floor + rise)
        return level_db >= threshold

    def _paused(self, k: int, kind: type[SpeechPaused] = SpeechPaused) -> SpeechPaused:
        keep = min(k, self._last_voiced + self._tail_frames) + 1 - self._chunks_start
        return kind(
            audio=np.concatenate(self._chunks[:keep]),
            onset_s=self._onset * self._frame_s,
            last_voiced_s=(self._last_voiced + 1) * self._frame_s,
            paused_s=(k + 1) * self._frame_s,
            start_s=self._chunks_start * self._frame_s,
        )

    def _confirm(self, k: int, events: list[Event]) -> None:
        start = max(self._floor, self._onset - self._pre_roll_frames, k + 1 - len(self._ring))
        ring_len = len(self._ring)
        self._chunks = [self._ring[i % ring_len].copy() for i in range(start, k + 1)]
        self._chunks_start = start
        self._state = _State.SPEECH
        self._gap = 0
        events.append(SpeechStarted(onset_s=self._onset * self._frame_s, confirmed_s=(k + 1) * self._frame_s))
        if k + 1 - self._onset >= self._max_frames:
            self._end(k, capped=True, events=events)

    def _end(self, k: int, *, capped: bool, events: list[Event]) -> None:
        last = k if capped else min(k, self._last_voiced + self._tail_frames)
        keep = last + 1 - self._chunks_start
        audio = np.concatenate(self._chunks[:keep])
        events.append(
            SpeechEnded(
                audio=audio,
                onset_s=self._onset * self._frame_s,
                last_voiced_s=(self._last_voiced + 1) * self._frame_s,
                ended_s=(k + 1) * self._frame_s,
                capped=capped,
                start_s=self._chunks_start * self._frame_s,
            )
        )
        self._reset_state()
        self._floor = last + 1
