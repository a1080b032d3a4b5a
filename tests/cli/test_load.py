"""``voicectl load`` against the real stack (concurrent real-time calls speaking Piper speech: the table, the
JSON report, the PNG latency plot), its error counting, and the report and plot from synthetic figures."""

from __future__ import annotations

import http.server
import io
import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from voicectl.__main__ import main
from voicectl.callers import trigger
from voicectl.gateway_api import put_agent, request
from voicectl.load import LoadOptions, LoadStats, Progress, build_report, render_png, render_utterances, table

API_KEY = "test-key"  # one of the keys the test gateway accepts (tests/support/gateway.py)
AGENT = {
    "name": "Load",
    "system_prompt": "You are a phone assistant. Answer in one short sentence.",
    "greeting": "Hello, how can I help?",
    "llm": {"temperature": 0.0, "max_tokens": 24},
}


def voicectl_load(capsys, tmp_path: Path, gateway_url: str, *args: str) -> tuple[int, str, dict]:
    """Run ``voicectl load`` in this process; returns the exit code, stdout + stderr and the JSON report."""
    out = tmp_path / "load.json"
    argv = ["load", "--gateway", gateway_url, "--agent", "load-test", "--api-key", API_KEY, "--seed", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--json", str(out), *args])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert out.exists(), output
    return exit_info.value.code, output, json.loads(out.read_text())


@pytest.fixture(scope="module")
def load_agent(gateway_url) -> str:
    put_agent(gateway_url, "load-test", AGENT, api_key=API_KEY)
    return gateway_url


def assert_healthy(code: int, output: str, report: dict, calls: int) -> None:
    assert code == 0, output
    assert report["calls_completed"] == calls and report["calls_placed"] == calls, output
    assert report["errors"] == {}, output
    assert report["turns"] >= calls, output
    v2v = report["voice_to_voice_s"]
    assert v2v["n"] == report["turns"] and 0.1 < v2v["p50"] < 10 and v2v["p50"] <= v2v["p95"] <= v2v["p99"]
    assert len({turn["call"] for turn in report["samples"]["turns"]}) == calls, output
    for line in ("calls ", "turns ", "errors ", "voice-to-voice p50", "voice-to-voice p95", "voice-to-voice p99"):
        assert line in output, output
    assert f"{report['turns']} answered" in output and "\r" not in output  # no progress bar off a terminal


def test_twilio_calls_with_barge_ins_and_a_png(load_agent, tmp_path, capsys):
    png = tmp_path / "load.png"
    code, output, report = voicectl_load(
        capsys, tmp_path, load_agent, "--dialect", "twilio", "--calls", "2", "--duration", "18", "--ramp", "1",
        "--barge-in-rate", "1", "--png", str(png),
    )  # fmt: skip
    assert_healthy(code, output, report, calls=2)
    barge = report["barge_ins"]
    assert barge["attempted"] >= 1 and barge["stopped"] == barge["attempted"], output
    assert 0.05 < barge["latency_s"]["p50"] < 1.0, output
    assert "stopped the agent, latency p50" in output
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1280, 560)
        assert len(image.convert("RGB").getcolors(1_000_000)) > 5


@pytest.mark.parametrize("dialect", ["pcm", "browser"])
def test_pcm_and_browser_calls(load_agent, tmp_path, capsys, dialect):
    code, output, report = voicectl_load(
        capsys, tmp_path, load_agent, "--dialect", dialect, "--calls", "2", "--duration", "12"
    )
    assert_healthy(code, output, report, calls=2)
    assert report["config"]["dialect"] == dialect
    if dialect == "browser":
        assert report["barge_ins"] is None and "n/a" in output


def test_errors_are_counted_by_kind(tmp_path, capsys):
    # Nothing listens on port 9: each call fails to connect, and the run is too short to retry.
    code, output, report = voicectl_load(capsys, tmp_path, "http://127.0.0.1:9", "--calls", "2", "--duration", "2")
    assert code == 1 and report["turns"] == 0 and report["calls_completed"] == 0
    assert report["errors"] == {"connect": 2}, output
    assert "errors              2: connect 2" in output


def test_report_table_and_png_from_synthetic_figures(tmp_path):
    stats = LoadStats(calls_placed=3, calls_completed=2)
    stats.turns += [(i % 2, i * 1.5, 1.0 + (i % 7) * 0.25) for i in range(40)]
    stats.barge_ins += [(0, 10.0, 0.3), (1, 20.0, None)]
    stats.error("closed by server", "close code 1011")
    report = build_report(LoadOptions(calls=2, duration_s=60, barge_in_rate=0.2), stats, 60.5)
    text = table(report)
    assert "3 placed, 2 completed" in text and "40 answered" in text
    assert "errors              1: closed by server 1" in text and "close code 1011" in text
    assert "1 of 2 stopped the agent, latency p50 300 ms" in text
    assert report["voice_to_voice_s"]["p50"] == pytest.approx(1.75)
    with Image.open(render_png(report, tmp_path / "plot.png")) as image:
        assert image.format == "PNG"


def test_rest_calls_carry_the_api_key():
    seen: list[tuple[str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, self.headers.get("Authorization")))
            body = json.dumps({"session_id": "s1", "websocket_url": "/ws/pcm/s1"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        ws_url, _ = trigger(url, {"agent_id": "default"}, "k1")
        assert request(url, "POST", "/api/x", {}, api_key="k2")["session_id"] == "s1"
    finally:
        server.shutdown()
    assert ws_url == f"ws://127.0.0.1:{server.server_port}/ws/pcm/s1"
    assert seen == [("/api/calls/trigger", "Bearer k1"), ("/api/x", "Bearer k2")]


async def test_speech_comes_from_the_tts_worker_without_piper(nats_url, tts_worker, monkeypatch):
    from voicectl import speech

    monkeypatch.setattr(speech, "piper_available", lambda: False)
    (spoken,) = await render_utterances(["Can you help me with my order?"], nats_url=nats_url)
    assert spoken.rate == 16000 and 1.0 < spoken.duration_s < 4.0
    assert 0 <= spoken.onset_s < spoken.last_voiced_s <= spoken.duration_s


def test_progress_line_redraws_in_place():
    stream = io.StringIO()
    progress = Progress(stream, enabled=True)
    stats = LoadStats(active=2)
    stats.turns.append((0, 1.0, 2.5))
    progress.show(15, 30, stats, 4)
    progress.show(30, 30, stats, 4)
    progress.done()
    first, second = stream.getvalue().split("\r")[1:]
    assert first.startswith("[############............]  50%    15/30 s  calls 2/4  turns 1  errors 0  v2v p50 2.50 s")
    assert second.startswith("[########################] 100%") and second.endswith("\n")
    quiet = io.StringIO()
    Progress(quiet).show(1, 30, stats, 4)  # a StringIO is no terminal
    assert quiet.getvalue() == ""
