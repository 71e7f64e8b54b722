"""scripts/domain_attacks.py with --images: attacks crafted from real uncompressed images and from their
JPEG copies, judged by a shipped bundle; scripts/cifar10_originals.py pairs official-batch originals with
the data set's own JPEG copies."""

import importlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import DATA_DIR, SHIPPED_CIFAR10, SHIPPED_CIFAR10_POOL

ROOT = Path(__file__).resolve().parents[2]
ORIGINALS = ROOT / "tests" / "data" / "cifar10-originals"


def _script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout)


def _check_rows(rows: dict, attack: str) -> None:
    assert set(rows) == {"jpeg", "original"}
    for row in rows.values():
        a = row[attack]
        assert row["classifier_right"] >= 0.8  # the classifier gets most of these 20 right ...
        assert a["no_defense"] < row["classifier_right"]  # ... and FGSM at 0.05 takes some away
        for v in (row["clean"], a):
            assert 0 <= v["rejected"] <= 1 and v["accepted_and_right"] <= v["defended"] <= 1
            assert v["defended"] == pytest.approx(v["rejected"] + v["accepted_and_right"], abs=1e-9)


def test_attacks_from_the_shipped_originals(tmp_path):
    if not (SHIPPED_CIFAR10 / "manifest.json").is_file():
        pytest.skip("models/cifar10 is not shipped in this checkout")
    out = tmp_path / "attacks.json"
    run = _script("domain_attacks.py", "--bundle", str(SHIPPED_CIFAR10), "--images", str(ORIGINALS),
                  "--attacks", "fgsm:0.05", "--out", str(out))
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["originals"] == 20 and report["copies"] == "JPEG quality 75" and "validation_images" not in report
    _check_rows(report["bundles"][str(SHIPPED_CIFAR10)], "fgsm_eps0.05")
    bad = _script("domain_attacks.py", "--bundle", str(SHIPPED_CIFAR10), timeout=120)
    assert bad.returncode == 2 and "--images" in bad.stderr


def test_official_batch_originals_pair_with_the_data_sets_copies(tmp_path):
    """A test_batch cut after the 20 shipped originals (the official files' layout: labels first, then the
    pixel string), written out next to the data set's own JPEG copies and attacked from both."""
    if not (DATA_DIR / "cifar10").is_dir() or not (SHIPPED_CIFAR10 / "manifest.json").is_file():
        pytest.skip(f"CIFAR-10 not found under {DATA_DIR} (set MAGNET_TEST_DATA), or no models/cifar10")
    files = sorted(ORIGINALS.glob("*-label-*.png"))
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files])
    labels = [int(f.stem.split("-label-")[1]) for f in files]
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    blob = pickle.dumps({b"batch_label": b"testing batch 1 of 1", b"labels": labels,
                         b"data": pixels.reshape(len(files), -1).tobytes()}, protocol=4)
    cut = blob.index(pixels.reshape(-1)[:64].tobytes()) + pixels.size - 1000  # the last image incomplete
    (batches / "test_batch").write_bytes(blob[:cut])
    out = tmp_path / "originals"
    run = _script("cifar10_originals.py", "--batches", str(batches), "--data-dir", str(DATA_DIR), "--out", str(out))
    assert run.returncode == 0, run.stderr
    written = sorted((out / "test").glob("test-*-label-*.png"))
    summary = json.loads((out / "originals.json").read_text())
    assert len(written) == 19 and summary["written"] == {"train": 0, "val": 0, "test": 19}
    assert summary["rms_to_copy_0_255"]["test"][1] < 20  # each sits at JPEG distance from its copy
    by_pixels = {np.asarray(Image.open(f).convert("RGB")).tobytes(): f.name for f in written}
    for f in files[:19]:  # the originals come back unchanged
        assert np.asarray(Image.open(f).convert("RGB")).tobytes() in by_pixels
    report = tmp_path / "attacks.json"
    run = _script("domain_attacks.py", "--bundle", str(SHIPPED_CIFAR10), "--images", str(out / "test"),
                  "--data-dir", str(DATA_DIR), "--attacks", "fgsm:0.05", "--out", str(report))
    assert run.returncode == 0, run.stderr
    r = json.loads(report.read_text())
    assert r["copies"] == "the data set's own" and r["originals"] == 19
    _check_rows(r["bundles"][str(SHIPPED_CIFAR10)], "fgsm_eps0.05")
    # the settings that made the data set's copies: quality 75 with 4:2:0 chroma lands nearest them
    match = tmp_path / "match.json"
    run = _script("jpeg_match.py", "--images", str(out / "test"), "--data-dir", str(DATA_DIR),
                  "--qualities", "70", "75", "80", "--out", str(match))
    assert run.returncode == 0, run.stderr
    m = json.loads(match.read_text())
    assert m["images"] == 19 and m["nearest"] == {"quality": 75, "subsampling": "4:2:0"}
    nearest = next(r for r in m["rows"] if r["quality"] == 75 and r["subsampling"] == "4:2:0")
    assert nearest["rms_0_255"] < m["original_to_copy"]["rms_0_255"] / 2


def _script_module(name: str):
    """A module of scripts/ (they are run as files, not installed)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_jpeg_match_finds_the_setting_that_made_the_copies():
    match_table = _script_module("jpeg_match").match_table
    from service.defense.domain import jpeg_round_trip

    x = np.random.default_rng(0).uniform(size=(3, 3, 16, 16)).astype(np.float32)
    # the input step's default is Pillow's 4:2:0 for colour
    assert np.array_equal(jpeg_round_trip(x, 60), jpeg_round_trip(x, 60, "4:2:0"))
    table = match_table(x, jpeg_round_trip(x, 60, "4:4:4"), [60, 90], ["4:2:0", "4:4:4"])
    assert table["nearest"] == {"quality": 60, "subsampling": "4:4:4"}
    exact = next(r for r in table["rows"] if r["quality"] == 60 and r["subsampling"] == "4:4:4")
    assert exact["rms_0_255"] == 0 and exact["equal_values"] == 1
    assert all(r["rms_0_255"] > 0 for r in table["rows"] if r is not exact)


def test_the_threshold_trade_off_on_originals_moves_both_ways(tmp_path):
    if not (SHIPPED_CIFAR10 / "manifest.json").is_file():
        pytest.skip("models/cifar10 is not shipped in this checkout")
    out = tmp_path / "tradeoff.json"
    run = _script("originals_tradeoff.py", "--bundle", str(SHIPPED_CIFAR10), "--images", str(ORIGINALS),
                  "--rates", "5", "30", "--eps", "0.05", "--out", str(out))
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["bundles"][str(SHIPPED_CIFAR10)]
    manifest = json.loads((SHIPPED_CIFAR10 / "manifest.json").read_text())
    assert rows[0]["threshold"] == "shipped" and rows[0]["value"] == manifest["members"][0]["detectors"][0]["threshold"]
    low, high = rows[1], rows[2]  # 5 % and 30 % of these 20 rejected: a higher, then a lower threshold
    assert low["value"] > high["value"] and low["clean_rejected"] < high["clean_rejected"]
    assert high["clean_rejected"] == pytest.approx(0.30, abs=0.051)
    assert low["fgsm_eps0.05_defended"] <= high["fgsm_eps0.05_defended"]
    assert low["clean_accepted_and_right"] >= high["clean_accepted_and_right"]


def test_paired_names_round_trip_and_a_wrong_label_or_split_is_refused():
    from training.data import Split
    from training.evaluate.originals import paired_name, paired_rows

    class Data:  # the three splits of a loaded data set, tiny
        train = Split(np.zeros((4, 3, 2, 2), np.float32), np.array([0, 1, 2, 3]))
        val = Split(np.zeros((2, 3, 2, 2), np.float32), np.array([5, 6]))
        test = Split(np.zeros((3, 3, 2, 2), np.float32), np.array([7, 8, 9]))

    names = [paired_name("train", 2, 2), paired_name("val", 1, 6), paired_name("test", 0, 7)]
    splits, rows = paired_rows(names, np.array([2, 6, 7]), Data)
    assert splits == ["train", "val", "test"] and rows.tolist() == [2, 1, 0]
    with pytest.raises(SystemExit, match="does not match"):
        paired_rows([paired_name("train", 2, 3)], np.array([3]), Data)
    with pytest.raises(SystemExit, match="train-<row>"):
        paired_rows([paired_name("val", 1, 6)], np.array([6]), Data, only="train")


def test_detector_views_score_the_named_views_and_thresholds():
    V = _script_module("detector_views")
    rng = np.random.default_rng(0)
    n, k = 400, 10
    y = rng.integers(0, k, n)
    onehot = np.eye(k)[y] * 8.0

    def views(x_noise, j_noise, dx_shift, dj_shift):
        base = onehot + rng.normal(0, x_noise, (n, k))
        return {"x": base, "j": base + rng.normal(0, j_noise, (n, k)),
                "dx": base + dx_shift + rng.normal(0, 0.3, (n, k)), "dj": base + dj_shift + rng.normal(0, 0.3, (n, k))}

    shift = np.zeros((n, k))
    shift[:, 0] = 6.0  # the reformed view moves towards class 0: a large divergence
    sets = {"clean": views(0.5, 0.01, 0.0, 0.0), "orig_clean": views(0.5, 0.5, shift, 0.0)}
    ys = {"clean": y, "orig_clean": y}
    masks = {}
    cfg = {"output": "DJx", "detectors": [{"view": "x|Dx", "temperature": 40, "fpr": 0.02}], "thresholds_from": "jpeg"}
    r = V.evaluate(cfg, sets, ys, masks)
    # the detector compares x with D(x): the originals' shifted D(x) is rejected, the clean images at the FPR
    assert r["clean"]["rejected"] == pytest.approx(0.02, abs=0.0051)
    assert r["orig_clean"]["rejected"] > 0.5
    # the image classified is D(J(x)), unshifted: every accepted row is right
    assert r["orig_clean"]["accepted_and_right"] == pytest.approx(1 - r["orig_clean"]["rejected"])
    r_max = V.evaluate({**cfg, "thresholds_from": "max"}, sets, ys, masks)
    assert r_max["thresholds"]["x|Dx T40"] > r["thresholds"]["x|Dx T40"]
    assert r_max["orig_clean"]["rejected"] <= 0.0201
    # the other view leaves originals alone: D(J(x)) was not shifted
    r_dj = V.evaluate({**cfg, "detectors": [{"view": "x|DJx", "temperature": 10, "fpr": 0.02}]}, sets, ys, masks)
    assert r_dj["orig_clean"]["rejected"] < 0.1
    # Jx|Dx compares J(x) with D(x): an original whose raw view alone moves the classifier passes it, and
    # fails MagNet's x|Dx
    base = onehot + rng.normal(0, 0.5, (n, k))
    raw_moved = {"x": base + shift, "j": base, "dx": base + rng.normal(0, 0.3, (n, k)), "dj": base}
    moved = {"clean": sets["clean"], "orig_clean": raw_moved}
    jd = {**cfg, "detectors": [{"view": "Jx|Dx", "temperature": 10, "fpr": 0.02}]}
    assert V.evaluate(jd, moved, ys, masks)["orig_clean"]["rejected"] < 0.1
    assert V.evaluate({**jd, "detectors": [{"view": "x|Dx", "temperature": 40, "fpr": 0.02}]},
                      moved, ys, masks)["orig_clean"]["rejected"] > 0.5
    # the frontier keeps only configurations no other beats on both counts
    def row(orig, fgsm, n_det=1):
        return {"clean": {"accepted_and_right": 0.9}, "pgd": {"defended": 1.0}, "orig_clean": {"accepted_and_right": orig},
                "objective": (fgsm, orig), "detectors": [{}] * n_det}
    a, b, c, d = row(0.8, 0.95), row(0.9, 0.85), row(0.85, 0.8), row(0.8, 0.95, 2)
    assert V.frontier([d, a, b, c], 0.92) == [a, b]
    assert V.cell("x|Dx") == "x\\|Dx"


def test_detector_views_learned_combination_uses_a_view_that_separates():
    V = _script_module("detector_views")
    rng = np.random.default_rng(1)
    n, k = 300, 10
    keys = ("clean", "fgsm", "pgd", "fgsm05", "orig_clean", "copy_clean", "orig_fgsm", "orig_fgsm05", "orig_pgd")
    y = {key: rng.integers(0, k, n) for key in keys}
    sets = {}
    for key in keys:
        clean = np.eye(k)[y[key]] * 8.0 + rng.normal(0, 0.5, (n, k))
        # only J tells attacks apart: it undoes them; D leaves every image as it is, so x|Dx sees nothing
        # and D(x) is right on clean rows, wrong on attacks
        x = clean if key.endswith("clean") else np.eye(k)[(y[key] + 1) % k] * 8.0 + rng.normal(0, 0.5, (n, k))
        j = clean + rng.normal(0, 0.05, (n, k))
        sets[key] = {"x": x, "dx": x + rng.normal(0, 0.05, (n, k)), "j": j, "dj": j + rng.normal(0, 0.05, (n, k))}
    mask = {key: np.ones(n, bool) for key in keys if not key.endswith("clean")}
    c = V.learned_combination(sets, y, mask)
    assert max(c["weights"], key=lambda d: abs(c["weights"][d])).startswith(("x|Jx", "x|DJx"))
    for cal in ("jpeg", "originals"):
        assert c[cal]["fgsm"] > 0.95 and c[cal]["orig_fgsm"] > 0.95
        assert c[cal]["clean"] > 0.9


def test_residual_structure_statistics_tell_a_dense_perturbation_from_edge_detail():
    R = _script_module("residual_structure")
    dx = np.full((2, 3, 32, 32), 0.2, np.float32)
    dx[:, :, :, 16:] = 0.8  # one vertical edge
    eps = 6 / 255
    dense = dx.copy()
    dense[0] += eps * np.where(np.random.default_rng(0).random((3, 32, 32)) < 0.5, -1, 1)
    edge = dx.copy()
    edge[0, :, :, 15] += 32 * eps  # the same L1 as the dense one, all of it on the column where the edge starts
    d, e = R.statistics(dense, dx), R.statistics(edge, dx)
    assert d["l1"][0] == pytest.approx(e["l1"][0], rel=1e-4)  # MagNet's mean |r| cannot tell them apart
    for s in ("q25", "q50", "frac3", "flat_l1"):
        assert d[s][0] > e[s][0] + 1e-6, s
    assert e["flat_l1"][0] == pytest.approx(0, abs=1e-7)  # the edge's residual lies outside the flat half
    assert d["r_lapmad"][0] > e["r_lapmad"][0]
    for s in set(d) - {"x_lapmad"}:  # the second image is D(x) itself: no residual to see
        assert d[s][1] == pytest.approx(0, abs=1e-7) and e[s][1] == pytest.approx(0, abs=1e-7)
    assert d["x_lapmad"][0] > d["x_lapmad"][1]  # the input's own noise level rises with the dense perturbation


def test_residual_structure_tables_judge_rejections_and_separation():
    R = _script_module("residual_structure")
    rng = np.random.default_rng(2)
    n = 1000
    sets = R.SETS
    # the statistic is high on attacks and low on clean images; the divergence carries nothing
    stats = {k: {"s": rng.normal(0 if k.endswith("clean") else 5, 1, n)} for k in sets}
    jsd = {k: rng.random(n) for k in sets}
    right = {k: np.ones(n, bool) if k.endswith("clean") else np.zeros(n, bool) for k in sets}
    mask = {k: np.ones(n, bool) for k in sets if not k.endswith("clean")}
    t = R.tables(stats, jsd, right, mask)
    assert t["separation_at_2pct_of_clean_originals"]["s"] > 0.99
    only_jsd = next(r for r in t["combined"] if r["statistic"] is None and r["jsd_fpr"] == 0.0)
    assert only_jsd["clean"] == 1.0 and only_jsd["fgsm"] == 0.0  # nothing rejected: every attack gets through
    with_s = next(r for r in t["combined"] if r["statistic"] == "s" and r["jsd_fpr"] == 0.0 and r["fpr"] == 0.02)
    assert with_s["clean"] == pytest.approx(0.98, abs=0.002) and with_s["orig_fgsm"] > 0.99
    assert R.eligible(with_s, f_val=1.0, f_orig=1.0)
    assert not R.eligible({**with_s, "orig_clean": 0.9}, f_val=1.0, f_orig=1.0)
    alone = next(r for r in t["alone"] if r["statistic"] == "s" and r["fpr"] == 0.01)
    assert alone["rejected"]["clean"] == pytest.approx(0.01, abs=0.002)


def test_each_member_of_a_pool_judges_with_its_own_thresholds(tmp_path):
    """--every-member: the same inputs judged by each member (here told apart by their thresholds)."""
    from service.defense.core import Defense
    from tests import fakes

    judge = _script_module("domain_attacks").judge
    defense = Defense(fakes.make_bundle(tmp_path / "pool", members=2, thresholds=[0.07, 0.5]))
    v = np.array([0.30, 0.34, 0.38, 0.42, 0.46, 0.54, 0.58, 0.62, 0.66, 0.70])
    y = np.zeros(len(v), np.int64)  # every one 'bright' once reformed: right unless rejected
    first, second = judge(defense, fakes.images(*v), y, 0), judge(defense, fakes.images(*v), y, 1)
    assert first["rejected"] == pytest.approx(0.4) and first["accepted_and_right"] == pytest.approx(0.6)
    assert second["rejected"] == 0.0 and second["accepted_and_right"] == 1.0
    assert judge(defense, fakes.images(*v), y) == first  # no member named: the first


def test_every_member_of_the_shipped_pool_is_reported(tmp_path):
    pool = SHIPPED_CIFAR10_POOL
    if not (pool / "manifest.json").is_file():
        pytest.skip("models/cifar10-pool is not shipped in this checkout")
    out = tmp_path / "attacks.json"
    run = _script("domain_attacks.py", "--bundle", str(pool), "--images", str(ORIGINALS), "--attacks", "fgsm:0.05",
                  "--every-member", "--out", str(out))
    assert run.returncode == 0, run.stderr
    bundles = json.loads(out.read_text())["bundles"]
    members = json.loads((pool / "manifest.json").read_text())["members"]
    assert sorted(bundles) == sorted(f"{pool}-m{k}" for k in range(len(members))) and len(members) == 8
    for rows in bundles.values():
        _check_rows(rows, "fgsm_eps0.05")
    # the attacks target the classifier, so every member is judged on the same examples
    assert len({rows["original"]["fgsm_eps0.05"]["no_defense"] for rows in bundles.values()}) == 1
