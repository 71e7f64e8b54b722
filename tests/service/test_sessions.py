import numpy as np
import pytest

from service.sessions import MemberSelector

SECRET = b"0123456789abcdef-test-secret"
# chi-square critical value for 7 degrees of freedom at p = 0.001 (statistical tables)
CHI2_7_P001 = 24.322


def sessions(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.bytes(12).hex() for _ in range(n)]


def test_members_are_uniform_over_many_sessions():
    selector = MemberSelector(SECRET, 8)
    counts = np.bincount([selector.member(s) for s in sessions(16000)], minlength=8)
    expected = 16000 / 8
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_7_P001, counts


def test_sequential_session_ids_are_uniform_too():
    selector = MemberSelector(SECRET, 8)
    counts = np.bincount([selector.member(f"user-{i}") for i in range(16000)], minlength=8)
    assert float(((counts - 2000) ** 2 / 2000).sum()) < CHI2_7_P001


def test_a_session_keeps_its_member_across_calls_and_replicas():
    a, b = MemberSelector(SECRET, 8), MemberSelector(SECRET, 8)
    for s in sessions(200):
        assert a.member(s) == a.member(s) == b.member(s)


def test_another_secret_gives_another_assignment():
    a, b = MemberSelector(SECRET, 8), MemberSelector(b"another-secret-of-16+bytes", 8)
    ids = sessions(2000)
    same = np.mean([a.member(s) == b.member(s) for s in ids])
    assert 0.08 < same < 0.18  # independent assignments agree 1/8 of the time


def test_single_member_and_bad_arguments():
    assert MemberSelector(SECRET, 1).member("anything") == 0
    with pytest.raises(ValueError):
        MemberSelector(b"short", 8)
    with pytest.raises(ValueError):
        MemberSelector(SECRET, 0)
