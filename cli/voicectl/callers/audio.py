"""Voiced-sample helpers for simulated callers: where speech starts and ends in int16 audio.

A 10 ms window is voiced when its RMS is at least 1/32 of the loudest window's (-30 dB) and at least 100
(about -50 dBFS). Voice-to-voice latency is measured from the caller's last voiced sample, barge-in latency
from the first.
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_int16", "first_voiced_s", "last_voiced_s"]


def _voiced_windows(samples: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    window = max(1, rate // 100)
    count = samples.size // window
    if count == 0:
        return np.zeros(0, np.int64), window
    frames = samples[: count * window].astype(np.float32).reshape(count, window)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    threshold = max(100.0, float(rms.max()) / 32.0)
    return np.flatnonzero(rms >= threshold), window


def last_voiced_s(samples: np.ndarray, rate: int) -> float | None:
    """Offset in seconds of the end of the last voiced 10 ms window in ``samples``.

    A window is voiced when its RMS is at least 1/32 of the loudest window's (-30 dB) and at least 100
    (about -50 dBFS). Returns None for silence.
    """
    voiced, window = _voiced_windows(samples, rate)
    if voiced.size == 0:
        return None
    return float((voiced[-1] + 1) * window) / rate


def first_voiced_s(samples: np.ndarray, rate: int) -> float | None:
    """Offset in seconds of the start of the first voiced 10 ms window in ``samples`` (the speech onset).

    Voiced as in ``last_voiced_s``. Returns None for silence.
    """
    voiced, window = _voiced_windows(samples, rate)
    if voiced.size == 0:
        return None
    return float(voiced[0] * window) / rate


def as_int16(samples: np.ndarray, what: str) -> np.ndarray:
    """``samples`` flattened to one dimension.

    Raises:
        ValueError: If ``samples`` is not an int16 numpy array (``what`` names it in the message).
    """
    if not isinstance(samples, np.ndarray) or samples.dtype != np.int16:
        raise ValueError(f"{what} must be an int16 numpy array")
    return samples.reshape(-1)
