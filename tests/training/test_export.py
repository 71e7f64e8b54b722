"""torch -> ONNX export: parity with onnxruntime and a working dynamic batch axis."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.defense.runtime import CPU, OnnxModel  # noqa: E402
from training.export import export_onnx, parity  # noqa: E402
from training.nets import make_autoencoder, make_classifier  # noqa: E402


@pytest.mark.parametrize("kind", ["classifier", "mnist_ae_i", "mnist_ae_ii"])
def test_export_parity_and_dynamic_batch(tmp_path, kind):
    torch.manual_seed(0)
    model = make_classifier("mnist") if kind == "classifier" else make_autoencoder(kind)
    path = export_onnx(model, tmp_path / f"{kind}.onnx", (1, 28, 28), "output")
    x = np.random.default_rng(0).uniform(size=(7, 1, 28, 28)).astype(np.float32)
    assert parity(model, path, x) < 1e-5
    onnx_model = OnnxModel(path, [CPU])
    for n in (1, 3, 64):
        out = onnx_model(np.random.default_rng(n).uniform(size=(n, 1, 28, 28)).astype(np.float32))
        assert out.shape[0] == n
    assert not list(tmp_path.glob("*.data")), "export must be one self-contained file"


def test_autoencoder_keeps_shape_and_unit_range():
    ae = make_autoencoder("mnist_ae_i")
    out = ae(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 1, 28, 28) and float(out.min()) > 0 and float(out.max()) < 1
    _, activity = ae.forward_with_activity(torch.rand(2, 1, 28, 28))
    assert float(activity) > 0
