"""One-shot and streaming resampling: lengths, dtypes, frequency fidelity, continuity."""

from __future__ import annotations

import numpy as np
import pytest

from voice_audio import AudioFormatError, StreamResampler, resample


def sine(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize(
    ("from_rate", "to_rate"),
    [(16000, 8000), (8000, 16000), (8000, 48000), (22050, 16000), (48000, 16000), (44100, 24000)],
)
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_one_shot_length_and_dtype(from_rate: int, to_rate: int, dtype) -> None:
    source = sine(440, from_rate)
    if dtype is np.int16:
        source = (source * 32767).astype(np.int16)
    out = resample(source, from_rate, to_rate)
    assert out.dtype == dtype
    assert out.ndim == 1
    assert abs(out.size - source.size * to_rate / from_rate) <= 1


def test_same_rate_returns_input_object() -> None:
    source = sine(440, 16000)
    assert resample(source, 16000, 16000) is source


@pytest.mark.parametrize(("from_rate", "to_rate"), [(22050, 16000), (8000, 16000), (48000, 8000)])
def test_sine_keeps_its_frequency(from_rate: int, to_rate: int) -> None:
    out = resample(sine(1000, from_rate), from_rate, to_rate)
    assert dominant_frequency(out, to_rate) == pytest.approx(1000, abs=2)
    assert float(np.max(np.abs(out[100:-100]))) == pytest.approx(0.5, rel=0.02)


def test_downsampling_removes_content_above_new_nyquist() -> None:
    out = resample(sine(6000, 48000), 48000, 8000)
    assert float(np.sqrt(np.mean(out**2))) < 0.01


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_stream_resampler_matches_one_shot(dtype) -> None:
    source = sine(440, 8000, seconds=2.0)
    if dtype is np.int16:
        source = (source * 32767).astype(np.int16)
    stream = StreamResampler(8000, 16000, dtype=dtype)
    rng = np.random.default_rng(3)
    pieces, start = [], 0
    while start < source.size:
        size = int(rng.integers(0, 400))
        pieces.append(stream.process(source[start : start + size]))
        start += size
    pieces.append(stream.flush())
    streamed = np.concatenate(pieces)
    one_shot = resample(source, 8000, 16000)
    assert streamed.dtype == dtype
    assert abs(streamed.size - one_shot.size) <= 1
    n = min(streamed.size, one_shot.size)
    tolerance = 2 if dtype is np.int16 else 1e-4
    assert np.max(np.abs(streamed[:n].astype(np.float64) - one_shot[:n])) <= tolerance


def test_stream_resampler_is_continuous_across_20ms_frames() -> None:
    rate_in, rate_out = 8000, 16000
    source = sine(300, rate_in, seconds=1.0)
    stream = StreamResampler(rate_in, rate_out, dtype=np.float32)
    out = np.concatenate([stream.process(source[i : i + 160]) for i in range(0, source.size, 160)] + [stream.flush()])
    steady = out[200:-200]
    # A 300 Hz sine at 16 kHz moves at most 2*pi*300/16000*0.5 ≈ 0.059 per sample; a seam jumps.
    assert float(np.max(np.abs(np.diff(steady)))) < 0.07
    assert dominant_frequency(out, rate_out) == pytest.approx(300, abs=2)


def test_stream_resampler_passthrough_and_flush_once() -> None:
    stream = StreamResampler(16000, 16000)
    chunk = np.arange(10, dtype=np.int16)
    assert stream.process(chunk) is chunk
    assert stream.flush().size == 0
    assert stream.flush().size == 0
    with pytest.raises(AudioFormatError, match="flushed"):
        stream.process(chunk)


def test_stream_resampler_rejects_wrong_dtype() -> None:
    stream = StreamResampler(8000, 16000, dtype=np.int16)
    with pytest.raises(AudioFormatError, match="int16"):
        stream.process(np.zeros(160, dtype=np.float32))


@pytest.mark.parametrize("rate", [0, -1, 10_000_000, 7999, 16000.0])
def test_absurd_rates_rejected(rate) -> None:
    samples = np.zeros(160, dtype=np.float32)
    with pytest.raises(AudioFormatError, match="absurd"):
        resample(samples, rate, 16000)
    with pytest.raises(AudioFormatError, match="absurd"):
        resample(samples, 16000, rate)
    with pytest.raises(AudioFormatError, match="absurd"):
        StreamResampler(rate, 16000)


@pytest.mark.parametrize("bad", [np.zeros(10, dtype=np.float64), np.zeros((2, 10), dtype=np.int16), [0, 1, 2]])
def test_bad_sample_arrays_rejected(bad) -> None:
    with pytest.raises(AudioFormatError):
        resample(bad, 8000, 16000)
