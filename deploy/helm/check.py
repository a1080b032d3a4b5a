"""Lints, renders and validates the voice-platform Helm chart, and lints the Dockerfiles.

Run by ``make helm-lint`` and ``make k8s-validate`` (both part of ``make test``)::

    python deploy/helm/check.py lint                  # helm lint (strict) of every value set
    python deploy/helm/check.py validate              # render, Kubernetes schemas, policies
    python deploy/helm/check.py hadolint              # services/*/Dockerfile*
    python deploy/helm/check.py validate --values my-values.yaml   # another value set

Rendering and linting use Helm's own Go SDK through ``helm-python-sdk`` (no ``helm`` binary);
every rendered object is validated with ``kubernetes-validate`` against the Kubernetes
``KUBE_VERSION`` schemas in strict mode (unknown fields are errors). The custom resources
(KEDA's ScaledObject, Prometheus Operator's ServiceMonitor and PrometheusRule, Gateway API's
HTTPRoute) have no schema there: their shape is checked here instead. Then the platform's policies:
pinned image tags, resources on every container, non-root restricted security contexts, probes on
every serving container, one autoscaler per Deployment, KEDA reading a NATS headless Service,
disruption budgets and network policies for every Deployment, a gateway drain that outlasts its
longest call, required secrets, and an Ingress that routes no internal or unauthenticated path.

This module is the command line and the public API (tests and ``deploy/images`` import it by path);
the checks live in the ``checks`` package beside it: ``checks.model`` (paths, constants, the
rendered-object model), ``checks.render`` (render, lint, Kubernetes schemas), ``checks.policies``,
``checks.custom_resources`` and ``checks.hadolint``. Every public name of those is re-exported here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# The checks package sits beside this file; put it on the path also when this file is imported
# by its path (importlib) rather than run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checks.custom_resources import (
    CUSTOM_RESOURCES,
    ENDPOINT_RE,
    check_custom,
    check_scaled_object,
    check_service_monitor,
)
from checks.hadolint import HADOLINT_CONFIG, dockerfiles, hadolint
from checks.model import (
    CHART,
    CI_VALUES,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    ROOT,
    VALUE_SETS,
    WORKLOAD_KINDS,
    ChartError,
    Manifest,
    Report,
    containers,
    env_values,
    load_values,
    pod_labels,
    pod_spec,
    selects,
    value_set_path,
)
from checks.policies import (
    IMAGE_RE,
    PRIVATE_PATHS,
    autoscalers_by_target,
    check_autoscaling,
    check_container,
    check_disruption,
    check_gateway,
    check_image,
    check_policies,
    check_routes,
    check_workloads,
    minimum_replicas,
    routed_paths,
)
from checks.render import lint, manifests, render, validate_schemas

__all__ = [
    "CHART",
    "CI_VALUES",
    "CUSTOM_RESOURCES",
    "ENDPOINT_RE",
    "HADOLINT_CONFIG",
    "IMAGE_RE",
    "KUBE_VERSION",
    "NAMESPACE",
    "PRIVATE_PATHS",
    "RELEASE",
    "ROOT",
    "VALUE_SETS",
    "WORKLOAD_KINDS",
    "ChartError",
    "Manifest",
    "Report",
    "autoscalers_by_target",
    "check_autoscaling",
    "check_container",
    "check_custom",
    "check_disruption",
    "check_gateway",
    "check_image",
    "check_policies",
    "check_routes",
    "check_scaled_object",
    "check_service_monitor",
    "check_workloads",
    "containers",
    "dockerfiles",
    "env_values",
    "hadolint",
    "lint",
    "lint_values",
    "load_values",
    "main",
    "manifests",
    "minimum_replicas",
    "pod_labels",
    "pod_spec",
    "print_report",
    "render",
    "routed_paths",
    "selects",
    "validate_schemas",
    "validate_values",
    "value_set_path",
    "value_sets",
]


def validate_values(name: str, values: dict[str, Any]) -> Report:
    """Renders one value set and runs the schema and policy checks on it.

    Args:
        name: How the report names the value set.
        values: Overrides of the chart's values.yaml.

    Returns:
        The findings; a render failure is its only error.
    """
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
    """``helm lint --strict`` of one value set.

    Args:
        name: How the report names the value set.
        values: Overrides of the chart's values.yaml.

    Returns:
        The findings.
    """
    report = Report(name)
    report.errors = lint(values)
    return report


def value_sets(extra: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The CI value sets, or the files named on the command line.

    Args:
        extra: Values files given with ``--values`` (none: the CI value sets).

    Returns:
        Name (or path) and values of each set.
    """
    if extra:
        return [(path, load_values(Path(path))) for path in extra]
    return [(name, load_values(value_set_path(name))) for name in VALUE_SETS]


def print_report(action: str, report: Report, verbose: bool) -> None:
    """One line per value set, then its findings.

    Args:
        action: What was done (``helm lint``, ``k8s-validate``).
        report: The findings of one value set.
        verbose: Also print the notes (what was skipped and why).
    """
    status = "FAILED" if report.errors else "ok"
    size = f", {report.objects} objects" if report.objects else ""
    print(f"{action} {report.name}: {status}{size}")
    for error in report.errors:
        print(f"  error: {error}")
    if verbose:
        for note in report.notes:
            print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    """Runs the requested checks.

    Args:
        argv: The command line without the program (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 1 when any check failed, else 0.
    """
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
