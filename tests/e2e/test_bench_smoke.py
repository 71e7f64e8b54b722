"""The load benchmark runs end to end (a smoke run of a second per row): every row it plans is served
without errors, with its memory and versions recorded and a plot drawn. Figures come from real runs
(docs/results/bench-*.md), never from this test."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DATA_DIR, SHIPPED_MNIST

pytestmark = pytest.mark.skipif(not (SHIPPED_MNIST / "manifest.json").exists(), reason="no shipped MNIST bundle")


def test_every_row_of_a_short_run_is_served_without_errors(tmp_path, mnist):
    from bench.gateway_load import main

    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["--data-dir", str(DATA_DIR), "--seconds", "1", "--warmup", "0.2", "--concurrency", "4",
                 "--workers", "1", "--wire", "json,binary", "--out", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {
        "kserve_direct_json", "gateway_embedded_json_w1", "gateway_to_kserve_json_w1",
        "gateway_to_kserve_unbatched_json_w1", "kserve_direct_binary", "gateway_embedded_binary_w1",
        "gateway_to_kserve_binary_w1"}
    for name, row in report["results"].items():
        assert row["requests"] > 0 and row["errors"] == 0, name
        assert row["rss_mb"] > 20, name
    assert report["versions"]["onnxruntime"] and "cores" in report["machine"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
