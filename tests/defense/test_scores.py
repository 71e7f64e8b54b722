import numpy as np
import pytest

from service.defense import scores as S


def test_reconstruction_error_p1_and_p2_by_hand():
    x = np.array([[[[0.0, 1.0], [0.5, 0.25]]]], np.float32)
    r = np.array([[[[0.5, 0.5], [0.5, 0.75]]]], np.float32)
    # |diff| = 0.5, 0.5, 0, 0.5
    assert S.reconstruction_error(x, r, 1) == pytest.approx([0.375])
    assert S.reconstruction_error(x, r, 2) == pytest.approx([0.1875])


def test_reconstruction_error_is_per_row():
    x = np.zeros((3, 1, 2, 2), np.float32)
    r = np.stack([np.full((1, 2, 2), v, np.float32) for v in (0.0, 0.1, 0.2)])
    assert S.reconstruction_error(x, r, 2) == pytest.approx([0.0, 0.01, 0.04])


def test_reconstruction_error_rejects_other_p():
    with pytest.raises(ValueError):
        S.reconstruction_error(np.zeros((1, 1)), np.zeros((1, 1)), 3)


def test_softmax_temperature_by_hand():
    p = S.softmax(np.array([[0.0, np.log(3.0)]]), temperature=1.0)
    np.testing.assert_allclose(p, [[0.25, 0.75]])
    # T = 2 halves the logit gap: softmax(0, ln3 / 2) = (1, sqrt 3) / (1 + sqrt 3)
    p2 = S.softmax(np.array([[0.0, np.log(3.0)]]), temperature=2.0)
    assert p2[0, 1] == pytest.approx(np.sqrt(3) / (1 + np.sqrt(3)))


def test_softmax_is_stable_for_huge_logits():
    p = S.softmax(np.array([[1000.0, 0.0]]))
    assert np.isfinite(p).all() and p[0, 0] == pytest.approx(1.0)


def test_jsd_by_hand():
    # disjoint supports: JSD = ln 2
    assert S.jensen_shannon(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])) == pytest.approx([np.log(2)])
    assert S.jensen_shannon(np.array([[0.3, 0.7]]), np.array([[0.3, 0.7]])) == pytest.approx([0.0])
    p, q = np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]])
    # m = (0.75, 0.25): KL(p||m) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25), KL(q||m) = ln(1/0.75)
    expected = 0.5 * (0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)) + 0.5 * np.log(1 / 0.75)
    assert S.jensen_shannon(p, q) == pytest.approx([expected])


def test_probabilities_give_the_same_divergence_as_logits():
    rng = np.random.default_rng(0)
    za, zb = rng.normal(size=(5, 10)) * 5, rng.normal(size=(5, 10)) * 5
    pa, pb = S.softmax(za), S.softmax(zb)
    for t in (1.0, 10.0, 40.0):
        via_logits = S.divergence_score(za, zb, t)
        via_probs = S.divergence_score(S.logits_from_probabilities(pa), S.logits_from_probabilities(pb), t)
        assert via_probs == pytest.approx(via_logits, rel=1e-6, abs=1e-12)


def test_divergence_is_nan_where_logits_are_missing():
    z = np.array([[1.0, 2.0], [np.nan, np.nan]])
    scores = S.divergence_score(z, z + 0.5, 10.0)
    assert scores[0] == pytest.approx(0.0) and np.isnan(scores[1])
