"""A Piper voice's model cut in two, so that a sentence's audio comes out in pieces while it is decoded.

A Piper voice is one VITS graph: the text encoder, the duration predictor and the flow turn phonemes into
latent frames, and the HiFi-GAN decoder turns each frame into ``hop`` samples (256 at 22.05 kHz). The
decoder takes about two thirds of a sentence's time. Cut at the decoder's input, the front runs once per
sentence and the decoder runs on successive windows of frames, each with ``CONTEXT_FRAMES`` neighbouring
frames on both sides. The decoder is convolutional and sees fewer than that many frames around each one,
so the pieces join into the samples one pass over the sentence gives (to float rounding).

The first piece is short (``FIRST_PIECE_FRAMES``, about 0.28 s of speech), so a sentence's first audio is
ready after the front and one short decode instead of the whole sentence; each later piece is twice the
one before, and decodes in far less time than the previous piece takes to play.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime

__all__ = ["CONTEXT_FRAMES", "FIRST_PIECE_FRAMES", "SplitVoice"]

_LOGGER = logging.getLogger(__name__)

FIRST_PIECE_FRAMES = 24
"""Latent frames in a sentence's first piece (24 × 256 samples: 0.28 s at 22.05 kHz)."""

CONTEXT_FRAMES = 16
"""Frames decoded on each side of a piece and dropped; measured: 8 leave errors of 0.005, 16 none."""

# HiFi-GAN's first convolution; its weight keeps this name in every Piper export, whatever the node names.
_DECODER_WEIGHT = "dec.conv_pre.weight"


class SplitVoice:
    """The front (phonemes to latent frames) and the decoder (frames to samples) of one Piper voice.

    Both sessions are thread-safe; one ``SplitVoice`` serves every synthesis of its voice.
    """

    def __init__(self, front: onnxruntime.InferenceSession, decoder: onnxruntime.InferenceSession, latent: str) -> None:
        self._front = front
        self._decoder = decoder
        self._latent = latent
        self._decoder_inputs = {i.name for i in decoder.get_inputs()} - {latent}

    @classmethod
    def load(cls, model_path: Path, options: onnxruntime.SessionOptions, providers: list) -> SplitVoice | None:
        """Cuts the voice's model at its decoder's input.

        Args:
            model_path: The voice's ``.onnx`` file.
            options: Session options for both parts.
            providers: onnxruntime execution providers for both parts.

        Returns:
            The two parts, or ``None`` when the model has no decoder input to cut at (it is then run whole).
        """
        import onnx
        from onnx.utils import Extractor

        model = onnx.load(str(model_path))
        graph = model.graph
        cut = next(
            (n.input[0] for n in graph.node if n.op_type == "Conv" and list(n.input[1:2]) == [_DECODER_WEIGHT]),
            None,
        )
        if cut is None:
            _LOGGER.info("Piper voice %s has no %s: it is synthesized whole", model_path.name, _DECODER_WEIGHT)
            return None
        inputs = [i.name for i in graph.input]
        extractor = Extractor(model)
        try:
            front = extractor.extract_model(inputs, [cut])
            decoder = extractor.extract_model(
                [cut, *(name for name in inputs if name == "sid")], [graph.output[0].name]
            )
        except Exception:
            _LOGGER.warning("Piper voice %s could not be cut at its decoder: it is synthesized whole", model_path.name)
            return None
        sessions = [
            onnxruntime.InferenceSession(part.SerializeToString(), sess_options=options, providers=providers)
            for part in (front, decoder)
        ]
        return cls(sessions[0], sessions[1], cut)

    @property
    def front(self) -> onnxruntime.InferenceSession:
        """The session that turns phonemes into latent frames."""
        return self._front

    def pieces(self, feeds: dict[str, np.ndarray]) -> Iterator[tuple[np.ndarray, bool]]:
        """Synthesizes one run of phonemes in pieces.

        Args:
            feeds: The whole model's inputs (``input``, ``input_lengths``, ``scales``, ``sid`` if it has speakers).

        Yields:
            ``(samples, last)``: float samples of the next piece, and whether it is the last.
        """
        latent = self._front.run([self._latent], feeds)[0]
        extra = {name: feeds[name] for name in self._decoder_inputs if name in feeds}
        frames = latent.shape[-1]
        start, size = 0, FIRST_PIECE_FRAMES
        while start < frames:
            end = min(frames, start + size)
            if frames - end < CONTEXT_FRAMES:
                end = frames
            low, high = max(0, start - CONTEXT_FRAMES), min(frames, end + CONTEXT_FRAMES)
            window = np.ascontiguousarray(latent[:, :, low:high])
            audio = self._decoder.run(None, {self._latent: window, **extra})[0].reshape(-1)
            hop = audio.size // (high - low)
            yield audio[(start - low) * hop : (end - low) * hop], end == frames
            start, size = end, size * 2
