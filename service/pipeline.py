"""The classify pipeline: defense (off the event loop) -> one upstream call -> results in input order.

Inputs rejected by a reconstruction detector never go upstream. When the member has divergence
detectors, the accepted-so-far rows go upstream twice in one call (x, then ae(x)): 2N rows. In shadow
mode (``MAGNET_MODE=shadow``) every row goes upstream as it came and nothing is rejected; the verdict
is still computed and counted, so the metrics show what enforcing would do.
"""

from __future__ import annotations

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


class Pipeline:
    def __init__(self, defense: Defense, upstream: Upstream, metrics: Metrics, executor: Executor) -> None:
        self.defense = defense
        self.upstream = upstream
        self.metrics = metrics
        self.offload = Offload(executor)

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

    async def _upstream_rows(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:  # everything rejected: nothing goes upstream
            return np.empty((0, len(self.defense.manifest.classifier.classes)))
        return await self._call_upstream(rows)

    @staticmethod
    def _scatter(values: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
        full = np.full((n, values.shape[1]), np.nan)
        full[idx] = values
        return full

    async def _decide(self, screening: Screening) -> tuple[Verdict, np.ndarray]:
        """Final verdict and the logits of the reformed rows (NaN where not classified)."""
        n = len(screening.x)
        if not self.defense.needs_logits(screening.member):
            verdict = self.defense.decide(screening)
            idx = np.flatnonzero(verdict.accepted)
            return verdict, self._scatter(await self._upstream_rows(screening.reformed[idx]), idx, n)
        idx = np.flatnonzero(~self.defense.screened_out(screening))
        out = await self._upstream_rows(np.concatenate([screening.x[idx], screening.reformed[idx]]))
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

    async def classify(self, x: np.ndarray, member: int = 0, shadow: bool = False) -> Outcome:
        """Defend and classify a batch ``x`` (N x C x H x W float32 in [0, 1]); ``shadow``: score and count,
        but answer every row with the classifier's output on the row itself."""
        t0 = time.perf_counter()
        screening = await self.offload(self.defense.screen, x, member)
        t_screen = time.perf_counter() - t0
        if screening.logits is not None and not shadow:
            verdict, logits = self._decide_fused(screening)
        else:
            verdict, logits = await (self._watch(screening) if shadow else self._decide(screening))
        self.metrics.stage_seconds.labels("defense").observe(t_screen)
        self._count(verdict)
        probabilities = np.full(logits.shape, np.nan)
        ok = (np.ones(len(x), bool) if shadow else verdict.accepted) & ~np.isnan(logits).any(axis=1)
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
