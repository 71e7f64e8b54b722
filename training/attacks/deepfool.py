"""Batched DeepFool (Moosavi-Dezfooli et al., CVPR 2016), L2 version, in PyTorch.

Each step linearises the classifier around the current point and moves to the nearest linearised
decision boundary among all other classes; the total perturbation is scaled by (1 + overshoot) so the
example crosses it. ART's DeepFool loops in NumPy and took about 2 s per MNIST image here; this one
runs a whole batch with one backward pass per class.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def deepfool(model: nn.Module, x: np.ndarray, y: np.ndarray, *, max_iter: int = 50, overshoot: float = 0.02,
             batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Untargeted DeepFool.

    Parameters
    ----------
    model : maps N x C x H x W float32 in [0, 1] to N x K logits
    x : ndarray (N, C, H, W) float32 in [0, 1]
    y : ndarray (N,) labels to move away from
    max_iter : linearisation steps per example
    overshoot : the total perturbation is multiplied by 1 + overshoot

    Returns
    -------
    ndarray (N, C, H, W) float32 in [0, 1]; examples already misclassified come back unchanged.
    """
    model = model.eval().to(device)
    out = [_batch(model, torch.from_numpy(x[i : i + batch_size]).to(device),
                  torch.from_numpy(np.asarray(y[i : i + batch_size])).to(device), max_iter, overshoot)
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32)


def _batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_iter: int, overshoot: float) -> np.ndarray:
    r_total = torch.zeros_like(x)
    x_adv = x.clone()
    idx = torch.arange(len(x), device=x.device)  # rows still classified as y: only these are computed
    for _ in range(max_iter):
        x_var = x_adv[idx].clone().requires_grad_(True)
        logits = model(x_var)
        active = logits.argmax(1) == y[idx]
        if not active.any():
            break
        idx = idx[active]
        logits = logits[active]
        yi = y[idx]
        rows = torch.arange(len(idx), device=x.device)
        k = logits.shape[1]
        grads = torch.stack([torch.autograd.grad(logits[:, j].sum(), x_var, retain_graph=j < k - 1)[0][active]
                             for j in range(k)], 1).flatten(2)  # n x K x D
        w = grads - grads[rows, yi][:, None]
        f = (logits - logits[rows, yi][:, None]).detach()
        norms = w.norm(dim=2).clamp_min(1e-12)
        dist = f.abs() / norms
        dist[rows, yi] = float("inf")
        nearest = dist.argmin(1)
        step = ((f[rows, nearest].abs() + 1e-4) / norms[rows, nearest] ** 2)[:, None] * w[rows, nearest]
        r_total[idx] += step.view(len(idx), *x.shape[1:])
        x_adv[idx] = (x[idx] + (1 + overshoot) * r_total[idx]).clamp(0.0, 1.0).detach()
    return x_adv.cpu().numpy()
