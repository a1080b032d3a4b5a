"""Runs the chart's own manifests on one machine with ``podman kube play`` (``make images-test``, docs/deploy.md).

    python deploy/images/stack.py up      # render the chart, play it as one pod, print the published ports
    python deploy/images/stack.py yaml    # only print what would be played
    python deploy/images/stack.py down

The chart is rendered with Helm's Go SDK (``deploy/helm/check.py``) with its default values plus
``deploy/images/podman-values.yaml``. What podman cannot express is mapped here, and nothing else is
changed (docs/deploy.md, "Run the real images on one machine", lists it):

- Services and cluster DNS: every Deployment's container joins **one pod** (one network namespace),
  and each Service name the chart uses (NATS's, the LLM backend's) resolves to 127.0.0.1 through
  ``hostAliases``; each container port is published on 127.0.0.1 (``hostPort``).
- NATS comes from its official chart in a cluster: here a container of the NATS stand-in image.
- Per-pod settings (``terminationGracePeriodSeconds``, volumes) are merged: each container keeps its
  own ``/tmp`` emptyDir; the pod's grace period is the longest of the Deployments'.
- Probes are left out of the played pod: podman 4.3 ignores startup, readiness and gRPC probes and
  turns an HTTP liveness probe into a health check that runs curl inside the container (the images
  carry none). The tests (tests/images) make every probe of the rendered manifests themselves,
  through the published ports.
- The chart's Secret is created with ``podman secret create`` as a JSON map of key to base64 value:
  podman 4.3 plays ``kind: Secret`` but stores it in a form its own ``secretKeyRef`` cannot read.
- ``fieldRef: spec.nodeName`` is not supported by podman: ``K8S_NODE_NAME`` gets the host's name.
- ``$(VAR)`` references inside env values are not expanded by podman (``OTEL_RESOURCE_ATTRIBUTES``
  keeps ``$(K8S_POD_NAME)`` literally).
- preStop hooks and ``terminationGracePeriodSeconds`` are not honoured by podman 4.3 (its stop timeout
  stays 10 s): the tests run the preStop command and give SIGTERM the chart's grace period themselves.
"""

from __future__ import annotations

import argparse
import base64
import copy
import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
VALUES = Path(__file__).resolve().parent / "podman-values.yaml"
POD = "voice-platform"
# The stand-in deploy/images/build.py makes of the nats-server that cli[nats] pins.
NATS_IMAGE = "docker.io/library/nats:2.15.1"
NATS_PORTS = {"client": 4222, "monitor": 8222}
LOOPBACK = "127.0.0.1"


def chart_check() -> Any:
    """deploy/helm/check.py as a module (render, manifests, pod_spec)."""
    name = "voice_deploy_check"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / "helm" / "check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def rendered(values_file: Path = VALUES, *, tests: bool = False) -> list[dict[str, Any]]:
    """The chart's objects for the default profile plus ``values_file``.

    Args:
        values_file: Values on top of the chart's defaults.
        tests: The ``helm test`` pods instead of the release's objects.
    """
    check = chart_check()
    values = check.load_values(values_file) if values_file.exists() else {}
    return [m.obj for m in check.manifests(check.render(values)) if m.is_test == tests]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The objects of one kind, in the chart's order."""
    return [obj for obj in objects if obj.get("kind") == kind]


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def service_hosts(objects: list[dict[str, Any]]) -> list[str]:
    """Every host name the rendered env vars point at (Services of the release, NATS), for hostAliases."""
    names = {obj["metadata"]["name"] for obj in of_kind(objects, "Service")}
    for deployment in of_kind(objects, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env") or []:
                value = str(env.get("value", ""))
                if "://" in value:
                    names.add(value.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0])
    return sorted(names)


def pod(objects: list[dict[str, Any]], host_ports: dict[int, int] | None = None) -> dict[str, Any]:
    """One Pod holding every Deployment's container (as rendered) and the NATS stand-in.

    Args:
        objects: The rendered chart.
        host_ports: Container port -> port published on 127.0.0.1 (default: the same number).

    Returns:
        The Pod manifest for ``podman kube play``.
    """
    host_ports = host_ports or {}
    deployments = of_kind(objects, "Deployment")
    specs = [d["spec"]["template"]["spec"] for d in deployments]
    security = specs[0]["securityContext"]
    assert all(s["securityContext"] == security for s in specs), "the pods' security contexts differ"
    containers, volumes = [], []
    for spec in specs:
        by_name = {volume["name"]: volume for volume in spec.get("volumes") or []}
        for container in spec["containers"]:
            container = copy.deepcopy(container)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                container.pop(probe, None)
            for env in container.get("env") or []:
                if env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
                    env.pop("valueFrom")
                    env["value"] = socket.gethostname()
            for port in container.get("ports") or []:
                port["hostIP"] = LOOPBACK
                port["hostPort"] = host_ports.get(port["containerPort"], port["containerPort"])
            for mount in container.get("volumeMounts") or []:
                volume = copy.deepcopy(by_name[mount["name"]])
                volume["name"] = mount["name"] = f"{container['name']}-{mount['name']}"
                volumes.append(volume)
            containers.append(container)
    nats_security = copy.deepcopy(containers[0]["securityContext"])
    containers.insert(
        0,
        {
            "name": "nats",
            "image": NATS_IMAGE,
            "imagePullPolicy": "Never",
            "args": ["--jetstream", "--store_dir", "/data", "--http_port", str(NATS_PORTS["monitor"])],
            "ports": [
                {"name": name, "containerPort": port, "hostIP": LOOPBACK, "hostPort": host_ports.get(port, port)}
                for name, port in NATS_PORTS.items()
            ],
            "securityContext": nats_security,
            "volumeMounts": [{"name": "nats-data", "mountPath": "/data"}],
        },
    )
    volumes.append({"name": "nats-data", "emptyDir": {}})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": POD, "labels": {"app.kubernetes.io/part-of": "voice-platform"}},
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": max(s["terminationGracePeriodSeconds"] for s in specs),
            "securityContext": security,
            "hostAliases": [{"ip": LOOPBACK, "hostnames": service_hosts(objects)}],
            "restartPolicy": "Never",
            "containers": containers,
            "volumes": volumes,
        },
    }


def play_yaml(objects: list[dict[str, Any]], host_ports: dict[int, int] | None = None) -> str:
    """The ConfigMaps and the pod, as one YAML stream for ``podman kube play``."""
    return yaml.safe_dump_all([*of_kind(objects, "ConfigMap"), pod(objects, host_ports)], sort_keys=False)


def podman(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """Runs podman, capturing its output."""
    return subprocess.run(["podman", *args], check=check, capture_output=True, text=True, input=input)


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    """A Secret's keys and base64 values, ``stringData`` included: what podman's secretKeyRef reads."""
    data = dict(secret.get("data") or {})
    for key, value in (secret.get("stringData") or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    return data


def create_secrets(objects: list[dict[str, Any]]) -> None:
    """Each rendered Secret as a podman secret of the same name (a JSON map of key to base64 value)."""
    for secret in of_kind(objects, "Secret"):
        name = secret["metadata"]["name"]
        podman("secret", "rm", name, check=False)
        podman("secret", "create", name, "-", input=json.dumps(secret_data(secret)))


def up(objects: list[dict[str, Any]], host_ports: dict[int, int] | None = None, workdir: Path | None = None) -> str:
    """Plays the stack; returns the YAML played (also written to ``workdir/stack.yaml``)."""
    down(objects)
    create_secrets(objects)
    text = play_yaml(objects, host_ports)
    workdir = workdir or ROOT / ".run" / "images"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "stack.yaml"
    path.write_text(text)
    done = podman("kube", "play", str(path), check=False)
    if done.returncode:
        raise RuntimeError(f"podman kube play {path} failed:\n{done.stdout}{done.stderr}")
    return text


def run_test_pod(test_pod: dict[str, Any], timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Runs a ``helm test`` pod's container in the stack's pod (its network, Service names and ports).

    The container gets the test pod's command, args, env, user, read-only root, dropped capabilities,
    no privilege escalation, memory and CPU limits, and a tmpfs for each emptyDir it mounts.
    """
    spec = test_pod["spec"]
    (container,) = spec["containers"]
    security = {**(spec.get("securityContext") or {}), **(container.get("securityContext") or {})}
    args = [
        "run",
        "--rm",
        "--pod",
        POD,
        "--pull",
        "never",
        "--user",
        f"{security['runAsUser']}:{security['runAsGroup']}",
    ]
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    args += [f"--cap-drop={cap}" for cap in (security.get("capabilities") or {}).get("drop", [])]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    limits = (container.get("resources") or {}).get("limits") or {}
    if "memory" in limits:
        args += ["--memory", str(limits["memory"]).replace("Mi", "m").replace("Gi", "g")]
    if "cpu" in limits:
        args += ["--cpus", str(limits["cpu"])]
    empty_dirs = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
    args += [f"--tmpfs={m['mountPath']}" for m in container.get("volumeMounts") or [] if m["name"] in empty_dirs]
    args += [f"--env={env['name']}={env['value']}" for env in container.get("env") or [] if "value" in env]
    command = container.get("command") or []
    if command:
        args += ["--entrypoint", json.dumps(command)]
    args += [container["image"], *(container.get("args") or [])]
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout_s)


def down(objects: list[dict[str, Any]] | None = None) -> None:
    """Removes the pod and the secrets (nothing when absent)."""
    podman("pod", "rm", "--force", "--time", "10", POD, check=False)
    for secret in of_kind(objects or [], "Secret"):
        podman("secret", "rm", secret["metadata"]["name"], check=False)


def main(argv: list[str] | None = None) -> int:
    """``up``, ``down`` or ``yaml``; the exit status is the result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "yaml"))
    parser.add_argument("--values", type=Path, default=VALUES, help="values on top of the chart's defaults")
    args = parser.parse_args(argv)
    objects = rendered(args.values)
    if args.command == "yaml":
        sys.stdout.write(play_yaml(objects))
    elif args.command == "down":
        down(objects)
    else:
        up(objects)
        ports = {c["name"]: [p["hostPort"] for p in c.get("ports", [])] for c in pod(objects)["spec"]["containers"]}
        sys.stdout.write(json.dumps(ports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
