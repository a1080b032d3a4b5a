"""The chart and the images agree by construction: user, entrypoint, exposed ports, env and probe ports.

Reads the chart's rendered Deployments (default profile, as ``make images-test`` plays them) and
``podman image inspect`` of the images ``make images`` built (deploy/images/agreement.py compares
them); skipped when the images are not built.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.conftest import load_script
from tests.images.conftest import podman, podman_inspect

ROOT = Path(__file__).resolve().parents[2]
WORKER_ONLY_LLM = "localhost/voice-platform/llm:0.1.0-worker"


@pytest.fixture(scope="module")
def agreement() -> ModuleType:
    """deploy/images/agreement.py as a module."""
    return load_script("voice_images_agreement", ROOT / "deploy" / "images" / "agreement.py")


def container_of(objects: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, container) of one chart container in ``objects``."""
    for obj in objects:
        if obj.get("kind") == "Deployment":
            spec = obj["spec"]["template"]["spec"]
            for container in spec["containers"]:
                if container["name"] == name:
                    return spec, container
    raise KeyError(name)


def test_the_chart_and_the_built_images_agree(agreement, objects, images) -> None:
    assert agreement.mismatches(objects, images) == []


def test_a_mismatch_is_named(agreement, objects, images) -> None:
    """Each kind of disagreement the issue names fails with the container and the reason."""
    cases = {
        "stt: chart ports [50061] are not EXPOSEd": lambda o: port(o, "stt", "grpc", 50061),
        "image USER '10001:10001', chart runAsUser:runAsGroup 10002:10001": lambda o: user(o, "tts", 10002),
        "llm: startupProbe checks port 9102, the process listens on 50052": lambda o: grpc_probe(o, "llm", 9102),
        "gateway: image GATEWAY_PORT=8000, chart GATEWAY_PORT=8001": lambda o: env(
            o, "gateway", "GATEWAY_PORT", "8001"
        ),
        "stt: metrics port 9101, METRICS_PORT=9111": lambda o: env(o, "stt", "METRICS_PORT", "9111"),
        "llm-backend: readinessProbe checks port 8080, the process listens on 8081": lambda o: backend_port(o, "8081"),
    }
    for expected, break_it in cases.items():
        broken = copy.deepcopy(objects)
        break_it(broken)
        found = agreement.mismatches(broken, images)
        assert any(expected in line for line in found), f"{expected!r} not in {found}"


def port(objects, name, port_name, number) -> None:
    _, container = container_of(objects, name)
    next(p for p in container["ports"] if p["name"] == port_name)["containerPort"] = number


def user(objects, name, uid) -> None:
    spec, _ = container_of(objects, name)
    spec["securityContext"]["runAsUser"] = uid


def grpc_probe(objects, name, number) -> None:
    _, container = container_of(objects, name)
    container["startupProbe"]["grpc"]["port"] = number


def env(objects, name, key, value) -> None:
    _, container = container_of(objects, name)
    next(e for e in container["env"] if e["name"] == key)["value"] = value


def backend_port(objects, value) -> None:
    _, container = container_of(objects, "llm-backend")
    args = container["args"]
    args[args.index("--port") + 1] = value


def test_entrypoints_commands_and_pre_stop_exist_in_the_images(deployments, images) -> None:
    for name, item in deployments.items():
        container = item["container"]
        argv = container.get("command") or images[container["image"]]["Config"]["Entrypoint"]
        assert argv[:2] == ["python", "-m"], f"{name}: {argv}"
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"][0]
        script = (
            "import importlib.util, shutil, sys\n"
            f"sys.exit(0 if importlib.util.find_spec({argv[2]!r}) and shutil.which({pre_stop!r}) else 1)\n"
        )
        done = podman(
            "run", "--rm", "--network", "none", "--entrypoint", "python", container["image"], "-c", script, check=False
        )
        assert done.returncode == 0, f"{name}: {argv[2]} or {pre_stop} missing in {container['image']}: {done.stderr}"


def test_the_worker_only_llm_image_can_replace_the_full_one(agreement, images) -> None:
    """Production's LLM image (``--target worker``): the chart's llm container runs it unchanged."""
    worker = podman_inspect(WORKER_ONLY_LLM)
    if worker is None:
        pytest.skip(f"{WORKER_ONLY_LLM} is not built (make images)")
    full = images["voice-platform/llm:0.1.0"]
    assert worker["Config"]["Entrypoint"] == full["Config"]["Entrypoint"] == ["python", "-m", "voice_llm"]
    assert worker["Config"]["User"] == full["Config"]["User"]
    assert agreement.exposed(worker) == agreement.exposed(full) - {8080}
    assert worker["Size"] < full["Size"]
