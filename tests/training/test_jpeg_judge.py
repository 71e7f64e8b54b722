"""training.evaluate.jpeg_judge: its bookkeeping on known scores, and a small run on the shipped bundle."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from training.evaluate.jpeg_judge import main, rows

REPO = Path(__file__).resolve().parents[2]


def test_rows_threshold_on_clean_and_count_defended_among_right_examples():
    clean = np.linspace(0.0, 0.99, 100)  # FPR 0.1 puts the threshold near 0.9: 10 clean images rejected
    judged = {
        "clean": {"labels": np.zeros(100, int), "classifier": np.zeros(100, int), "x_t40": clean, "jpeg_t40": clean},
        # 4 examples: x-mode scores all high (rejected), J-mode all low (accepted); labels right on the first only
        "fgsm": {"labels": np.array([1, 0, 0, 0]), "classifier": np.zeros(4, int),
                 "x_t40": np.full(4, 5.0), "jpeg_t40": np.full(4, 0.1)},
        "preimages": {"labels": np.zeros(4, int), "classifier": np.zeros(4, int),
                      "x_t40": np.array([5.0, 5.0, 0.1, 0.1]), "jpeg_t40": np.full(4, 0.1)},
    }
    y = {"clean": np.zeros(100, int), "fgsm": np.ones(4, int), "preimages": np.zeros(4, int)}
    right = np.array([True, True, True, False])  # the last example's clean image was misclassified: not counted
    out = {r["judged_on"]: r for r in rows(judged, y, right, [40.0], [0.1])}
    assert out["x"]["clean_rejected"] == pytest.approx(0.1, abs=0.011)
    assert out["x"]["clean_accepted_and_right"] == pytest.approx(1 - out["x"]["clean_rejected"])
    assert out["x"]["fgsm_defended"] == 1.0 and out["x"]["fgsm_rejected"] == 1.0
    assert out["J(x)"]["fgsm_rejected"] == 0.0
    assert out["J(x)"]["fgsm_defended"] == pytest.approx(1 / 3)  # only the first of the three counted is right
    assert out["x"]["preimages_rejected"] == 0.5 and out["J(x)"]["preimages_rejected"] == 0.0
    assert out["J(x)"]["preimages_accepted_and_right"] == 1.0


@pytest.mark.skipif(not os.environ.get("MAGNET_TEST_DATA"), reason="needs MAGNET_TEST_DATA (CIFAR-10)")
def test_run_on_the_shipped_bundle(tmp_path):
    from training.evaluate.selection import make_set

    data = Path(os.environ["MAGNET_TEST_DATA"])
    make_set(REPO / "models" / "shared" / "cifar10-resnet9.onnx", data, 100, tmp_path / "set.npz")
    out = tmp_path / "judge.json"
    main(["--bundle", str(REPO / "models" / "cifar10"), "--data-dir", str(data), "--set", str(tmp_path / "set.npz"),
          "--val-images", "500", "--preimages", "200", "--temperatures", "40", "--fprs", "0.02", "--out", str(out)])
    result = json.loads(out.read_text())
    by = {r["judged_on"]: r for r in result["rows"]}
    assert set(by) == {"x", "J(x)"}
    for r in by.values():
        assert r["clean_rejected"] == pytest.approx(0.02, abs=0.005)
    # the trade this tool documents: the JPEG round trip hides the domain and the attack alike
    assert by["J(x)"]["preimages_rejected"] < by["x"]["preimages_rejected"]
    assert by["J(x)"]["fgsm_rejected"] < by["x"]["fgsm_rejected"]


def test_a_bundle_with_a_jpeg_step_is_refused(tmp_path, capsys):
    bundle = tmp_path / "models" / "b"
    bundle.mkdir(parents=True)
    (tmp_path / "models" / "shared").symlink_to(REPO / "models" / "shared")
    manifest = json.loads((REPO / "models" / "cifar10" / "manifest.json").read_text())
    manifest["input"]["jpeg_quality"] = 75
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "reformer.onnx").symlink_to(REPO / "models" / "cifar10" / "reformer.onnx")
    with pytest.raises(SystemExit) as e:
        main(["--bundle", str(bundle), "--data-dir", str(tmp_path), "--set", str(tmp_path / "set.npz")])
    assert e.value.code == 2 and "JPEG input step" in capsys.readouterr().err
