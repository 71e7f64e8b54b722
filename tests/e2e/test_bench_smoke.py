"""The load benchmark runs end to end (a smoke run of a second per row and concurrency): every row it
plans is served without errors at every concurrency, with its memory, versions and the model server's
script hash recorded, a plot drawn and the results page written. Figures come from real runs
(docs/results/bench-*.md), never from this test."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import DATA_DIR, SHIPPED_CIFAR10_POOL, SHIPPED_MNIST
from tests.procs import MODEL_SERVER

pytestmark = pytest.mark.skipif(not (SHIPPED_MNIST / "manifest.json").exists(), reason="no shipped MNIST bundle")


def test_every_row_of_a_short_run_is_served_without_errors(tmp_path, mnist):
    from bench.gateway_load import main

    out, png, md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    assert main(["--data-dir", str(DATA_DIR), "--seconds", "1", "--warmup", "0.2", "--concurrency", "1,4",
                 "--workers", "1", "--wire", "json,binary", "--out", str(out), "--plot", str(png),
                 "--md", str(md)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {
        "kserve_direct_json", "gateway_embedded_json_w1", "gateway_to_kserve_json_w1",
        "gateway_to_kserve_unbatched_json_w1", "kserve_direct_binary", "gateway_embedded_binary_w1",
        "gateway_to_kserve_binary_w1"}
    for name, row in report["results"].items():
        assert set(row["runs"]) == {"1", "4"}, name
        for run in row["runs"].values():
            assert run["requests"] > 0 and run["errors"] == 0, name
        assert row["rss_mb"] > 20, name
        if not name.startswith("kserve"):
            assert row["peak_rss_per_process_mb"] >= 20, name
    assert report["results"]["kserve_direct_json"]["runs"]["4"]["ratio_to_kserve"] == 1.0
    assert report["versions"]["onnxruntime"] and "cores" in report["machine"]
    assert report["model_server"]["script_sha256"] == hashlib.sha256(MODEL_SERVER.read_bytes()).hexdigest()
    assert report["upstream_rows_per_image"] == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "## 1 concurrent client" in text and "## 4 concurrent clients" in text
    assert "| gateway_to_kserve_binary_w1 |" in text


def test_a_pool_with_divergence_detectors_is_benchmarked_with_two_upstream_rows_per_image(tmp_path, cifar10):
    from bench.gateway_load import main

    out = tmp_path / "bench.json"
    assert main(["--data-dir", str(DATA_DIR), "--bundle", str(SHIPPED_CIFAR10_POOL), "--seconds", "1",
                 "--warmup", "0.2", "--concurrency", "2", "--wire", "binary", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["upstream_rows_per_image"] == 2
    assert report["model_server"]["model_file"].endswith(".onnx")
    for name, row in report["results"].items():
        assert row["runs"]["2"]["requests"] > 0 and row["runs"]["2"]["errors"] == 0, name


def test_core_throughput_measures_both_variants_and_checks_decisions(tmp_path, mnist):
    pytest.importorskip("onnx")
    from bench.core_throughput import main

    out = tmp_path / "core.json"
    assert main(["--data-dir", str(DATA_DIR), "--bundle", str(SHIPPED_MNIST), "--batch", "16", "--seconds", "0.2",
                 "--threads", "1", "--check", "100", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["bundles"][str(SHIPPED_MNIST)]
    assert set(rows) == {"separate", "fused"}
    for row in rows.values():
        assert row["screen_img_per_s"] > 0 and row["core_img_per_s"] > 0
        # on the CPU the fused graph computes what the separate sessions do: the same decisions and labels,
        # scores equal up to float rounding (a fused graph may run at another graph optimization level
        # than a small autoencoder's own session: MAGNET_ORT_OPTIMIZATION=auto)
        check = dict(row["check"])
        assert check.pop("max_score_diff") < 1e-6
        assert check == {"images": 100, "decisions_differ": 0, "labels_differ": 0}


def test_the_load_can_come_from_several_processes(mnist):
    from bench.gateway_load import drive, mnist_json_requests
    from tests.procs import start_model_server

    _, v2 = mnist_json_requests(DATA_DIR, 20)
    kserve, url = start_model_server(SHIPPED_MNIST / "classifier.onnx", "mnist")
    try:
        figures = drive(f"{url}/v2/models/mnist/infer", v2, 1.0, 4, processes=2)
    finally:
        kserve.stop()
    assert figures["requests"] > 0 and figures["errors"] == 0 and figures["p99_ms"] >= figures["p50_ms"] > 0


def test_the_connection_spread_counts_every_connection_on_a_worker(mnist, capsys):
    from bench.connection_spread import main

    assert main(["--data-dir", str(DATA_DIR), "--workers", "2", "--connections", "6", "--rounds", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    rounds = [[int(n) for n in r.split(" / ")] for r in line.split(": ", 1)[1].split(", ")]
    assert len(rounds) == 2 and all(len(r) == 2 and sum(r) == 6 for r in rounds), line


def test_the_in_process_cost_benchmark_runs_both_route_kinds(tmp_path, mnist):
    from bench.asgi_cost import main

    for extra in ([], ["--fastapi-routes"], ["--lean-chain"]):
        out = tmp_path / f"cost{len(extra)}{extra[:1]}.json"
        assert main(["--data-dir", str(DATA_DIR), "--requests", "20", "--rounds", "2", "--out", str(out), *extra]) == 0
        report = json.loads(out.read_text())
        assert report["fastapi_routes"] is (extra == ["--fastapi-routes"]) and len(report["rounds"]) == 2
        for row in report["rounds"]:
            assert 0 < row["route_work_cpu_ms"] and 0 < row["app_cpu_ms"] < 1000
            assert ("lean_chain_cpu_ms" in row) is (extra == ["--lean-chain"])
            if "lean_chain_cpu_ms" in row:  # the handler ran and answered 200 (checked per request)
                assert 0 < row["lean_chain_cpu_ms"] < 1000


def test_the_stage_breakdown_reports_cpu_per_request_under_a_closed_loop(mnist, capsys):
    from bench.stage_breakdown import main

    assert main(["--data-dir", str(DATA_DIR), "--concurrency", "4", "--seconds", "0.5"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("4 clients")]
    assert len(lines) == 4 and sum("through the gateway" in line for line in lines) == 2
    for line in lines:
        assert "CPU ms per request: KServe" in line and "load generator" in line
    assert " 0 req/s" not in "".join(lines)


def test_the_hop_floor_runs_its_three_targets_and_the_forwarding_proxy_answers_as_kserve(tmp_path, mnist):
    """bench.hop_floor: KServe direct, the do-nothing forwarding proxy and the gateway, each served without
    errors; the summary's differences are those of the rounds' p50s."""
    from bench.hop_floor import main

    out = tmp_path / "hop.json"
    assert main(["--data-dir", str(DATA_DIR), "--seconds", "1", "--warmup", "0.2", "--rounds", "2",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 2
    for rd in report["rounds"]:
        assert set(rd) == {"kserve_direct", "floor_proxy", "gateway_to_kserve"}
        assert all(run["requests"] > 0 and run["errors"] == 0 for run in rd.values())
        assert all(run["server_cpu_ms_per_request"] > 0 and run["kserve_cpu_ms_per_request"] > 0 for run in rd.values())
    s = report["summary"]
    p50 = s["p50_ms_median_of_rounds"]
    assert s["added_p50_ms"] == pytest.approx(p50["gateway_to_kserve"] - p50["kserve_direct"])
    assert s["hop_ms"] + s["gateway_work_ms"] == pytest.approx(s["added_p50_ms"])


def test_the_speculation_bench_serves_both_variants_behind_a_server_that_answers_late(tmp_path, mnist):
    """bench.speculation: the stand-in model server answers the classifier's logits, no sooner than its
    delay; both gateway variants in front of it are served without errors."""
    import numpy as np
    import orjson

    from bench.speculation import DistantServer, main
    from service.defense import Defense

    defense = Defense(SHIPPED_MNIST, device="cpu")
    server = DistantServer(str(defense.classifier_file), "mnist", 0.0)
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    body = orjson.dumps({"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32",
                                     "data": x.ravel().tolist()}]})
    out = orjson.loads(server.infer(body))["outputs"][0]
    np.testing.assert_allclose(np.asarray(out["data"]).reshape(out["shape"]), defense.classifier(x), rtol=1e-5, atol=1e-5)

    report_file = tmp_path / "speculation.json"
    assert main(["--data-dir", str(DATA_DIR), "--delay-ms", "5", "--seconds", "1", "--warmup", "0.2", "--rounds", "1",
                 "--out", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    (rd,) = report["rounds"]
    assert set(rd) == {"direct", "speculate_off", "speculate_auto"}
    assert all(run["requests"] > 0 and run["errors"] == 0 for run in rd.values())
    assert rd["direct"]["p50_ms"] >= 5.0  # the delay is served
    assert report["summary"]["saved_ms_per_round"][0] == pytest.approx(
        rd["speculate_off"]["p50_ms"] - rd["speculate_auto"]["p50_ms"])


def test_the_forwarding_proxy_passes_bodies_and_statuses_through():
    import asyncio

    from bench.hop_floor import ForwardingApp
    from tests.procs import start_model_server

    proc, url = start_model_server(SHIPPED_MNIST / "classifier.onnx", "mnist")
    try:
        app = ForwardingApp(url)

        async def call(method: str, path: str, body: bytes) -> tuple[int, bytes]:
            sent, chunks = [], [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                return chunks.pop(0)

            async def send(message):
                sent.append(message)

            await app({"type": "http", "method": method, "path": path}, receive, send)
            return sent[0]["status"], sent[1]["body"]

        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                       "data": [0.0] * 784}]}).encode()
        async def both():
            try:
                return await call("POST", "/v2/models/mnist/infer", body), await call("POST", "/v2/models/nope/infer", body)
            finally:
                await app.client.close()

        (status, answer), (missing, _) = asyncio.run(both())
        assert status == 200 and json.loads(answer)["outputs"][0]["shape"] == [1, 10]
        assert missing == 404
    finally:
        proc.stop()


def test_the_optimization_level_bench_times_every_model_at_each_level(tmp_path):
    from bench.ort_levels import main

    out = tmp_path / "levels.json"
    assert main(["--bundles", str(SHIPPED_MNIST), "--batches", "1,2", "--seconds", "0.01", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["file"] for r in rows] == ["ae_i.onnx", "ae_ii.onnx", "classifier.onnx"]
    for r in rows:
        assert set(r["ms"]) == {"all", "extended", "basic"} and all(set(t) == {"1", "2"} for t in r["ms"].values())
        assert r["auto"] in ("all", "extended") and all(v > 0 for t in r["ms"].values() for v in t.values())


def test_attack_batch_cost_reports_every_size_per_step_and_per_image(tmp_path):
    import torch

    from bench.attack_batch import main

    out, threads = tmp_path / "cost.json", torch.get_num_threads()
    assert main(["--sizes", "1", "2", "--steps", "1", "--repeats", "1", "--note", "smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 2] and report["threads"] == 1 and report["note"] == "smoke"
    for r in report["rows"]:
        assert r["ms_per_step"] > 0 and r["ms_per_image"] == pytest.approx(r["ms_per_step"] / r["batch"], abs=0.01)
    assert report["rows"][0]["images_per_second_vs_batch_1"] == 1.0
    assert torch.get_num_threads() == threads  # the process's setting is left as it was
