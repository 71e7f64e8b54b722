import json

import pytest

from service.defense import BundleError, Defense, read_manifest, verify_files
from tests import fakes
from tests.conftest import SHIPPED_MNIST


def test_toy_bundle_loads_and_verifies(toy_bundle):
    manifest = read_manifest(toy_bundle)
    verify_files(toy_bundle, manifest)
    assert manifest.input.shape == fakes.SHAPE


def test_tampered_file_is_refused(toy_bundle):
    with open(toy_bundle / "half.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="half.onnx has sha256"):
        Defense(toy_bundle)


def test_missing_file_is_refused(toy_bundle):
    (toy_bundle / "classifier.onnx").unlink()
    with pytest.raises(BundleError, match="classifier.onnx is missing"):
        Defense(toy_bundle)


def test_missing_manifest_is_refused(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Defense(tmp_path)


def _edit_manifest(bundle, edit):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_detector_on_unlisted_file_is_refused(toy_bundle):
    _edit_manifest(toy_bundle, lambda d: d["members"][0]["detectors"][0].update(autoencoder="other.onnx"))
    with pytest.raises(BundleError, match="other.onnx"):
        read_manifest(toy_bundle)


def test_reconstruction_detector_without_p_is_refused(toy_bundle):
    _edit_manifest(toy_bundle, lambda d: d["members"][0]["detectors"][0].update(p=None))
    with pytest.raises(BundleError, match="p = 1 or 2"):
        read_manifest(toy_bundle)


def test_unknown_format_version_is_refused(toy_bundle):
    _edit_manifest(toy_bundle, lambda d: d.update(format_version=2))
    with pytest.raises(BundleError, match="format_version"):
        read_manifest(toy_bundle)


def test_shipped_mnist_bundle_verifies():
    if not (SHIPPED_MNIST / "manifest.json").exists():
        pytest.skip("the MNIST bundle is not built")
    manifest = read_manifest(SHIPPED_MNIST)
    verify_files(SHIPPED_MNIST, manifest)
    member = manifest.members[0]
    assert {d.name: (d.kind, d.p) for d in member.detectors} == {"I": ("reconstruction", 2),
                                                                  "II": ("reconstruction", 1)}
    assert member.reformer == "ae_i.onnx"
    assert {"command", "seed", "date", "git_revision"} <= manifest.provenance.keys()
