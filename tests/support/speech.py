"""Speech test helpers: Piper synthesis and word-error-rate scoring.

Loaded as a pytest plugin from ``tests/conftest.py``. Other test modules may
import the plain functions (``speak``, ``normalize_text``,
``word_error_rate``) directly, or use the ``piper_speech`` fixture. ``speak``
and ``piper_voice`` live in ``voicectl.speech`` (``voicectl load`` speaks with
them too) and are re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest

from voicectl.speech import piper_voice, speak

__all__ = ["normalize_text", "piper_speech", "piper_voice", "speak", "word_error_rate"]

_PUNCTUATION = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")
_WHITESPACE = re.compile(r"\s+")


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
