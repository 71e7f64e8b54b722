"""Carlini-Wagner attacks against models whose minimal adversarial distances are known in closed form.

For a 2-class linear model z = W x + b on 1 x 4 x 4 images with d = w1 - w0 and margin
m = z0 - z1 > 0, the closest class-1 point is at L2 distance m / ||d||_2 (delta = -m d / ||d||^2
reversed in sign) and at L-infinity distance m / ||d||_1 (delta = eps * sign(d)), as long as the
[0, 1] box does not bind; the images below sit near 0.5 so that it never does.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from training.attacks.carlini import AttackResult, carlini_l0, carlini_l0_stream, carlini_l2, carlini_linf

FAST_L2 = dict(binary_search_steps=5, max_iterations=300)
FAST_LI = dict(max_iterations=150, initial_const=1e-2)


def linear_model(weight: np.ndarray, bias: np.ndarray | None = None) -> nn.Module:
    k, p = weight.shape
    model = nn.Sequential(nn.Flatten(), nn.Linear(p, k))
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        model[1].bias.copy_(torch.from_numpy(np.zeros(k, np.float32) if bias is None else bias.astype(np.float32)))
    return model


@pytest.fixture(scope="module")
def two_class():
    """Model, images (all class 0, margins 0.3..1.2), d = w1 - w0 and the margins."""
    rng = np.random.default_rng(0)
    d = rng.normal(size=16)
    d /= np.abs(d).max()
    model = linear_model(np.stack([np.zeros(16), d]))
    margins = np.array([0.3, 0.6, 0.9, 1.2])
    base = 0.5 + 0.05 * rng.uniform(-1, 1, size=(4, 16))
    # move each image along -d until z0 - z1 = -d.x equals its margin
    alpha = (margins + base @ d) / (d @ d)
    x = (base - alpha[:, None] * d).reshape(4, 1, 4, 4).astype(np.float32)
    return model, x, d, margins


def logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_l2_contract_and_minimal_distance(two_class):
    model, x, d, margins = two_class
    optimum = margins / np.linalg.norm(d)
    flat = x.reshape(4, -1)
    for delta in (margins[:, None] * d / (d @ d), margins[:, None] * np.sign(d) / np.abs(d).sum()):
        assert 0.1 < (flat + delta).min() and (flat + delta).max() < 0.9  # the box never binds
    np.testing.assert_allclose(logits(model, x) @ [1, -1], margins, atol=1e-5)
    res = carlini_l2(model, x, np.zeros(4, np.int64), **FAST_L2)
    assert isinstance(res, AttackResult)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == np.float32
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert res.success.all() and (logits(model, res.x_adv).argmax(1) == 1).all()
    assert np.all(res.l2 >= optimum * 0.999) and np.all(res.l2 <= optimum * 1.1), (res.l2, optimum)
    np.testing.assert_allclose(res.l2, np.linalg.norm((res.x_adv - x).reshape(4, -1), axis=1), rtol=1e-5)


def test_confidence_buys_margin_with_distortion(two_class):
    model, x, d, margins = two_class
    y = np.zeros(4, np.int64)
    plain = carlini_l2(model, x, y, **FAST_L2)
    strong = carlini_l2(model, x, y, confidence=0.5, **FAST_L2)
    assert strong.success.all() and np.all(strong.l2 > plain.l2)
    z = logits(model, strong.x_adv)
    assert np.all(z[:, 1] - z[:, 0] >= 0.5 - 1e-4)
    np.testing.assert_array_less(strong.l2, (margins + 0.5) / np.linalg.norm(d) * 1.1)


def test_targeted_reaches_the_target():
    rng = np.random.default_rng(1)
    model = linear_model(rng.normal(size=(3, 16)))
    x = (0.5 + 0.2 * rng.uniform(-1, 1, size=(6, 1, 4, 4))).astype(np.float32)
    clean = logits(model, x).argmax(1)
    target = (clean + 1 + np.arange(6) % 2) % 3
    res = carlini_l2(model, x, target, targeted=True, confidence=0.1, **FAST_L2)
    z = logits(model, res.x_adv)
    assert res.success.all() and (z.argmax(1) == target).all()
    assert np.all(z[np.arange(6), target] - np.sort(z, 1)[:, -2] >= 0.1 - 1e-4)


def test_linf_minimal_distance(two_class):
    model, x, d, margins = two_class
    optimum = margins / np.abs(d).sum()
    res = carlini_linf(model, x, np.zeros(4, np.int64), **FAST_LI)
    assert res.success.all() and (logits(model, res.x_adv).argmax(1) == 1).all()
    assert res.x_adv.dtype == np.float32 and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    # tau shrinks by 10 % per success, so the answer is within about 1 / 0.9 of the optimum
    assert np.all(res.linf >= optimum * 0.999) and np.all(res.linf <= optimum * 1.15), (res.linf, optimum)


def test_penalty_keeps_a_pixel_still(two_class):
    model, x, d, _ = two_class
    pixel = int(np.argmax(np.abs(d)))  # the pixel an unconstrained attack moves most
    y = np.zeros(4, np.int64)
    x0 = torch.from_numpy(x).flatten(1)[:, pixel]

    def penalty(adv):
        return 1e3 * (adv.flatten(1)[:, pixel] - x0) ** 2

    free = carlini_l2(model, x, y, **FAST_L2)
    held = carlini_l2(model, x, y, penalty=penalty, **FAST_L2)
    moved = lambda r: np.abs(r.x_adv - x).reshape(4, -1)[:, pixel]
    assert held.success.all()
    assert np.all(moved(held) < 0.05 * moved(free)), (moved(held), moved(free))
    assert np.all(held.l2 > free.l2)


@pytest.mark.parametrize("attack", [carlini_l2, carlini_linf])
def test_success_fn_never_true_returns_inputs(two_class, attack):
    model, x, _, _ = two_class
    never = lambda adv, z, y: torch.zeros(len(adv), dtype=torch.bool)
    kw = dict(binary_search_steps=3, max_iterations=30) if attack is carlini_l2 else dict(max_iterations=10, initial_const=1.0)
    res = attack(model, x, np.zeros(4, np.int64), success_fn=never, **kw)
    assert not res.success.any() and np.array_equal(res.x_adv, x)
    assert not res.l2.any() and not res.linf.any()


CARLINI_L0 = dict(schedule="carlini", learning_rate=1e-2, max_iterations=1000, initial_const=1e-3, const_factor=2.0,
                  largest_const=1e2)  # Carlini's budget, but giving up at c = 100 rather than 2e6 (test time)


@pytest.mark.parametrize("kw", [{}, CARLINI_L0], ids=["geometric", "carlini"])
def test_l0_changes_about_the_fewest_pixels(two_class, kw):
    """For the linear model the fewest pixels that flip an image are the ones of largest |d_i| * room_i
    (room: distance to the box edge in the direction of d), taken greedily until the margin is covered."""
    model, x, d, margins = two_class
    flat = x.reshape(4, -1).astype(np.float64)
    room = np.where(d > 0, 1 - flat, flat) * np.abs(d)
    optimum = np.array([int(np.searchsorted(np.cumsum(np.sort(r)[::-1]), m)) + 1 for r, m in zip(room, margins)])
    assert np.all(optimum < 8)
    res = carlini_l0(model, x, np.zeros(4, np.int64), **kw)
    assert res.success.all() and (logits(model, res.x_adv).argmax(1) == 1).all()
    assert res.x_adv.dtype == np.float32 and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    changed = (res.x_adv != x).reshape(4, -1).sum(1)  # pixels outside the mask are exactly x
    assert np.all(changed >= optimum) and np.all(changed <= optimum + 1), (changed, optimum)
    assert all(p.grad is None for p in model.parameters())


def test_l0_counts_pixels_across_channels():
    """A 3-channel pixel is one unit: the attack changes all or none of its channels' freedom."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 3 * 16))
    model = linear_model(w)
    x = (0.5 + 0.05 * rng.uniform(-1, 1, size=(5, 3, 4, 4))).astype(np.float32)
    y = logits(model, x).argmax(1)
    res = carlini_l0(model, x, y)
    assert res.success.all() and (logits(model, res.x_adv).argmax(1) != y).all()
    pixels = (res.x_adv != x).any(1).reshape(5, -1).sum(1)
    assert np.all(pixels >= 1) and np.all(pixels < 16)


@pytest.mark.parametrize("attack", [carlini_l2, carlini_linf, carlini_l0])
def test_already_misclassified_is_free(two_class, attack):
    model, x, _, _ = two_class
    kw = {carlini_l2: FAST_L2, carlini_linf: FAST_LI, carlini_l0: {}}[attack]
    res = attack(model, x, np.ones(4, np.int64), **kw)  # "true" label 1, model says 0 with margin
    assert res.success.all() and np.all(res.l2 < 1e-4) and np.all(res.linf < 1e-5)


def test_trained_mlp_batches_and_model_state():
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=64)
    x = np.clip(0.5 + 0.15 * (2 * y[:, None] - 1) * np.linspace(-1, 1, 16) + 0.05 * rng.normal(size=(64, 16)), 0, 1)
    x = x.reshape(64, 1, 4, 4).astype(np.float32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    correct = logits(model, x).argmax(1) == y
    assert correct.mean() > 0.9
    model.train()
    calls = []
    xs, ys = x[correct][:7], y[correct][:7]
    res = carlini_l2(model, xs, ys, batch_size=3, progress=lambda done, total: calls.append((done, total)), **FAST_L2)
    done = [d for d, _ in calls]
    assert all(t == 7 for _, t in calls) and done == sorted(set(done)) and done[-1] == 7
    assert {3, 6} <= set(done)  # batch ends are reported
    assert model.training and model[3].training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    assert res.success.all() and (logits(model, res.x_adv).argmax(1) != ys).all()


def test_bad_inputs_raise(two_class):
    model, x, _, _ = two_class
    with pytest.raises(ValueError):
        carlini_l2(model, x * 2, np.zeros(4, np.int64))
    with pytest.raises(ValueError):
        carlini_linf(model, x, np.zeros(3, np.int64))
    with pytest.raises(ValueError):
        carlini_l0(model, x[:, 0], np.zeros(4, np.int64))


def test_l0_knows_its_schedules(two_class):
    model, x, _, _ = two_class
    with pytest.raises(ValueError, match="schedule"):
        carlini_l0(model, x, np.zeros(4, np.int64), schedule="fast")


class _Batches(nn.Module):
    """Records the batch size of every forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.model(x)


@pytest.mark.parametrize("kw", [{}, {**CARLINI_L0, "max_iterations": 100}], ids=["geometric", "carlini"])
def test_l0_stream_is_the_same_attack_with_slots_refilled(two_class, kw):
    """Streaming keeps each example's own state: the same result as the batched attack, example by example,
    with the batch full until the stream runs dry, and time shares that add up to the stream's time."""
    model, x, _, _ = two_class
    xs = np.concatenate([x, x[::-1]])  # 8 examples, different lengths of search side by side
    ys = np.zeros(8, np.int64)
    alone = carlini_l0(model, xs, ys, batch_size=1, **kw)
    watched = _Batches(model)
    got = {}

    def done(key, x_adv, ok, seconds):
        got[key] = (x_adv, ok, seconds)

    started = time.perf_counter()
    count = carlini_l0_stream(watched, ((f"ex{i}", xs[i], ys[i]) for i in range(8)), done, slots=3, **kw)
    took = time.perf_counter() - started
    assert count == 8 and sorted(got) == [f"ex{i}" for i in range(8)]
    for i in range(8):
        x_adv, ok, seconds = got[f"ex{i}"]
        assert x_adv.shape == xs[i].shape and x_adv.dtype == np.float32 and ok == alone.success[i]
        np.testing.assert_allclose(x_adv, alone.x_adv[i], atol=1e-5)
        assert (x_adv != xs[i]).any(0).sum() == (alone.x_adv[i] != xs[i]).any(0).sum()  # same pixels changed
        assert seconds > 0
    assert sum(s for _, _, s in got.values()) == pytest.approx(took, rel=0.2)
    sizes = watched.sizes
    assert max(sizes) == 3 and sizes[0] == 3
    full_until = len(sizes) - sizes[::-1].index(3)  # the batch stays full until the last example has joined
    assert min(sizes[:full_until]) == 3 and sizes[full_until:] == sorted(sizes[full_until:], reverse=True)
    assert all(p.grad is None for p in model.parameters())


def test_l0_stream_rejects_bad_input(two_class):
    model, x, _, _ = two_class
    ignore = lambda *a: None  # noqa: E731
    with pytest.raises(ValueError, match="slots"):
        carlini_l0_stream(model, [(0, x[0], 0)], ignore, slots=0)
    with pytest.raises(ValueError, match="twice"):
        carlini_l0_stream(model, [(0, x[0], 0), (0, x[1], 0)], ignore, slots=2)
    with pytest.raises(ValueError, match="C x H x W"):
        carlini_l0_stream(model, [(0, x[:1], 0)], ignore)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        carlini_l0_stream(model, [(0, x[0] * 3, 0)], ignore)
    with pytest.raises(TypeError, match="batch_size"):
        carlini_l0_stream(model, [(0, x[0], 0)], ignore, batch_size=4)
    with pytest.raises(ValueError, match="schedule"):
        carlini_l0_stream(model, [(0, x[0], 0)], ignore, schedule="fast")
    assert carlini_l0_stream(model, [], ignore) == 0
