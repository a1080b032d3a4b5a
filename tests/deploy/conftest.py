"""Fixtures of the deployment tests: the chart checker (deploy/helm/check.py) and the probe script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str, path: Path) -> ModuleType:
    """Imports a script that is not part of a package (deploy/ holds no Python packages)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def check() -> ModuleType:
    """deploy/helm/check.py as a module."""
    return load_script("voice_deploy_check", ROOT / "deploy" / "helm" / "check.py")


@pytest.fixture(scope="session")
def probe() -> ModuleType:
    """deploy/docker/probe.py (``voice-probe`` in the images) as a module."""
    return load_script("voice_deploy_probe", ROOT / "deploy" / "docker" / "probe.py")
