"""``voicectl load``: many concurrent real-time calls against a running gateway, turn after turn.

The command and its help are in ``command.py``; what the callers say and how they take turns in
``scenario.py``; placing and replacing the calls in ``runner.py``; the table, JSON and PNG in ``report.py``.
"""

from __future__ import annotations

from voicectl.load.command import add_parser, run
from voicectl.load.report import build_report, latency_figures, render_png, table
from voicectl.load.runner import DIALECTS, Progress, run_load
from voicectl.load.scenario import INTERRUPTION, QUESTIONS, LoadOptions, LoadStats, Utterance, render_utterances

__all__ = [
    "DIALECTS",
    "INTERRUPTION",
    "QUESTIONS",
    "LoadOptions",
    "LoadStats",
    "Progress",
    "Utterance",
    "add_parser",
    "build_report",
    "latency_figures",
    "render_png",
    "render_utterances",
    "run",
    "run_load",
    "table",
]
