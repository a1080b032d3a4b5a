"""The report of ``voicectl load``: the summary (also its JSON), the text table and the PNG latency plot.

The PNG has two panels: the voice-to-voice distribution (histogram with its CDF and the p50/p95/p99
marks) and the latency of every turn and barge-in over the run's time. It is drawn with Pillow.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from voicectl.load.scenario import LoadOptions, LoadStats

__all__ = ["build_report", "latency_figures", "render_png", "table"]

_TURN_COLOR = (46, 110, 180)
_CDF_COLOR = (220, 110, 20)
_BARGE_COLOR = (200, 40, 60)
_GRID_COLOR = (225, 225, 225)
_AXIS_COLOR = (90, 90, 90)
_TEXT_COLOR = (30, 30, 30)
# Callers whose event loop wakes up later than this measure their own lateness too.
_LAG_WARNING_S = 0.05


def latency_figures(values: list[float]) -> dict[str, Any]:
    """Count, p50, p95, p99, mean, min and max of ``values`` (seconds); None figures for no values."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "min": None, "max": None}
    array = np.asarray(values, dtype=np.float64)
    return {
        "n": int(array.size),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "p99": float(np.percentile(array, 99)),
        "mean": float(array.mean()),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def build_report(options: LoadOptions, stats: LoadStats, elapsed_s: float) -> dict[str, Any]:
    """The run's report (what ``--json`` writes) from its options and what the calls measured.

    Args:
        options: What was run.
        stats: What the calls measured.
        elapsed_s: How long the run lasted.

    Returns:
        See ``voicectl.load.run_load``; ``stopped_early`` is False here.
    """
    carrier = options.dialect != "browser"
    stopped = [latency for _, _, latency in stats.barge_ins if latency is not None]
    return {
        "config": {
            "gateway": options.gateway,
            "dialect": options.dialect,
            "calls": options.calls,
            "duration_s": options.duration_s,
            "ramp_s": options.ramp_s,
            "barge_in_rate": options.barge_in_rate if carrier else 0.0,
            "agent": options.agent,
            "sample_rate": options.sample_rate if options.dialect in ("exotel", "plivo", "vonage") else None,
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": elapsed_s,
        "calls_placed": stats.calls_placed,
        "calls_completed": stats.calls_completed,
        "turns": len(stats.turns),
        "errors": dict(stats.errors),
        "error_examples": dict(stats.error_examples),
        "voice_to_voice_s": latency_figures([latency for _, _, latency in stats.turns]),
        "barge_ins": (
            {"attempted": len(stats.barge_ins), "stopped": len(stopped), "latency_s": latency_figures(stopped)}
            if carrier
            else None
        ),
        "underruns": stats.underruns if carrier else None,
        "unplanned_interruptions": stats.unplanned_interruptions if carrier else None,
        "caller_loop_lag_s": {
            name: value for name, value in latency_figures(stats.loop_lags).items() if name in ("p50", "p99", "max")
        },
        "stopped_early": False,
        "samples": {
            "turns": [{"call": c, "t_s": round(t, 3), "latency_s": round(v, 4)} for c, t, v in stats.turns],
            "barge_ins": [
                {"call": c, "t_s": round(t, 3), "latency_s": None if v is None else round(v, 4)}
                for c, t, v in stats.barge_ins
            ],
        },
    }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def table(report: dict[str, Any]) -> str:
    """The run's summary as a text table.

    Args:
        report: What ``voicectl.load.run_load`` returns.

    Returns:
        The table, one figure a line.
    """
    config = report["config"]
    errors = report["errors"]
    error_total = sum(errors.values())
    error_text = str(error_total)
    if errors:
        error_text += ": " + ", ".join(f"{kind} {count}" for kind, count in sorted(errors.items(), key=lambda e: -e[1]))
    v2v = report["voice_to_voice_s"]
    elapsed = max(report["elapsed_s"], 1e-9)
    rows = [
        ("calls", f"{report['calls_placed']} placed, {report['calls_completed']} completed, {config['calls']} at once"),
        ("turns", f"{report['turns']} answered ({report['turns'] / elapsed:.2f} a second)"),
        ("errors", error_text),
        ("voice-to-voice p50", _s(v2v["p50"])),
        ("voice-to-voice p95", _s(v2v["p95"])),
        ("voice-to-voice p99", _s(v2v["p99"])),
    ]
    barge = report["barge_ins"]
    if barge is None:
        rows.append(("barge-ins", "n/a (the browser protocol has none)"))
    elif not barge["attempted"] and not config["barge_in_rate"]:
        rows.append(("barge-ins", "none asked for (--barge-in-rate 0)"))
    else:
        text = f"{barge['stopped']} of {barge['attempted']} stopped the agent"
        if barge["stopped"]:
            text += f", latency p50 {_ms(barge['latency_s']['p50'])}"
        rows.append(("barge-ins", text))
    if report.get("underruns") is not None:
        rows.append(("playback underruns", str(report["underruns"])))
    lag = report.get("caller_loop_lag_s", {}).get("p99")
    if lag is not None:
        text = f"p99 {_ms(lag)}"
        if lag > _LAG_WARNING_S:
            text += " (this machine is too busy for its callers: the latencies above are inflated)"
        rows.append(("caller loop lag", text))
    head = (
        f"voicectl load: {config['calls']} {config['dialect']} calls for {config['duration_s']:g} s against "
        f"{config['gateway']} (agent {config['agent']}, ramp {config['ramp_s']:g} s"
        + (f", barge-in rate {config['barge_in_rate']:g}" if config["barge_in_rate"] else "")
        + ")"
        + (f", stopped after {report['elapsed_s']:.0f} s" if report.get("stopped_early") else "")
    )
    width = max(len(name) for name, _ in rows)
    lines = [head, ""] + [f"{name:<{width}}  {value}" for name, value in rows]
    for kind, example in sorted(report.get("error_examples", {}).items()):
        lines.append(f"  {kind}: {example}")
    return "\n".join(lines)


def _nice_step(span: float, ticks: int = 6) -> float:
    raw = max(span, 1e-9) / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _nice_top(value: float) -> float:
    step = _nice_step(value)
    return max(step, math.ceil(value / step) * step)


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1 or value == 0 else f"{value:.2g}"


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


class _Panel:
    """A plot area with linear axes: data coordinates to pixels, gridlines and tick labels."""

    def __init__(self, draw: Any, box: tuple[int, int, int, int], x_max: float, y_max: float, font: Any) -> None:
        self.draw = draw
        self.left, self.top, self.right, self.bottom = box
        self.x_max = x_max
        self.y_max = y_max
        self.font = font

    def px(self, x: float, y: float) -> tuple[float, float]:
        return (
            self.left + (self.right - self.left) * x / self.x_max,
            self.bottom - (self.bottom - self.top) * y / self.y_max,
        )

    def axes(self, x_title: str, y_title: str) -> None:
        draw = self.draw
        step = _nice_step(self.y_max, 5)
        value = 0.0
        while value <= self.y_max + 1e-9:
            _, y = self.px(0, value)
            draw.line([(self.left, y), (self.right, y)], fill=_GRID_COLOR)
            draw.text((self.left - 6, y), _label(value), fill=_AXIS_COLOR, font=self.font, anchor="rm")
            value += step
        step = _nice_step(self.x_max, 6)
        value = 0.0
        while value <= self.x_max + 1e-9:
            x, _ = self.px(value, 0)
            draw.line([(x, self.bottom), (x, self.bottom + 4)], fill=_AXIS_COLOR)
            draw.text((x, self.bottom + 6), _label(value), fill=_AXIS_COLOR, font=self.font, anchor="mt")
            value += step
        draw.rectangle([self.left, self.top, self.right, self.bottom], outline=_AXIS_COLOR)
        middle = (self.left + self.right) / 2
        draw.text((middle, self.bottom + 24), x_title, fill=_TEXT_COLOR, font=self.font, anchor="mt")
        draw.text((self.left, self.top - 8), y_title, fill=_TEXT_COLOR, font=self.font, anchor="ls")


def _dashed_vertical(draw: Any, x: float, top: float, bottom: float, color: tuple[int, int, int]) -> None:
    y = top
    while y < bottom:
        draw.line([(x, y), (x, min(bottom, y + 5))], fill=color, width=1)
        y += 9


def render_png(report: dict[str, Any], path: str | os.PathLike, width: int = 1280, height: int = 560) -> Path:
    """Draw the latency plot of a run.

    Args:
        report: What ``voicectl.load.run_load`` returns.
        path: Where to write the PNG.
        width: Image width in pixels.
        height: Image height in pixels.

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw

    font = _font(13)
    title_font = _font(16)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    config = report["config"]
    turns = report["samples"]["turns"]
    barge_ins = [b for b in report["samples"]["barge_ins"] if b["latency_s"] is not None]
    latencies = [t["latency_s"] for t in turns]
    errors = sum(report["errors"].values())
    draw.text(
        (24, 16),
        f"voicectl load: {config['calls']} {config['dialect']} calls, {config['duration_s']:g} s, "
        f"{report['turns']} turns, {errors} errors",
        fill=_TEXT_COLOR,
        font=title_font,
    )
    half = width // 2
    top, bottom = 80, height - 60

    # Left: the voice-to-voice distribution.
    if latencies:
        x_max = _nice_top(max(latencies) * 1.05)
        bins = int(min(40, max(8, math.sqrt(len(latencies)) * 2)))
        counts, edges = np.histogram(latencies, bins=bins, range=(0.0, x_max))
        left = _Panel(draw, (70, top, half - 60, bottom), x_max, _nice_top(max(1, int(counts.max())) * 1.1), font)
        left.axes("voice-to-voice latency (s)", "turns")
        for count, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
            if count:
                x0, y0 = left.px(lo, count)
                x1, y1 = left.px(hi, 0)
                draw.rectangle([x0 + 1, y0, x1 - 1, y1], fill=_TURN_COLOR)
        ordered = np.sort(np.asarray(latencies))
        cdf = np.arange(1, ordered.size + 1) / ordered.size
        points = [(left.left, left.bottom)]
        for value, fraction in zip(ordered, cdf, strict=True):
            x, _ = left.px(float(value), 0)
            points.append((x, points[-1][1]))
            points.append((x, left.bottom - (left.bottom - left.top) * fraction))
        points.append((left.right, left.top))
        draw.line(points, fill=_CDF_COLOR, width=2)
        for fraction in (0.5, 1.0):
            y = left.bottom - (left.bottom - left.top) * fraction
            draw.text((left.right + 6, y), f"{fraction:.0%}", fill=_CDF_COLOR, font=font, anchor="lm")
        figures = report["voice_to_voice_s"]
        for index, name in enumerate(("p50", "p95", "p99")):
            x, _ = left.px(figures[name], 0)
            _dashed_vertical(draw, x, left.top, left.bottom, _AXIS_COLOR)
            draw.text(
                (x + 3, left.top + 4 + 16 * index),
                f"{name} {figures[name]:.2f} s",
                fill=_TEXT_COLOR,
                font=font,
            )
        draw.text((left.right - 4, top - 8), "CDF", fill=_CDF_COLOR, font=font, anchor="rs")
    else:
        draw.text((half / 2, (top + bottom) / 2), "no answered turns", fill=_TEXT_COLOR, font=font, anchor="mm")

    # Right: latency over the run.
    values = latencies + [b["latency_s"] for b in barge_ins]
    if values:
        times = [t["t_s"] for t in turns] + [b["t_s"] for b in barge_ins]
        right = _Panel(
            draw,
            (half + 60, top, width - 40, bottom),
            _nice_top(max([config["duration_s"], *times])),
            _nice_top(max(values) * 1.05),
            font,
        )
        right.axes("time since the start of the run (s)", "latency (s)")
        for turn in turns:
            x, y = right.px(turn["t_s"], turn["latency_s"])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_TURN_COLOR)
        for barge in barge_ins:
            x, y = right.px(barge["t_s"], barge["latency_s"])
            draw.polygon([(x, y - 4), (x - 4, y + 3), (x + 4, y + 3)], fill=_BARGE_COLOR)
        legend_x = right.right - 200
        draw.ellipse([legend_x, top + 8, legend_x + 6, top + 14], fill=_TURN_COLOR)
        draw.text((legend_x + 12, top + 11), "voice-to-voice", fill=_TEXT_COLOR, font=font, anchor="lm")
        if barge_ins:
            draw.polygon([(legend_x + 3, top + 24), (legend_x, top + 31), (legend_x + 6, top + 31)], fill=_BARGE_COLOR)
            draw.text((legend_x + 12, top + 28), "barge-in (onset to stop)", fill=_TEXT_COLOR, font=font, anchor="lm")
    out = Path(path)
    image.save(out, format="PNG")
    return out
