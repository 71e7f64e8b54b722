"""checkov over what we ship for deployment: the rendered Kubernetes overlay, the InferenceServices and
the Dockerfiles. No finding may fail; each one skipped carries its reason in the manifest itself
(``checkov.io/skipN`` annotations) and a row in docs/kubernetes.md. checkov lives in its own virtual
environment (``make test`` makes ``.venv-checkov``; it pins dependencies of its own)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

CHECKOV = os.environ.get("CHECKOV") or shutil.which("checkov") or str(ROOT / ".venv-checkov" / "bin" / "checkov")


def run_checkov(*args: str) -> list[dict]:
    if not os.path.exists(CHECKOV):
        pytest.skip("checkov is not installed (make test installs it in .venv-checkov)")
    r = subprocess.run([CHECKOV, "--compact", "-o", "json", "--skip-download", *args],
                       capture_output=True, text=True, timeout=600)
    out = json.loads(r.stdout or "[]")
    return out if isinstance(out, list) else [out]


def failed(reports: list[dict]) -> list[str]:
    return [f"{c['check_id']} {c['resource']} ({c['file_path']})" for rep in reports
            for c in rep.get("results", {}).get("failed_checks", [])]


def test_kubernetes_manifests_have_no_failing_finding(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / "example")],
                              capture_output=True, text=True, check=True).stdout
    (tmp_path / "rendered.yaml").write_text(rendered)
    for f in (ROOT / "deploy" / "kserve").glob("*.yaml"):
        shutil.copy(f, tmp_path)
    reports = run_checkov("-d", str(tmp_path), "--framework", "kubernetes")
    assert not failed(reports), failed(reports)
    skipped = {c["check_id"] for rep in reports for c in rep.get("results", {}).get("skipped_checks", [])}
    documented = (ROOT / "docs" / "kubernetes.md").read_text()
    assert skipped and all(check in documented for check in skipped), skipped
    passed = sum(len(rep.get("results", {}).get("passed_checks", [])) for rep in reports)
    assert passed > 100


def test_dockerfiles_have_no_failing_finding():
    reports = run_checkov("-d", str(ROOT / "docker"), "--framework", "dockerfile")
    assert not failed(reports), failed(reports)
    skipped = {c["check_id"] for rep in reports for c in rep.get("results", {}).get("skipped_checks", [])}
    documented = (ROOT / "docs" / "kubernetes.md").read_text()
    assert all(check in documented for check in skipped), skipped
