"""The local trace view: the receiver's span file, `voicectl up`'s choice to run one, and `voicectl trace`.

The rendering is checked on a synthetic span file; the end-to-end test has real STT and TTS workers
export to the receiver and runs ``python -m voicectl trace`` on the file they filled.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.observability.conftest import traced_call
from voicectl import traces
from voicectl.otlp_receiver import OtlpReceiver, read_spans
from voicectl.stack import local_trace_receiver

T0 = 1_700_000_000_000_000_000
MS = 1_000_000


def span(name, span_id, parent, service, start_ms, duration_ms, trace_id="a" * 32, **attributes) -> dict:
    return {
        "trace_id": trace_id,
        "span_id": span_id.ljust(16, "0"),
        "parent_span_id": parent.ljust(16, "0") if parent else "",
        "name": name,
        "kind": "INTERNAL",
        "service": service,
        "start_ns": T0 + int(start_ms * MS),
        "end_ns": T0 + int((start_ms + duration_ms) * MS),
        "status": "UNSET",
        "status_message": "",
        "attributes": {"voice.session_id": "call-1", **attributes},
        "events": [],
    }


SYNTHETIC = [
    span("session", "1", "", "voice-gateway", 0, 4000, **{"voice.dialect": "browser", "voice.session.turns": 2}),
    span("turn", "2", "1", "voice-gateway", 10, 1000, **{"voice.turn.kind": "greeting"}),
    span("tts.synthesize", "4", "3", "voice-tts", 30, 900),  # listed before its parent on purpose
    span("tts.work", "3", "2", "voice-tts", 20, 950),
    span("turn", "5", "1", "voice-gateway", 2000, 2000, **{"voice.turn.kind": "audio"}),
    span("stt.transcribe", "6", "5", "voice-stt", 2010, 500),
    span("llm.generate SmolLM2", "7", "5", "voice-llm", 2600, 1000),
    span("session", "8", "", "voice-gateway", 0, 100, trace_id="b" * 32, **{"voice.session_id": "call-2"}),
]


@pytest.fixture
def span_file(tmp_path) -> Path:
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in SYNTHETIC) + '{"half a line')
    return path


def test_waterfall_orders_spans_depth_first_under_their_parents(span_file):
    rows = traces.waterfall(traces.find_trace(read_spans(span_file), "call-1"))
    assert [(r.depth, r.span["name"]) for r in rows] == [
        (0, "session"),
        (1, "turn"),
        (2, "tts.work"),
        (3, "tts.synthesize"),
        (1, "turn"),
        (2, "stt.transcribe"),
        (2, "llm.generate SmolLM2"),
    ]
    assert rows[2].start_ms == pytest.approx(20.0) and rows[2].duration_ms == pytest.approx(950.0)
    assert rows[1].label == "turn (greeting)"


def test_text_waterfall_has_columns_and_bars_scaled_to_the_width(span_file):
    rows = traces.waterfall(traces.find_trace(read_spans(span_file), "call-1"))
    text = traces.render_text(rows, "call-1", width=100)
    lines = text.splitlines()
    assert (
        lines[0].startswith("session call-1  trace " + "a" * 32) and "7 spans" in lines[0] and "4000.0 ms" in lines[0]
    )
    assert all(len(line) == 100 for line in lines[1:]), lines
    body = lines[2:]
    assert body[0].startswith("voice-gateway session ")
    synth = next(line for line in body if "tts.synthesize" in line)
    assert synth.startswith("voice-tts") and "      tts.synthesize" in synth
    assert "30.0" in synth and "900.0" in synth
    bars = [line[line.index("|") + 1 : -1] for line in body]
    full = bars[0].strip()
    assert len(full) == len(bars[0])  # the session spans the whole call
    llm = bars[-1]
    start = len(llm) - len(llm.lstrip())
    assert start == pytest.approx(0.65 * len(llm), abs=1)  # starts at 2600 of 4000 ms
    assert len(llm.strip()) == pytest.approx(0.25 * len(llm), abs=1)


def test_png_waterfall(span_file, tmp_path):
    rows = traces.waterfall(traces.find_trace(read_spans(span_file), "call-1"))
    out = traces.render_png(rows, tmp_path / "out" / "call.png", "call-1", width=1000)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width == 1000 and image.height > 22 * len(rows)
        colors = {color for _, color in image.convert("RGB").getcolors(1_000_000)}
    assert len(colors) > 5  # bars in several process colours, not a blank image


def test_list_and_missing_sessions(span_file, capsys):
    listing = traces.render_list(read_spans(span_file))
    assert listing.index("call-1") > 0 and "call-2" in listing
    assert traces.find_trace(read_spans(span_file), "nobody") == []
    args = ["trace", "nobody", "--file", str(span_file)]
    with pytest.raises(SystemExit) as exit_info:
        from voicectl.__main__ import main

        main(args)
    assert exit_info.value.code == 1
    assert "no spans of session nobody" in capsys.readouterr().err


def test_a_running_call_is_found_by_its_spans_before_the_session_span_ends(span_file):
    running = [s for s in read_spans(span_file) if s["name"] != "session"]
    assert {s["trace_id"] for s in traces.find_trace(running, "call-1")} == {"a" * 32}


def test_receiver_appends_json_lines_and_moves_a_full_file_aside(tmp_path):
    path = tmp_path / "spans" / "traces.jsonl"
    receiver = OtlpReceiver(path, keep=False, max_bytes=200)
    try:
        receiver.add(SYNTHETIC[:2])
        receiver.add(SYNTHETIC[2:])
    finally:
        receiver.stop()
    assert receiver.spans == []
    assert path.with_name("traces.jsonl.1").exists()
    assert [s["span_id"] for s in read_spans(path)] == [s["span_id"] for s in SYNTHETIC]


def test_voicectl_up_runs_a_receiver_only_without_an_otel_choice(tmp_path):
    for chosen in (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"},
        {"OTEL_TRACES_EXPORTER": "console"},
        {"OTEL_SDK_DISABLED": "true"},
    ):
        assert local_trace_receiver(str(tmp_path), chosen) is None
    receiver = local_trace_receiver(str(tmp_path), {"PATH": "/usr/bin"})
    try:
        assert receiver.path == (tmp_path / "traces.jsonl").resolve()
        env = receiver.env()
        assert all(name.startswith("OTEL_") for name in env)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == receiver.endpoint
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    finally:
        receiver.stop()


async def test_voicectl_trace_shows_a_call_served_by_real_workers(default_stack, tmp_path):
    session_id = f"obs-{uuid.uuid4().hex[:12]}"
    await traced_call(default_stack, session_id, "Hello there. How can I help you today?")
    png = tmp_path / "call.png"
    trace_file = str(default_stack.trace_file)
    result = await asyncio.to_thread(
        voicectl, "trace", session_id, "--file", trace_file, "--width", "120", "--png", str(png)
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"session {session_id}  trace ")
    for process, name in (
        ("voice-test-caller", "session"),
        ("voice-tts", "tts.work"),
        ("voice-tts", "tts.synthesize"),
        ("voice-stt", "stt.transcribe"),
    ):
        line = next(line for line in lines if f" {name} " in line)
        assert line.startswith(process), line
    indent = {name: next(line for line in lines if f" {name} " in line).index(name) for name in ("turn", "tts.work")}
    assert indent["tts.work"] > indent["turn"]
    assert all(len(line) == 120 for line in lines[1:-1]) and lines[-1] == f"wrote {png}"
    with Image.open(png) as image:
        assert image.format == "PNG"
    listing = await asyncio.to_thread(voicectl, "trace", "--list", "--file", trace_file)
    assert listing.returncode == 0 and session_id in listing.stdout


def voicectl(*args: str) -> subprocess.CompletedProcess:
    """Runs ``python -m voicectl ARGS`` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "voicectl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_workers_expose_their_metrics_on_the_metrics_port(default_stack):
    worker = default_stack.workers["tts"]
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for series in (
        'voice_worker_slots{service="tts"}',
        'voice_worker_consumer_pending{service="tts"}',
        'voice_worker_consumer_ack_pending{service="tts"}',
        'voice_worker_in_flight{service="tts",transport="bus"}',
        'voice_worker_errors_total{kind="internal",service="tts",transport="bus"}',
        "voice_tts_time_to_first_byte_seconds_bucket",
    ):
        assert series in text, series
