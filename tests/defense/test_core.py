import numpy as np
import pytest

from service.defense import Defense
from tests import fakes


def test_scores_thresholds_and_reforming_by_hand(toy_bundle):
    defense = Defense(toy_bundle, device="cpu")
    x = fakes.images(0.5, 0.0, 1.0, 0.6)
    verdict = defense.inspect(x)
    # ae(x) = 0.5 x + 0.25, so |x - ae(x)| = |0.5 x - 0.25|: 0, 0.25, 0.25, 0.05; threshold 0.1
    np.testing.assert_allclose(verdict.scores["R"], [0.0, 0.25, 0.25, 0.05], atol=1e-7)
    assert verdict.accepted.tolist() == [True, False, False, True]
    assert verdict.fired_by(1) == ["R"] and verdict.fired_by(0) == []
    np.testing.assert_allclose(verdict.reformed[3], np.full(fakes.SHAPE, 0.55), atol=1e-7)


def test_reformer_output_is_clipped_to_unit_range(tmp_path):
    bundle = fakes.make_bundle(tmp_path / "b", reformer="steep.onnx")
    verdict = Defense(bundle, device="cpu").inspect(fakes.images(0.0, 0.5, 1.0))
    # steep(x) = 2x - 0.5: -0.5, 0.5, 1.5 -> clipped 0, 0.5, 1
    assert verdict.reformed.reshape(3, -1)[:, 0].tolist() == [0.0, 0.5, 1.0]
    assert verdict.reformed.dtype == np.float32


def test_any_detector_firing_rejects(tmp_path):
    detectors = [
        {"name": "loose", "kind": "reconstruction", "autoencoder": "half.onnx", "p": 2, "fpr": 0.01,
         "threshold": 1.0},
        {"name": "tight", "kind": "reconstruction", "autoencoder": "steep.onnx", "p": 1, "fpr": 0.01,
         "threshold": 0.2},
    ]
    defense = Defense(fakes.make_bundle(tmp_path / "b", detectors=detectors), device="cpu")
    # steep: |x - (2x - 0.5)| = |0.5 - x|: 0 for 0.5, 0.3 for 0.8
    verdict = defense.inspect(fakes.images(0.5, 0.8))
    assert verdict.accepted.tolist() == [True, False]
    assert verdict.fired["loose"].tolist() == [False, False]
    assert verdict.fired["tight"].tolist() == [False, True]


def test_divergence_detector_uses_logits_on_x_and_reformed(tmp_path):
    detectors = [{"name": "jsd", "kind": "divergence", "autoencoder": "half.onnx", "temperature": 1.0,
                  "fpr": 0.01, "threshold": 0.04}]
    defense = Defense(fakes.make_bundle(tmp_path / "b", detectors=detectors), device="cpu")
    assert defense.needs_logits()
    calls = []

    def classify(batch):
        calls.append(len(batch))
        return defense.classifier(batch)

    x = fakes.images(0.5, 0.3)
    verdict = defense.inspect(x, classify=classify)
    assert calls == [4]  # x and ae(x) in one call of 2N rows
    # x = 0.5: ae(x) = x, identical logits, JSD 0.
    assert verdict.scores["jsd"][0] == pytest.approx(0.0, abs=1e-9)
    # x = 0.3: sum 4.8 -> logits (4.8, 3.2, 0); ae(x) = 0.4: sum 6.4 -> logits (6.4, 1.6, 0)
    p = np.exp([4.8, 3.2, 0.0]) / np.exp([4.8, 3.2, 0.0]).sum()
    q = np.exp([6.4, 1.6, 0.0]) / np.exp([6.4, 1.6, 0.0]).sum()
    m = (p + q) / 2
    expected = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert verdict.scores["jsd"][1] == pytest.approx(expected, rel=1e-5)
    assert expected > 0.04
    assert verdict.accepted.tolist() == [True, False]


def test_decide_without_logits_names_what_is_missing(tmp_path):
    detectors = [{"name": "jsd", "kind": "divergence", "autoencoder": "half.onnx", "temperature": 10.0,
                  "fpr": 0.01, "threshold": 0.05}]
    defense = Defense(fakes.make_bundle(tmp_path / "b", detectors=detectors), device="cpu")
    with pytest.raises(ValueError, match="needs logits"):
        defense.decide(defense.screen(fakes.images(0.5)))


def test_providers_report_cpu(toy_bundle):
    assert Defense(toy_bundle, device="cpu").providers == ["CPUExecutionProvider"]


def test_a_uint8_classifier_takes_rounded_pixels_and_needs_a_contract_that_gives_them(tmp_path):
    """A classifier with a UINT8 input (its own Cast inside) is fed the contract's 0..255 values rounded; a
    manifest whose contract gives [0, 1] values is a bundle error that says what to set."""
    from onnx import TensorProto

    from service.defense.bundle import BundleError

    u8 = Defense(fakes.make_bundle(tmp_path / "u8", contract={"scale": 255.0}, classifier_type=TensorProto.UINT8),
                 device="cpu")
    x = np.random.default_rng(1).uniform(size=(5, *fakes.SHAPE)).astype(np.float32)
    want = np.rint(x * 255).reshape(5, -1).sum(1) / 255  # logit 0: sum of the pixels as 8-bit values, scaled back
    np.testing.assert_allclose(u8.classifier(x)[:, 0], want, rtol=1e-5)
    assert not np.allclose(u8.classifier(x)[:, 0], x.reshape(5, -1).sum(1), rtol=1e-5, atol=0)  # they were rounded
    wrong = Defense(fakes.make_bundle(tmp_path / "bad", classifier_type=TensorProto.UINT8), device="cpu")
    with pytest.raises(BundleError, match="takes uint8 pixels: its input contract needs scale 255"):
        wrong.classifier
