"""Encoding linear PCM for the wire, and minimal WAV (RIFF) writing and reading.

``encode_pcm16`` turns int16 samples at one rate into PCM16 / μ-law / A-law
bytes at another; ``wav_bytes`` and ``read_wav`` handle mono 16-bit WAV
without going through FFmpeg.
"""

from __future__ import annotations

import io
import struct
import wave

import numpy as np

from voice_audio import g711
from voice_audio.formats import AudioFormatError, Encoding, check_sample_rate
from voice_audio.resample import resample

__all__ = ["encode_pcm16", "read_wav", "wav_bytes"]

_WAV_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")


def _check_int16(samples: np.ndarray) -> np.ndarray:
    if not isinstance(samples, np.ndarray) or samples.dtype != np.int16:
        raise AudioFormatError(
            "expected an int16 numpy array, got "
            + (f"dtype {samples.dtype}" if isinstance(samples, np.ndarray) else type(samples).__name__)
        )
    if samples.ndim != 1:
        raise AudioFormatError(f"expected mono 1-D samples, got shape {samples.shape}")
    return samples


def _le_bytes(samples: np.ndarray) -> bytes:
    return samples.astype("<i2", copy=False).tobytes()


def encode_pcm16(samples: np.ndarray, *, from_rate: int, encoding: Encoding, to_rate: int) -> bytes:
    """Resample int16 mono samples and encode them as raw bytes.

    Args:
        samples: 1-D int16 samples at ``from_rate``.
        from_rate: Rate of ``samples`` in Hz.
        encoding: Output sample encoding (PCM16 is little-endian).
        to_rate: Output rate in Hz.

    Returns:
        The encoded bytes (2 bytes per sample for PCM16, 1 for μ-law/A-law).

    Raises:
        AudioFormatError: For non-int16 or non-mono input, or an absurd rate.
    """
    samples = resample(_check_int16(samples), from_rate, to_rate)
    if encoding is Encoding.PCM16:
        return _le_bytes(samples)
    if encoding is Encoding.MULAW:
        return g711.ulaw_encode(samples)
    if encoding is Encoding.ALAW:
        return g711.alaw_encode(samples)
    raise AudioFormatError(f"unsupported encoding {encoding!r}")


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Wrap int16 mono samples in a canonical 44-byte-header RIFF WAV.

    Args:
        samples: 1-D int16 samples.
        sample_rate: Rate in Hz.

    Returns:
        The complete WAV file as bytes.

    Raises:
        AudioFormatError: For non-int16 or non-mono input, or an absurd rate.
    """
    data = _le_bytes(_check_int16(samples))
    rate = check_sample_rate(sample_rate)
    header = _WAV_HEADER.pack(
        b"RIFF",
        36 + len(data),
        b"WAVE",
        b"fmt ",
        16,
        1,
        1,
        rate,
        rate * 2,
        2,
        16,
        b"data",
        len(data),
    )
    return header + data


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV file, downmixing to mono.

    Args:
        data: The complete WAV file.

    Returns:
        ``(samples, sample_rate)`` with int16 mono samples.

    Raises:
        AudioFormatError: If the bytes are not a 16-bit PCM WAV, the rate is
            absurd, or it holds no samples.
    """
    if not data:
        raise AudioFormatError("empty audio")
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError, struct.error) as exc:
        raise AudioFormatError(f"not a readable PCM WAV file: {exc}") from exc
    if width != 2:
        raise AudioFormatError(f"WAV sample width {width * 8} bits is not supported; need 16-bit PCM")
    rate = check_sample_rate(rate)
    usable = len(frames) - len(frames) % (2 * channels)
    samples = np.frombuffer(frames, dtype="<i2", count=usable // 2).astype(np.int16)
    if samples.size == 0:
        raise AudioFormatError("WAV file holds no audio samples")
    if channels > 1:
        mixed = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
        samples = np.round(mixed).astype(np.int16)
    return samples, rate
