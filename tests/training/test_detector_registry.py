"""The detector registry: every kind scores the same in the core (gateway), the calibration and the torch
twin; a kind added to the registry alone works in all three."""

from typing import Literal

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.defense import Defense, read_manifest  # noqa: E402
from service.defense import detectors as D  # noqa: E402
from service.defense.thresholds import threshold_at_fpr  # noqa: E402
from training import bundles as B  # noqa: E402
from training.evaluate.torch_defense import Twins  # noqa: E402
from training.export import export_onnx  # noqa: E402
from training.nets import GuidedReformer, ResNet9  # noqa: E402
from tests.fakes import make_client  # noqa: E402

SHAPE = (3, 32, 32)
# each registered kind's parameters for these tests: a kind registered without an entry fails below
PARAMS = {"reconstruction": [{"p": 1}, {"p": 2}], "divergence": [{"temperature": 10.0}], "kl": [{"temperature": 4.0}]}


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.8, size=(n, 3, 1, 1))  # smooth-ish images with some texture
    return np.clip(base + rng.normal(0, 0.1, size=(n, *SHAPE)), 0, 1).astype(np.float32)


def _bundle(tmp_path, detectors: list[dict]):
    """A CIFAR-shaped bundle: a tiny ResNet-9 and a guided reformer that is not the identity,
    calibrated on 200 'validation' images by ``training.bundles.calibrate``."""
    torch.manual_seed(0)
    out = tmp_path / "bundle"
    out.mkdir()
    classifier, reformer = ResNet9(width=4).eval(), GuidedReformer(3, 8, 1).eval()
    torch.nn.init.normal_(reformer.out.weight, std=0.2)
    with torch.no_grad():  # confident logits, so divergences are far above float32 round-off
        classifier.head.weight.mul_(400)
    export_onnx(classifier, out / B.CLASSIFIER_FILE, SHAPE, "logits")
    export_onnx(reformer, out / "reformer.onnx", SHAPE, "output")
    dets = B.calibrate(out, [{**d, "autoencoder": "reformer.onnx"} for d in detectors], _images(200, 1))
    B.write_bundle(out, "registry", "cifar10", SHAPE, [str(k) for k in range(10)],
                   [{"name": "m0", "reformer": "reformer.onnx", "detectors": dets}], {}, {})
    return out


def _twin_scores(defense: Defense, x: np.ndarray) -> dict:
    with torch.no_grad():
        ev = Twins(defense).members([0]).evaluate(torch.from_numpy(x))
    return {k: v.numpy() for k, v in ev.scores[0].items()}


def test_every_registered_kind_has_test_parameters():
    assert set(PARAMS) == set(D.REGISTRY)


@pytest.mark.parametrize("kind, params", [(k, p) for k, ps in PARAMS.items() for p in ps])
def test_twin_scores_equal_the_cores_and_calibration_hits_its_fpr(tmp_path, kind, params):
    out = _bundle(tmp_path, [{"name": "d", "kind": kind, "fpr": 0.1, **params}])
    defense = Defense(out, device="cpu")
    spec = defense.members[0].detectors[0]
    assert isinstance(spec, D.REGISTRY[kind].spec)
    val = defense.inspect(_images(200, 1))  # calibration's own images: 10 % at or above the threshold
    assert val.fired["d"].mean() == pytest.approx(0.1)
    x = _images(32, 2)
    core = defense.inspect(x).scores["d"]
    assert np.all(np.isfinite(core)) and core.std() > 0
    np.testing.assert_allclose(_twin_scores(defense, x)["d"], core, rtol=2e-4, atol=1e-7)  # float32 twin


class MeanShift(D.DetectorKind):
    """A new kind, for the test: how far the mean brightness moves, times ``scale``; its threshold is
    twice MagNet's rule, so the test can tell that calibration asked the kind."""

    kind, spec = "mean_shift", None

    def score(self, spec, x, reconstruction, logits_x=None, logits_reconstruction=None, ops=D.NUMPY):
        return spec.scale * abs(ops.row_mean(ops.asfloat(x)) - ops.row_mean(ops.asfloat(reconstruction)))

    def infer_threshold(self, validation_scores, fpr):
        return 2 * threshold_at_fpr(validation_scores, fpr)


class MeanShiftSpec(D.DetectorSpec):
    kind: Literal["mean_shift"] = "mean_shift"
    scale: float


MeanShift.spec = MeanShiftSpec


@pytest.fixture
def mean_shift():
    D.register(MeanShift())
    yield
    D.unregister("mean_shift")


def test_a_kind_added_to_the_registry_alone_works_in_calibration_core_twin_and_gateway(tmp_path, mean_shift):
    out = _bundle(tmp_path, [{"name": "shift", "kind": "mean_shift", "scale": 100.0, "fpr": 0.05},
                             {"name": "jsd", "kind": "divergence", "temperature": 10.0, "fpr": 0.05}])
    manifest = read_manifest(out)
    spec = manifest.members[0].detectors[0]
    assert isinstance(spec, MeanShiftSpec) and spec.scale == 100.0
    val = _images(200, 1)
    defense = Defense(out, device="cpu")
    reformed = defense.screen(val).reformed
    expected = 100 * np.abs(val.reshape(200, -1).mean(1).astype(np.float64)
                            - defense.autoencoders["reformer.onnx"](val).reshape(200, -1).mean(1))
    assert spec.threshold == pytest.approx(2 * threshold_at_fpr(expected, 0.05), rel=1e-5)
    x = _images(16, 3)
    x[:4] = np.clip(x[:4] + 0.2, 0, 1)  # brighter: the reformer pulls them back, the score grows
    verdict = defense.inspect(x)
    assert set(verdict.scores) == {"shift", "jsd"} and reformed.shape == val.shape
    np.testing.assert_allclose(_twin_scores(defense, x)["shift"], verdict.scores["shift"], rtol=2e-4, atol=2e-5)
    c, upstream = make_client(out, explain=True)
    with c:
        results = c.post("/classify", json={"inputs": x.tolist()}).json()["results"]
    np.testing.assert_allclose([r["scores"]["shift"] for r in results], verdict.scores["shift"], rtol=1e-6)
    assert [r["rejected"] for r in results] == verdict.rejected.tolist()


def test_register_refuses_a_spec_whose_kind_differs():
    class Wrong(D.DetectorKind):
        kind, spec = "wrong", D.ReconstructionSpec

    with pytest.raises(ValueError, match="defaults to 'reconstruction'"):
        D.register(Wrong())


def test_calibration_goes_through_the_classifiers_input_contract(tmp_path):
    """The same classifier behind the default and an NHWC 0..255 softmax contract: equal thresholds."""
    from service.defense.contract import ClassifierInput
    from tests import fakes

    val = np.random.default_rng(0).uniform(size=(200, *fakes.SHAPE)).astype(np.float32)
    dets = [{"name": "jsd", "kind": "divergence", "autoencoder": "half.onnx", "temperature": 1.0, "fpr": 0.05}]
    plain = B.calibrate(fakes.make_bundle(tmp_path / "a"), dets, val)
    other = fakes.make_bundle(tmp_path / "b", contract={"layout": "NHWC", "scale": 255.0, "output": "probabilities"})
    bound = B.calibrate(other, dets, val, contract=ClassifierInput(layout="NHWC", scale=255.0), output="probabilities")
    assert bound[0]["threshold"] == pytest.approx(plain[0]["threshold"], rel=1e-4)
