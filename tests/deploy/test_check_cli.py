"""deploy/helm/check.py as the make targets run it: a script, from any directory, with its checks package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

CHECK = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "check.py"


def test_the_script_runs_from_another_directory(tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("services:\n  stt:\n    replicas: -3\n")
    good = tmp_path / "good-values.yaml"
    good.write_text("services:\n  stt:\n    replicas: 2\n")

    passed = subprocess.run(
        [sys.executable, str(CHECK), "lint", "validate", "--values", str(good)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert f"k8s-validate {good}: ok" in passed.stdout

    failed = subprocess.run(
        [sys.executable, str(CHECK), "validate", "--values", str(bad)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1
    assert "at '/services/stt/replicas': minimum: got -3, want 1" in failed.stdout


def test_every_public_name_is_importable_from_check(check: ModuleType) -> None:
    for name in check.__all__:
        assert getattr(check, name) is not None, name
    # The re-exports are the checks' own objects, so a Manifest built here passes their isinstance checks.
    objects = check.manifests(check.render({}))
    assert objects and all(isinstance(m, check.Manifest) for m in objects)
    assert check.check_policies(objects) == []
