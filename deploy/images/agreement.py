"""Whether the chart's rendered containers and the built images agree (tests/images/test_metadata.py).

Compares each rendered container with ``podman image inspect`` of its image: the non-root user,
the ports (chart ``containerPort`` vs ``EXPOSE``), the probes' ports vs the ports the process listens
on (``GRPC_PORT``, ``GATEWAY_PORT``, the backend's ``--port``), ``METRICS_PORT``, the env the image
sets by itself, the image's ``HEALTHCHECK`` and the entrypoint module. Each mismatch is one line
naming the container, so a wrong port or user fails a test with the reason.
"""

from __future__ import annotations

from typing import Any

# The module each image's ENTRYPOINT runs, by chart container name.
ENTRYPOINT_MODULES = {"gateway": "voice_gateway", "stt": "voice_stt", "llm": "voice_llm", "tts": "voice_tts"}
SHARED_ENV = ("HOME", "GRPC_PORT", "METRICS_PORT", "GATEWAY_PORT", "GATEWAY_HOST")


def image_env(inspect: dict[str, Any]) -> dict[str, str]:
    """The image's ENV as a mapping."""
    return dict(item.split("=", 1) for item in inspect["Config"].get("Env") or [])


def chart_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's literal env values (``valueFrom`` left out)."""
    return {env["name"]: str(env["value"]) for env in container.get("env") or [] if "value" in env}


def exposed(inspect: dict[str, Any]) -> set[int]:
    """The image's EXPOSEd ports."""
    return {int(port.split("/")[0]) for port in inspect["Config"].get("ExposedPorts") or {}}


def healthcheck(inspect: dict[str, Any]) -> list[str]:
    """The image's HEALTHCHECK command (podman reports it at the top level, Docker under Config)."""
    check = inspect.get("Healthcheck") or inspect["Config"].get("Healthcheck") or {}
    return list(check.get("Test") or [])


def probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    """The number of the port a probe targets (a named port resolved against the container's)."""
    action = probe.get("grpc") or probe.get("httpGet") or {}
    port = action.get("port")
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports") or [] if p["name"] == port), -1)


def listening_port(container: dict[str, Any], env: dict[str, str], kind: str) -> int | None:
    """Where the process listens for what a probe of ``kind`` (grpc, http) checks."""
    if kind == "grpc":
        return int(env["GRPC_PORT"]) if "GRPC_PORT" in env else None
    args = [str(arg) for arg in container.get("args") or []]
    if "--port" in args:
        return int(args[args.index("--port") + 1])
    return int(env["GATEWAY_PORT"]) if "GATEWAY_PORT" in env else None


def container_mismatches(pod: dict[str, Any], container: dict[str, Any], inspect: dict[str, Any]) -> list[str]:
    """What differs between one rendered container (in its pod spec) and its image."""
    name, problems = container["name"], []
    security = pod.get("securityContext") or {}
    user = str(inspect["Config"].get("User") or "")
    wanted = f"{security.get('runAsUser')}:{security.get('runAsGroup')}"
    if user != wanted:
        problems.append(f"{name}: image USER {user!r}, chart runAsUser:runAsGroup {wanted}")
    if not security.get("runAsNonRoot") or user.split(":")[0] in ("", "0", "root"):
        problems.append(f"{name}: not a numeric non-root user ({user!r})")

    ports = {p["name"]: p["containerPort"] for p in container.get("ports") or []}
    missing = set(ports.values()) - exposed(inspect)
    if missing:
        problems.append(f"{name}: chart ports {sorted(missing)} are not EXPOSEd (image: {sorted(exposed(inspect))})")

    baked, rendered = image_env(inspect), chart_env(container)
    env = {**baked, **rendered}
    for key in SHARED_ENV:
        if key in baked and key in rendered and baked[key] != rendered[key]:
            problems.append(f"{name}: image {key}={baked[key]}, chart {key}={rendered[key]}")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if not probe:
            problems.append(f"{name}: no {kind}")
            continue
        target = probe_port(container, probe)
        listens = listening_port(container, env, "grpc" if "grpc" in probe else "http")
        if target != listens:
            problems.append(f"{name}: {kind} checks port {target}, the process listens on {listens}")
    if "metrics" in ports and str(ports["metrics"]) != env.get("METRICS_PORT"):
        problems.append(f"{name}: metrics port {ports['metrics']}, METRICS_PORT={env.get('METRICS_PORT')}")

    if not container.get("command"):
        entrypoint = list(inspect["Config"].get("Entrypoint") or [])
        module = ENTRYPOINT_MODULES.get(name)
        if module and entrypoint != ["python", "-m", module]:
            problems.append(f"{name}: ENTRYPOINT {entrypoint}, expected python -m {module}")
        test = healthcheck(inspect)
        if test[:2] != ["CMD", "voice-probe"]:
            problems.append(f"{name}: HEALTHCHECK {test} is not voice-probe")
        elif test[2] == "http" and f":{env.get('GATEWAY_PORT')}/" not in test[3]:
            problems.append(f"{name}: HEALTHCHECK {test[3]} is not on GATEWAY_PORT={env.get('GATEWAY_PORT')}")
    return problems


def mismatches(objects: list[dict[str, Any]], inspects: dict[str, dict[str, Any]]) -> list[str]:
    """Every mismatch between the rendered Deployments and their images.

    Args:
        objects: The rendered chart.
        inspects: Image reference (as the chart names it) -> ``podman image inspect`` of it.

    Returns:
        One line per mismatch; empty when they agree.
    """
    problems, served = [], {}
    for deployment in objects:
        if deployment.get("kind") != "Deployment":
            continue
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            inspect = inspects.get(container["image"])
            if inspect is None:
                problems.append(f"{container['name']}: image {container['image']} is not built")
                continue
            problems += container_mismatches(pod, container, inspect)
            served.setdefault(container["image"], set()).update(
                p["containerPort"] for p in container.get("ports") or []
            )
    for ref, ports in served.items():
        unused = exposed(inspects[ref]) - ports
        if unused:
            problems.append(f"{ref}: EXPOSEs {sorted(unused)}, which no chart container serves")
    return problems
