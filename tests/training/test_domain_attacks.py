"""scripts/domain_attacks.py with --images: attacks crafted from real uncompressed images and from their
JPEG copies, judged by a shipped bundle."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHIPPED_CIFAR10

ROOT = Path(__file__).resolve().parents[2]


def test_attacks_from_the_shipped_originals(tmp_path):
    if not (SHIPPED_CIFAR10 / "manifest.json").is_file():
        pytest.skip("models/cifar10 is not shipped in this checkout")
    out = tmp_path / "attacks.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "domain_attacks.py"), "--bundle", str(SHIPPED_CIFAR10),
                          "--images", str(ROOT / "tests" / "data" / "cifar10-originals"), "--attacks", "fgsm:0.05",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["originals"] == 20 and report["copy_quality"] == 75 and "validation_images" not in report
    rows = report["bundles"][str(SHIPPED_CIFAR10)]
    assert set(rows) == {"jpeg", "original"}
    for row in rows.values():
        attack = row["fgsm_eps0.05"]
        assert row["classifier_right"] >= 0.8  # the classifier gets most of these 20 right ...
        assert attack["no_defense"] < row["classifier_right"]  # ... and FGSM at 0.05 takes some away
        for v in (row["clean"], attack):
            assert 0 <= v["rejected"] <= 1 and v["accepted_and_right"] <= v["defended"] <= 1
            assert v["defended"] == pytest.approx(v["rejected"] + v["accepted_and_right"], abs=1e-9)
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "domain_attacks.py"), "--bundle", str(SHIPPED_CIFAR10)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--images" in bad.stderr
