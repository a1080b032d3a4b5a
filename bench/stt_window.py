"""``python -m bench.stt_window``: would a shorter Whisper window make STT fast enough after a turn ends?

faster-whisper pads every utterance's log-mel features to Whisper's 30 s window (3000 frames) before
CTranslate2's encoder runs; on a 2-core CPU that encoder pass dominates the transcription of a
short utterance. CTranslate2 accepts shorter inputs, so this compares, on the same Piper-rendered
sentences, the STT worker's decoding (``tiny.en``, int8, greedy) with the standard window against a
window cut to the utterance plus ``--pad`` seconds. It reports how many transcripts stay identical
and the median time of each; no figure is asserted. Results (docs/latency.md, "Tried and set aside")
decide whether such a window may be used: the platform's transcripts must not change.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
from faster_whisper import WhisperModel
from scipy.signal import resample_poly

from voice_stt.faster_whisper_engine import EMBEDDED_MODEL, resolve_model_path
from voicectl.speech import speak

SENTENCES = (
    "What time does the restaurant open on Sunday?",
    "I would like to book a table for two people tonight.",
    "Can you tell me a joke about penguins?",
    "How far is the moon from the earth?",
    "Hello.",
    "Yes, please.",
    "My account number is four five seven two nine one.",
    "I need to change my flight to Tuesday morning, and I want a window seat.",
    "What's the weather like in Paris tomorrow?",
    "Stop.",
    "Could you repeat that, please?",
    "I'd like to speak to a human agent right now.",
    "The quick brown fox jumps over the lazy dog.",
    "Please cancel my order number eight three one.",
    "Is the pharmacy open after nine in the evening?",
    "Thank you, goodbye.",
    "Hmm, let me think about it for a second, okay?",
    "I was wondering whether you could help me with my internet connection, because it keeps dropping "
    "every few minutes and I have a meeting soon.",
)


class ShortWindowWhisper(WhisperModel):
    """faster-whisper whose encoder sees only the utterance and some padding, not 30 s."""

    def __init__(self, *args, pad_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pad_frames = int(pad_s * 100)

    def encode(self, features: np.ndarray):
        batch = features if features.ndim == 3 else features[None]
        voiced = np.nonzero(np.any(batch != 0, axis=1))[-1]
        content = int(voiced.max()) + 1 if voiced.size else 1
        window = min(batch.shape[-1], int(math.ceil((content + self.pad_frames) / 100.0) * 100))
        return super().encode(features[..., :window])


def _transcribe(model: WhisperModel, audio: np.ndarray) -> tuple[str, float]:
    started = time.perf_counter()
    segments, _ = model.transcribe(audio, language="en", beam_size=1)
    text = " ".join(s.text.strip() for s in segments)
    return text, time.perf_counter() - started


def main() -> None:
    """Run the comparison and print one line per sentence and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pad", type=float, default=1.0, help="seconds of window after the utterance")
    args = parser.parse_args()
    path = resolve_model_path(EMBEDDED_MODEL)
    standard = WhisperModel(path, device="cpu", compute_type="int8", local_files_only=True)
    short = ShortWindowWhisper(path, device="cpu", compute_type="int8", local_files_only=True, pad_s=args.pad)
    same, times_standard, times_short = 0, [], []
    for sentence in SENTENCES:
        pcm, rate = speak(sentence)
        audio = pcm.astype(np.float32) / 32768.0 if pcm.dtype != np.float32 else pcm
        if rate != 16000:
            audio = resample_poly(audio, 16000, rate).astype(np.float32)
        text_standard, t_standard = _transcribe(standard, audio)
        text_short, t_short = _transcribe(short, audio)
        same += text_standard == text_short
        times_standard.append(t_standard)
        times_short.append(t_short)
        mark = "same" if text_standard == text_short else "DIFFERS"
        print(f"{mark:7} {t_standard:6.3f} s {t_short:6.3f} s  {text_standard!r}  ->  {text_short[:120]!r}")
    print(
        f"identical transcripts: {same}/{len(SENTENCES)}; median time standard "
        f"{statistics.median(times_standard):.3f} s, short window {statistics.median(times_short):.3f} s"
    )


if __name__ == "__main__":
    main()
