"""The MagNet defense: detectors decide, the reformer rewrites what they accept.

``Defense.screen`` runs the autoencoders and the reconstruction detectors; ``Defense.decide`` adds the
divergence detectors, which need the classifier's logits on x and on ae(x). The gateway calls the two
halves around its upstream call; ``Defense.inspect`` chains them for offline use (evaluation).
``screen`` is itself ``Defense.reform`` (the reformer alone) then ``Defense.complete`` (the other
autoencoders and the scores), so that a gateway can send the reformed rows upstream before the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from service.defense import detectors as D
from service.defense.contract import ClassifierInput, prepare
from service.defense.domain import jpeg_round_trip
from service.defense.scores import as_scores, logits_from_probabilities
from service.defense.bundle import BundleError, Manifest, MemberSpec, read_manifest, verify_files
from service.defense.fused import TOLERANCE, FusedMember, FusionError, fuse_member
from service.defense.runtime import CUDA, Device, OnnxModel, Optimization, choose_providers, make_session
from service.defense.thresholds import passes

Classify = Callable[[np.ndarray], np.ndarray]
log = logging.getLogger("magnet.defense")


@dataclass(frozen=True)
class Screening:
    """Result of the first half: reconstructions and reconstruction-detector scores.

    Attributes
    ----------
    x : ndarray (N, C, H, W) float32, the inputs
    reformed : ndarray (N, C, H, W) float32, reformer output clipped to [0, 1]
    scores : dict detector name -> ndarray (N,) for the reconstruction detectors
    member : int, the pool member that screened the batch
    logits : ndarray or None, the embedded classifier's raw output when a fused graph computed it: on
        ``concat(x, reformed)`` (2N rows) for a member with divergence detectors, else on ``reformed``
    original : ndarray or None, the inputs as they came when the bundle's input domain changed them (a
        JPEG round trip, ``input.jpeg_quality``): ``x`` is then what the defense judged
    """

    x: np.ndarray
    reformed: np.ndarray
    scores: dict[str, np.ndarray]
    member: int
    logits: np.ndarray | None = None  # a fused graph's classifier output (see ``service.defense.fused``)
    original: np.ndarray | None = None
    #: False after ``Defense.reform`` alone: the detectors that need no logits are not scored yet
    complete: bool = True
    #: raw autoencoder outputs kept between ``reform`` and ``complete`` (the reformer is usually a detector too)
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Verdict:
    """Final decision per input.

    Attributes
    ----------
    accepted : ndarray (N,) bool, True iff no detector fired
    reformed : ndarray (N, C, H, W) float32, what the classifier sees for accepted inputs
    scores : dict detector name -> ndarray (N,) float64
    fired : dict detector name -> ndarray (N,) bool
    member : int
    logits_x, logits_reformed : ndarray (N, K) or None
        The classifier's logits on x and on the reformed inputs, when a divergence detector needed them.
    """

    accepted: np.ndarray
    reformed: np.ndarray
    scores: dict[str, np.ndarray]
    fired: dict[str, np.ndarray]
    member: int
    logits_x: np.ndarray | None = None
    logits_reformed: np.ndarray | None = None

    @property
    def rejected(self) -> np.ndarray:
        return ~self.accepted

    def fired_by(self, i: int) -> list[str]:
        return [name for name, mask in self.fired.items() if mask[i]]


class Classifier:
    """An ONNX classifier that takes the bundle's images: its input contract is applied on each call.
    Calling it returns what the model outputs (logits or probabilities, ``output``); ``logits`` returns
    logits either way (log p for probabilities: equal up to a per-row constant, which softmax ignores)."""

    def __init__(self, model: OnnxModel, contract: ClassifierInput, output: str = "logits") -> None:
        self.model, self.contract, self.output = model, contract, output
        if model.input_dtype == np.uint8 and not contract.gives_8bit_pixels:
            raise ValueError(f"{model.path.name} takes uint8 pixels: its input contract needs scale 255 and no "
                             f"mean/std (it has scale {contract.scale:g}, mean {contract.mean}, std {contract.std})")

    @property
    def path(self) -> Path:
        return self.model.path

    @property
    def providers(self) -> list[str]:
        return self.model.providers

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return as_scores(self.model(prepare(x, self.contract)))

    def logits(self, x: np.ndarray) -> np.ndarray:
        out = self(x)
        return logits_from_probabilities(out) if self.output == "probabilities" else out


class Defense:
    """A loaded, verified bundle with onnxruntime sessions for every autoencoder and the classifier."""

    def __init__(self, bundle_dir: Path, device: Device = "auto", threads: int = 0, spinning: bool = True,
                 fused: bool | None = False, embed_classifier: bool = False,
                 optimization: Optimization = "auto") -> None:
        """``fused``: one graph per member (``service.defense.fused``): True requires it (FusionError
        otherwise), None uses it on CUDA when it can be built, False never; ``embed_classifier``: the
        fused graphs include the bundle's classifier (the gateway's embedded upstream);
        ``optimization``: onnxruntime's graph optimization level per model (``runtime.make_session``)."""
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.bundle_dir)
        self.files: dict[str, Path] = verify_files(self.bundle_dir, self.manifest)  # manifest path -> file
        providers = choose_providers(device)
        self._optimization = optimization
        self.autoencoders = {f: OnnxModel(self.files[f], providers, threads, spinning=spinning,
                                          optimization=optimization)
                             for f in self.manifest.autoencoder_files()}
        self._spinning = spinning
        self._classifier_providers = providers
        self._threads = threads
        self._classifier: Classifier | None = None
        self.fused: dict[int, FusedMember] = {}
        self._plan_of: Manifest | None = None
        self._plans: list[tuple[list, list]] = []
        if fused or (fused is None and providers[0] == CUDA):
            self._fuse(embed_classifier, required=bool(fused))

    def _fuse(self, embed_classifier: bool, required: bool) -> None:
        """Build and check each member's fused graph; without ``required`` a member that cannot be fused
        keeps its separate sessions (logged)."""
        spec = self.manifest.classifier
        for k, member in enumerate(self.members):
            files = list(dict.fromkeys([d.autoencoder for d in member.detectors] + [member.reformer]))
            try:
                model = fuse_member([self.files[f] for f in files], self.files[member.reformer],
                                    self.classifier_file if embed_classifier else None, spec.input,
                                    spec.output_name, both_rows=self.needs_logits(k))
                fm = FusedMember(make_session(model, self._classifier_providers, self._threads, self._spinning,
                                              self._optimization), files)
                self._check_fused(k, fm)
            except FusionError as e:
                if required:
                    raise
                log.warning("member %s: separate sessions (%s)", member.name, e)
                continue
            self.fused[k] = fm

    def _check_fused(self, member: int, fm: FusedMember) -> None:
        x = np.random.default_rng(member).uniform(size=(4, *self.input_shape)).astype(np.float32)
        out = fm(x)
        expected = {name: self.autoencoders[f](x) for f, name in fm.outputs.items()}
        expected["reformed"] = np.clip(expected[fm.outputs[self.members[member].reformer]], 0, 1)
        if fm.has_logits:
            rows = np.concatenate([x, expected["reformed"]]) if self.needs_logits(member) else expected["reformed"]
            expected["logits"] = self.classifier(rows)
        for name, want in expected.items():
            diff = float(np.abs(out[name] - want).max())
            if not diff <= TOLERANCE:
                raise FusionError(f"the fused graph's {name} differs from the separate sessions' by {diff:.2e}")

    @property
    def providers(self) -> list[str]:
        return next(iter(self.autoencoders.values())).providers

    @property
    def members(self) -> list[MemberSpec]:
        return self.manifest.members

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.manifest.input.shape

    @property
    def classifier(self) -> "Classifier":
        """The bundle's own classifier, taking the bundle's images (its input contract applied), built on
        first use: a gateway with an upstream never needs it."""
        if self._classifier is None:
            spec = self.manifest.classifier
            try:
                model = OnnxModel(self.classifier_file, self._classifier_providers, self._threads,
                                  input_name=spec.input.name, output_name=spec.output_name, spinning=self._spinning,
                                  optimization=self._optimization)
                self._classifier = Classifier(model, spec.input, spec.output)
            except ValueError as e:  # the manifest's input or output name, or contract, does not fit the graph
                raise BundleError(f"{self.manifest.name}'s classifier: {e}") from e
        return self._classifier

    @property
    def classifier_file(self) -> Path:
        """The verified classifier file (it may live outside the bundle directory, shared)."""
        return self.files[self.manifest.classifier.file]

    def needs_logits(self, member: int = 0) -> bool:
        """Whether ``decide`` needs the classifier's logits on x and ae(x) for this member."""
        return bool(self._plan()[member][1])

    def _plan(self) -> list[tuple[list, list]]:
        """Per member: (detectors scored on the screening, detectors that need logits), worked out once per
        manifest (the per-request path looks them up rather than asking the registry each time)."""
        if self._plan_of is not self.manifest:
            self._plans = [([d for d in m.detectors if not D.kind_of(d).needs_logits],
                            [d for d in m.detectors if D.kind_of(d).needs_logits]) for m in self.members]
            self._plan_of = self.manifest
        return self._plans

    def screen(self, x: np.ndarray, member: int = 0) -> Screening:
        """Run the member's autoencoders on ``x`` (N x C x H x W float32 in [0, 1]), after the bundle's
        input domain step when it has one (a JPEG round trip: ``Screening.x`` is then the round-tripped
        batch and ``Screening.original`` the batch as it came)."""
        return self.complete(self.reform(x, member))

    def reform(self, x: np.ndarray, member: int = 0) -> Screening:
        """The first part of ``screen``: the input domain step and the reformer only. The screening it
        returns has ``complete`` False (no scores yet) unless a fused graph computed everything at once;
        ``complete`` finishes it."""
        spec = self.members[member]
        original = None
        if self.manifest.input.jpeg_quality is not None:
            original, x = x, jpeg_round_trip(x, self.manifest.input.jpeg_quality)
        fm = self.fused.get(member)
        if fm is not None:
            out = fm(x)
            scores = {d.name: D.score(d, x, out[fm.outputs[d.autoencoder]]) for d in self._plan()[member][0]}
            return Screening(x=x, reformed=out["reformed"], scores=scores, member=member, logits=out.get("logits"),
                             original=original)
        raw = self.autoencoders[spec.reformer](x)
        reformed = np.clip(raw, 0.0, 1.0).astype(np.float32, copy=False)
        return Screening(x=x, reformed=reformed, scores={}, member=member, original=original, complete=False,
                         outputs={spec.reformer: raw})

    def complete(self, screening: Screening) -> Screening:
        """The rest of ``screen`` after ``reform``: the member's other autoencoders and the scores of the
        detectors that need no logits (a complete screening is returned as it is)."""
        if screening.complete:
            return screening
        outputs = dict(screening.outputs)

        def ae(path: str) -> np.ndarray:
            if path not in outputs:  # each autoencoder runs once, whichever detectors use it
                outputs[path] = self.autoencoders[path](screening.x)
            return outputs[path]

        scores = {d.name: D.score(d, screening.x, ae(d.autoencoder)) for d in self._plan()[screening.member][0]}
        return replace(screening, scores=scores, complete=True, outputs={})

    @staticmethod
    def _complete_only(screening: Screening) -> None:
        if not screening.complete:
            raise ValueError("the screening holds the reformer's output only: call Defense.complete first")

    def screened_out(self, screening: Screening) -> np.ndarray:
        """Rows already rejected by a detector that needs no logits (no need to send them upstream)."""
        self._complete_only(screening)
        spec = self.members[screening.member]
        mask = np.zeros(len(screening.x), dtype=bool)
        for d in spec.detectors:
            if d.name in screening.scores:
                mask |= ~passes(screening.scores[d.name], d.threshold)
        return mask

    def decide(self, screening: Screening, logits_x: np.ndarray | None = None,
               logits_reformed: np.ndarray | None = None) -> Verdict:
        """Apply every detector of the member. Detectors that need logits (divergences) need both logit
        arrays (N x K), on x and on the reformed x; rows where they are NaN (not sent upstream) count as
        not fired by those detectors."""
        self._complete_only(screening)
        spec = self.members[screening.member]
        scores = dict(screening.scores)
        fired = {}
        for d in spec.detectors:
            if d.name not in scores:
                if logits_x is None or logits_reformed is None:
                    raise ValueError(f"detector {d.name} needs logits on x and ae(x); call decide with both")
                scores[d.name] = D.score(d, screening.x, screening.reformed, logits_x, logits_reformed)
            s = scores[d.name]
            fired[d.name] = ~passes(s, d.threshold) & ~np.isnan(s)
        accepted = ~np.logical_or.reduce(list(fired.values())) if fired else np.ones(len(screening.x), bool)
        return Verdict(accepted=accepted, reformed=screening.reformed, scores=scores, fired=fired,
                       member=screening.member, logits_x=logits_x, logits_reformed=logits_reformed)

    def inspect(self, x: np.ndarray, member: int = 0, classify: Classify | None = None) -> Verdict:
        """Screen and decide in one call; ``classify`` (default: the bundle's classifier) maps
        N x C x H x W to N x K logits and is only called when a divergence detector needs it."""
        screening = self.screen(x, member)
        if not self.needs_logits(member):
            return self.decide(screening)
        classify = classify or self.classifier.logits
        logits = classify(np.concatenate([screening.x, screening.reformed]))
        return self.decide(screening, logits[: len(x)], logits[len(x):])
