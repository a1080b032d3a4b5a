"""decode_to_float / decode_to_pcm16 over raw encodings and real container files."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.speech import encode_container
from voice_audio import (
    AudioFormatError,
    Container,
    Encoding,
    decode_to_float,
    decode_to_pcm16,
    encode_pcm16,
    resample,
    wav_bytes,
)

SENTENCE = "Please call me back at the office tomorrow morning."


@pytest.fixture(scope="module")
def speech(piper_speech) -> tuple[np.ndarray, int]:
    return piper_speech(SENTENCE)


@pytest.fixture(scope="module")
def reference_16k(speech) -> np.ndarray:
    samples, rate = speech
    return resample(samples.astype(np.float32) / 32768, rate, 16000)


@pytest.fixture(scope="module")
def container_files(speech) -> dict[str, bytes]:
    samples, rate = speech
    return {name: encode_container(samples, rate, name) for name in ("wav", "webm", "ogg", "mp3")}


def envelope(samples: np.ndarray, frame: int = 320) -> np.ndarray:
    usable = samples[: samples.size - samples.size % frame]
    return np.sqrt(np.mean(usable.reshape(-1, frame).astype(np.float64) ** 2, axis=1))


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    ea, eb = envelope(a), envelope(b)
    n = min(ea.size, eb.size)
    return float(np.corrcoef(ea[:n], eb[:n])[0, 1])


def decode(data: bytes, container: Container, **kwargs) -> np.ndarray:
    kwargs.setdefault("encoding", Encoding.PCM16)
    kwargs.setdefault("sample_rate", 16000)
    return decode_to_float(data, container=container, **kwargs)


@pytest.mark.parametrize("name", ["wav", "webm", "ogg", "mp3"])
@pytest.mark.parametrize("auto", [False, True], ids=["named", "auto"])
def test_container_decodes_to_16k_float(container_files, reference_16k, name: str, auto: bool) -> None:
    out = decode(container_files[name], Container.AUTO if auto else Container(name))
    assert out.dtype == np.float32
    assert out.ndim == 1
    assert abs(out.size - reference_16k.size) < 0.05 * 16000
    assert float(np.max(np.abs(out))) <= 1.0
    assert similarity(out, reference_16k) > 0.95


def test_wav_decodes_exactly(container_files, reference_16k) -> None:
    out = decode(container_files["wav"], Container.WAV)
    assert out.size == reference_16k.size
    assert np.allclose(out, np.clip(reference_16k, -1, 1), atol=1e-4)


@pytest.mark.parametrize("target_rate", [8000, 24000, 48000])
def test_container_honours_target_rate(container_files, speech, target_rate: int) -> None:
    samples, rate = speech
    out = decode(container_files["webm"], Container.WEBM, target_rate=target_rate)
    assert abs(out.size / target_rate - samples.size / rate) < 0.05


def test_decode_to_pcm16_container(container_files, speech) -> None:
    samples, rate = speech
    out = decode_to_pcm16(container_files["ogg"], encoding=Encoding.PCM16, sample_rate=rate, container=Container.OGG)
    assert out.dtype == np.int16
    assert abs(out.size / 16000 - samples.size / rate) < 0.05


def test_float_wav_falls_back_to_ffmpeg(speech) -> None:
    import io

    import av

    samples, rate = speech
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="wav") as output:
        stream = output.add_stream("pcm_f32le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            (samples.astype(np.float32) / 32768).reshape(1, -1), format="flt", layout="mono"
        )
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            output.mux(packet)
    out = decode(buffer.getvalue(), Container.WAV)
    assert abs(out.size / 16000 - samples.size / rate) < 0.01


@pytest.mark.parametrize(("encoding", "snr_floor_db"), [(Encoding.MULAW, 30), (Encoding.ALAW, 30)])
def test_g711_8k_round_trip(speech, encoding: Encoding, snr_floor_db: float) -> None:
    samples, rate = speech
    wire = encode_pcm16(samples, from_rate=rate, encoding=encoding, to_rate=8000)
    expected = resample(samples, rate, 8000).astype(np.float64) / 32768
    assert len(wire) == expected.size
    at_8k = decode_to_float(wire, encoding=encoding, sample_rate=8000, container=Container.RAW, target_rate=8000)
    noise = at_8k - expected
    snr_db = 10 * np.log10(np.sum(expected**2) / np.sum(noise**2))
    assert snr_db > snr_floor_db
    at_16k = decode_to_float(wire, encoding=encoding, sample_rate=8000, container=Container.RAW)
    assert abs(at_16k.size - 2 * at_8k.size) <= 1


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 44100, 48000, 96000, 192000])
def test_raw_pcm16_any_rate(rate: int) -> None:
    t = np.arange(rate // 2) / rate
    samples = (np.sin(2 * np.pi * 440 * t) * 16000).astype("<i2")
    out = decode(samples.tobytes(), Container.RAW, sample_rate=rate)
    assert abs(out.size - 8000) <= 1
    assert float(np.max(np.abs(out))) == pytest.approx(16000 / 32768, rel=0.02)


def test_raw_pcm16_same_rate_is_exact() -> None:
    samples = np.array([0, 1, -1, 32767, -32768, 12345], dtype=np.int16)
    data = samples.astype("<i2").tobytes()
    assert np.array_equal(
        decode_to_pcm16(data, encoding=Encoding.PCM16, sample_rate=16000, container=Container.RAW),
        samples,
    )
    assert np.allclose(decode(data, Container.RAW), samples / 32768)


@pytest.mark.parametrize("encoding", list(Encoding))
def test_raw_stereo_is_downmixed(encoding: Encoding) -> None:
    left = (np.sin(np.arange(1600) / 5) * 8000).astype(np.int16)
    mono_wire = encode_pcm16(left, from_rate=8000, encoding=encoding, to_rate=8000)
    width = 2 if encoding is Encoding.PCM16 else 1
    frames = np.frombuffer(mono_wire, dtype=np.uint8).reshape(-1, width)
    stereo_wire = np.concatenate([frames, frames], axis=1).tobytes()
    mono = decode(mono_wire, Container.RAW, encoding=encoding, sample_rate=8000, target_rate=8000)
    both = decode(
        stereo_wire,
        Container.RAW,
        encoding=encoding,
        sample_rate=8000,
        channels=2,
        target_rate=8000,
    )
    assert np.allclose(mono, both, atol=1 / 32768)


def test_raw_opposite_channels_cancel() -> None:
    left = np.full(800, 1000, dtype=np.int16)
    stereo = np.stack([left, -left], axis=1).astype("<i2").tobytes()
    out = decode(stereo, Container.RAW, channels=2)
    assert np.allclose(out, 0)


# --- bad input: always AudioFormatError -------------------------------------------------------


@pytest.mark.parametrize("container", list(Container))
@pytest.mark.parametrize("encoding", list(Encoding))
def test_empty_audio(container: Container, encoding: Encoding) -> None:
    with pytest.raises(AudioFormatError, match="empty audio"):
        decode(b"", container, encoding=encoding)


def test_odd_pcm16_length() -> None:
    with pytest.raises(AudioFormatError, match="even number of bytes"):
        decode(b"\x00\x01\x02", Container.RAW)


def test_channels_must_divide_samples() -> None:
    with pytest.raises(AudioFormatError, match="channels"):
        decode(b"\x00\x00" * 3, Container.RAW, channels=2)


@pytest.mark.parametrize("channels", [0, -1, 99])
def test_bad_channel_count(channels: int) -> None:
    with pytest.raises(AudioFormatError, match="channel count"):
        decode(b"\x00\x00" * 4, Container.RAW, channels=channels)


GARBAGE = {
    "text": b"this is definitely not audio, just some text " * 20,
    "random": np.random.default_rng(42).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "zeros": bytes(2048),
    "riff_header_only": b"RIFF\x24\x00\x00\x00WAVEfmt ",
    "ebml_header_only": b"\x1a\x45\xdf\xa3" + bytes(64),
    "ogg_header_only": b"OggS" + bytes(64),
    "id3_header_only": b"ID3\x04\x00\x00\x00\x00\x00\x00",
    "one_byte": b"\x00",
}


@pytest.mark.parametrize("container", [c for c in Container if c is not Container.RAW])
@pytest.mark.parametrize("garbage", list(GARBAGE), ids=list(GARBAGE))
def test_garbage_in_containers(container: Container, garbage: str) -> None:
    with pytest.raises(AudioFormatError):
        decode(GARBAGE[garbage], container)
    with pytest.raises(AudioFormatError):
        decode_to_pcm16(GARBAGE[garbage], encoding=Encoding.PCM16, sample_rate=16000, container=container)


@pytest.mark.parametrize("name", ["wav", "webm", "ogg", "mp3"])
def test_truncated_header_in_containers(container_files, name: str) -> None:
    with pytest.raises(AudioFormatError):
        decode(container_files[name][:40], Container(name))


@pytest.mark.parametrize("rate", [0, -1, 10_000_000, 7999, 192_001, 16000.5, "16000", None])
def test_absurd_raw_rates(rate) -> None:
    data = b"\x00\x00" * 160
    with pytest.raises(AudioFormatError, match="absurd"):
        decode(data, Container.RAW, sample_rate=rate)
    with pytest.raises(AudioFormatError, match="absurd"):
        decode(data, Container.RAW, target_rate=rate)


@pytest.mark.parametrize("rate", [0, -1, 10_000_000])
def test_absurd_target_rate_for_containers(container_files, rate: int) -> None:
    with pytest.raises(AudioFormatError, match="absurd"):
        decode(container_files["webm"], Container.WEBM, target_rate=rate)


def test_numpy_integer_rates_accepted() -> None:
    out = decode(b"\x00\x00" * 160, Container.RAW, sample_rate=np.int64(8000))
    assert out.size == 320


def test_audio_format_error_is_value_error() -> None:
    assert issubclass(AudioFormatError, ValueError)


def test_wav_bytes_header_is_read_by_container_decoder() -> None:
    samples = (np.sin(np.arange(8000) / 3) * 1000).astype(np.int16)
    out = decode_to_pcm16(
        wav_bytes(samples, 8000),
        encoding=Encoding.PCM16,
        sample_rate=0,
        container=Container.AUTO,
        target_rate=8000,
    )
    assert np.array_equal(out, samples)
