"""Batched Carlini-Wagner L2 and L-infinity attacks in PyTorch.

After Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks" (IEEE S&P 2017) and
their reference code (``l2_attack.py``, ``li_attack.py``), rewritten for batches of N x C x H x W
float32 images in [0, 1] and any ``nn.Module`` that maps them to N x K logits (a plain classifier or
a composition such as classifier(reformer(x))).

**tanh box.** Both attacks optimise an unconstrained variable ``w`` with
``x_adv = (tanh(w) + 1) / 2``, so every iterate lies in [0, 1]; ``w`` starts at
``atanh((2x - 1) * (1 - 1e-6))`` (the factor keeps pixels at 0 or 1 finite).

**Margin loss.** With logits Z, true label y (untargeted) or target t (targeted) and confidence k,
``f = max(Z_y - max_{i!=y} Z_i + k, 0)`` untargeted, ``f = max(max_{i!=t} Z_i - Z_t + k, 0)``
targeted. This is the paper's ``max(..., -k)`` shifted by the constant k, as in Carlini's code: the
gradients are the same and the loss stays >= 0, which the early-abort test relies on.

**L2** (:func:`carlini_l2`): minimise ``||x_adv - x||_2^2 + c f(x_adv)`` with Adam, for a binary
search over a per-example c: after each search step, an example that succeeded at some iterate gets
``upper = min(upper, c)``, one that did not gets ``lower = max(lower, c)``; c becomes the midpoint
once an upper bound exists and is multiplied by ``const_growth`` (10, as in Carlini's code) before.
Adam restarts from x at every search step; the smallest-L2 successful iterate over all steps wins.

**L-infinity** (:func:`carlini_linf`): minimise ``c f(x_adv) + sum(max(|x_adv - x| - tau, 0))``.
An optimisation round succeeds once the loss is below ``1e-4 c`` at an adversarial iterate; that
iterate is kept, tau becomes ``min(tau, max|delta|) * tau_decrease`` and the next round warm-starts
from it with a fresh Adam. A round that fails for ``max_iterations`` steps multiplies c by
``const_factor`` and goes on; the example stops when c reaches ``largest_const`` or tau <= 1/256.
Examples run as independent per-example state machines inside one batch.

**Result.** Both return :class:`AttackResult`. Images never attacked successfully come back
unchanged (``x_adv[i] == x[i]``, ``success[i] == False``, distances 0).
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable

import numpy as np
import torch
from torch import nn

Penalty = Callable[[torch.Tensor], torch.Tensor]
SuccessFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]
StreamDone = Callable[[Hashable, np.ndarray, bool, float], None]


@dataclass
class AttackResult:
    """What an attack returns for N images.

    Attributes
    ----------
    x_adv : np.ndarray, float32, N x C x H x W
        Adversarial images in [0, 1]; ``x`` itself where the attack failed.
    success : np.ndarray, bool, (N,)
        Whether ``x_adv[i]`` passed the success test.
    l2 : np.ndarray, float64, (N,)
        Euclidean distance ``||x_adv[i] - x[i]||_2`` (not squared); 0 where unsuccessful.
    linf : np.ndarray, float64, (N,)
        ``max |x_adv[i] - x[i]|``; 0 where unsuccessful.
    """

    x_adv: np.ndarray
    success: np.ndarray
    l2: np.ndarray
    linf: np.ndarray


def _box(w: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(w) + 1) / 2


def _to_w(x: torch.Tensor) -> torch.Tensor:
    return torch.atanh((2 * x - 1) * (1 - 1e-6))


def _hinge(logits: torch.Tensor, y: torch.Tensor, targeted: bool, kappa: float) -> torch.Tensor:
    real = logits.gather(1, y[:, None]).squeeze(1)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, y[:, None], True)
    other = logits.masked_fill(mask, float("-inf")).amax(1)
    return torch.clamp((other - real if targeted else real - other) + kappa, min=0)


def _margin_success(logits: torch.Tensor, y: torch.Tensor, targeted: bool, kappa: float) -> torch.Tensor:
    """Carlini's ``compare``: argmax after moving Z_y by the confidence against the attacker."""
    z = logits.detach().clone()
    z[torch.arange(len(y), device=z.device), y] += -kappa if targeted else kappa
    hit = z.argmax(1) == y
    return hit if targeted else ~hit


class _Adam:
    """Adam whose state and step count are per example, so single rows can be restarted."""

    def __init__(self, w: torch.Tensor, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m, self.v = torch.zeros_like(w), torch.zeros_like(w)
        self.t = torch.zeros(len(w), device=w.device)

    def step(self, w: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor | slice) -> None:
        """Update ``w[rows]`` in place with ``grad`` (len(rows) x C x H x W)."""
        shape = (-1,) + (1,) * (w.dim() - 1)
        self.t[rows] += 1
        t = self.t[rows].view(shape)
        m = self.m[rows] = self.b1 * self.m[rows] + (1 - self.b1) * grad
        v = self.v[rows] = self.b2 * self.v[rows] + (1 - self.b2) * grad * grad
        mhat, vhat = m / (1 - self.b1**t), v / (1 - self.b2**t)
        w[rows] -= self.lr * mhat / (vhat.sqrt() + self.eps)

    def reset(self, rows: torch.Tensor) -> None:
        self.m[rows], self.v[rows], self.t[rows] = 0.0, 0.0, 0.0

    def grow(self, n: int) -> None:
        """Add ``n`` fresh rows at the end."""
        self.m = torch.cat([self.m, self.m.new_zeros((n,) + self.m.shape[1:])])
        self.v = torch.cat([self.v, self.v.new_zeros((n,) + self.v.shape[1:])])
        self.t = torch.cat([self.t, self.t.new_zeros(n)])

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows``, in that order."""
        self.m, self.v, self.t = self.m[rows], self.v[rows], self.t[rows]


@contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _evaluate(model, w, x, y, targeted, kappa, penalty, success_fn):
    """One forward/backward pass: image, logits, per-example margin loss and success flags."""
    adv = _box(w)
    logits = model(adv)
    f = _hinge(logits, y, targeted, kappa)
    extra = penalty(adv) if penalty is not None else torch.zeros_like(f)
    with torch.no_grad():
        ok = success_fn(adv.detach(), logits.detach(), y) if success_fn is not None else _margin_success(logits, y, targeted, kappa)
    return adv, f, extra, ok.bool().to(adv.device)


def _machines(xb: torch.Tensor, initial_const: float):
    """Per-example state of the L-infinity and L0 attacks: c, steps at this c, still running, best
    iterate so far, whether one was found."""
    n, dev = len(xb), xb.device
    return (torch.full((n,), float(initial_const), device=dev), torch.zeros(n, dtype=torch.long, device=dev),
            torch.ones(n, dtype=torch.bool, device=dev), xb.clone(), torch.zeros(n, dtype=torch.bool, device=dev))


def _count_failure(steps, c, active, lose, max_iterations, const_factor, largest_const) -> None:
    """One more unsuccessful step for rows ``lose``; after ``max_iterations`` of them c grows, and a row
    whose c reaches ``largest_const`` stops."""
    steps[lose] += 1
    raise_c = lose[steps[lose] >= max_iterations]
    c[raise_c] *= const_factor
    steps[raise_c] = 0
    active[raise_c] = c[raise_c] < largest_const


def _run(attack, model, x, y, batch_size, device, progress) -> AttackResult:
    """Split into batches, run ``attack(xb, yb, tick) -> (adv, ok)`` and assemble the result.

    ``tick(k)`` lets the attack say that k images of the current batch are finished (or, for L2, how
    far its binary search has got in images' worth); ``progress`` hears every new total.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    if x.ndim != 4 or len(x) != len(y):
        raise ValueError(f"x must be N x C x H x W and y (N,); got {x.shape} and {y.shape}")
    if x.size and (x.min() < 0 or x.max() > 1):
        raise ValueError("x must lie in [0, 1]")
    n = len(x)
    adv, ok = x.copy(), np.zeros(n, dtype=bool)
    last = [0]

    def report(done: int) -> None:
        if progress is not None and done > last[0]:
            last[0] = done
            progress(done, n)

    with _eval_mode(model):
        for i in range(0, n, batch_size):
            xb = torch.from_numpy(x[i : i + batch_size]).to(device)
            a, s = attack(xb, torch.from_numpy(y[i : i + batch_size]).to(device), lambda k, i=i: report(i + int(k)))
            adv[i : i + batch_size], ok[i : i + batch_size] = a.detach().cpu().numpy(), s.cpu().numpy()
            report(min(i + batch_size, n))
    adv[~ok] = x[~ok]
    diff = (adv.astype(np.float64) - x).reshape(n, int(np.prod(x.shape[1:])))
    return AttackResult(adv, ok, np.sqrt((diff**2).sum(1)), np.abs(diff).max(1, initial=0.0))


def carlini_l2(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, confidence: float = 0.0, targeted: bool = False,
    binary_search_steps: int = 9, max_iterations: int = 1000, learning_rate: float = 1e-2,
    initial_const: float = 1e-3, abort_early: bool = True, penalty: Penalty | None = None,
    success_fn: SuccessFn | None = None, const_growth: float = 10.0, batch_size: int = 256,
    device: str | torch.device = "cpu", progress: Progress | None = None, penalty_times_const: bool = False,
) -> AttackResult:
    """Carlini-Wagner L2 attack, batched, with a per-example binary search over c.

    Parameters
    ----------
    model : nn.Module
        Maps N x C x H x W float32 in [0, 1] to N x K logits; must already live on ``device``. It is
        put in eval mode for the attack (modes restored afterwards); its parameters get no gradients.
    x : np.ndarray, float32, N x C x H x W, values in [0, 1]
    y : np.ndarray, int64, (N,)
        True labels (untargeted) or target labels (``targeted=True``).
    confidence : float
        kappa: the required logit margin of a success.
    targeted : bool
    binary_search_steps, max_iterations : int
        Search steps over c and Adam steps per search step. With >= 10 search steps the last one
        retries at the upper bound, as in Carlini's code.
    learning_rate, initial_const : float
        Adam step size (in tanh space) and the starting c.
    abort_early : bool
        End a search step when the batch's total loss has not decreased by 0.01 % over the last
        ``max_iterations // 10`` iterations (checked every that many iterations, as Carlini does).
    penalty : callable, optional
        ``penalty(x_adv) -> (N,)`` tensor, differentiable in ``x_adv`` (N x C x H x W, the current
        iterates), added to each example's objective; keep it >= 0 (e.g. a weighted hinge on
        detector scores above their thresholds, for an adaptive attack on a detector).
    success_fn : callable, optional
        ``success_fn(x_adv, logits, y) -> bool (N,)``, y the labels of those rows, replacing the
        default success test (misclassified or target reached, with margin ``confidence``); called
        without gradients. E.g. also require
        that the detectors accept ``x_adv``. Both callables see one batch at a time (at most
        ``batch_size`` rows; :func:`carlini_linf` passes only the rows still running), so they must
        work row by row on what they are given, not on positions in ``x``.
    penalty_times_const : bool
        Weigh the penalty by c like the margin loss (objective ``||delta||^2 + c (f + penalty)``)
        instead of adding it as it is. Use it when the success test also depends on the penalty
        (e.g. detectors must accept): then a larger c presses on both, and the binary search over c
        still moves in the right direction.
    const_growth : float
        Factor on c after a failed search step while no success is known (Carlini: 10).
    batch_size : int
        Images optimised together, each with its own c.
    device : str or torch.device
    progress : callable, optional
        ``progress(done_images, total)``, called whenever the count grows: after each search step
        (in images' worth of the batch) and after each batch.

    Returns
    -------
    AttackResult
        Per image the successful iterate of smallest L2 over all search steps, else ``x``.
    """

    def attack(xb, yb, tick):
        n, rows = len(xb), slice(None)
        w0 = _to_w(xb)
        lower, upper = torch.zeros(n, device=xb.device), torch.full((n,), 1e10, device=xb.device)
        c = torch.full((n,), float(initial_const), device=xb.device)
        best_l2, best = torch.full((n,), float("inf"), device=xb.device), xb.clone()
        every = max(1, max_iterations // 10)
        for step in range(binary_search_steps):
            if binary_search_steps >= 10 and step == binary_search_steps - 1:
                c = torch.where(upper < 1e10, upper, c)
            w, adam, prev = w0.clone(), _Adam(w0, learning_rate), float("inf")
            found = torch.zeros(n, dtype=torch.bool, device=xb.device)
            for it in range(max_iterations):
                w.requires_grad_(True)
                adv, f, extra, ok = _evaluate(model, w, xb, yb, targeted, confidence, penalty, success_fn)
                l2 = (adv - xb).flatten(1).pow(2).sum(1)
                loss = l2 + c * (f + extra) if penalty_times_const else l2 + c * f + extra
                (grad,) = torch.autograd.grad(loss.sum(), w)
                w = w.detach()
                with torch.no_grad():
                    found |= ok
                    better = ok & (l2 < best_l2)
                    best_l2 = torch.where(better, l2, best_l2)
                    best[better] = adv[better]
                if abort_early and it % every == 0:
                    total = loss.sum().item()
                    if total > prev * 0.9999:
                        break
                    prev = total
                adam.step(w, grad, rows)
            upper = torch.where(found, torch.minimum(upper, c), upper)
            lower = torch.where(found, lower, torch.maximum(lower, c))
            c = torch.where(upper < 1e9, (lower + upper) / 2, c * const_growth)
            tick(n * (step + 1) // binary_search_steps)
        return best, torch.isfinite(best_l2)

    return _run(attack, model, x, y, batch_size, device, progress)


def carlini_linf(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, confidence: float = 0.0, targeted: bool = False,
    max_iterations: int = 1000, learning_rate: float = 5e-3, initial_const: float = 1e-5,
    largest_const: float = 2e1, tau_decrease: float = 0.9, const_factor: float = 2.0,
    batch_size: int = 256, device: str | torch.device = "cpu", penalty: Penalty | None = None,
    success_fn: SuccessFn | None = None, progress: Progress | None = None,
) -> AttackResult:
    """Carlini-Wagner L-infinity attack (``li_attack.py``), batched with per-example tau and c.

    Parameters
    ----------
    model, x, y, confidence, targeted, penalty, success_fn, batch_size, device, progress
        As in :func:`carlini_l2` (Carlini's L-infinity code has no confidence; here kappa enters
        ``f`` and the default success test exactly as for L2). A round succeeds only when the
        success test holds and the whole loss, penalty included, is below ``1e-4 c``.
    max_iterations : int
        Adam steps at one (tau, c) before c is multiplied by ``const_factor`` (w and Adam carry on,
        as in Carlini's code). The default keeps Carlini's 1000 although it is slow: in tanh space
        a pixel at 0 or 1 sits at |w| ~ 7.3 and needs hundreds of steps of 5e-3 before it moves, so
        fewer steps weaken the attack on MNIST (8 test images, our classifier: mean max|delta| 0.25
        with 100 steps, 0.12 with 300). Rounds end as soon as they succeed, but the final, failing
        tau costs ``max_iterations * log(largest_const / c) / log(const_factor)`` steps (21000 from
        c = 1e-5): lower it, or raise ``initial_const``, for cheap evaluations.
    learning_rate, initial_const, largest_const : float
        Adam step size in tanh space; the first c; the c at which an example gives up.
    tau_decrease, const_factor : float
        tau := min(tau, max|delta|) * tau_decrease after a success; c := c * const_factor after
        ``max_iterations`` unsuccessful steps.

    Returns
    -------
    AttackResult
        Per image the last successful iterate (the one with the smallest tau reached), else ``x``.
    """

    def attack(xb, yb, tick):
        n, dev = len(xb), xb.device
        w, adam = _to_w(xb), _Adam(xb, learning_rate)
        tau = torch.ones(n, device=dev)
        c, steps, active, best, found = _machines(xb, initial_const)
        while bool(active.any()):
            tick(int((~active).sum()))
            rows = active.nonzero().squeeze(1)
            wa = w[rows].requires_grad_(True)
            adv, f, extra, ok = _evaluate(model, wa, xb[rows], yb[rows], targeted, confidence, penalty, success_fn)
            excess = torch.relu((adv - xb[rows]).abs() - tau[rows].view(-1, 1, 1, 1)).flatten(1).sum(1)
            loss = c[rows] * f + excess + extra
            (grad,) = torch.autograd.grad(loss.sum(), wa)
            with torch.no_grad():
                done = ok & (loss < 1e-4 * c[rows])
                win, lose = rows[done], rows[~done]
                best[win], found[win] = adv[done], True
                actual = (adv[done] - xb[win]).flatten(1).abs().amax(1)
                tau[win] = torch.minimum(tau[win], actual) * tau_decrease
                steps[win] = 0
                adam.reset(win)
                active[win] = tau[win] > 1.0 / 256
                adam.step(w, grad[~done], lose)
                _count_failure(steps, c, active, lose, max_iterations, const_factor, largest_const)
        return best, found

    return _run(attack, model, x, y, batch_size, device, progress)


def carlini_l0(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, confidence: float = 0.0, targeted: bool = False,
    max_iterations: int = 50, learning_rate: float = 0.1, initial_const: float = 1e-2,
    largest_const: float = 1e3, const_factor: float = 4.0, shrink: float = 0.2, schedule: str = "geometric",
    batch_size: int = 256, device: str | torch.device = "cpu", progress: Progress | None = None,
) -> AttackResult:
    """Carlini-Wagner L0 attack (``l0_attack.py``), batched; by default with a faster shrinking schedule,
    with ``schedule="carlini"`` with Carlini's.

    Each example keeps a mask of the pixels it may still change (a pixel is all its channels, as in
    Carlini's default). A round searches for an adversarial example that changes only masked pixels:
    Adam on ``||x_adv - x||_2^2 + c f(x_adv)`` with the unmasked pixels held at x, warm-started from
    the previous round's iterate, ending as soon as the success test holds; after ``max_iterations``
    steps without success c is multiplied by ``const_factor`` (c carries over between rounds, as in
    Carlini's code without ``reduce_const``). When a round succeeds, that example is kept, every
    masked pixel it does not change leaves the mask, and so do the ``ceil(shrink * changed)`` changed
    pixels of least importance ``sum_channels |delta| * |d loss / d x_adv|`` (Carlini's ranking).
    Carlini removes about ``0.3 sqrt(changed)`` pixels per round; the geometric ``shrink`` needs far
    fewer rounds (about 15 from 784 pixels) at the price of a somewhat larger final L0. The example
    stops when a round fails with c above ``largest_const``; its last success is the result.

    ``schedule="carlini"`` shrinks the mask as Carlini's code does: the masked pixels are ranked by
    importance (unchanged ones first, at 0) and removed in that order, at most ``ceil(0.3 sqrt(k))`` of
    them where k is the number of pixels the iterate changes, stopping after the first removed pixel
    whose importance exceeds 0.01; unchanged masked pixels beyond that stay changeable. With his
    budget (``learning_rate=1e-2, max_iterations=1000, initial_const=1e-3, const_factor=2,
    largest_const=2e6``) that is his attack at full strength, and many times the cost.

    Defaults are cheaper than Carlini's (Adam 1e-2 x 1000 steps, c from 1e-3 doubling up to 2e6), and
    were chosen on 32 MNIST test images with the shipped classifier: lr 0.1 x 50 steps with c x 4 gave
    mean L0 8.0 pixels in 494 steps per image; lr 1e-2 x 100 steps with c x 2 up to 1e4 gave 8.2 in
    about 5x the time. A step of 0.1 matters: in tanh space a pixel at 0 or 1 sits at |w| ~ 7.3, out
    of reach of 100 steps of 1e-2, so a small step can change only grey pixels.

    Parameters
    ----------
    model, x, y, confidence, targeted, batch_size, device, progress
        As in :func:`carlini_l2`.
    max_iterations : int
        Adam steps at one (mask, c) before c grows.
    learning_rate, initial_const, largest_const, const_factor : float
        Adam step size in tanh space; the first c; the c at which a failing example gives up; the
        growth of c after ``max_iterations`` unsuccessful steps.
    shrink : float
        Share of the changed pixels removed from the mask after each successful round (at least one).
    schedule : str
        ``"geometric"`` (``shrink``) or ``"carlini"`` (his rule, above; ``shrink`` unused).

    Returns
    -------
    AttackResult
        Per image the last successful iterate (the one with the fewest changeable pixels), else ``x``.
    """

    if schedule not in ("geometric", "carlini"):
        raise ValueError(f"schedule must be 'geometric' or 'carlini', not {schedule!r}")
    settings = dict(confidence=confidence, targeted=targeted, max_iterations=max_iterations,
                    learning_rate=learning_rate, initial_const=initial_const, largest_const=largest_const,
                    const_factor=const_factor, shrink=shrink, schedule=schedule)

    def attack(xb, yb, tick):
        search = _L0Search(model, **settings)
        search.join(xb, yb, list(range(len(xb))))
        best, found, finished = xb.clone(), torch.zeros(len(xb), dtype=torch.bool, device=xb.device), 0
        while len(search):
            for i, adv, ok in search.step()[0]:
                best[i], found[i] = adv, ok
                finished += 1
            tick(finished)
        return best, found

    return _run(attack, model, x, y, batch_size, device, progress)


def carlini_l0_stream(
    model: nn.Module, examples: Iterable[tuple[Hashable, np.ndarray, int]], done: StreamDone, *, slots: int = 2,
    device: str | torch.device = "cpu", **settings,
) -> int:
    """:func:`carlini_l0` on a stream of examples, ``slots`` side by side, each slot refilled as soon as its
    example finishes: the same per-example attack, with every forward and backward pass on a batch of
    ``slots`` images for as long as the stream lasts (a ResNet-9 step on one CPU thread costs 1.3-1.65 x
    for 2 images what it costs for 1: ``python -m bench.attack_batch``), where a fixed batch shrinks to its slowest example.

    ``examples`` yields ``(key, x, y)`` with x one C x H x W float32 image in [0, 1]; for each,
    ``done(key, x_adv, success, seconds)`` is called as soon as it finishes, with x_adv as
    :func:`carlini_l0` returns it (``x`` where the attack failed) and ``seconds`` its share of the time:
    every step's time split evenly among the examples in it, so that the shares add up to the time the
    stream took. ``settings`` are :func:`carlini_l0`'s keywords (not ``batch_size`` or ``progress``).
    Returns how many examples were attacked.
    """
    if slots < 1:
        raise ValueError(f"slots must be at least 1, not {slots}")
    defaults = {k: v.default for k, v in inspect.signature(carlini_l0).parameters.items() if k in _L0_SETTINGS}
    unknown = set(settings) - set(defaults)
    if unknown:
        raise TypeError(f"unknown setting(s) for the L0 attack: {', '.join(sorted(unknown))}")
    search = _L0Search(model, **{**defaults, **settings})
    source, count = iter(examples), 0
    spent: dict[Hashable, float] = {}
    seen: set = set()
    with _eval_mode(model):
        while True:
            while len(search) < slots:
                item = next(source, None)
                if item is None:
                    break
                key, xi, yi = item
                xi = np.ascontiguousarray(xi, dtype=np.float32)
                if xi.ndim != 3:
                    raise ValueError(f"each example must be C x H x W; got {xi.shape}")
                if xi.min() < 0 or xi.max() > 1:
                    raise ValueError("x must lie in [0, 1]")
                if key in seen:
                    raise ValueError(f"key {key!r} appears twice in the stream")
                seen.add(key)
                xt = torch.from_numpy(xi[None]).to(device)
                search.join(xt, torch.tensor([int(yi)], dtype=torch.long, device=device), [key])
                spent[key] = 0.0
                count += 1
            if not len(search):
                return count
            finished, took = search.step()
            share = took / (len(search) + len(finished))
            for key in search.keys:
                spent[key] += share
            for key, best, ok in finished:  # best is x itself where the attack failed
                spent[key] += share
                done(key, best.clamp(0.0, 1.0).cpu().numpy().astype(np.float32), ok, spent.pop(key))


_L0_SETTINGS = ("confidence", "targeted", "max_iterations", "learning_rate", "initial_const", "largest_const",
                "const_factor", "shrink", "schedule")


class _L0Search:
    """The L0 attack's per-example state machines, one row per example still running. Examples join
    between steps and leave as soon as they finish, so a batch can stay full while a stream goes by
    (:func:`carlini_l0_stream`); :func:`carlini_l0` lets a whole batch join at once."""

    def __init__(self, model, *, confidence, targeted, max_iterations, learning_rate, initial_const,
                 largest_const, const_factor, shrink, schedule):
        if schedule not in ("geometric", "carlini"):
            raise ValueError(f"schedule must be 'geometric' or 'carlini', not {schedule!r}")
        self.model, self.confidence, self.targeted = model, confidence, targeted
        self.max_iterations, self.learning_rate, self.initial_const = max_iterations, learning_rate, initial_const
        self.largest_const, self.const_factor, self.shrink, self.schedule = largest_const, const_factor, shrink, schedule
        self.keys: list = []
        self.x = self.y = self.w = self.mask = self.adam = None
        self.c = self.steps = self.active = self.best = self.found = None

    def __len__(self) -> int:
        return len(self.keys)

    def join(self, xb: torch.Tensor, yb: torch.Tensor, keys: list) -> None:
        """Start ``xb`` (N x C x H x W) with labels ``yb``, named by ``keys``."""
        n, dev = len(xb), xb.device
        c, steps, active, best, found = _machines(xb, self.initial_const)
        fresh = dict(x=xb, y=yb, w=_to_w(xb), mask=torch.ones((n, 1) + tuple(xb.shape[2:]), device=dev),
                     c=c, steps=steps, active=active, best=best, found=found)
        if not self.keys:
            for name, value in fresh.items():
                setattr(self, name, value)
            self.adam = _Adam(xb, self.learning_rate)
        else:
            for name, value in fresh.items():
                setattr(self, name, torch.cat([getattr(self, name), value]))
            self.adam.grow(n)
        self.keys += list(keys)

    def step(self) -> tuple[list[tuple], float]:
        """One Adam step for every running example. Returns ``(key, best iterate, found)`` for the examples
        that finished in it (they leave), and the seconds the step took."""
        started = time.perf_counter()
        w, m, xr, y = self.w, self.mask, self.x, self.y
        wa = w.detach().clone().requires_grad_(True)
        adv = m * _box(wa) + (1 - m) * xr
        logits = self.model(adv)
        f = _hinge(logits, y, self.targeted, self.confidence)
        loss = (adv - xr).flatten(1).pow(2).sum(1) + self.c * f
        grad_w, grad_adv = torch.autograd.grad(loss.sum(), [wa, adv])
        with torch.no_grad():
            dev = xr.device
            ok = _margin_success(logits, y, self.targeted, self.confidence)
            win, lose = ok.nonzero().squeeze(1), (~ok).nonzero().squeeze(1)
            self.best[win], self.found[win] = adv[ok], True
            delta = (adv[ok] - xr[ok]).abs().sum(1, keepdim=True)
            importance = delta * grad_adv[ok].abs().sum(1, keepdim=True)
            changed = (delta > 1e-4).flatten(1)
            if self.schedule == "carlini":
                # every masked pixel is a candidate, least important first; at most ceil(0.3 sqrt(k))
                # go, the first one above 0.01 being the last
                keep = (m[ok] > 0).flatten(1)
                small = (importance.flatten(1) <= 0.01) & keep
                drop = torch.minimum(torch.ceil(0.3 * changed.sum(1).float().sqrt()).clamp(min=1),
                                     small.sum(1).float() + 1).long()
            else:
                keep = changed & (m[ok] > 0).flatten(1)  # masked pixels this iterate changes
                drop = torch.ceil(self.shrink * keep.sum(1).float()).clamp(min=1).long()
            score = importance.flatten(1).masked_fill(~keep, float("inf"))
            order = score.argsort(1)
            ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=dev).expand_as(order))
            keep &= ranks >= drop[:, None]
            m[win] = keep.view_as(delta).float()
            w[win] = torch.where(m[win] > 0, wa.detach()[ok], _to_w(xr[ok]))
            self.steps[win] = 0
            self.adam.reset(win)
            self.active[win] = keep.any(1)
            self.adam.step(w, grad_w[~ok], lose)
            _count_failure(self.steps, self.c, self.active, lose, self.max_iterations, self.const_factor,
                           self.largest_const)
            finished = [(self.keys[i], self.best[i], bool(self.found[i])) for i in (~self.active).nonzero().squeeze(1).tolist()]
            if finished:
                stay = self.active.nonzero().squeeze(1)
                for name in ("x", "y", "w", "mask", "c", "steps", "active", "best", "found"):
                    setattr(self, name, getattr(self, name)[stay])
                self.adam.keep(stay)
                self.keys = [self.keys[i] for i in stay.tolist()]
        return finished, time.perf_counter() - started
