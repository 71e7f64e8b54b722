import numpy as np
import pytest

from service.defense.thresholds import passes, threshold_at_fpr, validate_fpr


def test_paper_rule_picks_sorted_minus_int_n_fpr():
    scores = np.arange(1000, dtype=float)[::-1]  # 999 ... 0
    # N = 1000, fpr = 0.005 -> int(5) -> sorted[-5] = 995
    t = threshold_at_fpr(scores, 0.005)
    assert t == 995.0
    assert passes(scores, t).sum() == 995  # exactly 5 of 1000 rejected


def test_pass_is_strictly_below():
    assert passes(np.array([0.9, 1.0, 1.1]), 1.0).tolist() == [True, False, False]


def test_float_rounding_does_not_lose_a_rejection():
    # 100 * 0.29 = 28.999999999999996 in floating point; the rule means 29
    assert validate_fpr(0.29, 100) == 29


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5])
def test_fpr_outside_open_interval_is_refused(fpr):
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr(np.arange(10.0), fpr)


def test_too_few_scores_for_the_fpr_is_refused():
    # int(500 * 0.001) = 0 would pick sorted[-0] = the minimum and reject everything
    with pytest.raises(ValueError, match="at least 1000"):
        threshold_at_fpr(np.arange(500.0), 0.001)


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError):
        threshold_at_fpr(np.array([1.0, np.nan]), 0.5)
