"""The caller's side of a simulated call: utterances placed on the call's clock, mixed frame by frame.

Utterances may overlap (a barge-in over earlier speech): the frames they share are mixed and clipped to
int16. Speech past the end of the call is cut off.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

__all__ = ["CallerTrack", "Segment"]


@dataclass
class Segment:
    """One utterance of the caller, at the call's sample rate.

    Attributes:
        index: Its number in the call, in the order utterances were placed.
        start_s: When it starts, in call seconds.
        samples: int16 mono samples.
        last_voiced_s: Offset of its last voiced sample (see ``last_voiced_s``), None if silent.
        first_frame: The first caller frame it sounds in (-1 if it is past the end of the call).
        last_frame: The last caller frame it sounds in (-1 if it is past the end of the call).
        start: Its first sample on the call's track.
        stop: One past its last sample on the call's track (clipped at the end of the call).
    """

    index: int
    start_s: float
    samples: np.ndarray
    last_voiced_s: float | None
    first_frame: int = 0
    last_frame: int = 0
    start: int = 0
    stop: int = 0


class CallerTrack:
    """What the caller says over the call: segments yet to start (by start sample) and those sounding now.

    Args:
        rate: The call's sample rate in Hz.
        frame: Samples in one caller frame.
        end_s: When the call ends, in call seconds.
        segments: The utterances known up front.
    """

    def __init__(self, rate: int, frame: int, end_s: float, segments: list[Segment]) -> None:
        self.rate = rate
        self.frame = frame
        self.segments: list[Segment] = []
        self.length = int(np.ceil(end_s * rate / frame)) * frame + frame
        self._upcoming: list[Segment] = []
        self._active: list[Segment] = []
        self._silence = np.zeros(frame, np.int16)
        for seg in segments:
            self.place(seg)

    def place(self, seg: Segment) -> None:
        """Put a segment on the caller's track (clipped at the end of the call)."""
        self.segments.append(seg)
        seg.start = round(seg.start_s * self.rate)
        seg.stop = min(self.length, seg.start + seg.samples.size)
        if seg.stop > seg.start:
            seg.first_frame = seg.start // self.frame
            seg.last_frame = (seg.stop - 1) // self.frame
            bisect.insort(self._upcoming, seg, key=lambda other: other.start)
        else:
            seg.first_frame = seg.last_frame = -1

    def frame_audio(self, k: int) -> tuple[np.ndarray, list[Segment]]:
        """Caller frame ``k`` and the segments sounding in it (frames are asked for in order)."""
        lo = k * self.frame
        hi = lo + self.frame
        while self._upcoming and self._upcoming[0].start < hi:
            self._active.append(self._upcoming.pop(0))
        sounding = self._active
        if not sounding:
            return self._silence, []
        self._active = [seg for seg in sounding if seg.last_frame > k]
        if len(sounding) == 1 and sounding[0].start <= lo and sounding[0].stop >= hi:
            seg = sounding[0]
            return seg.samples[lo - seg.start : hi - seg.start], sounding
        mix = np.zeros(self.frame, np.int32)
        for seg in sounding:
            a, b = max(lo, seg.start), min(hi, seg.stop)
            if b > a:
                mix[a - lo : b - lo] += seg.samples[a - seg.start : b - seg.start]
        return np.clip(mix, -32768, 32767).astype(np.int16), sounding

    def last_voiced(self, stream_end: float) -> float | None:
        """Call time of the last voiced sample the caller got to say before the stream ended at ``stream_end``."""
        ends = [
            min(seg.start_s + seg.last_voiced_s, stream_end)
            for seg in self.segments
            if seg.last_voiced_s is not None and seg.start_s < stream_end
        ]
        return max(ends, default=None)
