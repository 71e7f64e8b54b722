"""The generic ONNX -> torch twin: equal to onnxruntime on the shipped models, on models exported by
torch with many operators and layouts, and differentiable with respect to its input."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from tests import fakes  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from training.onnx_torch import OnnxModule, OnnxTwinError, check_twin  # noqa: E402

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("path, shape", [("models/shared/cifar10-resnet9.onnx", (3, 32, 32)),
                                         ("models/mnist/classifier.onnx", (1, 28, 28)),
                                         ("models/cifar10/reformer.onnx", (3, 32, 32)),
                                         ("models/cifar10-clean/reformer.onnx", (3, 32, 32)),
                                         ("models/cifar10-paper/ae.onnx", (3, 32, 32))])
def test_the_shipped_models(path, shape):
    file = ROOT / path
    if not file.exists():
        pytest.skip(f"{path} is not in this checkout")
    x = RNG.uniform(size=(8, *shape)).astype(np.float32)
    assert check_twin(OnnxModule(file), file, x) < 1e-4


class Zoo(nn.Module):
    """Operators a user's classifier may have, behind an NHWC 0..255 input with a softmax output."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.c3 = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12 * 4 * 4, 10)
        self.ln = nn.LayerNorm(10)
        self.eval()
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):  # N x H x W x C in 0..255
        x = (x.permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.25
        a = nn.functional.leaky_relu(self.bn(self.c1(x)), 0.1)
        b = torch.sigmoid(self.c2(a)) * torch.tanh(self.c2(a))
        m = nn.functional.max_pool2d(a, 3, 2, 1)
        h = torch.cat([b, nn.functional.avg_pool2d(m, 3, 1, 1, count_include_pad=False)], 1)
        h = nn.functional.adaptive_avg_pool2d(nn.functional.gelu(self.c3(h)), 4)
        z = self.ln(self.fc(torch.flatten(h, 1)))
        z = z - z.mean(dim=1, keepdim=True) + nn.functional.hardswish(z).clamp(-1, 1)
        return torch.softmax(z, dim=1)


def test_a_model_with_many_operators_nhwc_and_a_softmax(tmp_path):
    torch.manual_seed(0)
    model = Zoo()
    path = tmp_path / "zoo.onnx"
    torch.onnx.export(model, (torch.rand(2, 16, 16, 3) * 255,), str(path), input_names=["pixels"],
                      output_names=["probabilities"], dynamic_axes={"pixels": {0: "N"}, "probabilities": {0: "N"}},
                      opset_version=17, dynamo=False)
    x = (RNG.uniform(size=(5, 16, 16, 3)) * 255).astype(np.float32)
    twin = OnnxModule(path)
    assert twin.input_name == "pixels"
    assert check_twin(twin, path, x) < 1e-5
    z = torch.from_numpy(x).requires_grad_(True)
    twin(z)[:, 3].sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_hand_built_graphs_from_the_gateway_tests(tmp_path):
    for contract in ({}, {"layout": "NHWC", "scale": 255.0, "mean": [127.5], "std": [64.0], "output": "probabilities"}):
        bundle = fakes.make_bundle(tmp_path / str(len(contract)), contract=contract)
        shape = (4, 4, 1) if contract else (1, 4, 4)
        x = RNG.uniform(size=(3, *shape)).astype(np.float32)
        assert check_twin(OnnxModule(bundle / "classifier.onnx"), bundle / "classifier.onnx", x) < 1e-4


def test_an_unsupported_operator_is_named_at_load_time(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("NonMaxSuppression", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 3])])
    path = tmp_path / "nms.onnx"
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(OnnxTwinError, match="not supported by the torch twin: NonMaxSuppression"):
        OnnxModule(path)


@pytest.mark.parametrize("contract", [{}, {"layout": "NHWC", "scale": 255.0, "mean": [127.5], "std": [64.0],
                                          "output": "probabilities"}])
def test_twins_of_a_bundle_with_an_unknown_architecture_and_any_contract_equal_the_core(tmp_path, contract):
    """The toy bundle's affine autoencoders and linear classifier are no architecture the project knows:
    the twins read the graphs; with a contract they take the bundle's images and return logits."""
    from service.defense import Defense
    from training.evaluate.torch_defense import Twins

    detectors = [{"name": "R", "kind": "reconstruction", "autoencoder": "half.onnx", "p": 1, "fpr": 0.01, "threshold": 0.1},
                 {"name": "jsd", "kind": "divergence", "autoencoder": "half.onnx", "temperature": 1.0, "fpr": 0.01,
                  "threshold": 0.04}]
    defense = Defense(fakes.make_bundle(tmp_path / "b", detectors=detectors, contract=contract), device="cpu")
    x = RNG.uniform(size=(6, *fakes.SHAPE)).astype(np.float32)
    with torch.no_grad():
        ev = Twins(defense).members([0]).evaluate(torch.from_numpy(x))
    verdict = defense.inspect(x)
    for name, score in verdict.scores.items():
        np.testing.assert_allclose(ev.scores[0][name].numpy(), score, rtol=1e-4, atol=1e-7)
    reformed = defense.classifier.logits(verdict.reformed)
    np.testing.assert_allclose(torch.softmax(ev.logits[0], 1).numpy(),
                               np.exp(reformed) / np.exp(reformed).sum(1, keepdims=True), atol=1e-5)


def test_a_graph_that_hard_codes_a_batch_of_one_runs_any_batch_with_gradients(tmp_path):
    """An export without dynamic axes whose Reshape keeps the traced batch size (``reshape(1, -1)``): the twin
    runs one row at a time, as onnxruntime does, and equals it on a batch of 5, with gradients per row."""

    class HardCoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).reshape(1, -1))

    torch.manual_seed(0)
    path = tmp_path / "one.onnx"
    torch.onnx.export(HardCoded().eval(), (torch.rand(1, 3, 8, 8),), str(path), input_names=["x"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    twin = OnnxModule(path)
    assert twin.fixed_batch == 1
    x = RNG.uniform(size=(5, 3, 8, 8)).astype(np.float32)
    assert check_twin(twin, path, x) < 1e-5
    z = torch.from_numpy(x).requires_grad_(True)
    twin(z)[2, 1].backward()  # one row's logit: only that row's pixels have a gradient
    assert z.grad[2].abs().sum() > 0 and z.grad[[0, 1, 3, 4]].abs().sum() == 0
    assert twin(z[:0]).shape == (0, 3)


def test_a_half_precision_export_gets_a_float32_twin_with_gradients(tmp_path):
    """The MNIST classifier exported in half precision throughout: the twin reads its weights as float32 and
    takes float32 images; it equals onnxruntime (which gets the images cast) within the graph's own rounding,
    passes the generic twin's check, and gives gradients. (Double precision: onnxruntime's CPU build has no
    double Conv, so such a model serves only from a model server.)"""
    from service.defense.runtime import CPU, OnnxModel
    from training.from_onnx import generic_twin

    path = fakes.in_half_precision(ROOT / "models/mnist/classifier.onnx", tmp_path / "half.onnx")
    twin = OnnxModule(path)
    x = RNG.uniform(size=(8, 1, 28, 28)).astype(np.float32)
    got = OnnxModel(path, [CPU])(x)
    assert got.dtype == np.float32 and twin.rounding > 0
    assert 1e-5 < check_twin(twin, path, x) < 1e-2 * float(np.abs(got).max())  # rounded, but within its rounding
    float32 = OnnxModel(ROOT / "models/mnist/classifier.onnx", [CPU])(x)
    assert np.array_equal(got.argmax(1), float32.argmax(1))
    checked = generic_twin(path, (1, 28, 28))  # within the tolerance it allows for the graph's rounding
    z = torch.from_numpy(x).requires_grad_(True)
    checked(z)[0, 3].backward()
    assert z.grad.dtype == torch.float32 and z.grad[0].abs().sum() > 0


def test_a_uint8_input_is_rounded_by_the_twin_with_a_straight_through_gradient(tmp_path):
    """A classifier that takes UINT8 pixels (Cast and /255 inside): onnxruntime gets the pixels rounded, and
    so does the twin, which then equals it; the rounding's gradient is the identity."""
    import onnx

    path = tmp_path / "u8.onnx"
    onnx.save(fakes.with_input_of(ROOT / "models/mnist/classifier.onnx", onnx.TensorProto.UINT8, 255.0), str(path))
    twin = OnnxModule(path)
    x = 255 * RNG.uniform(size=(8, 1, 28, 28)).astype(np.float32)
    assert twin.rounds_input and check_twin(twin, path, x) < 1e-4
    z = torch.from_numpy(x).requires_grad_(True)
    twin(z)[0, 3].backward()
    assert z.grad[0].abs().sum() > 0 and z.grad[1:].abs().sum() == 0


@pytest.mark.parametrize("contract", [{}, {"output": "probabilities"}])
def test_a_1x1_convolution_head_gets_a_twin_with_n_by_k_logits(tmp_path, contract):
    """Scores as N x K x 1 x 1 (behind a softmax or not): the generic twin returns N x K logits, which pass its
    check against onnxruntime, and equal the flat classifier's twin."""
    from training.from_onnx import generic_twin

    headed = fakes.make_bundle(tmp_path / "h", contract=dict(contract), classifier_head=True) / "classifier.onnx"
    flat = fakes.make_bundle(tmp_path / "f", contract=dict(contract)) / "classifier.onnx"
    output = contract.get("output", "logits")
    x = torch.from_numpy(RNG.uniform(size=(5, *fakes.SHAPE)).astype(np.float32))
    with torch.no_grad():
        a, b = generic_twin(headed, fakes.SHAPE, output=output)(x), generic_twin(flat, fakes.SHAPE, output=output)(x)
    assert a.shape == (5, 3)
    torch.testing.assert_close(a, b)
