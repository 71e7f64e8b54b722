"""Autoencoder training resumes from its per-epoch checkpoint: a run killed after an epoch and started
again ends with the weights and history of a run never interrupted."""

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
