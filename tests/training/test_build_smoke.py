"""The MNIST bundle recipe end to end on a tiny budget: every stage runs and the bundle serves."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from service.defense import Defense, read_manifest, verify_files  # noqa: E402
from training import build_mnist  # noqa: E402
from training.domain_sim import jpeg_preimage  # noqa: E402
from service.defense.runtime import CPU, OnnxModel  # noqa: E402
from service.defense.scores import reconstruction_error  # noqa: E402
from tests.conftest import DATA_DIR  # noqa: E402


def test_smoke_build_writes_a_verified_calibrated_bundle(tmp_path, mnist):
    out, work = tmp_path / "bundle", tmp_path / "work"
    rc = build_mnist.main(["--data-dir", str(DATA_DIR), "--out", str(out), "--work-dir", str(work),
                           "--classifier-epochs", "1", "--ae-epochs", "1", "--train-limit", "1000",
                           "--fpr", "0.01"])
    assert rc == 0
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert json.loads((work / "config.json").read_text())["args"]["train_limit"] == 1000
    assert manifest.provenance["seed"] == 0 and "magnet train mnist" in manifest.provenance["command"]
    # the paper's rule on 5,000 validation images at fpr 0.01 lets exactly 50 reach the threshold
    for det in manifest.members[0].detectors:
        ae = OnnxModel(out / det.autoencoder, [CPU])
        scores = reconstruction_error(mnist.val.x, np.concatenate([ae(mnist.val.x[i:i + 1000])
                                                                    for i in range(0, 5000, 1000)]), det.p)
        assert int((scores >= det.threshold).sum()) == 50
    m = manifest.measurements
    assert set(m["detector_test_fpr"]) == {"I", "II"}
    assert max(m["onnx_parity_max_abs_diff"].values()) < 1e-5
    defense = Defense(out, device="cpu")
    assert defense.inspect(mnist.test.x[:10]).accepted.shape == (10,)
    # a second run reuses the saved weights instead of training again: weights edited on disk show up in
    # the new bundle (a retrained autoencoder, same seed, would give the first run's threshold again)
    import torch

    states = torch.load(work / "ae_i.pt")
    for state in states:
        for v in state.values():
            if v.is_floating_point():
                v.mul_(0.8)
    torch.save(states, work / "ae_i.pt")
    assert build_mnist.main(["--data-dir", str(DATA_DIR), "--out", str(out), "--work-dir", str(work),
                             "--classifier-epochs", "1", "--ae-epochs", "1", "--train-limit", "1000",
                             "--fpr", "0.01"]) == 0
    again = {d.name: d.threshold for d in read_manifest(out).members[0].detectors}
    first = {d.name: d.threshold for d in manifest.members[0].detectors}
    assert again["II"] == pytest.approx(first["II"]) and again["I"] != pytest.approx(first["I"], rel=1e-3)


def test_smoke_pool_on_a_smoke_bundle(tmp_path, mnist):
    from training import build_pool

    base = tmp_path / "base"
    assert build_mnist.main(["--data-dir", str(DATA_DIR), "--out", str(base), "--work-dir", str(tmp_path / "w1"),
                             "--classifier-epochs", "1", "--ae-epochs", "1", "--train-limit", "500",
                             "--fpr", "0.01"]) == 0
    out = tmp_path / "pool"
    assert build_pool.main(["--dataset", "mnist", "--base", str(base), "--data-dir", str(DATA_DIR),
                            "--out", str(out), "--work-dir", str(tmp_path / "w2"), "--members", "3",
                            "--pretrain-epochs", "1", "--epochs", "1", "--train-limit", "500",
                            "--figures-limit", "200"]) == 0
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert [m.reformer for m in manifest.members] == ["ae_0.onnx", "ae_1.onnx", "ae_2.onnx"]
    # detector I moves to each member's autoencoder; detector II keeps the shared AE-II
    assert [m.detectors[0].autoencoder for m in manifest.members] == ["ae_0.onnx", "ae_1.onnx", "ae_2.onnx"]
    assert {m.detectors[1].autoencoder for m in manifest.members} == {"ae_ii.onnx"}
    thresholds = {m.detectors[0].threshold for m in manifest.members}
    assert len(thresholds) == 3  # calibrated per member
    figures = manifest.measurements
    assert figures["diversity_pairwise_mse"] > 0 and len(figures["member_test_mse"]) == 3
    assert set(figures["member_clean_figures"]) == {"member-0", "member-1", "member-2"}


def test_smoke_cifar10_build(tmp_path, cifar10):
    from training import build_cifar10

    out = tmp_path / "cifar"
    assert build_cifar10.main(["--data-dir", str(DATA_DIR), "--out", str(out), "--work-dir", str(tmp_path / "w"),
                               "--width", "4", "--classifier-epochs", "1", "--ae-epochs", "1",
                               "--train-limit", "500", "--jpeg-quality", "auto"]) == 0
    manifest = read_manifest(out)
    verify_files(out, manifest)
    kinds = {d.name: (d.kind, getattr(d, "p", None), getattr(d, "temperature", None), d.fpr)
             for d in manifest.members[0].detectors}
    assert kinds == {"recon": ("reconstruction", 1, None, 0.005), "jsd_t10": ("divergence", None, 10.0, 0.01),
                     "jsd_t40": ("divergence", None, 40.0, 0.01)}
    verdict = Defense(out, device="cpu").inspect(cifar10.test.x[:20])
    assert set(verdict.scores) == {"recon", "jsd_t10", "jsd_t40"}
    # the data set is a JPEG re-encoding at quality 75: the bundle judges its inputs after that round trip
    assert cifar10.jpeg_quality == 75 and manifest.input.jpeg_quality == 75
    # 'magnet train domain' takes it off again, recalibrating at the same FPRs on the images as they are
    from training import build_domain

    assert build_domain.main(["--bundle", str(out), "--data-dir", str(DATA_DIR), "--jpeg-quality", "none",
                              "--figures-limit", "200"]) == 0
    after = read_manifest(out)
    verify_files(out, after)
    assert after.input.jpeg_quality is None
    before = {d.name: d.threshold for d in manifest.members[0].detectors}
    now = {d.name: d.threshold for d in after.members[0].detectors}
    assert now.keys() == before.keys() and now != before
    assert {d.name: d.fpr for d in after.members[0].detectors} == {k: v[3] for k, v in kinds.items()}
    step = after.measurements["input_domain"]
    assert step["jpeg_quality"] is None and step["training_images_jpeg_quality"] == 75
    assert step["thresholds_before"] == {"default": before} and step["test_images"] == 200
    assert "defense_clean_test_accuracy" in after.measurements
    # --drop and --fpr: a configuration chosen on validation, recalibrated at the new FPR
    assert build_domain.main(["--bundle", str(out), "--data-dir", str(DATA_DIR), "--jpeg-quality", "none",
                              "--drop", "recon", "jsd_t10", "--fpr", "jsd_t40=0.05", "--candidate"]) == 0
    chosen = read_manifest(out)
    verify_files(out, chosen)
    (det,) = chosen.members[0].detectors
    assert (det.name, det.fpr) == ("jsd_t40", 0.05) and det.threshold < now["jsd_t40"]
    assert chosen.measurements["input_domain"]["fprs_set"] == {"jsd_t40": 0.05}
    # --preimages: the FPR holds on the validation images plus a JPEG pre-image of each, together
    assert build_domain.main(["--bundle", str(out), "--data-dir", str(DATA_DIR), "--jpeg-quality", "none",
                              "--fpr", "jsd_t40=0.05", "--preimages", "0.5", "--preimage-seed", "3",
                              "--candidate"]) == 0
    mixed = read_manifest(out)
    cal = mixed.measurements["input_domain"]["calibration"]
    assert cal["preimages"] == cal["validation_images"] == len(cifar10.val) and cal["preimage_seed"] == 3
    rng = np.random.default_rng(3)
    spread = rng.uniform(0, 0.5, len(cifar10.val))
    pre = jpeg_preimage(cifar10.val.x, 75, spread, rng)
    judge = Defense(out, device="cpu")
    rejected = np.concatenate([judge.inspect(x[i : i + 1000]).rejected for x in (cifar10.val.x, pre)
                               for i in range(0, len(x), 1000)])
    assert abs(rejected.mean() - 0.05) < 0.005
    assert mixed.members[0].detectors[0].threshold != chosen.members[0].detectors[0].threshold
    for bad in (["--fpr", "jsd_t40=1.5"], ["--fpr", "jsd_t40"], ["--fpr", "nope=0.1"],
                ["--drop", "jsd_t40", "--fpr", "jsd_t40=0.1"], ["--preimages", "0"], ["--preimages", "1.5"]):
        with pytest.raises(SystemExit):
            build_domain.main(["--bundle", str(out), "--data-dir", str(DATA_DIR), "--jpeg-quality", "none", *bad])


def test_smoke_cifar10_bundles_share_one_classifier_file(tmp_path, cifar10):
    """--shared-classifier: the bundle lists the classifier by a path outside itself, a second bundle
    of the same run reuses the file (after checking it holds the same model), a pool built on it
    references it too, and a different classifier is refused."""
    from training import build_cifar10, build_pool

    shared = tmp_path / "models" / "shared" / "clf.onnx"
    common = ["--data-dir", str(DATA_DIR), "--work-dir", str(tmp_path / "w"), "--width", "4",
              "--classifier-epochs", "1", "--ae-epochs", "1", "--train-limit", "500",
              "--shared-classifier", str(shared)]
    for name in ("a", "b"):
        assert build_cifar10.main([*common, "--out", str(tmp_path / "models" / name)]) == 0
        manifest = read_manifest(tmp_path / "models" / name)
        assert manifest.classifier.file == "../shared/clf.onnx"
        assert not (tmp_path / "models" / name / "classifier.onnx").exists()
        assert Defense(tmp_path / "models" / name).classifier_file.resolve() == shared.resolve()
    pool = tmp_path / "models" / "pool"
    assert build_pool.main(["--dataset", "cifar10", "--base", str(tmp_path / "models" / "a"), "--data-dir",
                            str(DATA_DIR), "--out", str(pool), "--work-dir", str(tmp_path / "wp"), "--members", "2",
                            "--pretrain-epochs", "1", "--epochs", "1", "--train-limit", "300",
                            "--figures-limit", "100"]) == 0
    assert read_manifest(pool).classifier.file == "../shared/clf.onnx"
    assert list(pool.glob("*.onnx")) and not (pool / "classifier.onnx").exists()
    with pytest.raises(SystemExit, match="another classifier"):
        build_cifar10.main([*common, "--out", str(tmp_path / "models" / "c"), "--work-dir", str(tmp_path / "w2"),
                            "--seed", "1"])


def test_autoencoders_start_from_a_bundles_and_stop_on_time(tmp_path, mnist):
    """--ae-init-from trains the shipped autoencoders further (towards a plateau) instead of from random
    weights; --ae-max-minutes ends a stage after the epoch that passes it."""
    from tests.conftest import SHIPPED_MNIST

    def run(work, *extra):
        assert build_mnist.main(["--data-dir", str(DATA_DIR), "--out", str(tmp_path / "unused"), "--work-dir",
                                 str(work), "--train-only", "--classifier-from", str(SHIPPED_MNIST / "classifier.onnx"),
                                 "--autoencoders", "ae_i", "--train-limit", "512", *extra]) == 0
        return json.loads((work / "ae_i.history.json").read_text())["epochs"]

    warm = run(tmp_path / "warm", "--ae-epochs", "1", "--ae-init-from", str(SHIPPED_MNIST))
    cold = run(tmp_path / "cold", "--ae-epochs", "1")
    shipped = read_manifest(SHIPPED_MNIST).measurements["autoencoder_val_mse"]["ae_i"]
    # two Adam steps on 512 images barely move the shipped weights; from random ones they are far off
    assert warm[0]["val_denoise_mse"] < 3 * shipped < cold[0]["val_denoise_mse"]
    timed = run(tmp_path / "timed", "--ae-epochs", "5", "--ae-max-minutes", "1e-9")
    assert len(timed) == 1
    with pytest.raises(SystemExit, match="ae_i.onnx not found"):
        run(tmp_path / "bad", "--ae-epochs", "1", "--ae-init-from", str(tmp_path))
