"""The drift alert shipped beside the dashboard, run by Prometheus's own rule tester (promtool, from the
Debian `prometheus` package): it fires when traffic is rejected far above the calibrated rate, for long
enough and on enough inputs, and stays quiet otherwise."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

PROMTOOL = shutil.which("promtool")
RULES = ROOT / "docker" / "prometheus" / "alerts.yml"

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")


def _series(instance: str, per_minute_total: int, per_minute_rejected: int, expected: float) -> list[dict]:
    """One gateway's counters over 40 minutes, scraped every minute."""
    labels = f'job="magnet-gateway", instance="{instance}"'
    accepted = per_minute_total - per_minute_rejected
    return [
        {"series": f'magnet_inputs_total{{{labels}, decision="accepted"}}', "values": f"0+{accepted}x40"},
        {"series": f'magnet_inputs_total{{{labels}, decision="rejected"}}', "values": f"0+{per_minute_rejected}x40"},
        {"series": f"magnet_expected_rejection_ratio{{{labels}}}", "values": f"{expected}x40"},
    ]


def test_the_drift_alert_fires_on_a_rejection_surge_only(tmp_path):
    assert subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True).returncode == 0
    series = (_series("calm:8000", 100, 2, 0.02)       # 2 % rejected, calibrated at 2 %: quiet
              + _series("attacked:8000", 100, 30, 0.02)  # 30 %: fires
              + _series("quiet:8000", 5, 3, 0.02))       # 60 %, but 75 inputs in 15 min: too few to tell
    alert = {"alertname": "MagnetRejectionRateAboveCalibration"}
    assert alert["alertname"] in RULES.read_text()
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [
            # 5 minutes in, the surge is visible but the alert is still pending ("for: 10m"): not firing
            {"eval_time": "5m", "alertname": alert["alertname"], "exp_alerts": []},
            {"eval_time": "30m", "alertname": alert["alertname"], "exp_alerts": [{
                "exp_labels": {"severity": "warning", "job": "magnet-gateway", "instance": "attacked:8000"},
                "exp_annotations": {
                    "summary": "MagNet rejects 30% of inputs on attacked:8000",
                    "description": "The gateway's detectors were calibrated to reject about 2% of clean inputs, "
                                   "but rejected 30% over the last 15 minutes. Look at "
                                   "magnet_detector_rejections_total (which detector fires) and at recent "
                                   "traffic: an attack, or inputs unlike the training data (preprocessing, "
                                   "camera, upstream model changed). In shadow mode nothing was rejected for "
                                   "real (magnet_shadow_mode = 1)."}}]},
        ],
        "promql_expr_test": [{"expr": 'magnet:rejection_ratio:rate15m{instance="calm:8000"}', "eval_time": "20m",
                              "exp_samples": [{"labels": 'magnet:rejection_ratio:rate15m{job="magnet-gateway", '
                                                         'instance="calm:8000"}', "value": 0.02}]}],
    }]}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    run = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_mounts_the_rules_and_prometheus_loads_them():
    config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]  # relative to the config file, here and in compose
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "./docker/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]
