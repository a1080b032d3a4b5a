"""The platform's policies over a rendered release.

Pinned image tags, resources on every container, non-root restricted security contexts, probes and
a preStop drain on every serving container, one autoscaler per Deployment, disruption budgets,
network policies and surge-only rollouts for every Deployment, a gateway drain that outlasts its
longest call, required secrets, and an Ingress or HTTPRoute that routes no internal or
unauthenticated path. :func:`check_policies` runs them all, the custom resources' shape checks
included.
"""

from __future__ import annotations

import re
from typing import Any

from .custom_resources import check_custom
from .model import Manifest, env_values, pod_labels, pod_spec, selects

# Paths an Ingress or HTTPRoute of the gateway must never route: unauthenticated or internal.
PRIVATE_PATHS = ("/", "/metrics", "/metrics/", "/ws", "/ws/channels", "/healthz", "/readyz")
IMAGE_RE = re.compile(r"^(?P<repo>[^@\s]+?)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@sha256:[0-9a-f]{64})?$")


def check_image(ref: str, image: str) -> list[str]:
    """An image must carry a pinned tag (or digest), never ``latest``.

    Args:
        ref: How findings name the container.
        image: The image reference.

    Returns:
        What is wrong with it, one line each.
    """
    found = IMAGE_RE.match(image or "")
    if not found:
        return [f"{ref}: image {image!r} is not a valid reference"]
    if "@sha256:" in image:
        return []
    tag = found.group("tag")
    if not tag:
        return [f"{ref}: image {image!r} has no tag: pin a version"]
    if tag == "latest":
        return [f"{ref}: image {image!r} uses the 'latest' tag: pin a version"]
    return []


def check_container(
    manifest: Manifest, spec: dict[str, Any], container: dict[str, Any], *, init: bool = False
) -> list[str]:
    """Image, resources, security context and probes of one container.

    Args:
        manifest: The Deployment or Pod.
        spec: Its pod spec (its securityContext is the container's default).
        container: The container.
        init: An init container: it runs to completion, so no probes and no preStop.

    Returns:
        What is wrong with it, one line each.
    """
    ref = f"{manifest.ref} container {container.get('name')}"
    errors = check_image(ref, str(container.get("image", "")))
    resources = container.get("resources") or {}
    for part in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in (resources.get(part) or {}):
                errors.append(f"{ref}: resources.{part}.{resource} is missing")
    gpus = {key for key in (resources.get("limits") or {}) if key.endswith("/gpu")}
    for gpu in gpus:
        if (resources.get("requests") or {}).get(gpu, resources["limits"][gpu]) != resources["limits"][gpu]:
            errors.append(f"{ref}: {gpu} requests and limits differ (extended resources cannot be overcommitted)")

    pod_security = spec.get("securityContext") or {}
    security = container.get("securityContext") or {}
    if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is not True:
        errors.append(f"{ref}: runAsNonRoot is not true")
    if security.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{ref}: allowPrivilegeEscalation is not false")
    if security.get("privileged"):
        errors.append(f"{ref}: privileged")
    if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
        errors.append(f"{ref}: capabilities do not drop ALL")
    if (security.get("capabilities") or {}).get("add"):
        errors.append(f"{ref}: capabilities are added")
    seccomp = (security.get("seccompProfile") or pod_security.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        errors.append(f"{ref}: seccompProfile is not RuntimeDefault")
    if security.get("readOnlyRootFilesystem") is not True:
        errors.append(f"{ref}: readOnlyRootFilesystem is not true")

    if not manifest.is_test and not init:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if not container.get(probe):
                errors.append(f"{ref}: {probe} is missing")
        if not ((container.get("lifecycle") or {}).get("preStop")):
            errors.append(f"{ref}: no preStop hook (drain before SIGTERM)")
    return errors


def check_workloads(objects: list[Manifest]) -> list[str]:
    """Every container of every Deployment and Pod, and the pod-level rules.

    Args:
        objects: Every object of the release.

    Returns:
        What is wrong, one line each.
    """
    errors = []
    for manifest in objects:
        spec = pod_spec(manifest)
        if spec is None:
            continue
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            errors.append(f"{manifest.ref}: uses the host's network, PID or IPC namespace")
        if not (spec.get("securityContext") or {}).get("runAsNonRoot"):
            errors.append(f"{manifest.ref}: pod securityContext.runAsNonRoot is not true")
        for container in spec.get("initContainers") or []:
            errors += check_container(manifest, spec, container, init=True)
        for container in spec.get("containers") or []:
            errors += check_container(manifest, spec, container)
    return errors


def check_gateway(objects: list[Manifest]) -> list[str]:
    """The gateway's drain outlasts its longest call, and its required secrets are required.

    The preStop hook waits (``voice-probe drain --max-seconds``) at least GATEWAY_MAX_CALL_SECONDS
    beyond its minimum wait, and terminationGracePeriodSeconds covers that wait, the drain of the
    turns in flight and uvicorn's shutdown (each GATEWAY_DRAIN_TIMEOUT_SECONDS) and 10 s.

    Args:
        objects: Every object of the release.

    Returns:
        What is wrong, one line each.
    """
    errors = []
    for manifest in objects:
        if manifest.kind != "Deployment" or pod_labels(manifest).get("voice-platform/role") != "gateway":
            continue
        spec = pod_spec(manifest) or {}
        container = spec["containers"][0]
        env = env_values(container)
        command = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
        if "--max-seconds" not in command or "--min-seconds" not in command:
            errors.append(f"{manifest.ref}: preStop does not wait for the calls (voice-probe drain)")
            continue
        wait = float(command[command.index("--max-seconds") + 1])
        minimum = float(command[command.index("--min-seconds") + 1])
        try:
            max_call = float(env.get("GATEWAY_MAX_CALL_SECONDS") or 0)
            drain = float(env.get("GATEWAY_DRAIN_TIMEOUT_SECONDS") or 20)
        except (TypeError, ValueError):
            errors.append(f"{manifest.ref}: GATEWAY_MAX_CALL_SECONDS / GATEWAY_DRAIN_TIMEOUT_SECONDS are not numbers")
            continue
        if max_call <= 0:
            errors.append(f"{manifest.ref}: GATEWAY_MAX_CALL_SECONDS is not set: no drain can wait for every call")
        elif wait < max_call + minimum:
            errors.append(
                f"{manifest.ref}: preStop waits at most {wait:g} s, less than the longest call + {minimum:g} s"
            )
        grace = float(spec.get("terminationGracePeriodSeconds", 30))
        if grace < max(wait, minimum) + 2 * drain + 10:
            errors.append(
                f"{manifest.ref}: terminationGracePeriodSeconds={grace:g} < preStop {max(wait, minimum):g} s "
                f"+ 2 x GATEWAY_DRAIN_TIMEOUT_SECONDS + 10 s"
            )
        for name in ("GATEWAY_API_KEYS", "TWILIO_AUTH_TOKEN"):
            ref = (env.get(name) or {}).get("secretKeyRef") if isinstance(env.get(name), dict) else None
            if ref is None:
                errors.append(f"{manifest.ref}: {name} is not read from a Secret")
            elif ref.get("optional", False) is not False:
                errors.append(f"{manifest.ref}: {name} is an optional secretKeyRef (a missing key would fail open)")
    return errors


def routed_paths(manifest: Manifest) -> list[str]:
    """The paths an Ingress or HTTPRoute routes.

    Args:
        manifest: A rendered Ingress or HTTPRoute.

    Returns:
        Every path of its rules (``/`` where a rule names none).
    """
    spec = manifest.obj.get("spec") or {}
    if manifest.kind == "Ingress":
        return [p.get("path", "/") for r in spec.get("rules") or [] for p in (r.get("http") or {}).get("paths") or []]
    return [(m.get("path") or {}).get("value", "/") for r in spec.get("rules") or [] for m in r.get("matches") or [{}]]


def check_routes(objects: list[Manifest]) -> list[str]:
    """No Ingress or HTTPRoute routes /, /metrics, /ws, /ws/channels or the probes.

    Args:
        objects: Every object of the release.

    Returns:
        One line per private path routed.
    """
    return [
        f"{m.ref}: routes {path!r}, which must stay internal (docs/security.md)"
        for m in objects
        if m.kind in ("Ingress", "HTTPRoute")
        for path in routed_paths(m)
        if path.rstrip("/") in {p.rstrip("/") for p in PRIVATE_PATHS} or path.startswith("/metrics")
    ]


def autoscalers_by_target(objects: list[Manifest]) -> dict[str, list[Manifest]]:
    """HPAs and ScaledObjects, by the name of the Deployment they scale.

    Args:
        objects: Every object of the release.

    Returns:
        Deployment name to the autoscalers that target it.
    """
    targets: dict[str, list[Manifest]] = {}
    for manifest in objects:
        if manifest.kind in ("HorizontalPodAutoscaler", "ScaledObject"):
            target = manifest.obj.get("spec", {}).get("scaleTargetRef", {})
            if target.get("kind", "Deployment") == "Deployment":
                targets.setdefault(str(target.get("name")), []).append(manifest)
    return targets


def check_autoscaling(objects: list[Manifest]) -> list[str]:
    """One autoscaler per Deployment, targets that exist, no fixed replicas under an autoscaler.

    Args:
        objects: Every object of the release.

    Returns:
        What is wrong, one line each.
    """
    errors = []
    deployments = {m.name: m for m in objects if m.kind == "Deployment"}
    for target, scalers in autoscalers_by_target(objects).items():
        refs = ", ".join(s.ref for s in scalers)
        if len(scalers) > 1:
            errors.append(f"Deployment/{target}: more than one autoscaler ({refs}); keep one")
        if target not in deployments:
            errors.append(f"{refs}: scales Deployment/{target}, which the chart does not render")
        elif "replicas" in deployments[target].obj.get("spec", {}):
            errors.append(f"Deployment/{target}: sets spec.replicas although {refs} owns the replica count")
    return errors


def minimum_replicas(deployment: Manifest, scalers: list[Manifest]) -> int:
    """The fewest replicas a Deployment runs with.

    Args:
        deployment: A rendered Deployment.
        scalers: The autoscalers that target it (the first one decides).

    Returns:
        The autoscaler's minimum, else the Deployment's replicas (1 when unset).
    """
    for scaler in scalers:
        spec = scaler.obj.get("spec", {})
        return int(spec.get("minReplicas", spec.get("minReplicaCount", 1)))
    return int(deployment.obj.get("spec", {}).get("replicas", 1))


def check_disruption(objects: list[Manifest]) -> list[str]:
    """Deployments of more than one replica have a PodDisruptionBudget; every Deployment a NetworkPolicy.

    Every Deployment also rolls out with ``maxUnavailable: 0``.

    Args:
        objects: Every object of the release.

    Returns:
        What is wrong, one line each.
    """
    errors = []
    scalers = autoscalers_by_target(objects)
    pdbs = [m for m in objects if m.kind == "PodDisruptionBudget"]
    policies = [m for m in objects if m.kind == "NetworkPolicy"]
    for deployment in (m for m in objects if m.kind == "Deployment"):
        labels = pod_labels(deployment)
        if minimum_replicas(deployment, scalers.get(deployment.name, [])) > 1 and not any(
            selects(p.obj["spec"].get("selector", {}), labels) for p in pdbs
        ):
            errors.append(f"{deployment.ref}: runs several replicas but no PodDisruptionBudget selects it")
        if not any(selects(p.obj["spec"].get("podSelector", {}), labels) for p in policies):
            errors.append(f"{deployment.ref}: no NetworkPolicy selects its pods (networkPolicy.enabled is false?)")
        strategy = deployment.obj.get("spec", {}).get("strategy", {}).get("rollingUpdate", {})
        if strategy.get("maxUnavailable") not in (0, "0", "0%"):
            errors.append(f"{deployment.ref}: rollingUpdate.maxUnavailable is not 0 (a rollout would drop capacity)")
    return errors


def check_policies(objects: list[Manifest]) -> list[str]:
    """Every platform policy over a rendered release.

    Args:
        objects: Every object of the release.

    Returns:
        What is wrong, one line each: workloads, autoscaling, disruption, custom resources, the
        gateway's drain and secrets, then the routes.
    """
    return (
        check_workloads(objects)
        + check_autoscaling(objects)
        + check_disruption(objects)
        + check_custom(objects)
        + check_gateway(objects)
        + check_routes(objects)
    )
