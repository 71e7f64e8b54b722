"""Detector kinds: one registry shared by the gateway's core, the calibration in training and the torch
twin that attacks optimise through.

A kind is one object (:class:`DetectorKind`) with

- ``spec``: the pydantic model of its manifest entry (name, kind, autoencoder, fpr, threshold and the
  kind's own parameters); the manifest's ``detectors`` lists are a union over every registered spec,
  told apart by ``kind``;
- ``needs_logits``: whether it scores the classifier's logits on x and on ae(x) (then the gateway scores
  it after the upstream call, and ae must be the member's reformer, the only image sent upstream);
- ``score(spec, x, reconstruction, logits_x, logits_reconstruction, ops)``: one score per row, larger =
  further from the data. It is written once against ``ops`` (``NUMPY`` here, float64; a torch
  equivalent in ``training/evaluate/torch_defense.py``), so the twin computes what the core computes;
- ``infer_threshold(validation_scores, fpr)``: MagNet's rule by default.

``register`` adds a kind; nothing else in the gateway, the calibration or the twin needs to change.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.defense.thresholds import threshold_at_fpr

TINY = 1e-30


class NumpyOps:
    """The few array operations a score needs besides arithmetic, in numpy float64."""

    @staticmethod
    def asfloat(a: Any) -> np.ndarray:
        return np.asarray(a, dtype=np.float64)

    @staticmethod
    def row_mean(a: np.ndarray) -> np.ndarray:
        return a.reshape(len(a), -1).mean(axis=1)

    @staticmethod
    def row_sum(a: np.ndarray) -> np.ndarray:
        return a.reshape(len(a), -1).sum(axis=1)

    @staticmethod
    def softmax(z: np.ndarray, temperature: float) -> np.ndarray:
        z = z / temperature
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    @staticmethod
    def log(a: np.ndarray) -> np.ndarray:
        """log, with arguments below 1e-30 raised to it (so that 0 * log 0 is 0)."""
        return np.log(np.maximum(a, TINY))


NUMPY = NumpyOps()


class DetectorSpec(BaseModel):
    """A detector in the manifest. Validating this base class returns the registered kind's spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: str
    autoencoder: str = Field(description="path of the autoencoder's ONNX file in the bundle")
    fpr: float = Field(gt=0, lt=1)
    threshold: float

    @model_validator(mode="wrap")
    @classmethod
    def _by_kind(cls, data: Any, handler: Any) -> Any:
        if cls is DetectorSpec and isinstance(data, dict):
            kind = data.get("kind")
            if kind not in REGISTRY:
                raise ValueError(f"detector {data.get('name')!r}: unknown kind {kind!r} "
                                 f"(known: {', '.join(sorted(REGISTRY))})")
            return REGISTRY[kind].spec.model_validate(data)
        return handler(data)


class ReconstructionSpec(DetectorSpec):
    kind: Literal["reconstruction"] = "reconstruction"
    p: Literal[1, 2] = Field(description="mean |x - ae(x)|^p")


class DivergenceSpec(DetectorSpec):
    kind: Literal["divergence"] = "divergence"
    temperature: float = Field(gt=0, description="softmax temperature of the Jensen-Shannon divergence")


class KLSpec(DetectorSpec):
    kind: Literal["kl"] = "kl"
    temperature: float = Field(gt=0, description="softmax temperature of KL(f(x) || f(ae(x)))")


class DetectorKind:
    """One kind of detector; subclass and ``register`` an instance."""

    kind: ClassVar[str]
    spec: ClassVar[type[DetectorSpec]]
    needs_logits: ClassVar[bool] = False

    def score(self, spec: DetectorSpec, x: Any, reconstruction: Any, logits_x: Any = None,
              logits_reconstruction: Any = None, ops: Any = NUMPY) -> Any:
        raise NotImplementedError

    def infer_threshold(self, validation_scores: np.ndarray, fpr: float) -> float:
        """MagNet's rule: the threshold that ``fpr`` of the clean validation scores reach."""
        return threshold_at_fpr(validation_scores, fpr)


class Reconstruction(DetectorKind):
    """Detector I/II of the paper: mean over pixels of |x - ae(x)|^p."""

    kind, spec = "reconstruction", ReconstructionSpec

    def score(self, spec, x, reconstruction, logits_x=None, logits_reconstruction=None, ops=NUMPY):
        return ops.row_mean(abs(ops.asfloat(x) - ops.asfloat(reconstruction)) ** spec.p)


def kl_divergence(p: Any, q: Any, ops: Any = NUMPY) -> Any:
    """KL(p || q) per row of two distributions (natural log; 0 log 0 = 0)."""
    return ops.row_sum(p * (ops.log(p) - ops.log(q)))


def jensen_shannon(p: Any, q: Any, ops: Any = NUMPY) -> Any:
    """JSD(p, q) per row (natural log), in [0, ln 2]."""
    m = 0.5 * (p + q)
    return 0.5 * kl_divergence(p, m, ops) + 0.5 * kl_divergence(q, m, ops)


class SoftmaxDivergence(DetectorKind):
    """A divergence between softmax(z(x)/T) and softmax(z(ae(x))/T); subclasses name it (``measure``)."""

    needs_logits = True

    @staticmethod
    def measure(p: Any, q: Any, ops: Any) -> Any:
        raise NotImplementedError

    def score(self, spec, x, reconstruction, logits_x=None, logits_reconstruction=None, ops=NUMPY):
        p = ops.softmax(ops.asfloat(logits_x), spec.temperature)
        q = ops.softmax(ops.asfloat(logits_reconstruction), spec.temperature)
        return self.measure(p, q, ops)


class Divergence(SoftmaxDivergence):
    """The paper's probability divergence: Jensen-Shannon, natural log."""

    kind, spec, measure = "divergence", DivergenceSpec, staticmethod(jensen_shannon)


class KL(SoftmaxDivergence):
    """KL(softmax(z(x)/T) || softmax(z(ae(x))/T)): asymmetric, unbounded; Alibi Detect's choice."""

    kind, spec, measure = "kl", KLSpec, staticmethod(kl_divergence)


REGISTRY: dict[str, DetectorKind] = {}


def register(kind: DetectorKind) -> DetectorKind:
    """Add (or replace) a detector kind; its spec's ``kind`` literal must equal ``kind.kind``."""
    default = kind.spec.model_fields["kind"].default
    if default != kind.kind:
        raise ValueError(f"detector kind {kind.kind!r}: its spec's kind field defaults to {default!r}")
    REGISTRY[kind.kind] = kind
    return kind


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def kind_of(spec: DetectorSpec | str) -> DetectorKind:
    name = spec if isinstance(spec, str) else spec.kind
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown detector kind {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


def score(spec: DetectorSpec, x: Any, reconstruction: Any, logits_x: Any = None, logits_reconstruction: Any = None,
          ops: Any = NUMPY) -> Any:
    """``spec``'s scores (numpy float64 with the default ``ops``). Rows whose logits hold NaN (not sent
    upstream) score NaN, i.e. "not scored"."""
    kind = kind_of(spec)
    if kind.needs_logits and (logits_x is None or logits_reconstruction is None):
        raise ValueError(f"detector {spec.name} ({spec.kind}) needs the classifier's logits on x and ae(x)")
    s = kind.score(spec, x, reconstruction, logits_x, logits_reconstruction, ops)
    if kind.needs_logits and ops is NUMPY:
        unscored = np.isnan(logits_x).any(axis=1) | np.isnan(logits_reconstruction).any(axis=1)
        s = np.where(unscored, np.nan, s)
    return s


for _kind in (Reconstruction(), Divergence(), KL()):
    register(_kind)
