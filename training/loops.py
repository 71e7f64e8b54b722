"""Training loops: a classifier (SGD) and a denoising autoencoder (Adam).

Both are deliberately linear: one epoch = shuffle, minibatches, one validation pass, one log line.
The best-on-validation weights are kept (that is the early stopping both loops use).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.data import Split


@dataclass
class ClassifierConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.01  # the peak rate under the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    schedule: str = "constant"  # "onecycle": linear warm-up to lr over 25% of steps, then down to 0;
    # "step": lr, then lr/10 from 50% and lr/100 from 75% of the steps
    augment: bool = False  # random crops of the reflect-padded image (and horizontal flips if flip)
    augment_pad: int = 4
    flip: bool = True
    init: str = "default"  # "glorot": Keras' glorot-uniform weights and zero biases (Carlini's setup)
    bf16: bool | None = None  # bf16 autocast + channels_last; None: where the hardware has bf16 (native_bf16)
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = native_bf16(self.device)


@dataclass
class AutoencoderConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    noise: float = 0.1
    activity_l2: float = 1e-9
    patience: int = 10  # stop when validation loss has not improved for this many epochs
    max_seconds: float = 0.0  # stop after the epoch that passes this wall time (0: no limit)
    # learning rate on a plateau: multiply it by lr_decay after lr_patience epochs without validation
    # improvement, and stop (converged) once it would fall below min_lr; lr_decay 1 keeps it constant
    lr_decay: float = 1.0
    lr_patience: int = 10
    min_lr: float = 0.0
    device: str = "cpu"
    seed: int = 0
    # a file the state is saved to after every epoch and resumed from when it exists (a long run survives
    # the end of its process); removed when training ends
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 autocast pays on ``device``: on a CUDA GPU that supports it, and on a CPU with bf16
    instructions (AVX512-BF16 or AMX), where it ran about 1.5-2x faster than float32. Without them
    PyTorch emulates bf16: an FGSM step of the CIFAR-10 ResNet-9 on 64 images took 20.2 s against 0.67 s
    in float32 on a 2-core AVX2 machine (``python -m bench.bf16_cost``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def _batches(n: int, batch_size: int, gen: torch.Generator | None):
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def glorot_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Per-image random crops of the reflect-padded batch and (if ``flip``) random horizontal flips."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    di = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen).to(x.device)
    dj = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen).to(x.device)
    rows = (di + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dj + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if not flip:
        return out
    flips = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flips, out.flip(3), out)


def _lr_at(cfg: ClassifierConfig, step: int, total: int) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * (1.0 if step < total // 2 else 0.1 if step < 3 * total // 4 else 0.01)
    warm = max(1, int(0.25 * total))
    return cfg.lr * (step / warm if step < warm else max(0.0, (total - step) / (total - warm)))


def device_of(model: nn.Module) -> torch.device:
    """Where a model's tensors live (a graph interpreter may hold its weights as buffers, not parameters)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    model.eval()
    device = device_of(model)
    out = [model(torch.from_numpy(x[i : i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def accuracy(model: nn.Module, split: Split) -> float:
    return float((predict_logits(model, split.x).argmax(1) == split.y).mean())


def train_classifier(model: nn.Module, train: Split, val: Split, cfg: ClassifierConfig, log=print) -> History:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    if cfg.init == "glorot":
        glorot_init(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    fmt = torch.channels_last if cfg.bf16 else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    x_all, y_all = torch.from_numpy(train.x).to(device), torch.from_numpy(train.y).to(device)
    hist, best_acc, best_state, start = History(), -1.0, None, time.perf_counter()
    steps_per_epoch, step = math.ceil(len(train) / cfg.batch_size), 0
    for epoch in range(cfg.epochs):
        model.train()
        # sums stay on the device: a .item() per step would stall a GPU
        t0, loss_sum, correct = time.perf_counter(), torch.zeros((), device=device), torch.zeros((), device=device)
        for idx in _batches(len(train), cfg.batch_size, gen):
            idx = idx.to(device)
            xb, yb = x_all[idx], y_all[idx]
            if cfg.augment:
                xb = augment(xb, gen, cfg.augment_pad, cfg.flip)
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step, cfg.epochs * steps_per_epoch)
            step += 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(xb.contiguous(memory_format=fmt))
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == yb).sum()
        val_acc = accuracy(model, val)
        row = {"epoch": epoch + 1, "loss": loss_sum.item() / len(train), "train_acc": correct.item() / len(train),
               "val_acc": val_acc, "seconds": time.perf_counter() - t0}
        hist.epochs.append(row)
        log(f"classifier epoch {row['epoch']:3d}/{cfg.epochs}  loss {row['loss']:.4f}  "
            f"train acc {row['train_acc']:.4f}  val acc {val_acc:.4f}  {row['seconds']:.1f}s")
        if val_acc > best_acc:
            best_acc, best_state, hist.best_epoch = val_acc, copy.deepcopy(model.state_dict()), epoch + 1
    model.load_state_dict(best_state)
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    hist.seconds = time.perf_counter() - start
    return hist


@torch.no_grad()
def reconstruction_mse(model: nn.Module, x: np.ndarray, batch_size: int = 1000) -> float:
    """Mean squared error between clean inputs and their reconstructions."""
    model.eval()
    total, device = 0.0, device_of(model)
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[i : i + batch_size]).to(device)
        total += F.mse_loss(model(xb), xb, reduction="sum").item()
    return total / x.size


def _noisy(x: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    return (x + noise * torch.randn(x.shape, generator=gen, device=gen.device)).clamp_(0.0, 1.0)


def _objective(models: list[nn.Module], noisy: torch.Tensor, clean: torch.Tensor, alpha: float,
               activity_l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool loss Σᵢ MSE(x, aeᵢ(x̃)) − α Σᵢ MSE(aeᵢ(x̃), mean_j aeⱼ(x̃)) + activity L2.

    Returns (loss, summed reconstruction MSE, summed diversity); with one model it is plain denoising.
    """
    outs, activity = [], clean.new_zeros(())
    for m in models:
        out, act = m.forward_with_activity(noisy)
        outs.append(out)
        activity = activity + act
    recon = sum(F.mse_loss(o, clean) for o in outs)
    diversity = clean.new_zeros(())
    if len(models) > 1:
        mean = torch.stack(outs).mean(0)
        diversity = sum(F.mse_loss(o, mean) for o in outs)
    loss = recon - alpha * diversity + activity_l2 * activity / len(clean)
    return loss, recon, diversity


def duration(seconds: float) -> str:
    """A time span for progress lines and plans: seconds, minutes or hours."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def train_autoencoders(models: list[nn.Module], train: Split, val: Split, cfg: AutoencoderConfig,
                       alpha: float = 0.0, log=print, name: str = "autoencoder") -> History:
    """Denoising training: x̃ = clip(x + noise·N(0, 1), 0, 1), loss = MSE(ae(x̃), x) + activity L2.
    Several models with ``alpha > 0`` train jointly as a diverse pool (MagNet section 4.3); the best
    epoch on the validation objective is kept."""
    # Sigmoid layers produce denormals that make CPU convolutions ~4x slower; flushing them is free.
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(cfg.seed)
    val_gen = torch.Generator().manual_seed(cfg.seed + 1)
    x_val = torch.from_numpy(val.x).to(device)
    x_val_noisy = _noisy(torch.from_numpy(val.x), cfg.noise, val_gen).to(device)
    models = [m.to(device) for m in models]
    opt = torch.optim.Adam([p for m in models for p in m.parameters()], lr=cfg.lr)
    x_all = torch.from_numpy(train.x).to(device)
    n, hist, best, best_state, since_best, since_lr = len(models), History(), math.inf, None, 0, 0
    start, first, elapsed = time.perf_counter(), 0, 0.0
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
    if ckpt is not None and ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        changed = settings_changed(saved.get("config") or {}, asdict(cfg), free=RESUME_FREE | {"epochs"})
        if changed or len(saved["models"]) != len(models):
            said = "; ".join(changed) or f"{len(saved['models'])} models -> {len(models)}"
            raise SystemExit(f"{ckpt} was saved by a run of other settings ({said}): give --fresh to retrain, "
                             "or the same settings to resume (more epochs may be asked)")
        for m, state in zip(models, saved["models"]):
            m.load_state_dict(state)
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["gen"])
        noise_gen.set_state(saved["noise_gen"])
        torch.set_rng_state(saved["torch"])
        first, best, best_state, since_best = saved["epoch"], saved["best"], saved["best_state"], saved["since_best"]
        hist.epochs, hist.best_epoch, elapsed = saved["epochs"], saved["best_epoch"], saved["seconds"]
        since_lr = saved.get("since_lr", 0)  # checkpoints from before the schedule: its count starts here
        log(f"{name}: resuming after epoch {first} from {ckpt} (learning rate {opt.param_groups[0]['lr']:.3g})")
    for epoch in range(first, cfg.epochs):
        for m in models:
            m.train()
        t0, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        for idx in _batches(len(train), cfg.batch_size, gen):
            xb = x_all[idx.to(device)]
            loss, recon, _ = _objective(models, _noisy(xb, cfg.noise, noise_gen), xb, alpha, cfg.activity_l2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += recon.detach() * len(idx) / n
        for m in models:
            m.eval()
        with torch.no_grad():
            _, recon, diversity = _objective(models, x_val_noisy, x_val, alpha, 0.0)
        val_loss = (recon.item() - alpha * diversity.item()) / n
        row = {"epoch": epoch + 1, "train_mse": loss_sum.item() / len(train), "val_denoise_mse": recon.item() / n,
               "val_diversity": diversity.item() / n, "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0}
        hist.epochs.append(row)
        log(f"{name} epoch {row['epoch']:3d}/{cfg.epochs}  train mse {row['train_mse']:.5f}  "
            f"val mse {row['val_denoise_mse']:.5f}" + (f"  diversity {row['val_diversity']:.5f}" if n > 1 else "")
            + f"  {row['seconds']:.1f}s  (at most ~{duration(row['seconds'] * (cfg.epochs - epoch - 1))} left)")
        if val_loss < best - 1e-7:
            best, hist.best_epoch, since_best, since_lr = val_loss, epoch + 1, 0, 0
            best_state = [copy.deepcopy(m.state_dict()) for m in models]
        else:
            since_best, since_lr = since_best + 1, since_lr + 1
            if since_best >= cfg.patience:
                log(f"{name}: no validation improvement for {cfg.patience} epochs, stopping")
                break
            if cfg.lr_decay < 1.0 and since_lr >= cfg.lr_patience:
                lr, since_lr = opt.param_groups[0]["lr"] * cfg.lr_decay, 0
                if lr < cfg.min_lr:
                    log(f"{name}: no validation improvement for {cfg.lr_patience} epochs at the smallest learning "
                        f"rate ({opt.param_groups[0]['lr']:.3g}; the next, {lr:.3g}, is below {cfg.min_lr:.3g}): "
                        f"converged, stopping")
                    break
                for g in opt.param_groups:
                    g["lr"] = lr
                log(f"{name}: no validation improvement for {cfg.lr_patience} epochs, learning rate now {lr:.3g}")
        if ckpt is not None:
            _save_checkpoint(ckpt, {"models": [m.state_dict() for m in models], "optimizer": opt.state_dict(),
                                    "gen": gen.get_state(), "noise_gen": noise_gen.get_state(),
                                    "torch": torch.get_rng_state(), "epoch": epoch + 1, "best": best,
                                    "best_state": best_state, "since_best": since_best, "since_lr": since_lr,
                                    "epochs": hist.epochs, "config": asdict(cfg),
                                    "best_epoch": hist.best_epoch, "seconds": elapsed + time.perf_counter() - start})
        if cfg.max_seconds and time.perf_counter() - start > cfg.max_seconds:
            log(f"{name}: time budget of {cfg.max_seconds:.0f} s spent, stopping")
            break
    for m, state in zip(models, best_state):
        m.load_state_dict(state)
        m.to("cpu").eval()
    hist.seconds = elapsed + time.perf_counter() - start
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return hist


# settings a run may change when it resumes or reuses another's weights: where and how long it runs, not what
# it learns (the checkpoint path is where it is kept)
RESUME_FREE = {"device", "bf16", "max_seconds", "checkpoint"}


def settings_changed(old: dict, new: dict, prefix: str = "", free: set = RESUME_FREE) -> list[str]:
    """``field old -> new`` for each setting both ``old`` and ``new`` have (a setting added since cannot be
    compared) that differs, ``free`` ones left out."""
    return [f"{prefix}{f} {old[f]!r} -> {new[f]!r}" for f in sorted(set(old) & set(new))
            if f not in free and old[f] != new[f]]


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a run killed while saving keeps the previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_autoencoder(model: nn.Module, train: Split, val: Split, cfg: AutoencoderConfig, log=print,
                      name: str = "autoencoder") -> History:
    return train_autoencoders([model], train, val, cfg, log=log, name=name)
