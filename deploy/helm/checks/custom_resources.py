"""The shape of the custom resources that ``kubernetes-validate`` has no schema for.

KEDA's ScaledObject (its fields, replica bounds, and a ``nats-jetstream`` trigger on a work queue of
``voice_bus.catalog`` read through a NATS headless Service), Prometheus Operator's ServiceMonitor
(it selects a Service of the chart and scrapes one of its ports) and PrometheusRule, and Gateway
API's HTTPRoute.
"""

from __future__ import annotations

import re

from .model import Manifest, selects

# Custom resources without a schema in kubernetes-validate: validated by their own checks below.
CUSTOM_RESOURCES = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}
ENDPOINT_RE = re.compile(r"^(?P<host>[a-z0-9]([a-z0-9.-]*[a-z0-9])?):(?P<port>[0-9]+)$")


def check_scaled_object(manifest: Manifest) -> list[str]:
    """A KEDA ScaledObject: its shape, and a nats-jetstream trigger on a NATS headless Service.

    Args:
        manifest: A rendered ScaledObject.

    Returns:
        What is wrong with it, one line each.
    """
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
    """A ServiceMonitor selects one of the rendered Services and scrapes a port it has.

    Args:
        manifest: A rendered ServiceMonitor.
        objects: Every object of the release.

    Returns:
        What is wrong with it, one line each.
    """
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
    """The custom resources that kubernetes-validate has no schema for.

    Args:
        objects: Every object of the release.

    Returns:
        What is wrong, one line each.
    """
    errors = []
    for manifest in objects:
        if manifest.kind == "ScaledObject":
            errors += check_scaled_object(manifest)
        elif manifest.kind == "ServiceMonitor":
            errors += check_service_monitor(manifest, objects)
        elif manifest.kind == "PrometheusRule":
            groups = (manifest.obj.get("spec") or {}).get("groups") or []
            if not groups or not all(g.get("name") and g.get("rules") for g in groups):
                errors.append(f"{manifest.ref}: spec.groups needs named groups with rules")
        elif manifest.kind == "HTTPRoute":
            spec = manifest.obj.get("spec") or {}
            if not spec.get("parentRefs") or not spec.get("rules"):
                errors.append(f"{manifest.ref}: needs parentRefs and rules")
    return errors
