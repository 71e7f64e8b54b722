"""The validation selection's arithmetic on a toy bundle whose scores are known by hand."""

import numpy as np
import pytest

pytest.importorskip("torch")

from tests import fakes  # noqa: E402
from training.evaluate.selection import Candidate, grid  # noqa: E402


def test_thresholds_come_from_clean_scores_and_rejections_count_as_defended(tmp_path):
    bundle = fakes.make_bundle(tmp_path / "toy")
    # clean: constant images v in [0.3, 0.7]; the toy classifier calls an image bright when its mean is above 0.25
    v = np.array([0.30, 0.34, 0.38, 0.42, 0.46, 0.54, 0.58, 0.62, 0.66, 0.70])
    clean, y_clean = fakes.images(*v), np.zeros(len(v), np.int64)  # all "bright" (mean > 0.25) once reformed
    # attack set: all-white images labelled 'dark' (reformed: class 0, wrong), score 0.25 above every clean one,
    # and mid-grey ones labelled 'dark' whose score 0.0 passes every threshold and whose label is also wrong
    attack, y_attack = fakes.images(1.0, 1.0, 0.52, 0.52), np.array([1, 1, 1, 1])
    sets = {"clean": clean, "fgsm": attack, "pgd": attack}
    logits = {k: np.zeros((len(x), 3), np.float32) for k, x in sets.items()}
    cand = Candidate(bundle, sets, logits)
    np.testing.assert_allclose(cand.scores["clean"]["recon"], np.abs(0.5 * v - 0.25), atol=1e-6)
    y = {"clean": y_clean, "fgsm": y_attack, "pgd": y_attack}
    right = {k: np.ones(len(y[k]), bool) for k in y}
    # fpr 0.1 of 10 clean scores: the threshold is the largest, and that image (v = 0.30 or 0.70) is rejected
    row = cand.evaluate({"recon": 0.1}, y, right)
    assert row["clean_rejected"] == pytest.approx(0.1) and row["clean_defended"] == pytest.approx(0.9)
    assert row["clean_reformer_only"] == 1.0
    assert row["fgsm_rejected"] == 0.5 and row["fgsm_defended"] == 0.5 and row["fgsm_reformer_only"] == 0.0
    off = cand.evaluate({"recon": None}, y, right)
    assert off["clean_defended"] == 1.0 and off["fgsm_defended"] == 0.0
    # only the examples the classifier got right count in the attack rows
    row = cand.evaluate({"recon": 0.1}, y, {**right, "fgsm": np.array([True, False, False, False])})
    assert row["fgsm_defended"] == 1.0
    assert {tuple(g.items()) for g in grid(cand)} == {(("recon", f),) for f in (None, 0.002, 0.005, 0.01, 0.02)}


def test_the_as_shipped_row_uses_the_manifests_thresholds_not_a_recalibration(tmp_path):
    """A bundle calibrated elsewhere (e.g. on two input domains) is judged at its own threshold."""
    from service.defense.bundle import read_manifest, write_manifest

    bundle = fakes.make_bundle(tmp_path / "toy")
    manifest = read_manifest(bundle)
    (det,) = manifest.members[0].detectors
    # a threshold between the clean scores 0.06 (v = 0.38, 0.62) and 0.08 (v = 0.34, 0.66): 4 of 10 rejected
    member = manifest.members[0].model_copy(update={"detectors": [det.model_copy(update={"threshold": 0.07})]})
    write_manifest(bundle, manifest.model_copy(update={"members": [member]}))
    v = np.array([0.30, 0.34, 0.38, 0.42, 0.46, 0.54, 0.58, 0.62, 0.66, 0.70])
    sets = {"clean": fakes.images(*v), "fgsm": fakes.images(1.0, 0.52), "pgd": fakes.images(1.0, 0.52)}
    logits = {k: np.zeros((len(x), 3), np.float32) for k, x in sets.items()}
    cand = Candidate(bundle, sets, logits)
    assert cand.shipped() == {"recon": (0.07, det.fpr)}
    y = {"clean": np.zeros(10, np.int64), "fgsm": np.array([1, 1]), "pgd": np.array([1, 1])}
    right = {k: np.ones(len(y[k]), bool) for k in y}
    row = cand.judge({"recon": 0.07}, y, right)
    assert row["clean_rejected"] == pytest.approx(0.4) and row["fgsm_defended"] == 0.5


def test_a_candidate_with_an_input_step_is_scored_as_the_core_judges_it(tmp_path):
    """With input.jpeg_quality the scores are those of the round-tripped images, as the core's, and the
    cache keeps them apart from the same reformer's scores without the step."""
    from service.defense import Defense
    from service.defense.bundle import read_manifest, write_manifest

    bundle = fakes.make_bundle(tmp_path / "toy")
    manifest = read_manifest(bundle)
    write_manifest(bundle, manifest.model_copy(update={"input": manifest.input.model_copy(update={"jpeg_quality": 50})}))
    x = np.random.default_rng(0).uniform(size=(6, *fakes.SHAPE)).astype(np.float32)
    sets = {"clean": x, "fgsm": x, "pgd": x}
    logits = {k: np.zeros((len(v), 3), np.float32) for k, v in sets.items()}
    cand = Candidate(bundle, sets, logits, cache=tmp_path / "cache")
    np.testing.assert_allclose(cand.scores["clean"]["recon"], Defense(bundle).inspect(x).scores["R"], atol=1e-6)
    assert [p.name for p in (tmp_path / "cache").iterdir()][0].endswith("-jpeg50.npz")


def test_each_member_of_a_pool_is_scored_with_its_own_detectors(tmp_path):
    """--every-member: a pool's member k is its own candidate, NAME-mk, scored through member k's reformer
    and judged at member k's thresholds."""
    from service.defense.bundle import read_manifest, write_manifest

    bundle = fakes.make_bundle(tmp_path / "pool", members=2, thresholds=[0.07, 0.5])
    manifest = read_manifest(bundle)  # member 1 reforms with the steep autoencoder, 2 x - 0.5
    steep = manifest.members[1].model_copy(update={"reformer": "steep.onnx"})
    write_manifest(bundle, manifest.model_copy(update={"members": [manifest.members[0], steep]}))
    v = np.array([0.30, 0.34, 0.38, 0.42, 0.46, 0.54, 0.58, 0.62, 0.66, 0.70])
    sets = {"clean": fakes.images(*v), "fgsm": fakes.images(1.0, 0.52), "pgd": fakes.images(1.0, 0.52)}
    logits = {k: np.zeros((len(x), 3), np.float32) for k, x in sets.items()}
    y = {"clean": np.zeros(10, np.int64), "fgsm": np.array([1, 1]), "pgd": np.array([1, 1])}
    right = {k: np.ones(len(y[k]), bool) for k in y}
    first, second = (Candidate(bundle, sets, logits, member=k) for k in (0, 1))
    assert (first.name, second.name) == ("pool-m0", "pool-m1")
    np.testing.assert_allclose(first.scores["clean"]["recon"], np.abs(0.5 * v - 0.25), atol=1e-6)
    np.testing.assert_allclose(second.scores["clean"]["recon"], np.abs(v - 0.5), atol=1e-6)
    assert first.shipped()["recon"][0] == 0.07 and second.shipped()["recon"][0] == 0.5
    # member 0 rejects the 4 clean images scored above 0.07 and the white attack image; member 1 rejects nothing
    row0 = first.judge({k: t for k, (t, _) in first.shipped().items()}, y, right)
    row1 = second.judge({k: t for k, (t, _) in second.shipped().items()}, y, right)
    assert row0["clean_rejected"] == pytest.approx(0.4) and row0["fgsm_defended"] == 0.5
    assert row1["clean_rejected"] == 0.0 and row1["fgsm_defended"] == 0.0
    assert Candidate(bundle, sets, logits).name == "pool"  # no member named: the first, under the bundle's name
    with pytest.raises(ValueError, match="no member 2"):
        Candidate(bundle, sets, logits, member=2)
