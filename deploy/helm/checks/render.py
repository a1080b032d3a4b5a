"""Rendering, ``helm lint`` and Kubernetes schema validation of the chart.

Rendering and linting use Helm's own Go SDK through ``helm-python-sdk`` (no ``helm`` binary);
every rendered built-in object is validated with ``kubernetes-validate`` against the Kubernetes
``KUBE_VERSION`` schemas in strict mode (unknown fields are errors). The custom resources have no
schema there and are left to ``checks.custom_resources``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .custom_resources import CUSTOM_RESOURCES
from .model import CHART, KUBE_VERSION, NAMESPACE, RELEASE, ChartError, Manifest


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

    Args:
        values: Overrides of the chart's values.yaml.
        chart: The chart directory.

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
    """Parses the rendered YAML files (NOTES.txt and empty documents left out).

    Args:
        rendered: What :func:`render` returned.

    Returns:
        The objects, by template path then in the template's order.
    """
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

    Args:
        objects: The rendered objects.
        kube_version: The Kubernetes version whose schemas apply.

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
