import json
import shutil

import numpy as np
import pytest

from service.defense import BundleError, Defense, read_manifest, verify_files
from service.defense.bundle import FORMAT_VERSION, MemberSpec, fingerprint, manifest_version, pack, sha256_of
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
    with pytest.raises(BundleError, match=r"detectors\.0\.p\n.*1 or 2"):
        read_manifest(toy_bundle)


def test_unknown_format_version_is_refused(toy_bundle):
    _edit_manifest(toy_bundle, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleError, match="format_version 3 is not one this gateway reads.*newer magnet"):
        read_manifest(toy_bundle)


def _as_version_1(data):
    """What the first manifest format wrote: p and temperature on every detector, null where unused."""
    data["format_version"] = 1
    for d in data["members"][0]["detectors"]:
        d.setdefault("p", None)
        d.setdefault("temperature", None)


def test_a_version_1_manifest_is_read_and_migrated(toy_bundle):
    current = read_manifest(toy_bundle)
    _edit_manifest(toy_bundle, _as_version_1)
    assert manifest_version(toy_bundle) == 1
    migrated = read_manifest(toy_bundle)
    assert migrated == current and migrated.format_version == FORMAT_VERSION
    assert "temperature" not in migrated.model_dump()["members"][0]["detectors"][0]
    verdict = Defense(toy_bundle).inspect(np.random.default_rng(0).uniform(size=(4, *fakes.SHAPE)).astype(np.float32))
    assert verdict.accepted.shape == (4,)
    packed = pack(toy_bundle, toy_bundle.parent / "packed")  # a rewrite writes the current version
    assert manifest_version(packed) == FORMAT_VERSION
    from service.cli import main

    assert main(["migrate", "--bundle", str(toy_bundle)]) == 0
    assert manifest_version(toy_bundle) == FORMAT_VERSION and read_manifest(toy_bundle) == current


def test_an_unknown_detector_kind_is_refused_with_the_known_ones(toy_bundle):
    _edit_manifest(toy_bundle, lambda d: d["members"][0]["detectors"][0].update(kind="mahalanobis"))
    with pytest.raises(BundleError, match="unknown kind 'mahalanobis' \\(known: divergence, kl, reconstruction"):
        read_manifest(toy_bundle)


def test_a_divergence_detector_must_use_the_members_reformer(tmp_path):
    data = {"name": "R", "reformer": "a.onnx", "detectors": [
        {"name": "jsd", "kind": "divergence", "autoencoder": "b.onnx", "temperature": 10, "fpr": 0.01, "threshold": 0.1}]}
    with pytest.raises(ValueError, match="its autoencoder must be the member's reformer \\(a.onnx\\), not b.onnx"):
        MemberSpec.model_validate(data)


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


def _share_classifier(toy_bundle):
    """Move the toy bundle's classifier to ../shared/toy-classifier.onnx and reference it there."""
    shared = toy_bundle.parent / "shared"
    shared.mkdir()
    (toy_bundle / "classifier.onnx").rename(shared / "toy-classifier.onnx")

    def edit(d):
        for f in d["files"]:
            if f["role"] == "classifier":
                f["path"] = "../shared/toy-classifier.onnx"
        d["classifier"]["file"] = "../shared/toy-classifier.onnx"

    _edit_manifest(toy_bundle, edit)
    return shared / "toy-classifier.onnx"


def test_classifier_shared_outside_the_bundle_is_used_and_verified(toy_bundle):
    shared = _share_classifier(toy_bundle)
    defense = Defense(toy_bundle)
    assert defense.classifier_file.resolve() == shared.resolve()
    assert defense.classifier(fakes.images(1.0)).argmax(1).tolist() == [0]
    with open(shared, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="toy-classifier.onnx has sha256"):
        Defense(toy_bundle)


def test_bundle_copied_alone_names_the_missing_shared_file_and_the_fix(toy_bundle, tmp_path):
    _share_classifier(toy_bundle)
    alone = tmp_path / "elsewhere" / "toy"
    shutil.copytree(toy_bundle, alone)
    with pytest.raises(BundleError) as e:
        Defense(alone)
    message = str(e.value)
    assert "../shared/toy-classifier.onnx" in message and "magnet pack" in message
    assert str((alone.parent / "shared" / "toy-classifier.onnx").resolve()) in message
    shutil.copy(toy_bundle.parent / "shared" / "toy-classifier.onnx", alone / "toy-classifier.onnx")
    assert Defense(alone).classifier_file == alone / "toy-classifier.onnx"


def test_pack_makes_a_self_contained_copy(toy_bundle, tmp_path):
    shared = _share_classifier(toy_bundle)
    x = fakes.images(0.0, 0.5, 1.0)
    before = Defense(toy_bundle).inspect(x)
    packed = pack(toy_bundle, tmp_path / "packed")
    shutil.rmtree(toy_bundle)
    shared.unlink()
    manifest = read_manifest(packed)
    assert all("/" not in f.path for f in manifest.files)
    after = Defense(packed).inspect(x)
    assert after.accepted.tolist() == before.accepted.tolist()
    assert np.array_equal(after.reformed, before.reformed)
    with pytest.raises(BundleError, match="not empty"):
        pack(packed, packed)


def test_fingerprint_follows_what_decides_the_answers_not_paths_or_figures(toy_bundle, tmp_path):
    before = fingerprint(read_manifest(toy_bundle))
    assert len(before) == 64
    _share_classifier(toy_bundle)  # the classifier moves to another folder: same files, other paths
    assert fingerprint(read_manifest(toy_bundle)) == before
    assert fingerprint(read_manifest(pack(toy_bundle, tmp_path / "packed"))) == before
    _edit_manifest(toy_bundle, lambda d: d.update(measurements={"clean": 0.5}, provenance={"date": "today"}))
    assert fingerprint(read_manifest(toy_bundle)) == before
    _edit_manifest(toy_bundle, lambda d: d["members"][0]["detectors"][0].update(
        threshold=d["members"][0]["detectors"][0]["threshold"] * 1.01))
    changed = fingerprint(read_manifest(toy_bundle))
    assert changed != before
    _edit_manifest(toy_bundle, lambda d: d["files"][0].update(sha256="0" * 64))  # another model under the same name
    assert fingerprint(read_manifest(toy_bundle)) not in (before, changed)


def test_absolute_file_paths_are_refused(toy_bundle):
    _edit_manifest(toy_bundle, lambda d: d["files"][0].update(path="/etc/passwd"))
    with pytest.raises(BundleError, match="relative"):
        read_manifest(toy_bundle)


def test_shipped_bundles_carry_no_second_copy_of_a_large_file():
    """models/cifar10, -paper and -pool share one ResNet-9 file instead of a copy each."""
    large = {}
    for path in sorted((SHIPPED_MNIST.parent).rglob("*.onnx")):
        if path.stat().st_size > 5_000_000:
            large.setdefault(sha256_of(path), []).append(path.relative_to(SHIPPED_MNIST.parent).as_posix())
    assert large and all(len(paths) == 1 for paths in large.values()), large
    for name in ("cifar10", "cifar10-paper", "cifar10-clean", "cifar10-pool"):
        if (SHIPPED_MNIST.parent / name / "manifest.json").exists():
            assert Defense(SHIPPED_MNIST.parent / name).classifier_file.resolve() == \
                (SHIPPED_MNIST.parent / "shared" / "cifar10-resnet9.onnx").resolve()


def test_magnet_evaluate_names_a_missing_bundle_in_one_line_not_a_traceback(tmp_path, capsys):
    pytest.importorskip("torch")
    from service.cli import main

    assert main(["evaluate", "--bundle", str(tmp_path / "none"), "--data-dir", str(tmp_path), "--out",
                 str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"magnet evaluate: no manifest.json in bundle directory {tmp_path / 'none'}\n"
