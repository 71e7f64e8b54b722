"""The uncompressed-domain estimate (training.evaluate.domain_shift): its arithmetic on known scores,
and one small run on the shipped bundle and the shipped originals."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from training.evaluate.domain_shift import (estimate, estimate_loglinear, estimator_check, fit_loglinear, interval,
                                            interval_refit, main)

REPO = Path(__file__).resolve().parents[2]


def test_estimate_scales_every_test_score_by_each_pair_ratio():
    test = {"a": np.array([1.0, 2.0, 3.0, 4.0]), "b": np.array([0.1, 0.1, 0.1, 0.9])}
    thresholds = {"a": 4.0, "b": 1.0}
    right = np.array([True, True, False, True])
    # pair 0 changes nothing; pair 1 doubles a's scores (2, 3, 4 -> 4, 6, 8 reach 4); pair 2 multiplies b by 10
    ratios = {"a": np.array([1.0, 2.0, 1.0]), "b": np.array([1.0, 1.0, 10.0])}
    est = estimate(ratios, test, thresholds, right)
    np.testing.assert_allclose(est["fpr"]["a"], [0.25, 0.75, 0.25])
    np.testing.assert_allclose(est["fpr"]["b"], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(est["rejected"], [0.25, 0.75, 1.0])
    # accepted and right: pair 0 rejects image 3 (a = 4), leaving 0 and 1 right (image 2 is wrong)
    np.testing.assert_allclose(est["accepted_and_right"], [0.5, 0.25, 0.0])


def test_interval_brackets_the_mean_and_collapses_without_spread():
    rng = np.random.default_rng(0)
    lo, hi = interval(np.array([0.1, 0.2, 0.3, 0.4]), rng)
    assert lo < 0.25 < hi
    assert interval(np.full(5, 0.3), rng) == pytest.approx([0.3, 0.3])


def test_loglinear_with_a_constant_factor_is_the_factor_estimate():
    rng = np.random.default_rng(1)
    copy = {"a": rng.uniform(0.5, 3.0, 20)}
    orig = {"a": 2.0 * copy["a"]}
    a, b, e = fit_loglinear(copy["a"], orig["a"], 4.0)
    assert a == pytest.approx(np.log(2.0)) and b == pytest.approx(1.0) and np.abs(e).max() < 1e-9
    test = {"a": np.array([1.0, 1.9, 2.1, 3.0, 5.0])}
    right = np.ones(5, bool)
    lin = estimate_loglinear(copy, orig, test, {"a": 4.0}, right)
    fac = estimate({"a": np.full(20, 2.0)}, test, {"a": 4.0}, right)
    np.testing.assert_allclose(lin["fpr"]["a"], fac["fpr"]["a"])
    np.testing.assert_allclose(lin["rejected"], 0.6)  # 2.1, 3.0 and 5.0 reach 4 when doubled


def test_loglinear_follows_a_slope_that_the_factor_model_misses():
    # the domain squares-roots the scores (times 2): small scores grow a lot, large ones little
    copy = {"a": np.geomspace(1e-4, 1.0, 20)}
    orig = {"a": 2.0 * np.sqrt(copy["a"])}
    a, b, _ = fit_loglinear(copy["a"], orig["a"], 1.0)
    assert b == pytest.approx(0.5) and a == pytest.approx(np.log(2.0))
    test = {"a": np.array([1e-4, 0.01, 0.2, 0.3, 0.5])}  # 2 sqrt(s) >= 1.5 from s >= 0.5625: none of them
    est = estimate_loglinear(copy, orig, test, {"a": 1.5}, np.ones(5, bool))
    np.testing.assert_allclose(est["rejected"], 0.0)
    # each pair's ratio 2 / sqrt(s_copy) is 2 to 200: the factor model rejects half of them
    assert estimate({"a": orig["a"] / copy["a"]}, test, {"a": 1.5}, np.ones(5, bool))["rejected"].mean() > 0.4


def test_estimator_check_counts_and_compares_both_models():
    rng = np.random.default_rng(0)
    jpeg = {"a": rng.lognormal(-3.0, 1.0, 2000)}
    pre = {"a": 0.3 * np.sqrt(jpeg["a"]) * rng.lognormal(0.0, 0.1, 2000)}
    t = {"a": float(np.quantile(jpeg["a"], 0.98))}
    c = estimator_check(jpeg, pre, t, np.ones(2000, bool), rng, pairs=20, draws=50)
    assert c["counted_rejected"] == pytest.approx(float((pre["a"] >= t["a"]).mean()))
    assert abs(c["loglinear"]["median"] - c["counted_rejected"]) < 0.02
    assert c["factor"]["median"] > c["counted_rejected"] + 0.05


def test_refit_interval_brackets_the_estimate():
    rng = np.random.default_rng(2)
    copy = {"a": rng.lognormal(0.0, 1.0, 20)}
    orig = {"a": copy["a"] * rng.lognormal(0.5, 0.5, 20)}
    test = {"a": rng.lognormal(0.0, 1.0, 500)}
    right = np.ones(500, bool)
    est = estimate_loglinear(copy, orig, test, {"a": 5.0}, right)["rejected"].mean()
    ci = interval_refit(copy, orig, test, {"a": 5.0}, right, rng, rounds=200)
    assert ci["rejected"][0] <= est <= ci["rejected"][1] and ci["rejected"][0] < ci["rejected"][1]
    assert ci["accepted_and_right"][1] == pytest.approx(1 - ci["rejected"][0])


@pytest.mark.skipif(not os.environ.get("MAGNET_TEST_DATA"), reason="needs MAGNET_TEST_DATA (CIFAR-10)")
def test_run_on_the_shipped_bundle(tmp_path):
    out = tmp_path / "shift.json"
    main(["--bundle", str(REPO / "models" / "cifar10"), "--data-dir", os.environ["MAGNET_TEST_DATA"],
          "--images", str(REPO / "tests" / "data" / "cifar10-originals"), "--test-images", "200", "--out", str(out)])
    row = json.loads(out.read_text())["bundles"][str(REPO / "models" / "cifar10")][0]
    jsd = row["detectors"]["jsd_t40"]
    assert 0 <= jsd["copies_over_threshold"] <= jsd["originals_over_threshold"] <= 20
    e = row["estimated_uncompressed"]
    assert e["rejected_90"][0] <= e["rejected"] <= e["rejected_90"][1]
    # originals score higher than their JPEG copies on this bundle (README, input domain)
    assert jsd["log_ratio"]["median"] > 0
    # round 19's reformer (c15) moves the classifier's output between an original and its copy about
    # twice as much as the images themselves do, below 1.5 thresholds (c6: about as much, below 0.75;
    # c3: twice, up to 2 thresholds); README, input domain
    shift = jsd["shift_over_threshold"]
    assert 0 < shift["reformed"]["median"] < 3 * shift["classifier"]["median"]
    assert shift["reformed"]["max"] < 1.5
    assert e["rejected"] > row["measured_on_jpeg_test"]["rejected"]
    lin = row["estimated_uncompressed_loglinear"]
    assert lin["rejected_90"][0] <= lin["rejected"] <= lin["rejected_90"][1]
    # the fit's slope is below 1 on this bundle: scores near the threshold move by less than small ones
    assert 0 < jsd["loglinear_fit"]["slope"] < 1
    assert lin["rejected"] < e["rejected"]


def test_a_bundle_with_a_jpeg_step_is_refused(tmp_path):
    bundle = tmp_path / "models" / "b"  # beside a link to models/shared, where its classifier lives
    bundle.mkdir(parents=True)
    (tmp_path / "models" / "shared").symlink_to(REPO / "models" / "shared")
    manifest = json.loads((REPO / "models" / "cifar10" / "manifest.json").read_text())
    manifest["input"]["jpeg_quality"] = 75
    for f in (REPO / "models" / "cifar10").iterdir():
        if f.name != "manifest.json":
            (bundle / f.name).symlink_to(f)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="JPEG input step"):
        main(["--bundle", str(bundle), "--data-dir", str(tmp_path), "--images",
              str(REPO / "tests" / "data" / "cifar10-originals")])


@pytest.mark.skipif(not os.environ.get("MAGNET_TEST_DATA"), reason="needs MAGNET_TEST_DATA (CIFAR-10)")
def test_simulate_compares_bundles_on_validation_preimages(tmp_path):
    out = tmp_path / "sim.json"
    main(["--bundle", str(REPO / "models" / "cifar10"), "--data-dir", os.environ["MAGNET_TEST_DATA"],
          "--simulate", "0.4", "--val-images", "40", "--out", str(out)])
    report = json.loads(out.read_text())
    row = report["bundles"][str(REPO / "models" / "cifar10")][0]
    assert report["simulated_spread"] == 0.4 and 3 < row["mean_abs_pixel_change_255"] < 12
    # pre-images of JPEG images are rejected more often than the JPEG images themselves
    assert row["preimages"]["rejected"] > row["jpeg"]["rejected"]
    check = row["estimator_check"]
    assert check["counted_rejected"] == row["preimages"]["rejected"] and check["pairs_per_estimate"] == 20
    for model in ("factor", "loglinear"):
        assert 0 <= check[model]["p05"] <= check[model]["median"] <= check[model]["p95"] <= 1


def test_images_or_simulate_but_not_both(tmp_path, capsys):
    for extra in ([], ["--images", "x", "--simulate", "0.3"]):
        with pytest.raises(SystemExit):
            main(["--bundle", "b", "--data-dir", str(tmp_path), *extra])
    assert "--images" in capsys.readouterr().err
