"""Callers that decide during the call what they say: ``CallScript`` and what it sees of a call (``LiveCall``).

A script gets the call's timeline events as they happen and a tick about every 10 ms, and may ``say`` more
(turn-taking and barging in: what ``voicectl load`` does). Scripted or not, every call runs the same loop
(``base.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from voicectl.callers.result import CallTimeline

__all__ = ["CallScript", "LiveCall", "ScriptedTimeline"]


class LiveCall(Protocol):
    """What a ``CallScript`` sees of a call in progress.

    Attributes:
        dialect: ``"twilio"``, ``"exotel"`` or ``"pcm"``.
        rate: The caller's (and the heard audio's) sample rate in Hz.
        end_s: When the caller hangs up, in seconds after connect.
    """

    dialect: str
    rate: int
    end_s: float

    def now(self) -> float:
        """Seconds since the WebSocket opened."""
        ...

    @property
    def agent_playing(self) -> bool:
        """Whether agent audio is playing or queued for playback right now."""
        ...

    def say(self, samples: np.ndarray, at_s: float | None = None) -> float:
        """Speak ``samples`` (int16 mono at ``rate``), mixed over anything else the caller is saying.

        Args:
            samples: What to say.
            at_s: When to start, in call seconds; by default (and at the earliest) the next frame not yet sent.

        Returns:
            When the speech starts, in call seconds (speech starting after ``end_s`` is never sent).
        """
        ...


class CallScript:
    """Decides during a call what the caller says; subclass and override what you need.

    The methods run on the call's event loop and must not block; they may call ``call.say``. An exception
    raised by one ends the call and propagates out of ``call()``.
    """

    def on_start(self, call: LiveCall) -> None:
        """The WebSocket is open and the carrier's opening messages were sent."""

    def on_event(self, call: LiveCall, t: float, what: str, details: dict[str, Any]) -> None:
        """An event was added to the call's timeline (see ``CallTimeline``) at ``t`` call seconds."""

    def on_tick(self, call: LiveCall, t: float) -> None:
        """Called about every 10 ms while the call is up."""


class ScriptedTimeline(CallTimeline):
    """A timeline that also tells a callback about every event as it is added."""

    def __init__(self, notify: Callable[[float, str, dict[str, Any]], None]) -> None:
        super().__init__()
        self._notify = notify

    def add(self, t: float, what: str, **details: Any) -> None:
        """Record an event at ``t`` seconds since connect and pass it on."""
        super().add(t, what, **details)
        self._notify(t, what, details)
