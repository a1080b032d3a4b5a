"""encode_pcm16, wav_bytes and read_wav."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

from voice_audio import (
    AudioFormatError,
    Encoding,
    alaw_encode,
    encode_pcm16,
    read_wav,
    resample,
    ulaw_encode,
    wav_bytes,
)

SAMPLES = (np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000) * 20000).astype(np.int16)


def test_pcm16_same_rate_is_little_endian_copy() -> None:
    out = encode_pcm16(SAMPLES, from_rate=16000, encoding=Encoding.PCM16, to_rate=16000)
    assert out == SAMPLES.astype("<i2").tobytes()


@pytest.mark.parametrize(("encoding", "codec"), [(Encoding.MULAW, ulaw_encode), (Encoding.ALAW, alaw_encode)])
def test_g711_resamples_then_encodes(encoding: Encoding, codec) -> None:
    out = encode_pcm16(SAMPLES, from_rate=16000, encoding=encoding, to_rate=8000)
    assert out == codec(resample(SAMPLES, 16000, 8000))
    assert len(out) == 8000


def test_pcm16_upsampled_length() -> None:
    out = encode_pcm16(SAMPLES, from_rate=16000, encoding=Encoding.PCM16, to_rate=48000)
    assert len(out) == 2 * 48000


@pytest.mark.parametrize("bad", [SAMPLES.astype(np.float32), SAMPLES.reshape(2, -1), b"\x00\x00"])
def test_encode_rejects_non_int16_mono(bad) -> None:
    with pytest.raises(AudioFormatError):
        encode_pcm16(bad, from_rate=16000, encoding=Encoding.PCM16, to_rate=16000)


@pytest.mark.parametrize("rate", [0, -1, 10_000_000])
def test_encode_rejects_absurd_rates(rate: int) -> None:
    with pytest.raises(AudioFormatError, match="absurd"):
        encode_pcm16(SAMPLES, from_rate=rate, encoding=Encoding.MULAW, to_rate=8000)
    with pytest.raises(AudioFormatError, match="absurd"):
        encode_pcm16(SAMPLES, from_rate=16000, encoding=Encoding.MULAW, to_rate=rate)
    with pytest.raises(AudioFormatError, match="absurd"):
        wav_bytes(SAMPLES, rate)


def test_wav_round_trip_and_stdlib_compatibility() -> None:
    data = wav_bytes(SAMPLES, 22050)
    assert len(data) == 44 + 2 * SAMPLES.size
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 22050)
        assert wav.getnframes() == SAMPLES.size
    samples, rate = read_wav(data)
    assert rate == 22050
    assert np.array_equal(samples, SAMPLES)
    samples[0] = 1


def test_read_wav_downmixes_stereo() -> None:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(np.stack([SAMPLES, SAMPLES], axis=1).astype("<i2").tobytes())
    samples, rate = read_wav(buffer.getvalue())
    assert rate == 16000
    assert np.array_equal(samples, SAMPLES)


def test_read_wav_rejects_8_bit() -> None:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(8000)
        wav.writeframes(bytes(range(256)))
    with pytest.raises(AudioFormatError, match="16-bit"):
        read_wav(buffer.getvalue())


@pytest.mark.parametrize("data", [b"", b"garbage", b"RIFF\x00\x00\x00\x00WAVE", wav_bytes(SAMPLES[:0], 8000)])
def test_read_wav_rejects_bad_input(data: bytes) -> None:
    with pytest.raises(AudioFormatError):
        read_wav(data)
