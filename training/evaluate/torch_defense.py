"""Pool members' defenses, differentiable: torch twins of the bundle's ONNX graphs.

Attacks that know the defense (graybox columns, the adaptive attack) optimise through these; their
results are still judged by ``Defense.inspect`` on the ONNX graphs, so a mismatch between twin and
bundle could only make an attack weaker, never flatter the defense (tests check that the twins'
scores equal the core's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from service.defense import detectors as D
from service.defense.bundle import MemberSpec
from service.defense.core import Defense
from training.from_onnx import torch_twin
from training.reformer import jpeg_inputs


@dataclass
class Evaluation:
    """What a set of members makes of a batch: per member the reformed logits and detector scores."""

    x: torch.Tensor
    logits: torch.Tensor  # M x N x K, classifier(reformer_m(x))
    scores: list[dict[str, torch.Tensor]]  # per member: detector name -> (N,)
    logits_x: torch.Tensor | None = None  # N x K, classifier(x), when a divergence detector needed it


class Members(nn.Module):
    """Some members of a bundle, evaluated together: each autoencoder runs once per batch (members
    share detector II on MNIST) and the classifier once on every member's reformed batch at once.

    ``forward(x)`` is the mean over members of ``classifier(reformer_m(x))`` (for one member, its
    reformed classifier); the last evaluation is kept so the attack's penalty and success test on the
    same iterate need no second pass.
    """

    def __init__(self, specs: list[MemberSpec], classifier: nn.Module, autoencoders: dict[str, nn.Module],
                 detectors: bool = True, jpeg_quality: int | None = None) -> None:
        super().__init__()
        self.specs, self.detectors, self.jpeg_quality = specs, detectors, jpeg_quality
        self.classifier = classifier
        self.paths = sorted({p for s in specs for p in (s.reformer, *(d.autoencoder for d in s.detectors if detectors))})
        self.autoencoders = nn.ModuleList([autoencoders[p] for p in self.paths])
        self.last: Evaluation | None = None

    def evaluate(self, x: torch.Tensor) -> Evaluation:
        if self.last is not None and self.last.x is x:
            return self.last
        came, x = x, jpeg_straight_through(x, self.jpeg_quality)
        outs = {p: ae(x) for p, ae in zip(self.paths, self.autoencoders)}
        reformed = [outs[s.reformer].clamp(0.0, 1.0) for s in self.specs]
        # the core sends x and the reformed x upstream; a detector that needs logits uses those two
        divergence = self.detectors and any(D.kind_of(d).needs_logits for s in self.specs for d in s.detectors)
        batch = reformed + ([x] if divergence else [])
        z = self.classifier(torch.cat(batch)).view(len(batch), len(x), -1)
        m = len(self.specs)
        scores = []
        for k, spec in enumerate(self.specs if self.detectors else []):
            member = {}
            for d in spec.detectors:
                if D.kind_of(d).needs_logits:
                    member[d.name] = D.score(d, x, reformed[k], z[-1], z[k], ops=TORCH)
                else:
                    member[d.name] = D.score(d, x, outs[d.autoencoder], ops=TORCH)
            scores.append(member)
        self.last = Evaluation(came, z[:m], scores, z[-1] if divergence else None)
        return self.last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.evaluate(x).logits.mean(0)

    def excess(self, x: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
        """Mean over members of the sum over detectors of ``relu(score / threshold - (1 - margin))``:
        0 once every score is ``margin`` below its threshold, growing with how far over it is."""
        ev = self.evaluate(x)
        return torch.stack([sum(torch.relu(scores[d.name] / d.threshold - (1 - margin)) for d in spec.detectors)
                            for spec, scores in zip(self.specs, ev.scores)]).mean(0)

    def beaten(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Rows every member accepts and classifies other than ``y`` after reforming."""
        ev = self.evaluate(x)
        ok = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for k, (spec, scores) in enumerate(zip(self.specs, ev.scores)):
            for d in spec.detectors:
                ok &= scores[d.name] < d.threshold
            ok &= ev.logits[k].argmax(1) != y
        return ok


def jpeg_straight_through(x: torch.Tensor, quality: int | None) -> torch.Tensor:
    """The bundle's JPEG round trip (``input.jpeg_quality``) in the forward pass, the identity in the
    backward pass (BPDA, Athalye et al. 2018): JPEG has no useful gradient, so attacks optimise through
    it as if it were not there, and the core judges what they find with the real round trip."""
    return x if quality is None else x + (jpeg_inputs(x, quality) - x).detach()


class TorchOps:
    """``service.defense.detectors``' array operations in torch (float32, differentiable), so the twin's
    detector scores are the core's formulas."""

    @staticmethod
    def asfloat(a: torch.Tensor) -> torch.Tensor:
        return a.float()

    @staticmethod
    def row_mean(a: torch.Tensor) -> torch.Tensor:
        return a.flatten(1).mean(1)

    @staticmethod
    def row_sum(a: torch.Tensor) -> torch.Tensor:
        return a.flatten(1).sum(1)

    @staticmethod
    def softmax(z: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.softmax(z / temperature, 1)

    @staticmethod
    def log(a: torch.Tensor) -> torch.Tensor:
        return torch.log(a.clamp_min(D.TINY))


TORCH = TorchOps()


class Twins:
    """Torch twins of a bundle's classifier and autoencoders (built once, no gradients on weights)."""

    def __init__(self, defense: Defense, classifier: nn.Module | None = None) -> None:
        m = defense.manifest
        self.specs, self.jpeg_quality = list(m.members), m.input.jpeg_quality
        self.classifier = classifier or torch_twin(defense.classifier_file, m.dataset, "classifier", m.input.shape,
                                                   contract=m.classifier.input, output_name=m.classifier.output_name,
                                                   output=m.classifier.output)
        self.autoencoders = {p: torch_twin(defense.files[p], m.dataset, "autoencoder", m.input.shape)
                             for p in m.autoencoder_files()}
        for net in [self.classifier, *self.autoencoders.values()]:
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)

    def __len__(self) -> int:
        return len(self.specs)

    def members(self, which: list[int], detectors: bool = True) -> Members:
        """Members ``which``; ``detectors=False``: only their reformed classifiers (cheaper)."""
        return Members([self.specs[i] for i in which], self.classifier, self.autoencoders, detectors,
                       self.jpeg_quality).eval()
