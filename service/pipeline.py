"""The classify pipeline: defense (off the event loop) -> one upstream call -> results in input order.

Inputs rejected by a reconstruction detector never go upstream (unless speculative forwarding, below, is
turned on), and are not answered with the classifier's output. When the
member has divergence detectors, the accepted-so-far rows go upstream twice in one call (x, then ae(x)):
2N rows. In shadow mode (``MAGNET_MODE=shadow``) every row goes upstream as it came and nothing is
rejected; the verdict is still computed and counted, so the metrics show what enforcing would do.

Speculative forwarding (``MAGNET_SPECULATE``, off by default): in front of a model server, the reformed
rows go upstream as soon as the reformer has run, and the other autoencoders and the detector scores run
while the model server works; the verdict then picks which answers are kept. Verdicts and answers are
the same as without it; what changes is that the model server also classifies rows that end up rejected
(their answers are dropped, never returned). ``auto`` does this only while few recent rows were
rejected (clean traffic: see ``Speculation``), so a flood of rejected inputs goes back to the sequential
order, where rejected rows never reach the model server.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.defense import scores as S
from service.defense.core import Defense, Screening, Verdict
from service.errors import MagnetError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from service.metrics import Metrics
from service.offload import Offload
from service.upstream.base import Upstream


UPSTREAM_ERROR_REASONS = {UpstreamTimeout: "timeout", UpstreamUnavailable: "unavailable"}


@dataclass(frozen=True)
class Outcome:
    """What the gateway answers for one batch: the verdict and, per answered row, probabilities.

    Enforcing, the answered rows are the accepted ones, classified after reforming. In shadow mode
    every row is answered, classified as it came (the defense only watches), and ``verdict`` says what
    the defense would have done."""

    verdict: Verdict
    probabilities: np.ndarray  # N x K, NaN rows for inputs not answered
    shadow: bool = False

    @property
    def rejected(self) -> np.ndarray:
        """Rows the answer rejects: the verdict's rejections, none in shadow mode."""
        return np.zeros(len(self.verdict.accepted), bool) if self.shadow else ~self.verdict.accepted


def check_scores(out: np.ndarray, rows: int, classes: int, kind: str) -> None:
    """Raise UpstreamError unless ``out`` is ``rows`` x ``classes`` finite scores (probabilities in [0, 1])."""
    if out.ndim != 2 or out.shape != (rows, classes):
        raise UpstreamError(f"the model server returned scores of shape {list(out.shape)}; the bundle expects "
                            f"[{rows}, {classes}] ({classes} classes)")
    if not np.isfinite(out).all():
        raise UpstreamError("the model server returned NaN or infinite scores")
    if kind == "probabilities" and ((out < 0).any() or (out > 1 + 1e-3).any()):
        raise UpstreamError("the model server returned probabilities outside [0, 1]")


class Speculation:
    """When to forward before the verdict: ``mode`` 'on', 'off', or 'auto': only to an upstream over the
    network (``Upstream.remote``; an embedded classifier shares the CPU, there is nothing to overlap), and
    only while the share of rejected rows among the recent ones (an exponential average over about
    ``window`` rows) is at most ``max_rejected``."""

    def __init__(self, mode: str = "off", remote: bool = False, max_rejected: float = 0.05,
                 window: int = 256) -> None:
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"speculation mode must be auto, on or off, got {mode!r}")
        self.mode, self.remote, self.max_rejected, self.window = mode, remote, max_rejected, window
        self.rejected_share = 0.0

    def __call__(self) -> bool:
        if self.mode == "auto":
            return self.remote and self.rejected_share <= self.max_rejected
        return self.mode == "on"

    def observe(self, accepted: np.ndarray) -> None:
        """Fold a verdict's rows into the recent rejected share."""
        n = len(accepted)
        if n:
            weight = min(1.0, n / self.window)
            self.rejected_share += weight * ((n - int(accepted.sum())) / n - self.rejected_share)


class Pipeline:
    def __init__(self, defense: Defense, upstream: Upstream, metrics: Metrics, executor: Executor,
                 speculation: Speculation | None = None) -> None:
        self.defense = defense
        self.upstream = upstream
        self.metrics = metrics
        self.offload = Offload(executor)
        self.speculation = speculation or Speculation("off")
        self._background: set[asyncio.Future] = set()  # upstream calls whose answers no row needs any more

    async def _call_upstream(self, x: np.ndarray) -> np.ndarray:
        """Upstream scores as logits (probabilities become log p, equal up to a per-row constant), after
        checking them: one row per input, one column per class of the bundle, finite (probabilities in
        [0, 1]); anything else is a broken answer, 502, never a label."""
        try:
            with self.metrics.stage_seconds.labels("upstream").time():
                out = await self.upstream.infer(x)
            check_scores(out, len(x), len(self.defense.manifest.classifier.classes), self.upstream.outputs)
        except MagnetError as e:
            self.metrics.upstream_errors.labels(UPSTREAM_ERROR_REASONS.get(type(e), "bad_response")).inc()
            raise
        return S.logits_from_probabilities(out) if self.upstream.outputs == "probabilities" else out

    def _sent_parts(self, screening: Screening) -> tuple[np.ndarray, ...]:
        """What goes upstream for a screening's rows, in this order: ae(x), or x then ae(x) (2N rows) when
        the member has divergence detectors."""
        if self.defense.needs_logits(screening.member):
            return screening.x, screening.reformed
        return (screening.reformed,)

    async def _upstream_rows(self, parts: tuple[np.ndarray, ...], idx: np.ndarray,
                             sent: asyncio.Future | None = None) -> np.ndarray:
        """Upstream logits on the rows ``idx`` of each of ``parts``, part after part: one call for them, or,
        with ``sent`` (a speculative call already out on every row of every part), its answers to those
        rows; the rest of its answers are dropped and counted."""
        n = len(parts[0])
        if sent is not None:
            self.metrics.rows_discarded.inc(len(parts) * (n - len(idx)))
            if len(idx) == 0:
                self._let_go(sent)
            else:
                return (await sent)[np.concatenate([idx + k * n for k in range(len(parts))])]
        if len(idx) == 0:  # everything rejected: nothing goes upstream (or nothing is waited for)
            return np.empty((0, len(self.defense.manifest.classifier.classes)))
        return await self._call_upstream(parts[0][idx] if len(parts) == 1 else np.concatenate([p[idx] for p in parts]))

    @staticmethod
    def _scatter(values: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
        full = np.full((n, values.shape[1]), np.nan)
        full[idx] = values
        return full

    async def _decide(self, screening: Screening, sent: asyncio.Future | None = None) -> tuple[Verdict, np.ndarray]:
        """Final verdict and the logits of the reformed rows (NaN where not classified). ``sent``: the
        speculative upstream call on every row (``_speculate``), whose answers replace a call of its own."""
        n, parts = len(screening.x), self._sent_parts(screening)
        if len(parts) == 1:
            verdict = self.defense.decide(screening)
            idx = np.flatnonzero(verdict.accepted)
            return verdict, self._scatter(await self._upstream_rows(parts, idx, sent), idx, n)
        idx = np.flatnonzero(~self.defense.screened_out(screening))
        out = await self._upstream_rows(parts, idx, sent)
        logits_x = self._scatter(out[: len(idx)], idx, n)
        logits_reformed = self._scatter(out[len(idx):], idx, n)
        return self.defense.decide(screening, logits_x, logits_reformed), logits_reformed

    def _decide_fused(self, screening: Screening) -> tuple[Verdict, np.ndarray]:
        """The embedded classifier's logits came with the screening (one fused graph): the same verdict
        and answered logits as ``_decide`` with the embedded upstream, without a second call."""
        n, member = len(screening.x), screening.member
        spec = self.defense.manifest.classifier
        rows = 2 * n if self.defense.needs_logits(member) else n
        check_scores(screening.logits, rows, len(spec.classes), spec.output)
        logits = S.logits_from_probabilities(screening.logits) if spec.output == "probabilities" else screening.logits
        if rows == n:
            verdict = self.defense.decide(screening)
            return verdict, np.where(verdict.accepted[:, None], logits, np.nan)
        sent = ~self.defense.screened_out(screening)[:, None]  # rows _decide would have sent upstream
        logits_x, logits_reformed = np.where(sent, logits[:n], np.nan), np.where(sent, logits[n:], np.nan)
        return self.defense.decide(screening, logits_x, logits_reformed), logits_reformed

    async def _watch(self, screening: Screening) -> tuple[Verdict, np.ndarray]:
        """Shadow mode: every row goes upstream as it came (with what the defense judged, x after the
        bundle's input domain step and its reformed copy, when a detector needs logits); the verdict is
        scored and counted, and the logits on the rows as they came are what gets answered."""
        n = len(screening.x)
        came = screening.x if screening.original is None else screening.original
        if not self.defense.needs_logits(screening.member):
            return self.defense.decide(screening), await self._call_upstream(came)
        judged_rows = [screening.x, screening.reformed]  # after the rows as they came, when the input step changed x
        out = await self._call_upstream(np.concatenate(judged_rows if came is screening.x else [came, *judged_rows]))
        judged = out[-2 * n:]  # on x as judged and on its reformed copy
        return self.defense.decide(screening, judged[:n], judged[n:]), out[:n]

    def _let_go(self, sent: asyncio.Future) -> None:
        """An upstream call whose answer no row needs: let it finish (the connection stays in the pool)
        and drop its result or error (an error is still counted by ``_call_upstream``)."""
        self._background.add(sent)

        def done(f: asyncio.Future) -> None:
            self._background.discard(f)
            if not f.cancelled():
                f.exception()

        sent.add_done_callback(done)

    async def _speculate(self, head: Screening) -> tuple[Verdict, np.ndarray, float]:
        """``_decide``'s verdict and logits, with the upstream call sent on every row right after the
        reformer and the rest of the screen run while it is out (the rows ``_decide`` would not have sent
        get no logits either, so verdicts and answers are the same); returns the rest's time as well."""
        parts = self._sent_parts(head)
        sent = asyncio.ensure_future(self._call_upstream(parts[0] if len(parts) == 1 else np.concatenate(parts)))
        try:
            await asyncio.sleep(0)  # the call encodes and writes its request before the rest of the screen runs
            t0 = time.perf_counter()
            screening = await self.offload(self.defense.complete, head)
            t_rest = time.perf_counter() - t0
            verdict, logits = await self._decide(screening, sent)
        except BaseException:
            if not sent.done():
                sent.cancel()
            raise
        return verdict, logits, t_rest

    async def classify(self, x: np.ndarray, member: int = 0, shadow: bool = False) -> Outcome:
        """Defend and classify a batch ``x`` (N x C x H x W float32 in [0, 1]); ``shadow``: score and count,
        but answer every row with the classifier's output on the row itself."""
        t0 = time.perf_counter()
        if not shadow and self.speculation():
            screening = await self.offload(self.defense.reform, x, member)
            t_screen = time.perf_counter() - t0
            if not screening.complete:  # (a fused graph screens everything in one call)
                verdict, logits, t_rest = await self._speculate(screening)
                return self._outcome(verdict, logits, t_screen + t_rest, shadow)
        else:
            screening = await self.offload(self.defense.screen, x, member)
            t_screen = time.perf_counter() - t0
        if screening.logits is not None and not shadow:
            verdict, logits = self._decide_fused(screening)
        else:
            verdict, logits = await (self._watch(screening) if shadow else self._decide(screening))
        return self._outcome(verdict, logits, t_screen, shadow)

    def _outcome(self, verdict: Verdict, logits: np.ndarray, t_screen: float, shadow: bool) -> Outcome:
        """Count the verdict and turn the answered rows' logits into probabilities."""
        self.metrics.stage_seconds.labels("defense").observe(t_screen)
        if not shadow:
            self.speculation.observe(verdict.accepted)
        self._count(verdict)
        probabilities = np.full(logits.shape, np.nan)
        ok = (np.ones(len(logits), bool) if shadow else verdict.accepted) & ~np.isnan(logits).any(axis=1)
        if ok.any():
            probabilities[ok] = S.softmax(logits[ok])
        return Outcome(verdict=verdict, probabilities=probabilities, shadow=shadow)

    def _count(self, verdict: Verdict) -> None:
        accepted = int(verdict.accepted.sum())
        self.metrics.inputs.labels("accepted").inc(accepted)
        self.metrics.inputs.labels("rejected").inc(len(verdict.accepted) - accepted)
        for name, mask in verdict.fired.items():
            if mask.any():
                self.metrics.detector_rejections.labels(name).inc(int(mask.sum()))
