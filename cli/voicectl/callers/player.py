"""The caller's earpiece: a real-time playback buffer for agent audio and marks, on the call's clock.

Agent audio is queued as it arrives and played at the sample rate; marks are reached when everything
queued before them has played. What was played is kept (unless told not to), so a call's result holds what
the caller actually heard, and when playback ran dry (underruns).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["UNDERRUN_S", "Player"]

# Playback that runs dry and resumes within this long is one stretch with an underrun, not two.
UNDERRUN_S = 0.25


@dataclass
class _Chunk:
    samples: np.ndarray
    pos: int = 0

    @property
    def remaining(self) -> int:
        return self.samples.size - self.pos


class Player:
    """A real-time playback buffer on the call clock: audio chunks and marks, played in order.

    Playback that runs dry and resumes within ``UNDERRUN_S`` is one stretch with an underrun, not two.
    With ``keep=False`` the played audio is not kept (``heard`` and ``track`` are empty).
    """

    def __init__(self, rate: int, on_event: Callable[[float, str, dict[str, Any]], None], keep: bool = True) -> None:
        self.rate = rate
        self.keep = keep
        self.pieces: list[tuple[int, np.ndarray]] = []
        self.underruns = 0
        self.underrun_s = 0.0
        self._on_event = on_event
        self._queue: deque[_Chunk | str] = deque()
        self._cursor = 0
        self._playing = False
        self._ended_at: float | None = None
        self._stretch_underruns = 0
        self._stretch_gap_s = 0.0

    @property
    def playing(self) -> bool:
        return self._playing

    def queued_samples(self) -> int:
        return sum(item.remaining for item in self._queue if isinstance(item, _Chunk))

    def _end(self, t: float, **details: Any) -> None:
        if self._stretch_underruns:
            details.update(underruns=self._stretch_underruns, underrun_ms=round(self._stretch_gap_s * 1000))
        self._on_event(t, "playback end", details)
        self._stretch_underruns = 0
        self._stretch_gap_s = 0.0

    def flush(self, now: float) -> None:
        """Report a pending end of playback once it is certainly not an underrun (or at the end)."""
        if self._ended_at is not None and not self._playing:
            self._end(self._ended_at)
            self._ended_at = None

    def advance(self, now: float) -> list[str]:
        """Play everything due up to ``now``; returns the marks playback reached."""
        target = int(now * self.rate)
        reached: list[str] = []
        while self._queue:
            head = self._queue[0]
            if isinstance(head, str):
                reached.append(self._queue.popleft())
                continue
            room = target - self._cursor
            if room <= 0:
                break
            take = min(room, head.remaining)
            if self.keep:
                self.pieces.append((self._cursor, head.samples[head.pos : head.pos + take]))
            head.pos += take
            self._cursor += take
            if head.remaining == 0:
                self._queue.popleft()
        if self._playing and not any(isinstance(item, _Chunk) for item in self._queue):
            self._playing = False
            self._ended_at = self._cursor / self.rate
        if self._ended_at is not None and now - self._ended_at >= UNDERRUN_S:
            self.flush(now)
        return reached

    def push_audio(self, now: float, samples: np.ndarray) -> list[str]:
        """Queue received audio; returns the marks reached while catching up to ``now``."""
        reached = self.advance(now)
        if samples.size == 0:
            return reached
        if not self._playing:
            if self._ended_at is not None:
                gap = now - self._ended_at
                self.underruns += 1
                self.underrun_s += gap
                self._stretch_underruns += 1
                self._stretch_gap_s += gap
                self._ended_at = None
            else:
                self._on_event(now, "playback start", {})
            self._cursor = max(self._cursor, int(now * self.rate))
            self._playing = True
        self._queue.append(_Chunk(samples))
        return reached

    def push_mark(self, now: float, name: str) -> list[str]:
        """Queue a mark; returns the marks reached (this one too if nothing is left to play before it)."""
        reached = self.advance(now)
        self._queue.append(name)
        return reached + self.advance(now)

    def clear(self, now: float, *, keep_current: bool) -> tuple[list[str], int, list[str]]:
        """Drop unplayed audio.

        Returns:
            ``(marks reached before the clear, samples dropped, pending marks dropped)``.
        """
        reached = self.advance(now)
        self.flush(now)
        kept: _Chunk | None = None
        if keep_current and self._queue and isinstance(self._queue[0], _Chunk) and self._queue[0].pos > 0:
            kept = self._queue.popleft()
        dropped = self.queued_samples()
        pending = [item for item in self._queue if isinstance(item, str)]
        self._queue.clear()
        if kept is not None:
            self._queue.append(kept)
        elif self._playing:
            self._playing = False
            self._end(now, cut=True)
        return reached, dropped, pending

    def heard(self) -> np.ndarray:
        if not self.pieces:
            return np.zeros(0, np.int16)
        return np.concatenate([piece for _, piece in self.pieces]).astype(np.int16, copy=False)

    def track(self, duration_s: float) -> np.ndarray:
        if not self.keep:
            return np.zeros(0, np.int16)
        end = max([int(duration_s * self.rate)] + [pos + piece.size for pos, piece in self.pieces])
        out = np.zeros(end, np.int16)
        for pos, piece in self.pieces:
            out[pos : pos + piece.size] = piece
        return out
