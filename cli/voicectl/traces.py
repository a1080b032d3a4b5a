"""``voicectl trace``: a call's spans as a waterfall, from the local trace file ``voicectl up`` writes.

``voicectl up`` (when no ``OTEL_*`` exporter is configured) runs a small OTLP receiver that appends
every span of every process to ``.run/traces.jsonl``. ``voicectl trace SESSION_ID`` finds the trace
whose ``session`` span carries ``voice.session_id`` = SESSION_ID and prints its tree: each span
indented under its parent, with the process (``service.name``), its start offset and duration in
milliseconds and a bar on the call's time line. ``--png OUT.png`` draws the same waterfall as an
image; ``voicectl trace --list`` shows the recent sessions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from voicectl.otlp_receiver import read_spans

DEFAULT_FILE = os.path.join(".run", "traces.jsonl")
TRACE_FILE_NAME = "traces.jsonl"

# Attributes worth showing next to a span's name in the waterfall.
_LABEL_ATTRIBUTES = ("voice.turn.kind", "voice.outcome", "voice.error")
_ANSI_COLORS = (36, 33, 35, 32, 34, 31, 96, 93)
_PNG_COLORS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (148, 103, 189),
    (214, 39, 40),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
)


@dataclass(frozen=True)
class Row:
    """One span of a waterfall, in display order.

    Attributes:
        span: The span (as the receiver stores it).
        depth: Nesting level: 0 for a root.
        start_ms: Start, in milliseconds after the trace's first span started.
        duration_ms: Duration in milliseconds.
    """

    span: dict
    depth: int
    start_ms: float
    duration_ms: float

    @property
    def label(self) -> str:
        """The span's name with its telling attributes, e.g. ``turn (audio)``; ``!`` marks an error."""
        attributes = self.span.get("attributes") or {}
        extra = [str(attributes[key]) for key in _LABEL_ATTRIBUTES if attributes.get(key) not in (None, "", "ok")]
        label = self.span.get("name", "?") + (f" ({', '.join(extra)})" if extra else "")
        return label + (" !" if self.span.get("status") == "ERROR" else "")

    @property
    def service(self) -> str:
        return self.span.get("service") or "?"


def session_spans(spans: list[dict]) -> list[dict]:
    """The ``session`` spans that carry a ``voice.session_id``, newest first."""
    found = [s for s in spans if s.get("name") == "session" and (s.get("attributes") or {}).get("voice.session_id")]
    return sorted(found, key=lambda s: s.get("start_ns", 0), reverse=True)


def find_trace(spans: list[dict], session_id: str) -> list[dict]:
    """Every span of the trace of ``session_id``; empty when it is not in ``spans``.

    The trace is the one whose ``session`` span has ``voice.session_id`` = ``session_id``. While a
    call is still running its ``session`` span is not exported yet; then the trace that most spans
    carrying that ``voice.session_id`` belong to is used.
    """
    sessions = [s for s in session_spans(spans) if s["attributes"]["voice.session_id"] == session_id]
    if sessions:
        trace_id = sessions[0]["trace_id"]
    else:
        votes = Counter(
            s["trace_id"] for s in spans if (s.get("attributes") or {}).get("voice.session_id") == session_id
        )
        if not votes:
            return []
        trace_id = votes.most_common(1)[0][0]
    return [s for s in spans if s.get("trace_id") == trace_id]


def waterfall(spans: list[dict]) -> list[Row]:
    """The spans of one trace as rows: depth-first, children after their parent by start time.

    A span whose parent is not among ``spans`` (not exported, or from outside) is shown as a root.
    """
    if not spans:
        return []
    unique = {s["span_id"]: s for s in spans}
    children: dict[str, list[dict]] = {}
    roots = []
    for span in unique.values():
        parent = span.get("parent_span_id") or ""
        if parent and parent in unique and parent != span["span_id"]:
            children.setdefault(parent, []).append(span)
        else:
            roots.append(span)
    origin = min(s.get("start_ns", 0) for s in unique.values())
    rows: list[Row] = []

    def visit(span: dict, depth: int) -> None:
        start, end = span.get("start_ns", origin), span.get("end_ns", 0)
        rows.append(Row(span, depth, (start - origin) / 1e6, max(0, end - start) / 1e6))
        for child in sorted(children.get(span["span_id"], ()), key=lambda s: s.get("start_ns", 0)):
            visit(child, depth + 1)

    for root in sorted(roots, key=lambda s: s.get("start_ns", 0)):
        visit(root, 0)
    return rows


def _total_ms(rows: list[Row]) -> float:
    return max((row.start_ms + row.duration_ms for row in rows), default=0.0)


def _header(rows: list[Row], session_id: str) -> str:
    trace_id = rows[0].span.get("trace_id", "?") if rows else "?"
    return f"session {session_id}  trace {trace_id}  {len(rows)} spans  {_total_ms(rows):.1f} ms"


def render_text(rows: list[Row], session_id: str = "", width: int = 0, color: bool = False) -> str:
    """The waterfall as text lines: process, indented span name, start, duration, and a time bar.

    Args:
        rows: From :func:`waterfall`.
        session_id: Shown in the header line.
        width: Characters per line; 0 for the terminal's width.
        color: Colour each bar by process with ANSI escapes.
    """
    width = width or shutil.get_terminal_size((120, 24)).columns
    total = _total_ms(rows) or 1.0
    service_w = min(18, max((len(r.service) for r in rows), default=7))
    label_w = min(56, max((2 * r.depth + len(r.label) for r in rows), default=4))
    fixed = service_w + 1 + label_w + 1 + 9 + 1 + 9 + 2
    bar_w = max(10, width - fixed - 1)
    block = "█" if _can_encode("█") else "#"
    services = list(dict.fromkeys(r.service for r in rows))
    lines = [
        _header(rows, session_id),
        f"{'process':<{service_w}} {'span':<{label_w}} {'start ms':>9} {'dur ms':>9} |{'':<{bar_w}}|",
    ]
    for row in rows:
        label = ("  " * row.depth + row.label)[:label_w]
        begin = min(bar_w - 1, int(row.start_ms / total * bar_w))
        end = min(bar_w, max(begin + 1, round((row.start_ms + row.duration_ms) / total * bar_w)))
        bar = block * (end - begin)
        if color:
            bar = f"\033[{_ANSI_COLORS[services.index(row.service) % len(_ANSI_COLORS)]}m{bar}\033[0m"
        lines.append(
            f"{row.service[:service_w]:<{service_w}} {label:<{label_w}} {row.start_ms:>9.1f} {row.duration_ms:>9.1f} "
            f"|{' ' * begin}{bar}{' ' * (bar_w - end)}|"
        )
    return "\n".join(lines)


def _can_encode(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _tick_ms(total_ms: float, ticks: int = 8) -> float:
    """A round tick interval (1, 2 or 5 times a power of ten) giving about ``ticks`` ticks."""
    raw = max(total_ms / ticks, 1e-3)
    magnitude = 10 ** int(f"{raw:e}".split("e")[1])
    for step in (1, 2, 5, 10):
        if raw <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def render_png(rows: list[Row], path: str | os.PathLike, session_id: str = "", width: int = 1400) -> Path:
    """Draws the waterfall as a PNG image (Pillow) and returns its path.

    Args:
        rows: From :func:`waterfall`.
        path: Where to write the image.
        session_id: Shown in the title.
        width: Image width in pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType support for the default font
        font = ImageFont.load_default()
    row_h, margin, top = 22, 12, 58
    services = list(dict.fromkeys(r.service for r in rows))
    color_of = {s: _PNG_COLORS[i % len(_PNG_COLORS)] for i, s in enumerate(services)}
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    service_w = max((measure.textlength(s, font=font) for s in services), default=40) + 16
    label_w = max((measure.textlength("   " * r.depth + r.label, font=font) for r in rows), default=60) + 16
    label_w = min(label_w, width * 0.35)
    bar_x0 = margin + service_w + label_w
    bar_x1 = width - margin - 70
    bar_w = max(50.0, bar_x1 - bar_x0)
    height = top + row_h * max(1, len(rows)) + margin
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    total = _total_ms(rows) or 1.0
    draw.text((margin, 8), _header(rows, session_id), fill="black", font=font)
    step = _tick_ms(total)
    tick = 0.0
    while tick <= total + 1e-9:
        x = bar_x0 + tick / total * bar_w
        draw.line([(x, top - 6), (x, height - margin)], fill=(225, 225, 225))
        text = f"{tick:g} ms"
        text_w = measure.textlength(text, font=font)
        draw.text(
            (x + 2 if x + 2 + text_w <= width - margin else x - 2 - text_w, top - 22),
            text,
            fill=(90, 90, 90),
            font=font,
        )
        tick += step
    for i, row in enumerate(rows):
        y = top + i * row_h
        if i % 2:
            draw.rectangle([(margin, y), (width - margin, y + row_h - 1)], fill=(246, 246, 246))
        color = color_of[row.service]
        draw.text((margin, y + 4), row.service, fill=color, font=font)
        label = "   " * row.depth + row.label
        while label and measure.textlength(label, font=font) > label_w - 8:
            label = label[:-2] + "…"
        draw.text((margin + service_w, y + 4), label, fill="black", font=font)
        x0 = bar_x0 + row.start_ms / total * bar_w
        x1 = max(x0 + 2, bar_x0 + (row.start_ms + row.duration_ms) / total * bar_w)
        draw.rectangle([(x0, y + 4), (x1, y + row_h - 5)], fill=color)
        text = f"{row.duration_ms:.1f} ms"
        text_w = measure.textlength(text, font=font)
        tx = x1 + 4 if x1 + 4 + text_w <= width - margin else x0 - 4 - text_w
        draw.text((tx, y + 4), text, fill=(60, 60, 60), font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


def render_list(spans: list[dict], limit: int = 20) -> str:
    """The most recent sessions of a trace file, one per line, newest first."""
    sessions = session_spans(spans)[:limit]
    counts = Counter(s.get("trace_id") for s in spans)
    lines = [f"{'started':<19}  {'session id':<36}  {'dialect':<8}  {'agent':<12}  {'dur s':>7}  {'turns':>5}  spans"]
    for session in sessions:
        attributes = session["attributes"]
        started = datetime.datetime.fromtimestamp(session.get("start_ns", 0) / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        duration = max(0, session.get("end_ns", 0) - session.get("start_ns", 0)) / 1e9
        lines.append(
            f"{started:<19}  {attributes['voice.session_id']:<36}  {attributes.get('voice.dialect', ''):<8}  "
            f"{attributes.get('voice.agent_id', ''):<12}  {duration:>7.1f}  "
            f"{attributes.get('voice.session.turns', ''):>5}  {counts[session.get('trace_id')]}"
        )
    return "\n".join(lines)


def add_parser(sub) -> None:
    """Adds ``trace`` to voicectl's subcommands."""
    trace = sub.add_parser(
        "trace",
        help="show a call's spans as a waterfall (from the trace file `voicectl up` writes)",
        description=(
            "Show a call's spans as a waterfall: each span under its parent, with its process, start offset and "
            "duration in ms and a bar on the call's time line. `voicectl up` writes the spans to .run/traces.jsonl "
            "when no OTEL_* exporter is configured."
        ),
    )
    trace.add_argument("session_id", nargs="?", help="the call's session id (the browser's callLogId)")
    trace.add_argument("--list", action="store_true", help="list the recent sessions instead")
    trace.add_argument("--file", default=DEFAULT_FILE, help=f"span file (default {DEFAULT_FILE})")
    trace.add_argument("--png", metavar="OUT.png", help="also draw the waterfall into this PNG file")
    trace.add_argument("--width", type=int, default=0, help="characters per line (default: the terminal's)")
    trace.add_argument("--limit", type=int, default=20, help="sessions shown by --list (default 20)")


def run(args: argparse.Namespace) -> int:
    """Runs ``voicectl trace``; returns the exit code."""
    if not args.list and not args.session_id:
        print("voicectl trace: give a session id, or --list", file=sys.stderr)
        return 2
    if not Path(args.file).exists():
        print(
            f"voicectl trace: no span file at {args.file}; `voicectl up` writes one when no OTEL_* exporter "
            "is configured (or pass --file)",
            file=sys.stderr,
        )
        return 1
    spans = read_spans(args.file)
    if args.list:
        print(render_list(spans, args.limit) if session_spans(spans) else f"no finished sessions in {args.file} yet")
        return 0
    trace_spans = find_trace(spans, args.session_id)
    if not trace_spans:
        print(f"voicectl trace: no spans of session {args.session_id} in {args.file}", file=sys.stderr)
        return 1
    rows = waterfall(trace_spans)
    print(render_text(rows, args.session_id, args.width, color=sys.stdout.isatty()))
    if args.png:
        print(f"wrote {render_png(rows, args.png, args.session_id)}")
    return 0
