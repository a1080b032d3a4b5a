"""Fixtures of the image tests: the chart rendered for podman, the built images' metadata, the running stack.

The images come from ``make images`` (deploy/images/build.py). Without them every test here is
skipped; the stack itself (tests/images/test_stack.py) starts only under ``make images-test``, which
sets ``VOICE_IMAGES_TEST=1``: it takes a few minutes and both of this machine's cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.conftest import load_script

ROOT = Path(__file__).resolve().parents[2]
# How long the stack may take to load its models on a cold, 2-core machine (the chart's startup
# probes allow 10 minutes).
STARTUP_S = 600.0


@pytest.fixture(scope="session")
def stack_module() -> ModuleType:
    """deploy/images/stack.py as a module."""
    return load_script("voice_images_stack", ROOT / "deploy" / "images" / "stack.py")


def podman_inspect(ref: str) -> dict[str, Any] | None:
    """``podman image inspect`` of one image, None when podman or the image is missing."""
    if not shutil.which("podman"):
        return None
    done = subprocess.run(["podman", "image", "inspect", ref], capture_output=True, text=True)
    if done.returncode:
        return None
    return json.loads(done.stdout)[0]


@pytest.fixture(scope="session")
def objects(stack_module: ModuleType) -> list[dict[str, Any]]:
    """The chart's objects as stack.py plays them (default profile + deploy/images/podman-values.yaml)."""
    return stack_module.rendered()


@pytest.fixture(scope="session")
def deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Container name -> (its Deployment's pod spec, the container), for every Deployment."""
    found = {}
    for deployment in objects:
        if deployment.get("kind") != "Deployment":
            continue
        spec = deployment["spec"]["template"]["spec"]
        for container in spec["containers"]:
            found[container["name"]] = {"spec": spec, "container": container}
    return found


@pytest.fixture(scope="session")
def images(deployments: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Image reference -> its ``podman image inspect``; skips when an image is not built."""
    found = {}
    for item in deployments.values():
        ref = item["container"]["image"]
        inspect = podman_inspect(ref)
        if inspect is None:
            pytest.skip(f"image {ref} is not built (make images)")
        found[ref] = inspect
    return found


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs podman, capturing its output."""
    return subprocess.run(["podman", *args], check=check, capture_output=True, text=True, timeout=timeout)


class Stack:
    """The chart's pod played by podman, its containers reached through ports published on 127.0.0.1.

    Attributes:
        objects: The rendered chart.
        ports: Container port -> published host port.
        pod: The played Pod manifest.
    """

    def __init__(self, module: ModuleType, objects: list[dict[str, Any]], ports: dict[int, int]) -> None:
        self.module = module
        self.objects = objects
        self.ports = ports
        self.pod = module.pod(objects, ports)

    def container(self, name: str) -> str:
        """The podman container of a chart container (``<pod>-<name>``, as kube play names them)."""
        return f"{self.module.POD}-{name}"

    def host_port(self, container_port: int) -> int:
        """Where a container port is published on 127.0.0.1."""
        return self.ports[container_port]

    def logs(self, name: str) -> str:
        """Everything a container wrote so far."""
        done = podman("logs", self.container(name), check=False)
        return done.stdout + done.stderr

    def state(self, name: str) -> dict[str, Any]:
        """``podman inspect``'s State of a container (Status, ExitCode, ...)."""
        return json.loads(podman("inspect", self.container(name)).stdout)[0]["State"]


@pytest.fixture(scope="session")
def stack(stack_module: ModuleType, objects: list[dict[str, Any]], images, tmp_path_factory) -> Iterator[Stack]:
    """The whole stack from the built images, as the chart renders it (``make images-test`` only)."""
    if os.environ.get("VOICE_IMAGES_TEST") != "1":
        pytest.skip("the running stack is tested by `make images-test` (VOICE_IMAGES_TEST=1)")
    if podman_inspect(stack_module.NATS_IMAGE) is None:
        pytest.skip(f"{stack_module.NATS_IMAGE} is not built (make images)")
    container_ports = {p["containerPort"] for c in stack_module.pod(objects)["spec"]["containers"] for p in c["ports"]}
    workdir = tmp_path_factory.mktemp("stack")
    for attempt in range(3):
        # Free ports are chosen, then bound by podman: another process may take one in between.
        ports = {port: stack_module.free_port() for port in sorted(container_ports)}
        try:
            stack_module.up(objects, ports, workdir)
            break
        except RuntimeError as exc:
            if "address already in use" not in str(exc) or attempt == 2:
                raise
    running = Stack(stack_module, objects, ports)
    try:
        yield running
    finally:
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        for container in running.pod["spec"]["containers"]:
            (logs / f"{container['name']}.log").write_text(running.logs(container["name"]))
        stack_module.down(objects)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 2.0):
    """Polls ``predicate`` until it returns something truthy; fails with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
