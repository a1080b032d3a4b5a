"""Tests of the Coqui engine on tiny, randomly initialised VITS models built with Coqui's own API.

The models are a few hundred thousand parameters and use plain characters (no
phonemizer), so they load and synthesize in well under a second on a CPU. Their
speech is noise, which is all these tests need: the plumbing from text to int16
chunks is the same as for a trained model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.vits import TINY_ARGS, build_vits
from voice_text import split_sentences
from voice_tts.coqui_engine import CoquiEngine, CoquiNotInstalledError
from voice_tts.engine import SpeechChunk, SynthesisCancelled, UnknownVoiceError

needs_coqui = pytest.mark.skipif(
    importlib.util.find_spec("TTS") is None,
    reason="coqui extra not installed (pip install 'voice-platform-tts[coqui]')",
)
pytestmark = pytest.mark.coqui

TEXT = "Hello there. How are you today? I am fine, thanks."


def _build_tiny_vits(model_dir: Path, *, multi: bool = False) -> Path:
    """Save a tiny random VITS checkpoint and config.json into ``model_dir``."""
    pytest.importorskip("TTS.api", reason="coqui extra not installed")
    return build_vits(model_dir, TINY_ARGS, multi=multi)


@pytest.fixture(scope="module")
def tiny_vits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny single-speaker VITS model."""
    return _build_tiny_vits(tmp_path_factory.mktemp("coqui") / "tiny-vits")


@pytest.fixture(scope="module")
def engine(tiny_vits: Path) -> CoquiEngine:
    """A loaded engine over the tiny single-speaker model."""
    tts = CoquiEngine(str(tiny_vits))
    tts.load()
    return tts


def _duration(engine: CoquiEngine, text: str, **kwargs: object) -> float:
    return sum(chunk.duration for chunk in engine.synthesize(text, **kwargs))


@needs_coqui
def test_voice_is_named_after_the_model_dir(engine: CoquiEngine) -> None:
    assert engine.loaded
    [voice] = engine.voices()
    assert voice.name == "tiny-vits"
    assert voice.engine == "coqui"
    assert voice.sample_rate == 22050
    assert voice.speakers == ()
    assert voice.languages == ()


@needs_coqui
def test_one_int16_chunk_per_sentence(engine: CoquiEngine) -> None:
    chunks: list[SpeechChunk] = list(engine.synthesize(TEXT))
    assert [c.sentence_index for c in chunks] == [0, 1, 2]
    assert [c.text for c in chunks] == split_sentences(TEXT)
    for chunk in chunks:
        assert chunk.sample_rate == 22050
        assert chunk.samples.dtype == np.int16
        assert chunk.samples.ndim == 1
        assert chunk.samples.size > 0
        assert np.any(chunk.samples != 0)
        # The 10,000 zero samples Coqui pads after each sentence are trimmed.
        assert np.any(chunk.samples[-2000:] != 0)


@needs_coqui
def test_speed_changes_duration(engine: CoquiEngine) -> None:
    text = "Speaking rate should follow the speed setting."
    assert _duration(engine, text, speed=0.5) > _duration(engine, text, speed=2.0) * 1.5


@needs_coqui
def test_voice_and_argument_checks(engine: CoquiEngine) -> None:
    assert list(engine.synthesize("Hi.", voice="tiny-vits"))
    with pytest.raises(UnknownVoiceError):
        engine.synthesize("Hi.", voice="other")
    with pytest.raises(UnknownVoiceError):
        engine.synthesize("Hi.", speaker="alice")
    with pytest.raises(ValueError):
        engine.synthesize("  ")
    with pytest.raises(ValueError):
        engine.synthesize("Hi.", speed=5.0)


@needs_coqui
def test_should_stop_cancels_between_sentences(engine: CoquiEngine) -> None:
    received: list[SpeechChunk] = []
    with pytest.raises(SynthesisCancelled):
        for chunk in engine.synthesize(TEXT, should_stop=lambda: len(received) >= 2):
            received.append(chunk)
    assert [c.sentence_index for c in received] == [0, 1]


@needs_coqui
def test_loads_from_a_checkpoint_file(tiny_vits: Path) -> None:
    tts = CoquiEngine(str(tiny_vits / "model.pth"))
    chunks = list(tts.synthesize("One. Two."))
    assert len(chunks) == 2
    assert tts.voices()[0].name == "tiny-vits"


@needs_coqui
def test_multi_speaker_multilingual_model(tmp_path: Path) -> None:
    model_dir = _build_tiny_vits(tmp_path / "tiny-multi", multi=True)
    tts = CoquiEngine(str(model_dir), speaker="bob")
    [voice] = tts.voices()
    assert voice.speakers == ("alice", "bob")
    assert voice.languages == ("en", "fr")
    assert voice.language == "en"
    chunks = list(tts.synthesize("Bonjour. Salut.", speaker="alice", language="fr"))
    assert [c.text for c in chunks] == ["Bonjour.", "Salut."]
    assert list(tts.synthesize("Hello.", language="en-US"))
    with pytest.raises(UnknownVoiceError):
        tts.synthesize("Hi.", speaker="carol")
    with pytest.raises(ValueError):
        tts.synthesize("Hallo.", language="de")


@needs_coqui
def test_missing_model_dir_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CoquiEngine(str(tmp_path / "nowhere")).load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        CoquiEngine(str(tmp_path / "empty")).load()


@needs_coqui
def test_uncached_model_name_is_not_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTS_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        CoquiEngine("tts_models/en/ljspeech/vits").load()
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "TTS.api", None)
    with pytest.raises(CoquiNotInstalledError, match=r"voice-platform-tts\[coqui\]"):
        CoquiEngine("/nonexistent").load()
