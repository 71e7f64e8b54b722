"""The per-image latency benchmark writes what its results page shows (figures are not asserted: they
belong in docs/results, not in a timed test)."""

import json

from bench import defense_latency
from tests.conftest import SHIPPED_CIFAR10, SHIPPED_MNIST


def test_latency_benchmark_writes_json_and_markdown(tmp_path):
    out = tmp_path / "lat.json"
    assert defense_latency.main(["--bundle", str(SHIPPED_MNIST), str(SHIPPED_CIFAR10), "--calls", "5",
                                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].endswith(f"--out {out}") and result["threads"] == 1
    assert [r["bundle"] for r in result["rows"]] == [str(SHIPPED_MNIST), str(SHIPPED_CIFAR10)]
    for row in result["rows"]:
        for part in ("reformer", "classifier_2_rows", "full_path"):
            assert 0 < row[part]["median_ms"] <= row[part]["p90_ms"]
    md = out.with_suffix(".md").read_text()
    assert md.count(f"| `{SHIPPED_CIFAR10}` |") == 1
