"""``magnet train folder`` end to end on tiny folders of synthetic images and a classifier that this project
does not know (NHWC, 0..255, softmax output): build, then a served answer from a real gateway process, with
the embedded classifier and in front of a real KServe model server; ``magnet evaluate --data``; resume;
the errors a user meets first."""

from __future__ import annotations

import base64
import io
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from tests.procs import REPO, start_gateway, start_model_server  # noqa: E402

CLASSES = ("bar0", "bar1", "bar2", "bar3")


def synthetic(n: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k: a bright horizontal bar in the k-th quarter of a noisy dark image (N x C x H x W, [0, 1])."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    x = rng.uniform(0.0, 0.25, (n, channels, size, size)).astype(np.float32)
    q = size // 4
    for i, k in enumerate(y):
        x[i, :, k * q + q // 4: k * q + 3 * q // 4, 2:-2] = rng.uniform(0.7, 1.0)
    return x, y


def write_folder(root: Path, size: int, channels: int, n_train: int = 400, n_test: int = 200) -> Path:
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = synthetic(n, size, channels, seed)
        for i, (img, k) in enumerate(zip(x, y)):
            folder = root / split / CLASSES[k]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (img * 255).round().astype(np.uint8)
            Image.fromarray(pixels[0] if channels == 1 else pixels.transpose(1, 2, 0)).save(folder / f"{i:04d}.png")
    return root


class UserNet(nn.Module):
    """NHWC pixels in 0..255 -> softmax probabilities: an architecture and contract of a user's own."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4, len(CLASSES))

    def forward(self, pixels):
        x = pixels.permute(0, 3, 1, 2) / 255.0
        h = torch.relu(self.conv(x))
        h = nn.functional.adaptive_avg_pool2d(h, (4, 1)).flatten(1)
        return torch.softmax(self.head(h), dim=1)


def user_classifier(path: Path, size: int, channels: int) -> Path:
    torch.manual_seed(0)
    x, y = synthetic(800, size, channels, 2)
    xt, yt = torch.from_numpy(x).permute(0, 2, 3, 1) * 255, torch.from_numpy(y)
    net = UserNet(channels)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(150):
        loss = nn.functional.nll_loss(net(xt).clamp_min(1e-9).log(), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    torch.onnx.export(net, (xt[:1],), str(path), input_names=["pixels"], output_names=["probs"],
                      dynamic_axes={"pixels": {0: "n"}, "probs": {0: "n"}}, dynamo=False)
    return path


def magnet(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"magnet {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


CONTRACT = ("--layout", "nhwc", "--scale", "255", "--outputs", "probabilities")


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    root = tmp_path_factory.mktemp("grey")
    data = write_folder(root / "bars", 16, 1)
    clf = user_classifier(root / "user.onnx", 16, 1)
    out = root / "bundle"
    build = magnet("train", "folder", "--data", str(data), "--classifier", str(clf), "--out", str(out),
                   "--work-dir", str(root / "work"), "--epochs", "40", "--min-steps", "0", "--attack-examples", "40", *CONTRACT)
    return {"root": root, "data": data, "classifier": clf, "out": out, "log": build.stdout,
            "manifest": json.loads((out / "manifest.json").read_text())}


def test_the_build_records_the_contract_and_measured_rows(grey):
    m = grey["manifest"]
    assert m["dataset"] == "folder:bars" and m["input"]["shape"] == [1, 16, 16]
    contract = m["classifier"]["input"]
    assert (contract["layout"], contract["scale"], contract.get("mean"), contract.get("std")) == ("NHWC", 255.0, None, None)
    assert m["classifier"]["output"] == "probabilities" and m["classifier"]["classes"] == list(CLASSES)
    figures = m["measurements"]
    assert figures["recipe"] == "grey" and figures["reformer"]["trained_on_adversarial_examples"] is False
    # the user's classifier really is read through its contract: it is far above chance on the test split
    assert figures["clean"]["classifier_test_accuracy"] > 0.8
    assert set(figures["clean"]["detector_test_fpr"]) == {"I", "II"}
    rows = {(r["attack"], r["eps"]) for r in figures["attacks"]}
    assert rows == {("fgsm", 0.1), ("fgsm", 0.3), ("pgd", 0.1), ("pgd", 0.3)}
    assert all(r["examples"] == 40 and 0 <= r["full_defense"] <= 1 for r in figures["attacks"])
    # PGD at 0.3 against an undefended toy classifier succeeds on most examples
    assert next(r for r in figures["attacks"] if r["attack"] == "pgd" and r["eps"] == 0.3)["no_defense"] < 0.5
    assert "default" in figures["uniform_noise_rejected"]
    assert "AE-I epoch" in grey["log"] and "left" in grey["log"]


def test_a_second_run_resumes_from_the_work_dir(grey):
    again = magnet("train", "folder", "--data", str(grey["data"]), "--classifier", str(grey["classifier"]),
                   "--out", str(grey["root"] / "bundle2"), "--work-dir", str(grey["root"] / "work"), "--epochs", "40",
                   "--min-steps", "0", "--attack-examples", "10", *CONTRACT)
    assert "ae_i: reusing" in again.stdout and "AE-I epoch" not in again.stdout


def _png(x: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray((x[0] * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_served_embedded_and_in_front_of_a_model_server(grey):
    x, y = synthetic(8, 16, 1, 5)
    x = np.round(x * 255) / 255  # what the gateway decodes from the PNGs
    body = {"images": [_png(img) for img in x]}
    gw, url = start_gateway("--bundle", str(grey["out"]))
    with gw:
        embedded = requests.post(f"{url}/classify", json=body, timeout=30)
    server, upstream = start_model_server(grey["classifier"], "bars")
    with server:
        gw, url = start_gateway("--bundle", str(grey["out"]), "--upstream", upstream)
        with gw:
            proxied = requests.post(f"{url}/classify", json=body, timeout=30)
    assert embedded.status_code == 200 and proxied.status_code == 200, (embedded.text, proxied.text)
    a, b = embedded.json()["results"], proxied.json()["results"]
    assert [r["rejected"] for r in a] == [r["rejected"] for r in b]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    # the gateway answers what the defense core decides on the same images
    from service.defense.core import Defense

    defense = Defense(grey["out"], device="cpu")
    verdict = defense.inspect(x.astype(np.float32))
    assert [r["rejected"] for r in a] == verdict.rejected.tolist()
    reformed = defense.classifier(verdict.reformed).argmax(1)
    assert [r["label"] for r in a if not r["rejected"]] == reformed[verdict.accepted].tolist()
    # the model server got NHWC 0..255 and answered probabilities, as the manifest says
    assert np.allclose([sum(r["probabilities"]) for r in b if not r["rejected"]], 1.0, atol=1e-4)


def test_evaluate_reads_the_folder_as_the_build_split_it(grey):
    out = grey["root"] / "eval"
    magnet("evaluate", "--bundle", str(grey["out"]), "--data", str(grey["data"]), "--out", str(out),
           "--attacks", "fgsm_eps0.01", "--n", "30")
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "folder:bars" and report["rows"][0]["examples"] == 30
    assert report["clean"]["classifier_test_accuracy"] == grey["manifest"]["measurements"]["clean"][
        "classifier_test_accuracy"]
    missing = magnet("evaluate", "--bundle", str(grey["out"]), "--out", str(out), "--attacks", "fgsm_eps0.01",
                     check=False)
    assert missing.returncode != 0 and "--data" in missing.stderr


def test_rgb_pool_trains_through_the_users_classifier(tmp_path):
    data = write_folder(tmp_path / "rgb", 16, 3, n_train=300, n_test=100)
    clf = user_classifier(tmp_path / "user.onnx", 16, 3)
    out = tmp_path / "bundle"
    magnet("train", "folder", "--data", str(data), "--classifier", str(clf), "--out", str(out), "--work-dir",
           str(tmp_path / "work"), "--steps", "3", "--pool", "2", "--attack-examples", "20", *CONTRACT)
    m = json.loads((out / "manifest.json").read_text())
    assert [member["name"] for member in m["members"]] == ["member-0", "member-1"]
    assert {d["kind"] for d in m["members"][0]["detectors"]} == {"reconstruction", "divergence"}
    assert m["measurements"]["reformer"]["trained_on_adversarial_examples"] is True
    assert set(m["measurements"]["clean"]) == {"member-0", "member-1"}


@pytest.mark.parametrize("case, extra, message", [
    ("size", ("--size", "10", "10"), "multiples of 4"),
    ("layout", ("--layout", "nchw", "--scale", "255", "--outputs", "probabilities"), "does not take the images"),
    ("fpr", ("--fpr", "0.001", *CONTRACT), "keeps no image above a threshold"),
    ("outputs", ("--layout", "nhwc", "--scale", "255", "--outputs", "logits"), "give --outputs probabilities"),
])
def test_clear_errors_before_any_training(grey, tmp_path, case, extra, message):
    proc = magnet("train", "folder", "--data", str(grey["data"]), "--classifier", str(grey["classifier"]),
                  "--out", str(tmp_path / "b"), "--work-dir", str(tmp_path / "w"), "--epochs", "1",
                  "--attack-examples", "5", *extra, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "b").exists()


def test_a_classifier_with_the_wrong_number_of_classes(grey, tmp_path):
    import shutil

    shutil.copytree(grey["data"] / "train", tmp_path / "more" / "train")
    shutil.copytree(grey["data"] / "train" / "bar0", tmp_path / "more" / "train" / "bar4")  # a fifth class
    proc = magnet("train", "folder", "--data", str(tmp_path / "more"), "--classifier", str(grey["classifier"]),
                  "--out", str(tmp_path / "b"), "--work-dir", str(tmp_path / "w"), *CONTRACT, check=False)
    assert proc.returncode != 0 and "5 classes" in proc.stderr and "Traceback" not in proc.stderr


def test_a_work_dir_trained_through_another_classifier_is_refused_until_fresh(tmp_path):
    """The RGB recipe trains through the classifier: after a re-export (other weights), the same --work-dir is
    refused with what changed instead of resuming the old reformer and its cached classifier outputs;
    --fresh retrains there."""
    import onnx
    from onnx import numpy_helper

    data = write_folder(tmp_path / "rgb", 16, 3, n_train=120, n_test=40)
    clf = user_classifier(tmp_path / "user.onnx", 16, 3)
    model = onnx.load(str(clf))
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * 1.01, first.name))
    other = tmp_path / "user-v2.onnx"
    onnx.save(model, str(other))
    args = ("--data", str(data), "--work-dir", str(tmp_path / "work"), "--steps", "3", "--attack-examples", "5",
            "--attack-free", *CONTRACT)
    magnet("train", "folder", "--classifier", str(clf), "--out", str(tmp_path / "b1"), *args)
    refused = magnet("train", "folder", "--classifier", str(other), "--out", str(tmp_path / "b2"), *args, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "holds weights trained from other inputs (classifier sha256 changed): give --fresh" in refused.stderr
    assert not (tmp_path / "b2").exists()
    magnet("train", "folder", "--classifier", str(other), "--out", str(tmp_path / "b2"), *args, "--fresh")
    inputs = json.loads((tmp_path / "work" / "inputs.json").read_text())
    assert inputs["classifier sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert (tmp_path / "b2" / "manifest.json").exists()


@pytest.mark.parametrize("kind", ["half", "uint8", "head"])
def test_a_half_precision_uint8_or_headed_classifier_builds_and_serves(tmp_path, kind):
    """The user's classifier exported in half precision throughout (input, weights and output FLOAT16, as a
    float16 conversion gives), taking UINT8 pixels (a Cast inside), or giving its scores as N x K x 1 x 1 (a
    1x1-convolution head): the recipe trains through its twin, and a gateway serves the bundle with it
    embedded, agreeing with the core on every image."""
    import onnx

    from service.defense import Defense
    from tests.fakes import in_half_precision, with_input_of, with_spatial_head

    data = write_folder(tmp_path / "rgb", 16, 3, n_train=120, n_test=40)
    user = user_classifier(tmp_path / "user.onnx", 16, 3)
    half = tmp_path / f"{kind}.onnx"
    if kind == "half":
        in_half_precision(user, half)
    elif kind == "uint8":
        onnx.save(with_input_of(user, onnx.TensorProto.UINT8), str(half))
    else:
        onnx.save(with_spatial_head(user), str(half))
    out = tmp_path / "bundle"
    magnet("train", "folder", "--data", str(data), "--classifier", str(half), "--out", str(out), "--work-dir",
           str(tmp_path / "work"), "--steps", "3", "--attack-examples", "5", "--attack-free", *CONTRACT)
    x, _ = synthetic(12, 16, 3, 5)
    gw, url = start_gateway("--bundle", str(out))
    with gw:
        r = requests.post(f"{url}/classify", json={"inputs": x.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    defense = Defense(out, device="cpu")
    verdict = defense.inspect(x)
    labels = defense.classifier(verdict.reformed).argmax(1)
    assert [(a["rejected"], a["label"]) for a in r.json()["results"]] == [
        (False, int(l)) if ok else (True, None) for ok, l in zip(verdict.accepted, labels)]
    assert verdict.accepted.any()
