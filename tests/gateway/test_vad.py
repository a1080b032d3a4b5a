"""Endpointer (WebRTC VAD + energy gates) on Piper speech, noise, bursts and μ-law round trips.

Speech is Piper's, resampled to 16 kHz and padded with silence; its true start and end are taken
from the clean signal (first and last 10 ms window above -50 dBFS). The finished utterances are
also transcribed by the real tiny.en Whisper engine. A micro-benchmark writes the cost per 20 ms
frame to the terminal (not asserted).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator

import numpy as np
import pytest

from tests.support.speech import speak, word_error_rate
from voice_audio import resample, ulaw_decode, ulaw_encode
from voice_gateway.conversation.vad import (
    FRAME_MS,
    Endpointer,
    EndpointingConfig,
    SpeechEnded,
    SpeechGap,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
)
from voice_stt.engine import Transcript
from voice_stt.faster_whisper_engine import FasterWhisperEngine

RATE = 16000
FRAME = RATE // 50
SENTENCE = "I would like to book a table for two people tomorrow evening."
SECOND = "Please call me back at the office."
LEAD_S = 1.0
TRAIL_S = 1.5
ONSET_TOLERANCE_S = 0.1
END_TOLERANCE_S = 0.15
MAX_WER = 0.2

Event = SpeechStarted | SpeechEnded


def speech_16k(text: str) -> np.ndarray:
    samples, rate = speak(text)
    return resample(samples, rate, RATE)


def speech_bounds(samples: np.ndarray, threshold_dbfs: float = -50.0) -> tuple[float, float]:
    """Start and end (seconds) of the audible part: first and last 10 ms window above the threshold."""
    window = RATE // 100
    frames = samples[: samples.size // window * window].reshape(-1, window).astype(np.float64)
    level = 10 * np.log10(np.mean(frames**2, axis=1) / 32768.0**2 + 1e-12)
    loud = np.nonzero(level > threshold_dbfs)[0]
    return loud[0] * window / RATE, (loud[-1] + 1) * window / RATE


def trimmed(samples: np.ndarray) -> np.ndarray:
    start, end = speech_bounds(samples)
    return samples[round(start * RATE) : round(end * RATE)]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype=np.int16)


def noise(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.standard_normal(round(seconds * RATE)) * 32768 * 10 ** (dbfs / 20), -32768, 32767).astype(
        np.int16
    )


def ulaw_round_trip(samples: np.ndarray) -> np.ndarray:
    return resample(ulaw_decode(ulaw_encode(resample(samples, RATE, 8000))), 8000, RATE)


def frames_of(samples: np.ndarray, size: int = FRAME) -> Iterator[np.ndarray]:
    for start in range(0, samples.size, size):
        yield samples[start : start + size]


def random_chunks(samples: np.ndarray, seed: int, sizes: tuple[int, int] = (1, 3000)) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    start = 0
    while start < samples.size:
        size = int(rng.integers(*sizes))
        yield samples[start : start + size]
        start += size


def feed(endpointer: Endpointer, chunks: Iterable[np.ndarray]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += endpointer.process(chunk)
    return events


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


@pytest.fixture(scope="module")
def sentence() -> np.ndarray:
    return speech_16k(SENTENCE)


@pytest.fixture(scope="module")
def padded(sentence: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The sentence with silence around it, and its true start and end in stream time."""
    start, end = speech_bounds(sentence)
    return np.concatenate([silence(LEAD_S), sentence, silence(TRAIL_S)]), LEAD_S + start, LEAD_S + end


@pytest.fixture(scope="module")
def engine() -> FasterWhisperEngine:
    stt = FasterWhisperEngine("tiny.en", cpu_threads=2)
    stt.load()
    return stt


def transcribe(engine: FasterWhisperEngine, audio: np.ndarray) -> str:
    *_, final = engine.transcribe(audio.astype(np.float32) / 32768, language="en")
    assert isinstance(final, Transcript)
    return final.text


def audio_span(ended: SpeechEnded, config: EndpointingConfig) -> tuple[int, int]:
    """Sample indices of ``ended.audio`` in the stream, from the documented layout."""
    tail_s = min(config.pre_roll_ms, config.silence_ms) / 1000
    end_s = ended.ended_s if ended.capped else min(ended.ended_s, ended.last_voiced_s + tail_s)
    end = round(end_s * RATE)
    return end - ended.audio.size, end


def check_one_utterance(
    events: list[Event], true_start: float, true_end: float, config: EndpointingConfig
) -> SpeechEnded:
    assert kinds(events) == ["SpeechStarted", "SpeechEnded"]
    started, ended = events
    assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
    assert started.onset_s == pytest.approx(true_start, abs=ONSET_TOLERANCE_S)
    assert started.confirmed_s - started.onset_s >= config.min_speech_ms / 1000 - 1e-9
    assert ended.onset_s == started.onset_s
    assert ended.last_voiced_s == pytest.approx(true_end, abs=END_TOLERANCE_S)
    assert ended.ended_s == pytest.approx(ended.last_voiced_s + config.silence_ms / 1000, abs=1e-6)
    assert not ended.capped
    assert ended.audio.dtype == np.int16 and ended.audio.ndim == 1
    tail_s = min(config.pre_roll_ms, config.silence_ms) / 1000
    expected_s = ended.last_voiced_s + tail_s - (ended.onset_s - config.pre_roll_ms / 1000)
    assert ended.audio.size / RATE == pytest.approx(expected_s, abs=0.021)
    return ended


CHUNKINGS = {
    "20ms": lambda samples: frames_of(samples),
    "random": lambda samples: random_chunks(samples, seed=1),
    "tiny-odd": lambda samples: random_chunks(samples, seed=2, sizes=(1, 40)),
    "exotel-100ms": lambda samples: frames_of(samples, 1601),
}


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_sentence_gives_one_utterance(padded, chunking: str) -> None:
    stream, true_start, true_end = padded
    config = EndpointingConfig()
    endpointer = Endpointer(config)
    events = feed(endpointer, CHUNKINGS[chunking](stream))
    check_one_utterance(events, true_start, true_end, config)
    assert not endpointer.in_speech
    assert endpointer.stream_s == pytest.approx(stream.size / RATE)


def test_in_speech_follows_the_events(padded) -> None:
    stream, _, _ = padded
    endpointer = Endpointer()
    states: list[tuple[str, bool]] = []
    for frame in frames_of(stream):
        for event in endpointer.process(frame):
            states.append((type(event).__name__, endpointer.in_speech))
    assert states == [("SpeechStarted", True), ("SpeechEnded", False)]


def test_utterance_audio_matches_the_stream(padded) -> None:
    stream, _, _ = padded
    config = EndpointingConfig()
    events = feed(Endpointer(config), frames_of(stream))
    ended = events[-1]
    assert isinstance(ended, SpeechEnded)
    start, end = audio_span(ended, config)
    assert start == round((ended.onset_s - config.pre_roll_ms / 1000) * RATE)
    np.testing.assert_array_equal(ended.audio, stream[start:end])


def test_utterance_transcribes(padded, engine) -> None:
    stream, _, _ = padded
    events = feed(Endpointer(), random_chunks(stream, seed=3))
    ended = events[-1]
    assert isinstance(ended, SpeechEnded)
    text = transcribe(engine, ended.audio)
    assert word_error_rate(SENTENCE, text) <= MAX_WER, text


def test_ulaw_round_trip_still_endpoints(padded, engine) -> None:
    stream, true_start, true_end = padded
    config = EndpointingConfig()
    events = feed(Endpointer(config), frames_of(ulaw_round_trip(stream)))
    ended = check_one_utterance(events, true_start, true_end, config)
    text = transcribe(engine, ended.audio)
    assert word_error_rate(SENTENCE, text) <= MAX_WER, text


def test_8khz_input(padded) -> None:
    stream, true_start, true_end = padded
    config = EndpointingConfig()
    narrowband = ulaw_decode(ulaw_encode(resample(stream, RATE, 8000)))
    events = feed(Endpointer(config, sample_rate=8000), frames_of(narrowband, 160))
    started, ended = events
    assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
    assert started.onset_s == pytest.approx(true_start, abs=ONSET_TOLERANCE_S)
    assert ended.last_voiced_s == pytest.approx(true_end, abs=END_TOLERANCE_S)
    assert ended.audio.size == round((ended.last_voiced_s + 0.3 - (started.onset_s - 0.3)) * 8000)


def test_speech_in_background_noise(sentence) -> None:
    start, end = speech_bounds(sentence)
    stream = np.concatenate([silence(LEAD_S), sentence, silence(TRAIL_S)])
    noisy = np.clip(stream.astype(np.int32) + noise(stream.size / RATE, -50.0, seed=4), -32768, 32767).astype(np.int16)
    config = EndpointingConfig()
    check_one_utterance(feed(Endpointer(config), frames_of(noisy)), LEAD_S + start, LEAD_S + end, config)


@pytest.mark.parametrize(("silence_ms", "utterances"), [(600, 1), (200, 2)])
def test_pause_between_sentences(sentence, silence_ms: int, utterances: int) -> None:
    first, second = trimmed(sentence), trimmed(speech_16k(SECOND))
    stream = np.concatenate([silence(LEAD_S), first, silence(0.3), second, silence(TRAIL_S)])
    config = EndpointingConfig(silence_ms=silence_ms)
    events = feed(Endpointer(config), random_chunks(stream, seed=5))
    assert kinds(events) == ["SpeechStarted", "SpeechEnded"] * utterances
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    assert ends[0].onset_s == pytest.approx(LEAD_S, abs=ONSET_TOLERANCE_S)
    assert ends[-1].last_voiced_s == pytest.approx(LEAD_S + first.size / RATE + 0.3 + second.size / RATE, abs=0.15)
    if utterances == 2:
        assert ends[0].last_voiced_s == pytest.approx(LEAD_S + first.size / RATE, abs=END_TOLERANCE_S)
        assert ends[1].onset_s == pytest.approx(LEAD_S + first.size / RATE + 0.3, abs=ONSET_TOLERANCE_S)
    spans = [audio_span(e, config) for e in ends]
    for (start, end), ended in zip(spans, ends, strict=True):
        np.testing.assert_array_equal(ended.audio, stream[start:end])
    assert all(previous[1] <= current[0] for previous, current in itertools.pairwise(spans))


def cough(seconds: float, dbfs: float) -> np.ndarray:
    """Band-limited (300-3400 Hz) noise burst at the given RMS level, with 10 ms fades."""
    rng = np.random.default_rng(6)
    n = round(seconds * RATE)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[(freqs < 300) | (freqs > 3400)] = 0
    burst = np.fft.irfft(spectrum, n)
    fade = np.linspace(0, 1, RATE // 100)
    burst[: fade.size] *= fade
    burst[-fade.size :] *= fade[::-1]
    burst *= 32768 * 10 ** (dbfs / 20) / np.sqrt(np.mean(burst**2))
    return burst.astype(np.int16)


def speech_slice(sentence: np.ndarray, seconds: float) -> np.ndarray:
    """The loudest ``seconds`` of the sentence: clearly voiced speech, not a pause or a consonant."""
    length = round(seconds * RATE)
    energy = np.convolve(sentence.astype(np.float64) ** 2, np.ones(length), mode="valid")
    begin = int(np.argmax(energy))
    return sentence[begin : begin + length]


@pytest.mark.parametrize("kind", ["noise-burst", "speech-slice"])
def test_150ms_burst_is_ignored(sentence, kind: str) -> None:
    burst = cough(0.15, -20.0) if kind == "noise-burst" else speech_slice(sentence, 0.15)
    stream = np.concatenate([silence(1.0), burst, silence(1.5)])
    assert feed(Endpointer(EndpointingConfig(min_speech_ms=200)), frames_of(stream)) == []


def test_speech_slice_counts_when_min_speech_is_shorter(sentence) -> None:
    stream = np.concatenate([silence(1.0), speech_slice(sentence, 0.15), silence(1.5)])
    events = feed(Endpointer(EndpointingConfig(min_speech_ms=100)), frames_of(stream))
    assert kinds(events) == ["SpeechStarted", "SpeechEnded"]


@pytest.mark.parametrize("dbfs", [-60.0, -50.0, -40.0])
@pytest.mark.parametrize("ulaw", [False, True], ids=["pcm", "ulaw"])
def test_background_noise_is_ignored(dbfs: float, ulaw: bool) -> None:
    stream = noise(10.0, dbfs, seed=7)
    if ulaw:
        stream = ulaw_round_trip(stream)
    assert feed(Endpointer(), frames_of(stream)) == []


def test_noise_with_dropouts_is_ignored() -> None:
    stream = noise(10.0, -40.0, seed=11)
    for second in range(1, 10):
        stream[second * RATE : second * RATE + 3 * FRAME] = 0
    assert feed(Endpointer(), frames_of(stream)) == []


def test_noise_after_digital_silence_is_ignored() -> None:
    stream = np.concatenate([silence(3.0), noise(10.0, -40.0, seed=12)])
    assert feed(Endpointer(), frames_of(stream)) == []


def test_digital_silence_is_ignored() -> None:
    assert feed(Endpointer(), random_chunks(silence(5.0), seed=8)) == []


def test_max_utterance_caps_a_long_stream(sentence) -> None:
    speech = np.concatenate([trimmed(sentence), silence(0.1)] * 3)
    stream = np.concatenate([silence(LEAD_S), speech, silence(TRAIL_S)])
    config = EndpointingConfig(max_utterance_s=2.0, pre_roll_ms=300)
    events = feed(Endpointer(config), random_chunks(stream, seed=9))
    assert kinds(events)[:4] == ["SpeechStarted", "SpeechEnded", "SpeechStarted", "SpeechEnded"]
    assert kinds(events) == ["SpeechStarted", "SpeechEnded"] * (len(events) // 2)
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    assert all(e.capped for e in ends[:-1]) and not ends[-1].capped
    assert len(ends) >= 3
    for end in ends[:-1]:
        assert end.ended_s - end.onset_s == pytest.approx(2.0, abs=1e-6)
    assert ends[0].audio.size / RATE == pytest.approx(2.0 + 0.3, abs=1e-6)
    assert ends[-1].last_voiced_s == pytest.approx(LEAD_S + speech.size / RATE - 0.1, abs=END_TOLERANCE_S)
    spans = [audio_span(e, config) for e in ends]
    for (start, end), ended in zip(spans, ends, strict=True):
        np.testing.assert_array_equal(ended.audio, stream[start:end])
    for previous, current in itertools.pairwise(spans):
        assert current[0] == previous[1]


def test_reset_drops_the_utterance_in_progress(padded) -> None:
    stream, true_start, true_end = padded
    endpointer = Endpointer()
    midpoint = round((true_start + 1.0) * RATE)
    events = feed(endpointer, frames_of(stream[:midpoint]))
    assert kinds(events) == ["SpeechStarted"] and endpointer.in_speech
    endpointer.reset()
    assert not endpointer.in_speech
    rest = feed(endpointer, frames_of(stream[midpoint:]))
    assert kinds(rest) == ["SpeechStarted", "SpeechEnded"]
    started, ended = rest
    assert started.onset_s >= midpoint / RATE - FRAME_MS / 1000  # onsets lie on the 20 ms frame grid
    assert ended.last_voiced_s == pytest.approx(true_end, abs=END_TOLERANCE_S)
    assert ended.audio.size / RATE <= ended.last_voiced_s + 0.3 - midpoint / RATE + FRAME_MS / 1000
    again = feed(endpointer, frames_of(stream))
    assert kinds(again) == ["SpeechStarted", "SpeechEnded"]
    assert again[0].onset_s == pytest.approx(stream.size / RATE + true_start, abs=ONSET_TOLERANCE_S)


def test_tiny_and_empty_inputs() -> None:
    endpointer = Endpointer()
    assert endpointer.process(np.zeros(0, dtype=np.int16)) == []
    assert endpointer.process(np.zeros(1, dtype=np.int16)) == []
    assert endpointer.stream_s == pytest.approx(1 / RATE)
    assert endpointer.process(np.zeros(FRAME * 3 + 7, dtype=np.int16)) == []
    assert endpointer.stream_s == pytest.approx((FRAME * 3 + 8) / RATE)


def test_non_contiguous_input(padded) -> None:
    stream, true_start, true_end = padded
    strided = np.repeat(stream, 2)[::2]
    assert not strided.flags.c_contiguous
    config = EndpointingConfig()
    check_one_utterance(feed(Endpointer(config), random_chunks(strided, seed=10)), true_start, true_end, config)


@pytest.mark.parametrize(
    "bad",
    [np.zeros(320, dtype=np.float32), np.zeros((2, 160), dtype=np.int16), b"\x00" * 640],
    ids=["float", "2d", "bytes"],
)
def test_rejects_bad_input(bad) -> None:
    with pytest.raises(ValueError):
        Endpointer().process(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"silence_ms": 0},
        {"min_speech_ms": -1},
        {"max_utterance_s": 0},
        {"pre_roll_ms": -1},
        {"aggressiveness": 4},
        {"energy_threshold_dbfs": 3.0},
        {"noise_margin_db": -1.0},
        {"pause_ms": 600},
        {"transcribe_ms": 600},
        {"pause_ms": 150, "transcribe_ms": 200},
        {"pause_ms": 150, "transcribe_ms": 0},
    ],
)
def test_rejects_bad_config(kwargs) -> None:
    with pytest.raises(ValueError):
        EndpointingConfig(**kwargs)


def test_rejects_unsupported_rate() -> None:
    with pytest.raises(ValueError):
        Endpointer(sample_rate=22050)


def test_per_frame_cost(padded, request, capsys) -> None:
    stream, _, _ = padded
    audio = np.concatenate([stream] * 10)
    frames = list(frames_of(audio[: audio.size // FRAME * FRAME]))
    endpointer = Endpointer()
    started = time.perf_counter()
    events = feed(endpointer, frames)
    elapsed = time.perf_counter() - started
    assert kinds(events) == ["SpeechStarted", "SpeechEnded"] * 10
    silent = [np.zeros(FRAME, dtype=np.int16)] * 5000
    started = time.perf_counter()
    feed(Endpointer(), silent)
    silent_elapsed = time.perf_counter() - started
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        with capsys.disabled():
            reporter.write_line(
                f"\nEndpointer cost: {elapsed / len(frames) * 1e6:.1f} us per 20 ms frame on speech+silence "
                f"({len(frames)} frames), {silent_elapsed / len(silent) * 1e6:.1f} us on digital silence"
            )


def test_a_gap_hands_out_the_turns_audio_before_the_pause() -> None:
    """With ``transcribe_ms`` the utterance is handed out at the gap, the pause follows with the same audio,
    speech after them voids both, and the turn ended at the last pause carries exactly the gap's audio."""
    first, second = trimmed(speech_16k("I would like to book a table")), trimmed(speech_16k("for two people."))
    stream = np.concatenate([silence(LEAD_S), first, silence(0.4), second, silence(TRAIL_S)])
    endpointer = Endpointer(EndpointingConfig(silence_ms=1000, pause_ms=160, transcribe_ms=100), RATE)
    events = [e for e in endpointer.process(stream) if not isinstance(e, SpeechStarted)]
    kinds = [type(e) for e in events]
    gap = kinds.index(SpeechGap)
    assert kinds[gap : gap + 3] == [SpeechGap, SpeechPaused, SpeechResumed], kinds
    assert kinds[-3:] == [SpeechGap, SpeechPaused, SpeechEnded], kinds
    last_gap, last_pause = events[-3], events[-2]
    assert last_pause.paused_s - last_gap.paused_s == pytest.approx(0.06)
    assert np.array_equal(last_gap.audio, last_pause.audio)
    assert np.array_equal(last_gap.audio, events[-1].audio)
    expected_s = last_gap.last_voiced_s + 0.1 - (events[-1].onset_s - 0.3)  # pre-roll before, 100 ms after
    assert events[-1].audio.size / RATE == pytest.approx(expected_s, abs=0.021)


def test_without_pauses_a_gap_hands_out_the_audio_the_silence_ends_with(padded) -> None:
    endpointer = Endpointer(EndpointingConfig(silence_ms=600, transcribe_ms=100), RATE)
    events = [e for e in feed(endpointer, frames_of(padded[0])) if not isinstance(e, SpeechStarted)]
    assert not any(type(e) is SpeechPaused for e in events), "no pauses without pause_ms"
    assert isinstance(events[-2], SpeechGap) and isinstance(events[-1], SpeechEnded), events
    assert np.array_equal(events[-2].audio, events[-1].audio)


def test_the_turn_ends_at_the_pause_with_the_gaps_audio(padded) -> None:
    endpointer = Endpointer(EndpointingConfig(silence_ms=1000, pause_ms=160, transcribe_ms=100), RATE)
    gaps: list[SpeechGap] = []
    for chunk in frames_of(padded[0]):
        for event in endpointer.process(chunk):
            if isinstance(event, SpeechGap):
                gaps.append(event)
            elif isinstance(event, SpeechPaused):
                ended = endpointer.end_turn()
                assert ended is not None and np.array_equal(ended.audio, gaps[-1].audio)
                return
    raise AssertionError("no pause")


def test_flush_ends_the_utterance_in_progress(padded) -> None:
    stream, true_start, true_end = padded
    endpointer = Endpointer(EndpointingConfig(silence_ms=1000, pause_ms=160, transcribe_ms=100), RATE)
    assert endpointer.flush() is None, "nothing in progress"
    mid_word = round((true_start + 1.0) * RATE)
    assert kinds(feed(endpointer, frames_of(stream[:mid_word]))) == ["SpeechStarted"]
    ended = endpointer.flush()
    assert ended is not None and not ended.capped and not endpointer.in_speech
    assert ended.onset_s == pytest.approx(true_start, abs=ONSET_TOLERANCE_S)
    assert ended.audio.size == pytest.approx((mid_word / RATE - ended.onset_s + 0.3) * RATE, abs=2 * FRAME)
    assert endpointer.flush() is None, "flushed once"
    after_speech = round((true_end + 0.3) * RATE)
    gaps = [e for e in feed(endpointer, frames_of(stream[mid_word:after_speech])) if isinstance(e, SpeechGap)]
    assert gaps, "the rest of the sentence started a new utterance, which paused"
    assert np.array_equal(endpointer.flush().audio, gaps[-1].audio), "in a pause, the gap's audio"
