"""Autoencoder training resumes from its per-epoch checkpoint: a run killed after an epoch and started
again ends with the weights and history of a run never interrupted."""

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from training.loops import AutoencoderConfig, train_autoencoder  # noqa: E402
from training.nets import make_autoencoder  # noqa: E402


class Killed(Exception):
    pass


def _train(mnist, cfg, log=lambda line: None):
    torch.manual_seed(123)  # the same initial weights in every run
    model = make_autoencoder("mnist_ae_ii")
    hist = train_autoencoder(model, mnist.train.head(512), mnist.val.head(256), cfg, log=log)
    return model, hist


def test_a_killed_run_resumes_where_it_stopped(tmp_path, mnist):
    base = AutoencoderConfig(epochs=3, batch_size=128, patience=10)
    whole, whole_hist = _train(mnist, base)

    ckpt = tmp_path / "ae.checkpoint.pt"
    cfg = AutoencoderConfig(epochs=3, batch_size=128, patience=10, checkpoint=str(ckpt))

    def kill_in_epoch_2(line):
        if "epoch   2/3" in line:
            raise Killed  # after epoch 2 ran, before its checkpoint: the file holds epoch 1

    with pytest.raises(Killed):
        _train(mnist, cfg, log=kill_in_epoch_2)
    assert ckpt.exists() and torch.load(ckpt, weights_only=False)["epoch"] == 1

    lines = []
    resumed, resumed_hist = _train(mnist, cfg, log=lines.append)
    assert any("resuming after epoch 1" in line for line in lines)
    assert sum("epoch " in line and "/3" in line for line in lines) == 2  # epochs 2 and 3 only
    assert not ckpt.exists()  # removed once training ended
    assert [e["epoch"] for e in resumed_hist.epochs] == [1, 2, 3]
    assert [e["val_denoise_mse"] for e in resumed_hist.epochs] == [e["val_denoise_mse"] for e in whole_hist.epochs]
    assert resumed_hist.best_epoch == whole_hist.best_epoch
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_one_autoencoder_stage_alone_needs_train_only(tmp_path):
    from training import build_mnist

    for extra in (["--autoencoders", "ae_i"], ["--autoencoders", "ae_iii", "--train-only"]):
        with pytest.raises(SystemExit, match="--autoencoders takes names"):
            build_mnist.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "b"), *extra])


def test_the_classifier_can_come_from_a_bundle_to_retrain_only_the_autoencoders(tmp_path, mnist):
    import json

    import numpy as np

    from service.defense.runtime import CPU, OnnxModel
    from tests.conftest import DATA_DIR, SHIPPED_MNIST
    from training import build_mnist
    from training.nets import make_classifier

    work = tmp_path / "work"
    assert build_mnist.main(["--data-dir", str(DATA_DIR), "--out", str(tmp_path / "b"), "--work-dir", str(work),
                             "--classifier-from", str(SHIPPED_MNIST / "classifier.onnx"), "--train-only",
                             "--autoencoders", "ae_ii", "--ae-epochs", "1", "--train-limit", "300"]) == 0
    clf = make_classifier("mnist")
    clf.load_state_dict(torch.load(work / "classifier.pt")[0])
    clf.eval()
    x = mnist.test.x[:64]
    with torch.no_grad():
        ours = clf(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, OnnxModel(SHIPPED_MNIST / "classifier.onnx", [CPU])(x), atol=1e-4)
    history = json.loads((work / "classifier.history.json").read_text())
    assert history["epochs"] == [{"epoch": 0, "from_onnx": str(SHIPPED_MNIST / "classifier.onnx")}]
    assert (work / "ae_ii.pt").exists() and not (work / "ae_i.pt").exists()
    assert not (work / "ae_ii.checkpoint.pt").exists()  # removed once the stage finished


def test_a_bundle_built_with_classifier_from_carries_that_very_file(tmp_path):
    import hashlib
    import json

    from service.defense.core import Defense
    from tests.conftest import DATA_DIR, SHIPPED_MNIST
    from training import build_mnist

    import onnx

    # the shipped classifier with a note in its metadata: same weights, bytes that no export reproduces
    model = onnx.load(str(SHIPPED_MNIST / "classifier.onnx"))
    model.doc_string = "served by the team's model server"
    source = tmp_path / "served.onnx"
    onnx.save(model, str(source))
    out = tmp_path / "b"
    assert build_mnist.main(["--data-dir", str(DATA_DIR), "--out", str(out), "--work-dir", str(tmp_path / "work"),
                             "--classifier-from", str(source), "--ae-epochs", "1", "--train-limit", "300"]) == 0
    assert (out / "classifier.onnx").read_bytes() == source.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    sha = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert sha["classifier.onnx"] == hashlib.sha256(source.read_bytes()).hexdigest()
    # the parity recorded is the torch twin's against the carried file, and it is small
    assert manifest["measurements"]["onnx_parity_max_abs_diff"]["classifier.onnx"] < 1e-3
    assert Defense(out, device="cpu").manifest.classifier.file == "classifier.onnx"


def test_the_learning_rate_decays_on_a_plateau_and_the_run_stops_below_the_smallest(tmp_path, mnist):
    # a rate too small to improve the validation loss by the 1e-7 the loop asks: every epoch after the first
    # is a plateau, so the rate halves after each one and the run stops once it would fall below min_lr
    cfg = AutoencoderConfig(epochs=20, batch_size=128, patience=20, lr=1e-12, lr_decay=0.5, lr_patience=1,
                            min_lr=1e-13)
    lines = []
    _, hist = _train(mnist, cfg, log=lines.append)
    assert [e["lr"] for e in hist.epochs] == pytest.approx([1e-12, 1e-12, 5e-13, 2.5e-13, 1.25e-13])
    assert any("converged, stopping" in line for line in lines)
    assert hist.best_epoch == 1


def test_a_decayed_learning_rate_survives_a_kill(tmp_path, mnist):
    ckpt = tmp_path / "ae.checkpoint.pt"
    cfg = AutoencoderConfig(epochs=4, batch_size=128, patience=20, lr=1e-12, lr_decay=0.5, lr_patience=1,
                            checkpoint=str(ckpt))
    whole = _train(mnist, replace(cfg, checkpoint=None))[1]

    def kill_in_epoch_4(line):
        if "epoch   4/4" in line:
            raise Killed

    with pytest.raises(Killed):
        _train(mnist, cfg, log=kill_in_epoch_4)
    lines = []
    resumed = _train(mnist, cfg, log=lines.append)[1]
    assert any("resuming after epoch 3" in line and "learning rate 2.5e-13" in line for line in lines)
    assert [e["lr"] for e in resumed.epochs] == [e["lr"] for e in whole.epochs]
    assert [e["val_denoise_mse"] for e in resumed.epochs] == [e["val_denoise_mse"] for e in whole.epochs]


def test_the_mnist_build_refuses_a_decay_factor_outside_0_1(tmp_path):
    from training import build_mnist

    with pytest.raises(SystemExit, match="--ae-lr-decay"):
        build_mnist.main(["--data-dir", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--out",
                          str(tmp_path / "o"), "--ae-lr-decay", "1.5"])


def test_a_checkpoint_resumes_only_under_its_settings(tmp_path, mnist):
    """A killed run's checkpoint resumes under the same settings, or with more epochs; a run of other
    settings (another learning rate, noise) is refused with what changed, and the checkpoint is kept."""
    ckpt = tmp_path / "ae.checkpoint.pt"
    cfg = AutoencoderConfig(epochs=3, batch_size=128, patience=10, checkpoint=str(ckpt))

    def kill_in_epoch_2(line):
        if "epoch   2/3" in line:
            raise Killed

    with pytest.raises(Killed):
        _train(mnist, cfg, log=kill_in_epoch_2)
    with pytest.raises(SystemExit, match=r"saved by a run of other settings \(lr 0.001 -> 0.002; noise 0.1 -> 0.2\)"):
        _train(mnist, replace(cfg, lr=2e-3, noise=0.2))
    assert ckpt.exists()
    lines = []
    _, hist = _train(mnist, replace(cfg, epochs=4, max_seconds=600.0), log=lines.append)
    assert any("resuming after epoch 1" in line for line in lines) and [e["epoch"] for e in hist.epochs] == [1, 2, 3, 4]


def test_a_stage_is_reused_only_under_its_settings(tmp_path):
    """A stage's weights in the work dir are reused under the same settings (where it runs may change);
    under other settings of its own keys it is refused with what changed, and --fresh retrains it."""
    from dataclasses import asdict

    from training import bundles as B
    from training.loops import ClassifierConfig

    trained = []

    def train(models):
        trained.append(1)
        from training.loops import History

        return History(best_epoch=1)

    def config(**changes):
        return {"args": {"out": str(tmp_path / f"out{len(trained)}")},
                "classifier": asdict(replace(ClassifierConfig(bf16=False), **changes)), "autoencoder": {"epochs": 5}}

    run = lambda cfg, fresh=False: B.stage(tmp_path, "classifier", [torch.nn.Linear(2, 2)], fresh, train, cfg,  # noqa: E731
                                           keys=("classifier",))
    run(config())
    run(config(device="cuda"))  # reused: where it runs is free
    run({**config(), "autoencoder": {"epochs": 9}})  # another stage's settings do not matter
    assert len(trained) == 1
    with pytest.raises(SystemExit, match=r"classifier.pt was trained with other settings \(classifier.epochs 30 -> 60; "
                                         r"classifier.lr 0.01 -> 0.1\): give --fresh"):
        run(config(epochs=60, lr=0.1))
    run(config(epochs=60, lr=0.1), fresh=True)
    assert len(trained) == 2
