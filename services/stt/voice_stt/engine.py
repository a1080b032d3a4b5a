"""Speech-to-text engines: the interface every engine implements and the types it returns.

The worker front-ends (JetStream consumer, gRPC service) talk only to
``SpeechToTextEngine``; :mod:`voice_stt.faster_whisper_engine` is the adapter
that runs Whisper through CTranslate2.

Audio handed to an engine is float32 mono at 16 kHz. A transcription is a
stream: each ``Segment`` as soon as the decoder produces it, then exactly one
``Transcript``.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = [
    "Decoding",
    "Segment",
    "SpeechToTextEngine",
    "Transcript",
    "TranscriptionCancelled",
    "Word",
    "validate_audio",
]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
MIN_AUDIO_SAMPLES = SAMPLE_RATE // 100
SILENCE_PEAK = 1e-4
"""Audio whose absolute peak stays below this (about -80 dBFS) is treated as silence."""


@dataclass(frozen=True)
class Word:
    """One recognised word with its timing.

    Attributes:
        word: The word as the decoder wrote it, surrounding whitespace removed.
        start_s: Start time in seconds from the start of the audio.
        end_s: End time in seconds from the start of the audio.
        probability: Decoder confidence in [0, 1].
    """

    word: str
    start_s: float
    end_s: float
    probability: float


@dataclass(frozen=True)
class Segment:
    """One decoded stretch of speech.

    Attributes:
        id: 1-based position of the segment within its transcription.
        start_s: Start time in seconds.
        end_s: End time in seconds.
        text: Recognised text, surrounding whitespace removed.
        words: Word timings; empty unless word timestamps were requested.
        avg_logprob: Average token log-probability.
        no_speech_prob: Probability that the window holds no speech.
    """

    id: int
    start_s: float
    end_s: float
    text: str
    words: tuple[Word, ...]
    avg_logprob: float
    no_speech_prob: float


@dataclass(frozen=True)
class Transcript:
    """The final result of one transcription.

    Attributes:
        text: All segment texts joined by single spaces.
        segments: Every segment, in order.
        language: Language code used for decoding (e.g. ``"en"``).
        language_probability: Confidence of the language detection (1.0 when
            the language was given or the model is single-language).
        audio_duration_s: Length of the input audio in seconds.
        processing_time_s: Wall time spent transcribing, in seconds.
        model: Name of the model that produced it.
    """

    text: str
    segments: tuple[Segment, ...]
    language: str
    language_probability: float
    audio_duration_s: float
    processing_time_s: float
    model: str


class TranscriptionCancelled(Exception):
    """Raised from a transcription stream when its ``should_stop`` callback returns True."""


@dataclass(frozen=True)
class Decoding:
    """What an engine's ``_decode`` returns: a lazy segment stream plus language info.

    Attributes:
        segments: Segments, produced lazily by the decoder.
        language: Language code used for decoding.
        language_probability: Confidence of the language choice.
        close: Called once when the stream ends early or completes, to release
            the decoder; may be None.
    """

    segments: Iterator[Segment]
    language: str
    language_probability: float
    close: Callable[[], None] | None = None


class SpeechToTextEngine(abc.ABC):
    """A speech-to-text model behind a streaming, cancellable interface.

    ``transcribe`` may be called from several threads at once; implementations
    keep no per-call state on the instance.

    Attributes:
        name: Model name, reported in every ``Transcript``.
        sample_rate: The only input rate accepted, in Hz.
    """

    name: str
    sample_rate: ClassVar[int] = SAMPLE_RATE

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model weights. Idempotent and thread-safe."""

    @property
    @abc.abstractmethod
    def loaded(self) -> bool:
        """Whether the weights are loaded."""

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None = None,
        word_timestamps: bool = False,
        initial_prompt: str | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Segment | Transcript]:
        """Transcribe a complete utterance, streaming segments as they are decoded.

        The audio is validated immediately (before iteration starts). The model
        is loaded on first use if ``load`` was not called. Audio whose peak is
        below ``SILENCE_PEAK`` (digital silence) skips the model and yields just
        an empty ``Transcript`` (its ``language`` is the requested one, or
        ``""`` with probability 0.0); quiet but non-silent audio is decoded
        normally, since Whisper may still find speech in it.

        Args:
            audio: float32 mono samples at 16 kHz in [-1, 1]; at least 10 ms.
            language: Language code, or None to detect it (English-only models
                always use ``"en"``).
            word_timestamps: Fill ``Segment.words`` with word timings.
            initial_prompt: Text to condition the decoder on (names, jargon).
            should_stop: Polled before decoding and between segments; when it
                returns True the stream raises ``TranscriptionCancelled``. A
                segment already being decoded is finished first.

        Returns:
            An iterator yielding each ``Segment`` in order, then exactly one
            ``Transcript``.

        Raises:
            ValueError: Immediately, if the audio is not a 1-D float array, is
                empty or shorter than 10 ms, or holds NaN/inf.
            TranscriptionCancelled: During iteration, when ``should_stop``
                returns True.
        """
        samples = validate_audio(audio)
        return self._stream(
            samples,
            language=language,
            word_timestamps=word_timestamps,
            initial_prompt=initial_prompt,
            should_stop=should_stop,
        )

    @abc.abstractmethod
    def _decode(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        word_timestamps: bool,
        initial_prompt: str | None,
    ) -> Decoding:
        """Start decoding validated audio; the model is already loaded."""

    def _stream(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        word_timestamps: bool,
        initial_prompt: str | None,
        should_stop: Callable[[], bool] | None,
    ) -> Iterator[Segment | Transcript]:
        started = time.perf_counter()
        duration_s = audio.size / SAMPLE_RATE

        def check_stop() -> None:
            if should_stop is not None and should_stop():
                raise TranscriptionCancelled("transcription cancelled by caller")

        check_stop()
        if float(np.max(np.abs(audio))) < SILENCE_PEAK:
            yield Transcript(
                text="",
                segments=(),
                language=language or "",
                language_probability=0.0 if language is None else 1.0,
                audio_duration_s=duration_s,
                processing_time_s=time.perf_counter() - started,
                model=self.name,
            )
            return
        self.load()
        decoding = self._decode(
            audio, language=language, word_timestamps=word_timestamps, initial_prompt=initial_prompt
        )
        segments: list[Segment] = []
        try:
            check_stop()
            for segment in decoding.segments:
                segments.append(segment)
                yield segment
                check_stop()
        finally:
            if decoding.close is not None:
                decoding.close()
        elapsed = time.perf_counter() - started
        logger.debug(
            "transcribed %.2fs of audio in %.2fs (RTF %.3f) with %s",
            duration_s,
            elapsed,
            elapsed / duration_s,
            self.name,
        )
        yield Transcript(
            text=" ".join(s.text for s in segments if s.text),
            segments=tuple(segments),
            language=decoding.language,
            language_probability=decoding.language_probability,
            audio_duration_s=duration_s,
            processing_time_s=elapsed,
            model=self.name,
        )


def validate_audio(audio: np.ndarray) -> np.ndarray:
    """Check engine input and return it as contiguous 1-D float32.

    Args:
        audio: Candidate samples.

    Returns:
        The samples as a C-contiguous float32 array (the input itself when it
        already is one).

    Raises:
        ValueError: If the audio is not a 1-D float array, is shorter than
            10 ms, or holds NaN/inf.
    """
    if not isinstance(audio, np.ndarray) or not np.issubdtype(audio.dtype, np.floating):
        kind = f"dtype {audio.dtype}" if isinstance(audio, np.ndarray) else type(audio).__name__
        raise ValueError(f"audio must be a float32 numpy array of 16 kHz mono samples in [-1, 1], got {kind}")
    if audio.ndim != 1:
        raise ValueError(f"audio must be 1-D mono samples, got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError("audio is empty: nothing to transcribe")
    if audio.size < MIN_AUDIO_SAMPLES:
        raise ValueError(
            f"audio is too short to transcribe: {audio.size} samples "
            f"({audio.size / SAMPLE_RATE * 1000:.1f} ms); need at least 10 ms at 16 kHz"
        )
    samples = np.ascontiguousarray(audio, dtype=np.float32)
    if not np.isfinite(samples).all():
        raise ValueError("audio contains NaN or infinite samples")
    return samples
