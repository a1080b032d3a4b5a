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

__all__ = ["CallScript", "HangUpWhenAnswered", "LiveCall", "ScriptedTimeline"]


class LiveCall(Protocol):
    """What a ``CallScript`` sees of a call in progress.

    Attributes:
        dialect: ``"twilio"``, ``"exotel"`` or ``"pcm"``.
        rate: The caller's (and the heard audio's) sample rate in Hz.
        end_s: When the caller hangs up, in seconds after connect.
    """

    dialect: str
    rate: int
    end_s: float  # a script may bring it forward to hang up sooner

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


class HangUpWhenAnswered(CallScript):
    """Hangs up once the agent has answered: its audio started after the caller's speech ended, and it has
    then been quiet for ``quiet_s``. The call's own end (``listen_s``) stays the longest wait, so a slow
    answer is waited for and a missing one still ends the call.

    Args:
        quiet_s: How long the agent must have been silent after its answer.
    """

    def __init__(self, quiet_s: float = 1.0) -> None:
        self.quiet_s = quiet_s
        self._speaking = 0
        self._caller_spoke = False
        self._answered = False
        self._quiet_since: float | None = None

    def on_event(self, call: LiveCall, t: float, what: str, details: dict[str, Any]) -> None:
        """Follows the caller's speech and the starts of the agent's audio."""
        if what == "caller speech start":
            self._speaking += 1
            self._answered = False
        elif what == "caller speech end":
            self._speaking = max(0, self._speaking - 1)
            self._caller_spoke = True
        elif what == "agent audio start" and self._caller_spoke and not self._speaking:
            self._answered = True

    def on_tick(self, call: LiveCall, t: float) -> None:
        """Brings the call's end forward once the answer has been followed by ``quiet_s`` of silence."""
        if not self._answered or call.agent_playing:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = t
        elif t - self._quiet_since >= self.quiet_s:
            call.end_s = min(call.end_s, t)


class ScriptedTimeline(CallTimeline):
    """A timeline that also tells a callback about every event as it is added."""

    def __init__(self, notify: Callable[[float, str, dict[str, Any]], None]) -> None:
        super().__init__()
        self._notify = notify

    def add(self, t: float, what: str, **details: Any) -> None:
        """Record an event at ``t`` seconds since connect and pass it on."""
        super().add(t, what, **details)
        self._notify(t, what, details)
