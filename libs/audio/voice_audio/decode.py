"""Decoding client audio of any accepted format to mono samples at one rate.

Raw PCM16 / μ-law / A-law is handled with numpy; WAV (16-bit PCM) takes a
stdlib fast path; WebM, Ogg, MP3 and anything else go through PyAV (FFmpeg),
reading from memory. Every bad input raises ``AudioFormatError``.
"""

from __future__ import annotations

import io
import logging

import av
import numpy as np

from voice_audio import g711
from voice_audio.encode import read_wav
from voice_audio.formats import (
    AudioFormatError,
    Container,
    Encoding,
    check_channels,
    check_sample_rate,
)
from voice_audio.resample import resample

__all__ = ["decode_to_float", "decode_to_pcm16"]

logger = logging.getLogger(__name__)

_PCM16_SCALE = np.float32(1.0 / 32768.0)

# FFmpeg demuxer names; AUTO (None) lets FFmpeg probe.
_DEMUXERS: dict[Container, str | None] = {
    Container.WAV: "wav",
    Container.WEBM: "matroska",
    Container.OGG: "ogg",
    Container.MP3: "mp3",
    Container.AUTO: None,
}

_LABELS: dict[Container, str] = {
    Container.WAV: "WAV audio",
    Container.WEBM: "WebM audio",
    Container.OGG: "Ogg audio",
    Container.MP3: "MP3 audio",
    Container.AUTO: "audio (format auto-detected)",
}


def decode_to_float(
    data: bytes,
    *,
    encoding: Encoding,
    sample_rate: int,
    container: Container,
    channels: int = 1,
    target_rate: int = 16000,
) -> np.ndarray:
    """Decode audio bytes to float32 mono samples in [-1, 1].

    Args:
        data: The audio bytes.
        encoding: Sample encoding of RAW data; ignored for other containers.
        sample_rate: Rate of RAW data in Hz (8000 to 192000); ignored for
            other containers, whose header carries the rate.
        container: How the bytes are wrapped.
        channels: Interleaved channels of RAW data, downmixed to mono;
            ignored for other containers.
        target_rate: Rate of the returned samples in Hz.

    Returns:
        A 1-D float32 array at ``target_rate``.

    Raises:
        AudioFormatError: If the audio is empty, malformed, undecodable, holds
            no samples, or any rate or channel count is out of range.
    """
    target_rate = check_sample_rate(target_rate, what="target sample rate")
    if container is Container.RAW:
        pcm, rate = _decode_raw(data, encoding, sample_rate, channels)
        return _pcm16_to_float(pcm, rate, target_rate)
    if container is Container.WAV:
        wav = _try_wav_fast_path(data)
        if wav is not None:
            return _pcm16_to_float(wav[0], wav[1], target_rate)
    return _clip_unit(_decode_container(data, container, target_rate, "flt"))


def decode_to_pcm16(
    data: bytes,
    *,
    encoding: Encoding,
    sample_rate: int,
    container: Container,
    channels: int = 1,
    target_rate: int = 16000,
) -> np.ndarray:
    """Decode audio bytes to int16 mono samples.

    Same arguments and errors as :func:`decode_to_float`. For RAW mono PCM16
    already at ``target_rate`` the result is a read-only view of ``data``.

    Returns:
        A 1-D int16 array at ``target_rate``.
    """
    target_rate = check_sample_rate(target_rate, what="target sample rate")
    if container is Container.RAW:
        pcm, rate = _decode_raw(data, encoding, sample_rate, channels)
        return resample(pcm, rate, target_rate)
    if container is Container.WAV:
        wav = _try_wav_fast_path(data)
        if wav is not None:
            return resample(wav[0], wav[1], target_rate)
    return _decode_container(data, container, target_rate, "s16")


def _pcm16_to_float(pcm: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    samples = pcm.astype(np.float32)
    samples *= _PCM16_SCALE
    return _clip_unit(resample(samples, rate, target_rate))


def _clip_unit(samples: np.ndarray) -> np.ndarray:
    # Resampling filters overshoot on near-full-scale input; keep the promised [-1, 1] range.
    if samples.flags.writeable:
        return np.clip(samples, -1.0, 1.0, out=samples)
    return np.clip(samples, -1.0, 1.0)


def _decode_raw(data: bytes, encoding: Encoding, sample_rate: int, channels: int) -> tuple[np.ndarray, int]:
    rate = check_sample_rate(sample_rate)
    channels = check_channels(channels)
    if not data:
        raise AudioFormatError("empty audio")
    if encoding is Encoding.PCM16:
        if len(data) % 2:
            raise AudioFormatError(f"PCM16 audio must have an even number of bytes, got {len(data)}")
        pcm = np.frombuffer(data, dtype="<i2").astype(np.int16, copy=False)
    elif encoding is Encoding.MULAW:
        pcm = g711.ulaw_decode(data)
    elif encoding is Encoding.ALAW:
        pcm = g711.alaw_decode(data)
    else:
        raise AudioFormatError(f"unsupported encoding {encoding!r}")
    if channels > 1:
        if pcm.size % channels:
            raise AudioFormatError(f"{pcm.size} samples do not split evenly into {channels} channels")
        pcm = np.round(pcm.reshape(-1, channels).mean(axis=1, dtype=np.float32)).astype(np.int16)
    return pcm, rate


def _try_wav_fast_path(data: bytes) -> tuple[np.ndarray, int] | None:
    if not data:
        raise AudioFormatError("empty audio")
    try:
        return read_wav(data)
    except AudioFormatError as exc:
        logger.debug("WAV fast path declined (%s); falling back to FFmpeg", exc)
        return None


def _decode_container(data: bytes, container: Container, target_rate: int, fmt: str) -> np.ndarray:
    if not data:
        raise AudioFormatError("empty audio")
    if container not in _DEMUXERS:
        raise AudioFormatError(f"unsupported container {container!r}")
    label = _LABELS[container]
    pieces: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data), mode="r", format=_DEMUXERS[container]) as source:
            if not source.streams.audio:
                raise AudioFormatError(f"{label} holds no audio stream")
            stream = source.streams.audio[0]
            resampler = av.AudioResampler(format=fmt, layout="mono", rate=target_rate)
            for frame in source.decode(stream):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1))
    except AudioFormatError:
        raise
    except Exception as exc:
        # Untrusted bytes can make FFmpeg/PyAV fail in many ways (FFmpegError, ValueError,
        # IndexError, ...); callers are promised a single exception type.
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise AudioFormatError(f"could not decode {label}: {reason}") from exc
    if not pieces:
        raise AudioFormatError(f"{label} decoded to zero audio samples")
    samples = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    if samples.size == 0:
        raise AudioFormatError(f"{label} decoded to zero audio samples")
    return samples
