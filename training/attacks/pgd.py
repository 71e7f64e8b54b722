"""FGSM and PGD under L-infinity, batched in torch, with a per-example epsilon.

The reformer's training crafts these against the frozen classifier as it goes, and the validation
selection set is crafted with them; the reported test rows use ART's implementations instead (an
independent code path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _per_example(eps: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    return eps.reshape(-1, *([1] * (x.dim() - 1))) if eps.dim() else eps


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | float,
         bf16: bool = False) -> torch.Tensor:
    """x + eps * sign(grad of the loss), clipped to [0, 1]; ``eps`` a scalar or one per example."""
    eps = _per_example(eps, x)
    return (x + eps * _input_gradient(model, x, y, bf16).sign()).clamp(0.0, 1.0).detach()


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | float, steps: int = 10,
             step_size: torch.Tensor | float | None = None, random_start: bool = True,
             generator: torch.Generator | None = None, bf16: bool = False) -> torch.Tensor:
    """Madry et al.'s PGD: ``steps`` signed-gradient steps of ``step_size`` (default eps / 4), each
    projected back into the eps-ball around x and into [0, 1]; from a uniform random point of the ball
    when ``random_start``."""
    eps = _per_example(eps, x)
    step = eps / 4 if step_size is None else _per_example(step_size, x)
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=generator.device if generator else x.device)
        x_adv = (x + eps * (2 * noise.to(x.device) - 1)).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv = x_adv + step * _input_gradient(model, x_adv, y, bf16).sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
    return x_adv
