"""Engine-neutral text-to-speech interface and the types shared by every engine.

A :class:`TextToSpeechEngine` turns text into int16 mono audio, streamed sentence
by sentence (and a sentence in pieces, where the engine can) so a caller can start
playback long before the whole text is synthesized. Concrete engines (Piper, Coqui) implement two hooks; the base
class owns validation, sentence splitting, cancellation and chunk assembly so
every engine behaves the same way at its edges.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from voice_text import split_sentences

__all__ = [
    "MAX_SPEED",
    "MIN_SPEED",
    "SentenceSynthesizer",
    "SpeechChunk",
    "SpeechPieces",
    "SynthesisCancelled",
    "TextToSpeechEngine",
    "UnknownVoiceError",
    "Voice",
    "float_to_int16",
    "language_matches",
]

_LOGGER = logging.getLogger(__name__)

MIN_SPEED = 0.25
"""Exclusive lower bound of the ``speed`` argument."""

MAX_SPEED = 4.0
"""Inclusive upper bound of the ``speed`` argument."""

SpeechPieces = Iterator[tuple[np.ndarray, bool]]
"""One sentence's audio in successive pieces: int16 mono samples, and whether the piece is the last."""

SentenceSynthesizer = Callable[[str, float], np.ndarray | SpeechPieces]
"""Synthesizes one sentence at a speed factor: int16 mono samples, whole or in pieces."""


@dataclass(frozen=True)
class Voice:
    """A voice an engine can speak with.

    Attributes:
        name: Name to pass as ``voice`` to :meth:`TextToSpeechEngine.synthesize`.
        engine: Name of the engine that owns the voice ("piper", "coqui").
        language: Default language code of the voice, e.g. "en_US" or "en".
        sample_rate: Rate in Hz of the audio the voice produces.
        speakers: Speaker names of a multi-speaker voice; empty otherwise.
        languages: Languages of a multilingual voice; empty otherwise.
    """

    name: str
    engine: str
    language: str
    sample_rate: int
    speakers: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpeechChunk:
    """Audio of one sentence, or of one piece of it: a sentence's pieces follow one another.

    Attributes:
        samples: int16 mono samples at ``sample_rate``.
        sample_rate: Rate of ``samples`` in Hz.
        sentence_index: Position of the sentence in the text, counting from 0.
        text: The sentence the samples speak (on each of its pieces).
        final: This is the sentence's last piece (or the whole sentence).
    """

    samples: np.ndarray
    sample_rate: int
    sentence_index: int
    text: str
    final: bool = True

    @property
    def duration(self) -> float:
        """Length of the chunk in seconds."""
        return len(self.samples) / self.sample_rate


class UnknownVoiceError(ValueError):
    """The requested voice (or speaker of a voice) does not exist."""


class SynthesisCancelled(Exception):
    """Synthesis stopped early because the caller's ``should_stop`` said so."""


def float_to_int16(audio: np.ndarray) -> np.ndarray:
    """Convert float audio in [-1, 1] to int16, clipping out-of-range samples.

    Args:
        audio: Float samples of any shape; flattened to mono order.

    Returns:
        A one-dimensional int16 array.
    """
    flat = np.asarray(audio, dtype=np.float32).reshape(-1)
    flat = np.nan_to_num(flat, nan=0.0, posinf=1.0, neginf=-1.0)
    return (np.clip(flat, -1.0, 1.0) * 32767.0).astype(np.int16)


def language_matches(requested: str, available: str) -> bool:
    """Tell whether two language tags share their primary language.

    "en", "en-GB" and "en_US" all match one another; an empty tag matches any.

    Args:
        requested: Language a caller asked for.
        available: Language a voice speaks.

    Returns:
        True when the primary subtags are equal or either tag is empty.
    """
    want = requested.replace("-", "_").split("_")[0].lower()
    have = available.replace("-", "_").split("_")[0].lower()
    return not want or not have or want == have


class TextToSpeechEngine(abc.ABC):
    """Base class of the text-to-speech engines.

    Subclasses implement :meth:`load`, :attr:`loaded`, :meth:`voices` and
    :meth:`_prepare`; :meth:`synthesize` is shared. Engines are safe to use from
    several threads at once once loaded.

    Attributes:
        name: Engine name, e.g. "piper" or "coqui".
    """

    name: str

    @abc.abstractmethod
    def load(self) -> None:
        """Load models so the first synthesis is fast; calling it again is a no-op."""

    @property
    @abc.abstractmethod
    def loaded(self) -> bool:
        """Whether :meth:`load` has completed."""

    @abc.abstractmethod
    def voices(self) -> list[Voice]:
        """List the voices this engine can speak with, the default voice first."""

    @abc.abstractmethod
    def _prepare(self, voice: str | None, speaker: str | None, language: str | None) -> tuple[int, SentenceSynthesizer]:
        """Resolve a request's voice options before any audio is made.

        Args:
            voice: Voice name, or None for the engine's default.
            speaker: Speaker of a multi-speaker voice, or None for its default.
            language: Language of a multilingual voice, or None for its default.

        Returns:
            The output sample rate and a function synthesizing one sentence.

        Raises:
            UnknownVoiceError: The voice or speaker does not exist.
            ValueError: The options do not fit the voice.
        """

    def split(self, text: str) -> list[str]:
        """Split text into the sentences synthesized one by one.

        Args:
            text: Text to split.

        Returns:
            Non-empty sentences in order.
        """
        return split_sentences(text)

    def synthesize(
        self,
        text: str,
        *,
        voice: str | None = None,
        speaker: str | None = None,
        language: str | None = None,
        speed: float = 1.0,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[SpeechChunk]:
        """Synthesize text, yielding each sentence's audio, or each piece of it, as soon as it is ready.

        Arguments are checked when this is called, not when iteration starts.
        The engine is loaded first if it is not yet.

        Args:
            text: Text to speak.
            voice: Voice name from :meth:`voices`; None for the default voice.
            speaker: Speaker of a multi-speaker voice; None for its default.
            language: Language of a multilingual voice; None for its default.
            speed: Speaking rate factor in (0.25, 4.0]; 2.0 is twice as fast.
            should_stop: Polled before each sentence and piece; once it returns
                True the iterator raises :class:`SynthesisCancelled`.

        Returns:
            An iterator of :class:`SpeechChunk`, one or more per sentence, in order.

        Raises:
            ValueError: The text is empty or the speed out of range.
            UnknownVoiceError: The voice or speaker does not exist.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text to synthesize is empty")
        if isinstance(speed, bool) or not isinstance(speed, (int, float)):
            raise ValueError(f"speed must be a number, got {speed!r}")
        if not (MIN_SPEED < speed <= MAX_SPEED) or math.isnan(speed):
            raise ValueError(f"speed must be in ({MIN_SPEED}, {MAX_SPEED}], got {speed}")
        if not self.loaded:
            self.load()
        sample_rate, synthesize_sentence = self._prepare(voice, speaker, language)
        sentences = self.split(text)
        return self._stream(sentences, sample_rate, synthesize_sentence, float(speed), should_stop)

    def _stream(
        self,
        sentences: list[str],
        sample_rate: int,
        synthesize_sentence: SentenceSynthesizer,
        speed: float,
        should_stop: Callable[[], bool] | None,
    ) -> Iterator[SpeechChunk]:
        for index, sentence in enumerate(sentences):
            _check_stop(should_stop, f"before sentence {index}")
            started = time.perf_counter()
            result = synthesize_sentence(sentence, speed)
            pieces = [(result, True)] if isinstance(result, np.ndarray) else result
            size = 0
            for samples, final in pieces:
                if size:
                    _check_stop(should_stop, f"inside sentence {index}")
                if samples.size == 0 and not (final and size):
                    continue
                size += samples.size
                yield SpeechChunk(
                    samples=samples, sample_rate=sample_rate, sentence_index=index, text=sentence, final=final
                )
            if size == 0:
                _LOGGER.debug("%s produced no audio for sentence %d (%d characters)", self.name, index, len(sentence))
                continue
            _LOGGER.debug(
                "%s sentence %d: %.3fs of audio in %.3fs",
                self.name,
                index,
                size / sample_rate,
                time.perf_counter() - started,
            )


def _check_stop(should_stop: Callable[[], bool] | None, where: str) -> None:
    if should_stop is not None and should_stop():
        _LOGGER.debug("synthesis cancelled %s", where)
        raise SynthesisCancelled(f"synthesis cancelled {where}")
