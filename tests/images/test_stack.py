"""The stack run from the built images and the chart's own manifests (``make images-test``).

Every container reaches healthy through the checks its chart probes make and runs as the non-root
user on a read-only root; a Twilio call through the containerised gateway is answered and the answer
is heard; the chart's ``helm test`` pods pass; a webhook tool on an allowed network is reached and a
private address beyond it refused; the gateway's preStop lets a call finish and SIGTERM
drains a worker as the chart's preStop and grace period expect. The tests run in this order (the
last two stop the gateway and the TTS worker).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.gateway.test_chat import ChatClient
from tests.gateway.webhooks import WebhookServer
from tests.images.conftest import STARTUP_S, Stack, podman, wait_for
from tests.support.speech import speak
from voice_audio import read_wav, wav_bytes

VOICECTL = Path(sys.executable).with_name("voicectl")
SENTENCE = "Hello, could you tell me what a good name for a small black cat would be?"
# Long enough that the TTS worker is still speaking it when SIGTERM arrives.
LONG_TEXT = " ".join(
    f"This is sentence number {n} of a long announcement that keeps the speech worker busy." for n in range(1, 25)
)
# The gateway's key in deploy/images/podman-values.yaml.
API_KEY = "images-test-key"
pytestmark = pytest.mark.timeout(1500)


def probe_passes(stack: Stack, container: dict[str, Any], probe: dict[str, Any]) -> bool:
    """Makes the check the kubelet makes for ``probe``, through the port published on 127.0.0.1."""
    if "grpc" in probe:
        port = stack.host_port(probe["grpc"]["port"])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                    timeout=probe["timeoutSeconds"],
                )
            except grpc.RpcError:
                return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING
    action = probe["httpGet"]
    port = action["port"]
    if not isinstance(port, int):
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
    url = f"http://127.0.0.1:{stack.host_port(port)}{action['path']}"
    try:
        with urllib.request.urlopen(url, timeout=probe["timeoutSeconds"]) as response:
            return 200 <= response.status < 400
    except (urllib.error.URLError, OSError):
        return False


def chart_containers(stack: Stack) -> list[dict[str, Any]]:
    """The containers the chart renders (the NATS stand-in left out)."""
    return [
        c for d in stack.objects if d.get("kind") == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]
    ]


def metric(stack: Stack, port: int, name: str, path: str = "/metrics", **labels: str) -> float:
    """One sample of a Prometheus metric served on a container's metrics port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.host_port(port)}{path}", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_every_container_becomes_healthy_through_the_charts_probes(stack: Stack) -> None:
    for container in chart_containers(stack):
        name = container["name"]

        def started(container=container) -> bool:
            assert stack.state(container["name"])["Status"] == "running", stack.logs(container["name"])[-3000:]
            return probe_passes(stack, container, container["startupProbe"])

        wait_for(started, STARTUP_S, f"{name}'s startup probe")
        assert probe_passes(stack, container, container["readinessProbe"]), name
        assert probe_passes(stack, container, container["livenessProbe"]), name
    # The image's own HEALTHCHECK command agrees, from inside each container.
    for name in ("stt", "llm", "tts"):
        assert podman("exec", stack.container(name), "voice-probe", "grpc", check=False).returncode == 0, name
    gateway_check = podman(
        "exec", stack.container("gateway"), "voice-probe", "http", "http://127.0.0.1:8000/healthz", check=False
    )
    assert gateway_check.returncode == 0


def test_containers_run_as_the_non_root_user_on_a_read_only_root(stack: Stack) -> None:
    security = stack.pod["spec"]["securityContext"]
    for container in stack.pod["spec"]["containers"]:
        name = container["name"]
        inspect = podman(
            "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}", stack.container(name)
        )
        read_only, user = inspect.stdout.split()
        assert read_only == ("true" if container["securityContext"]["readOnlyRootFilesystem"] else "false"), name
        assert user.split(":")[0] == str(security["runAsUser"]), f"{name} runs as {user}"
        if name == "nats":
            continue  # a scratch image: no shell to look from inside
        script = (
            "import os, pathlib\n"
            "print(os.getuid(), os.getgid())\n"
            "pathlib.Path('/tmp/probe').write_text('ok')\n"
            "try:\n    pathlib.Path('/opt/venv/probe').write_text('no')\nexcept OSError as exc:\n    print(exc.errno)\n"
        )
        done = podman("exec", stack.container(name), "python", "-c", script)
        uid_gid, errno = done.stdout.split("\n")[:2]
        assert uid_gid == f"{security['runAsUser']} {security['runAsGroup']}", name
        assert errno == "30", f"{name}: the root filesystem is writable ({done.stdout!r})"  # EROFS


def test_the_gateways_pre_stop_drain_reads_its_sessions(stack: Stack, deployments: dict[str, Any]) -> None:
    """The chart's preStop command finds the gateway's session gauge (a wrong port would print 'unknown')."""
    container = deployments["gateway"]["container"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["voice-probe", "drain"], pre_stop
    done = podman("exec", stack.container("gateway"), *pre_stop)
    assert "voice-probe drain: 0.0 session(s) left" in done.stdout, done.stdout + done.stderr


def test_a_twilio_call_through_the_gateway_is_answered_and_heard(stack: Stack, tmp_path: Path) -> None:
    samples, rate = speak(SENTENCE)
    caller = tmp_path / "caller.wav"
    caller.write_bytes(wav_bytes(samples, rate))
    heard = tmp_path / "heard.wav"
    gateway = f"http://127.0.0.1:{stack.host_port(8000)}"
    argv = ["call", "--dialect", "twilio", "--wav", str(caller), "--url", gateway, "--at", "4", "--listen", "12"]
    done = subprocess.run([str(VOICECTL), *argv, "--out", str(heard)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr + done.stdout
    latency = re.search(r"voice-to-voice latency:\s+(\S+)", done.stdout)
    assert latency and latency.group(1) != "-", done.stdout
    last_voice = re.search(r"caller's last voice:\s+(\d+) ms", done.stdout)
    assert last_voice, done.stdout

    # What the caller heard after they stopped speaking, transcribed by the containerised STT worker.
    audio, heard_rate = read_wav(heard.read_bytes())
    answer = audio[int(int(last_voice.group(1)) / 1000 * heard_rate) :]
    answer_wav = tmp_path / "answer.wav"
    answer_wav.write_bytes(wav_bytes(answer, heard_rate))
    stt = subprocess.run(
        [str(VOICECTL), "stt", str(answer_wav), "--grpc", f"127.0.0.1:{stack.host_port(50051)}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert stt.returncode == 0, stt.stderr
    words = re.findall(r"[a-z']+", stt.stdout.split("\n")[0].lower())
    assert len(words) >= 3, f"the answer heard: {stt.stdout!r}"


def test_the_charts_helm_tests_pass_against_the_stack(stack: Stack) -> None:
    """``helm test``'s pods (a request through every worker on the bus, the gateway's /readyz)."""
    test_pods = stack.module.rendered(tests=True)
    assert {pod["metadata"]["name"] for pod in test_pods} >= {"voice-platform-test-bus", "voice-platform-test-gateway"}
    for test_pod in test_pods:
        done = stack.module.run_test_pod(test_pod)
        assert done.returncode == 0, f"{test_pod['metadata']['name']}: {done.stdout}{done.stderr}"


def put_agent(stack: Stack, agent: dict[str, Any]) -> None:
    """Creates or replaces an agent through the gateway's REST API."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.host_port(8000)}/api/agents/{agent['id']}",
        data=json.dumps(agent).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def tool_result(stack: Stack, agent_id: str, url: str) -> dict[str, Any]:
    """The ``tool_result`` of a chat turn whose agent (created as ``agent_id``) must call a webhook at ``url``."""
    put_agent(
        stack,
        {
            "id": agent_id,
            "name": "Orders",
            "system_prompt": "You help customers with their orders. Use the tools to look orders up.",
            "greeting": "",
            "llm": {"tool_choice": "get_order", "temperature": 0.0, "max_tokens": 40, "max_tool_rounds": 1},
            "tools": [
                {
                    "name": "get_order",
                    "description": "Look up an order's delivery status by its id.",
                    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
                    "url": url,
                }
            ],
        },
    )

    async def chat() -> list[dict[str, Any]]:
        async with ChatClient(f"http://127.0.0.1:{stack.host_port(8000)}") as client:
            await client.send(type="authorize", token=API_KEY)
            assert (await client.next())["type"] == "authorize_success"
            await client.send(type="chat_message", content="Where is my order A-42?", agent_id=agent_id)
            return await client.until("stream_end", timeout=180)

    events = asyncio.run(chat())
    return next(e for e in events if e["type"] == "tool_result")


def test_webhook_tools_reach_an_allowed_network_and_nothing_else_private(
    stack: Stack, deployments: dict[str, Any]
) -> None:
    """The production intent of the gateway's egress (the NetworkPolicy opens the public internet and
    ``tools.allowedNetworks``, never other private ranges), made by the gateway's own egress check: podman
    enforces no NetworkPolicy, and this machine has no internet, so the allowed network stands in."""
    networks = json.loads(podman("inspect", stack.container("gateway")).stdout)[0]["NetworkSettings"]["Networks"]
    host = next(iter(networks.values()))["Gateway"]  # the host, as the pod sees it on podman's kube network
    gateway = deployments["gateway"]["container"]
    allowed = next(e["value"] for e in gateway["env"] if e["name"] == "GATEWAY_TOOL_ALLOWED_NETWORKS")
    assert ipaddress.ip_address(host) in ipaddress.ip_network(allowed.split(",")[0]), (host, allowed)

    with WebhookServer(host="0.0.0.0") as hooks:
        reached = tool_result(stack, "images-tool-allowed", f"http://{host}:{hooks.port}/order")
        assert reached["successful"] is True, reached
        assert json.loads(reached["content"])["status"] == "shipped"
        assert [r["path"] for r in hooks.requests] == ["/order"]
        assert hooks.requests[0]["body"]["name"] == "get_order"

    refused = tool_result(stack, "images-tool-metadata", "http://169.254.169.254/latest/meta-data/")
    assert refused["successful"] is False, refused
    assert "link-local" in refused["content"] and "GATEWAY_TOOL_ALLOWED_NETWORKS" in refused["content"], refused


def test_the_gateway_lets_a_call_finish_before_it_stops(
    stack: Stack, deployments: dict[str, Any], tmp_path: Path
) -> None:
    """preStop waits for the call in progress, then SIGTERM stops the gateway cleanly (it is the last
    test to use the gateway)."""
    container, spec = deployments["gateway"]["container"], deployments["gateway"]["spec"]
    samples, rate = speak("Hello there.")
    caller = tmp_path / "caller.wav"
    caller.write_bytes(wav_bytes(samples, rate))
    gateway = f"http://127.0.0.1:{stack.host_port(8000)}"
    argv = [str(VOICECTL), "call", "--dialect", "twilio", "--wav", str(caller), "--url", gateway, "--hang-up", "20"]
    call = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(
        lambda: metric(stack, 8000, "voice_gateway_active_sessions", "/metrics/", dialect="twilio") >= 1,
        60,
        "the call to be in progress",
        interval_s=0.2,
    )
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    drained = podman("exec", stack.container("gateway"), *pre_stop, timeout=spec["terminationGracePeriodSeconds"])
    stdout, stderr = call.communicate(timeout=60)
    assert call.returncode == 0, stderr
    assert re.search(r"ended by:\s+caller", stdout), stdout
    assert "voice-probe drain: 0.0 session(s) left" in drained.stdout, drained.stdout + drained.stderr

    podman("kill", "--signal", "TERM", stack.container("gateway"))
    wait_for(
        lambda: stack.state("gateway")["Status"] == "exited",
        spec["terminationGracePeriodSeconds"],
        "the gateway to exit",
        0.5,
    )
    assert stack.state("gateway")["ExitCode"] == 0, stack.logs("gateway")[-3000:]


def test_sigterm_drains_a_worker_within_the_charts_grace_period(
    stack: Stack, deployments: dict[str, Any], tmp_path: Path
) -> None:
    container, spec = deployments["tts"]["container"], deployments["tts"]["spec"]
    grace = float(next(e["value"] for e in container["env"] if e["name"] == "DRAIN_GRACE_SECONDS"))
    assert grace < spec["terminationGracePeriodSeconds"]
    # The chart's preStop hook runs in the container (podman does not run lifecycle hooks).
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert podman("exec", stack.container("tts"), *pre_stop).returncode == 0

    out = tmp_path / "long.wav"
    nats = f"nats://127.0.0.1:{stack.host_port(4222)}"
    argv = [str(VOICECTL), "--nats", nats, "--timeout", "120", "tts", LONG_TEXT, "-o", str(out)]
    request = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    wait_for(lambda: metric(stack, metrics_port, "voice_worker_in_flight", service="tts", transport="bus") >= 1,
             60, "the TTS request to be in flight", interval_s=0.1)  # fmt: skip
    podman("kill", "--signal", "TERM", stack.container("tts"))
    # Within the pod's grace period, after which the kubelet would SIGKILL it.
    wait_for(
        lambda: stack.state("tts")["Status"] == "exited",
        spec["terminationGracePeriodSeconds"],
        "the TTS worker to exit",
        0.5,
    )
    _, stderr = request.communicate(timeout=60)

    logs = stack.logs("tts")
    assert stack.state("tts")["ExitCode"] == 0, logs[-3000:]
    assert "draining: no new work, finishing 1 in-flight request(s)" in logs, logs[-3000:]
    assert "tts worker exited cleanly" in logs, logs[-3000:]
    assert request.returncode == 0, stderr
    audio, rate = read_wav(out.read_bytes())
    assert audio.size > rate * 10, "the request in flight finished with all its speech"
