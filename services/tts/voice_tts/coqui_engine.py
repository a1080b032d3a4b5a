"""Coqui TTS engine (coqui-tts 0.28): VITS, XTTS-v2 and other Coqui models, CPU or GPU.

Models are loaded from disk only: either a model directory (``config.json``
plus a ``.pth`` checkpoint) or the name of a Coqui model that is already in
the local model cache. Nothing is downloaded at run time. Coqui itself is an
optional extra, imported when the engine loads.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from voice_tts.engine import (
    SentenceSynthesizer,
    TextToSpeechEngine,
    UnknownVoiceError,
    Voice,
    float_to_int16,
    language_matches,
)

__all__ = ["CoquiEngine", "CoquiNotInstalledError"]

_LOGGER = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'voice-platform-tts[coqui]'"
_CHECKPOINT_NAMES = ("model.pth", "model_file.pth", "model_file.pth.tar", "checkpoint.pth", "best_model.pth")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar")


class CoquiNotInstalledError(ImportError):
    """The optional Coqui TTS dependencies are not installed."""


class CoquiEngine(TextToSpeechEngine):
    """Text-to-speech with one Coqui TTS model.

    The engine offers a single voice, named after the model directory (or the
    model name, for a cached model). Multi-speaker and multilingual models
    (XTTS-v2, VCTK VITS) take ``speaker`` and ``language`` per request; the
    constructor's values are the defaults. Sentences are synthesized one at a
    time under a lock, so concurrent requests interleave by sentence.
    """

    name = "coqui"

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        speaker: str | None = None,
        language: str | None = None,
    ) -> None:
        """Configure the engine; the model is read in :meth:`load`.

        Args:
            model: A model directory holding ``config.json`` and a ``.pth``
                checkpoint, a checkpoint file with ``config.json`` beside it, or
                a Coqui model name (e.g. "tts_models/en/ljspeech/vits") already
                in the local Coqui cache.
            device: Torch device to run on, e.g. "cpu" or "cuda".
            speaker: Default speaker of a multi-speaker model.
            language: Default language of a multilingual model; for a
                single-language model, the language it is declared to speak.
        """
        self._model_spec = model
        self._device = device
        self._default_speaker = speaker
        self._default_language = language
        self._lock = threading.Lock()
        self._tts: Any = None
        self._voice: Voice | None = None
        self._multilingual = False
        self._speed_mode = "none"
        self._base_length_scale = 1.0
        self._pad_samples = 0

    @property
    def loaded(self) -> bool:
        """Whether :meth:`load` has completed."""
        return self._voice is not None

    def load(self) -> None:
        """Load the model onto the device; later calls do nothing.

        Raises:
            CoquiNotInstalledError: coqui-tts or torch is not installed.
            FileNotFoundError: The model is neither a model directory nor a
                cached Coqui model.
            UnknownVoiceError: The default speaker or language is not offered
                by the model.
        """
        if self._voice is not None:
            return
        with self._lock:
            if self._voice is not None:
                return
            try:
                import torch
                from TTS.api import TTS
                from TTS.utils.synthesizer import PAD_SILENCE_SAMPLES
            except ImportError as exc:
                raise CoquiNotInstalledError(
                    f"the Coqui TTS engine needs the coqui extra ({exc}); install it with: {_INSTALL_HINT}"
                ) from exc

            name, checkpoint, config_path = _resolve_model(self._model_spec)
            _LOGGER.info("Loading Coqui model %s from %s on %s", name, checkpoint, self._device)
            tts = TTS(model_path=str(checkpoint), config_path=str(config_path), progress_bar=False)
            tts = tts.to(torch.device(self._device))
            synthesizer = tts.synthesizer
            model_config = synthesizer.tts_config

            speakers = tuple(tts.speakers or ()) if tts.is_multi_speaker else ()
            languages = tuple(tts.languages or ()) if tts.is_multi_lingual else ()
            self._multilingual = bool(languages)
            speaker = self._default_speaker
            if speakers and speaker is None:
                speaker = speakers[0]
            if speaker is not None and speaker not in speakers:
                raise UnknownVoiceError(f"model {name} has no speaker {speaker!r}; speakers: {list(speakers)}")
            language = self._default_language
            if languages:
                if language is None:
                    language = "en" if "en" in languages else languages[0]
                language = _pick_language(language, languages, name)
            else:
                language = language or _declared_language(self._model_spec, model_config) or "und"

            if str(model_config.get("model", "")).lower() == "xtts":
                self._speed_mode = "kwarg"
            elif hasattr(synthesizer.tts_model, "length_scale"):
                self._speed_mode = "length_scale"
                self._base_length_scale = float(synthesizer.tts_model.length_scale)
            else:
                self._speed_mode = "none"
            self._pad_samples = int(PAD_SILENCE_SAMPLES)
            self._default_speaker = speaker
            self._default_language = language
            self._tts = tts
            self._voice = Voice(
                name=name,
                engine=self.name,
                language=language,
                sample_rate=int(synthesizer.output_sample_rate),
                speakers=speakers,
                languages=languages,
            )
            _LOGGER.info(
                "Coqui model %s loaded: %d Hz, %d speaker(s), %d language(s)",
                name,
                self._voice.sample_rate,
                len(speakers),
                len(languages),
            )

    def voices(self) -> list[Voice]:
        """List the model's single voice (loads the engine)."""
        self.load()
        return [self._voice] if self._voice is not None else []

    def _prepare(self, voice: str | None, speaker: str | None, language: str | None) -> tuple[int, SentenceSynthesizer]:
        info = self._voice
        if info is None:
            raise RuntimeError("Coqui engine is not loaded")
        if voice is not None and voice != info.name:
            raise UnknownVoiceError(f"unknown Coqui voice {voice!r}; available: [{info.name!r}]")
        if speaker is None:
            speaker = self._default_speaker
        elif speaker not in info.speakers:
            available = list(info.speakers) or "none (single-speaker model)"
            raise UnknownVoiceError(f"unknown speaker {speaker!r} for {info.name}; available: {available}")
        if self._multilingual:
            language = _pick_language(language or info.language, info.languages, info.name)
        else:
            if language is not None and not language_matches(language, info.language):
                raise ValueError(f"Coqui model {info.name} speaks {info.language}, not {language!r}")
            language = None

        def synthesize_sentence(sentence: str, speed: float) -> np.ndarray:
            return self._synthesize(sentence, speed, speaker, language)

        return info.sample_rate, synthesize_sentence

    def _synthesize(self, sentence: str, speed: float, speaker: str | None, language: str | None) -> np.ndarray:
        import torch

        kwargs: dict[str, Any] = {}
        if self._speed_mode == "kwarg":
            kwargs["speed"] = speed
        elif self._speed_mode == "none" and speed != 1.0:
            _LOGGER.warning("Coqui model %s cannot change speed; speaking at 1.0", self._model_spec)
        with self._lock, torch.inference_mode():
            model = self._tts.synthesizer.tts_model
            if self._speed_mode == "length_scale":
                model.length_scale = self._base_length_scale / speed
            try:
                wav = self._tts.tts(text=sentence, speaker=speaker, language=language, split_sentences=False, **kwargs)
            finally:
                if self._speed_mode == "length_scale":
                    model.length_scale = self._base_length_scale
        audio = np.asarray(wav, dtype=np.float32).reshape(-1)
        # Synthesizer.tts appends PAD_SILENCE_SAMPLES of zeros after every sentence.
        if self._pad_samples and audio.size >= self._pad_samples and not audio[-self._pad_samples :].any():
            audio = audio[: -self._pad_samples]
        return float_to_int16(audio)


def _pick_language(language: str, languages: tuple[str, ...], model_name: str) -> str:
    """Map a requested language onto one the model offers ("en-US" → "en")."""
    if language in languages:
        return language
    for candidate in languages:
        if candidate.lower() == language.lower().replace("_", "-"):
            return candidate
    for candidate in languages:
        if language_matches(language, candidate) and "-" not in candidate:
            return candidate
    raise ValueError(f"Coqui model {model_name} does not speak {language!r}; languages: {list(languages)}")


def _declared_language(model_spec: str, config: Any) -> str | None:
    """The language of a single-language model, from its name or phonemizer settings."""
    parts = model_spec.split("/")
    if len(parts) == 4 and parts[0] == "tts_models" and parts[1] != "multilingual":
        return parts[1]
    phoneme_language = config.get("phoneme_language") if config is not None else None
    return str(phoneme_language) if phoneme_language else None


def _resolve_model(model: str) -> tuple[str, Path, Path]:
    """Find a model's checkpoint and config without downloading anything.

    Returns:
        The voice name, the checkpoint (a file, or the directory for XTTS) and
        the ``config.json`` path.

    Raises:
        FileNotFoundError: No such model directory, checkpoint or cached model.
    """
    path = Path(model).expanduser()
    if path.is_file():
        config_path = path.parent / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"Coqui checkpoint {path} has no config.json beside it")
        return path.parent.name, path, config_path
    if path.is_dir():
        return path.name, _checkpoint_in(path), path / "config.json"
    parts = model.split("/")
    if len(parts) == 4 and not model.startswith((".", "/", "~")):
        model_dir = _cached_model_dir(model)
        return model, _checkpoint_in(model_dir), model_dir / "config.json"
    raise FileNotFoundError(
        f"Coqui model {model!r} is neither a model directory, a checkpoint file nor a "
        "Coqui model name such as 'tts_models/en/ljspeech/vits'"
    )


def _checkpoint_in(model_dir: Path) -> Path:
    """The checkpoint to load from a model directory (the directory itself for XTTS)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"Coqui model directory {model_dir} has no config.json")
    try:
        model_type = str(json.loads(config_path.read_text(encoding="utf-8")).get("model", ""))
    except (OSError, ValueError) as exc:
        raise ValueError(f"invalid Coqui config {config_path}: {exc}") from exc
    if model_type.lower() == "xtts":
        return model_dir
    for name in _CHECKPOINT_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    checkpoints = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(_CHECKPOINT_SUFFIXES))
    checkpoints = [p for p in checkpoints if not p.name.startswith(("speakers", "model_se"))]
    if len(checkpoints) == 1:
        return checkpoints[0]
    if not checkpoints:
        raise FileNotFoundError(f"Coqui model directory {model_dir} has no .pth checkpoint")
    raise FileNotFoundError(
        f"Coqui model directory {model_dir} has several checkpoints "
        f"({', '.join(p.name for p in checkpoints)}); pass the checkpoint file instead"
    )


def _cached_model_dir(model_name: str) -> Path:
    """Locate a Coqui model in the local cache, failing rather than downloading it."""
    from TTS.utils.manage import ModelManager

    manager = ModelManager(progress_bar=False)
    model_type, lang, dataset, model = model_name.split("/")
    try:
        model_item = manager.models_dict[model_type][lang][dataset][model]
    except KeyError:
        raise FileNotFoundError(f"{model_name!r} is not a known Coqui model name") from None
    if "repo_id" in model_item:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(
                snapshot_download(
                    model_item["repo_id"],
                    allow_patterns=model_item.get("allow"),
                    ignore_patterns=model_item.get("ignore"),
                    local_files_only=True,
                )
            )
        except LocalEntryNotFoundError:
            raise FileNotFoundError(_not_cached(model_name)) from None
    model_dir = Path(manager.output_prefix) / f"{model_type}--{lang}--{dataset}--{model}"
    if not model_dir.is_dir():
        raise FileNotFoundError(_not_cached(model_name))
    return model_dir


def _not_cached(model_name: str) -> str:
    return (
        f"Coqui model {model_name!r} is not in the local cache and is never downloaded at run "
        f"time; fetch it beforehand (e.g. `tts --model_name {model_name} --list_language_idxs`) "
        "or pass a model directory"
    )
