"""The chart's paths and constants, and the model of a rendered release shared by every check.

A rendered Kubernetes object is a :class:`Manifest` (its template and its object); the findings of
one value set are a :class:`Report`. The helpers here read values files and pull pod specs, labels,
containers and environments out of rendered objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = Path(__file__).resolve().parents[1] / "voice-platform"
CI_VALUES = CHART / "ci"
VALUE_SETS = ("default", "production", "minimal-cpu")
KUBE_VERSION = "1.31.0"
RELEASE = "voice-platform"
NAMESPACE = "voice"
WORKLOAD_KINDS = {"Deployment", "Pod"}


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
        """The object's ``kind`` (empty when missing)."""
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        """The object's ``metadata.name`` (empty when missing)."""
        return str(self.obj.get("metadata", {}).get("name", ""))

    @property
    def ref(self) -> str:
        """``Kind/name (template)``, how findings name the object."""
        return f"{self.kind}/{self.name} ({self.source})"

    @property
    def is_test(self) -> bool:
        """Whether the object is a ``helm test`` hook."""
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
    """Reads a values file (an empty file is no override).

    Args:
        path: The values file.

    Returns:
        The values.

    Raises:
        ChartError: The file holds something other than a mapping.
    """
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ChartError(f"{path}: a values file holds a mapping, not {type(data).__name__}")
    return data


def value_set_path(name: str) -> Path:
    """The file of one of the CI value sets.

    Args:
        name: ``default``, ``production`` or ``minimal-cpu``.

    Returns:
        ``voice-platform/ci/<name>-values.yaml``.
    """
    return CI_VALUES / f"{name}-values.yaml"


def pod_spec(manifest: Manifest) -> dict[str, Any] | None:
    """The pod spec of a Deployment or Pod.

    Args:
        manifest: Any rendered object.

    Returns:
        The pod spec, or None for other kinds.
    """
    if manifest.kind == "Deployment":
        return manifest.obj.get("spec", {}).get("template", {}).get("spec", {})
    if manifest.kind == "Pod":
        return manifest.obj.get("spec", {})
    return None


def pod_labels(manifest: Manifest) -> dict[str, str]:
    """The labels of the pods a Deployment creates, or of a Pod.

    Args:
        manifest: A Deployment or a Pod (of other kinds, the object's own labels).

    Returns:
        The labels (empty when none).
    """
    if manifest.kind == "Deployment":
        return manifest.obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {}
    return manifest.obj.get("metadata", {}).get("labels") or {}


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container of a pod spec, init containers included.

    Args:
        spec: A pod spec.

    Yields:
        The init containers, then the containers.
    """
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a ``matchLabels`` selector selects ``labels``.

    Args:
        selector: A label selector (only ``matchLabels`` is read).
        labels: The labels of an object.

    Returns:
        True when the selector is not empty and every label it names matches.
    """
    match = selector.get("matchLabels") or {}
    return bool(match) and all(labels.get(key) == value for key, value in match.items())


def env_values(container: dict[str, Any]) -> dict[str, Any]:
    """A container's environment.

    Args:
        container: A container of a pod spec.

    Returns:
        Variable name to its value (or to its ``valueFrom``).
    """
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}
