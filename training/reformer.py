"""Training a reformer through a frozen classifier (the CIFAR-10 defense's reformer).

MagNet's pixel-loss autoencoders stay close to the identity on CIFAR-10, so the perturbation passes
through them. Here the reformer D is trained with the classifier f in the loss:

    loss = KL(softmax(f(x)/T) || softmax(f(D(x_in))/T)) + pixel_weight * |D(x_in) - x|_1

over a batch holding the clean images (x_in = x) and as many perturbed copies, drawn per image from
``mix``: ``noise`` (Gaussian, std ~ U(0, noise_max)) trains without attacks (the "stability" loss of
denoised smoothing); ``fgsm`` and ``pgd`` are crafted against f on the *training* images as training
goes (eps ~ U(0, eps_max) per image), which makes a reformer that has seen attacks; ``preimage`` is not an
attack: an image that JPEG would have compressed to the training image (``training.domain_sim``), so that
a reformer trained on JPEG data keeps the classifier's output on uncompressed inputs; ``fgsm_pre`` and
``pgd_pre`` craft the attack from such a pre-image instead of the JPEG image (an attacker who starts from
the uncompressed original), the target staying the JPEG image's output. ``original``, ``fgsm_orig`` and
``pgd_orig`` do the same with *real* uncompressed originals where some training images have one
(``originals``: e.g. the official batches, ``scripts/cifar10_originals.py``): those copies are drawn
from the training images that have an original, the original (or the attack crafted from it) is the
input, and the target and the L1 stay the JPEG image's.

``pgd_member`` is an attack crafted through a pool member's reformer and the classifier (PGD, as
``pgd``), a member drawn at random each step: what an attacker who holds one member's weights sends to
the others (the graybox case). ``member_attack`` = "others" keeps those copies out of the loss of the
member they were crafted through, so each member learns to defend the others' attacks and not its own:
the diversity that matters for a pool is in what fools each member, which pixel distance between the
members' outputs does not measure (``docs/results/pools.md``).

``augment_pad`` / ``augment_flip`` move every training image (a random crop of it reflect-padded, a
left-right flip) before anything else, its original with it, the target becoming f on the moved JPEG
image: more distinct inputs from the few thousand real originals at hand.

``quiet_weight`` > 0 adds a term for the divergence detector that judges the reformer: on the rows that
are not attacks (the clean images, and the ``preimage``, ``noise`` and ``clean`` copies),
T_q^2 * KL(softmax(f(x)/T_q) || softmax(f(D(x_in))/T_q)) at ``quiet_temperature`` T_q (the detector's, 40).
At T = 1 a confident, unchanged label leaves the loss near zero however far the other logits move; at
the detector's temperature every logit counts, which is what the detector sees on clean inputs.
``quiet_rows`` = "preimage" keeps the term to the clean pre-image copies only, so that it does not also
quieten the clean JPEG images on which the detector's threshold is set.

Resumable: a checkpoint (weights, optimizer, step, random state) is written every few minutes and at
the end, and a run with the same work directory continues from it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.defense.domain import jpeg_round_trip
from training.attacks.pgd import fgsm, pgd_linf
from training.data import Split
from training.domain_sim import jpeg_preimage
from training.loops import augment, duration, native_bf16, predict_logits, settings_changed

PREIMAGE_ATTACKS = ("fgsm_pre", "pgd_pre")
ORIGINAL_KINDS = ("original", "fgsm_orig", "pgd_orig")  # start from a real uncompressed original
ATTACKS = ("fgsm", "pgd", *PREIMAGE_ATTACKS, "fgsm_orig", "pgd_orig", "pgd_member")  # the kinds that make a reformer one that has seen attacks
KINDS = ("clean", "noise", "preimage", *ATTACKS, "original")
QUIET_ROWS = ("calm", "preimage")  # the quiet term's rows: see the module's text
MEMBER_ATTACK = ("all", "others")  # which members learn from a ``pgd_member`` copy: see the module's text


@dataclass
class ReformerConfig:
    width: int = 32
    depth: int = 2
    steps: int = 1000  # optimizer steps in all (the cosine schedule spans them)
    batch_size: int = 128  # clean images per step; as many perturbed copies join them
    lr: float = 1e-3
    kl_weight: float = 1.0
    pixel_weight: float = 1.0
    temperature: float = 1.0
    quiet_weight: float = 0.0  # the detector term on the rows that are not attacks (see the module's text)
    quiet_temperature: float = 40.0
    quiet_rows: str = "calm"  # "calm": clean images and every copy that is not an attack; "preimage": those copies only
    mix: dict = field(default_factory=lambda: {"noise": 1.0})  # kind -> share of the perturbed copies
    noise_max: float = 0.05
    eps_max: float = 8 / 255
    pgd_steps: int = 3
    preimage_max: float = 0.5  # ``preimage``: spread ~ U(0, this) of training.domain_sim.jpeg_preimage
    preimage_quality: int = 75  # ``preimage``: the JPEG quality the training images were saved at
    max_minutes: float = 0.0  # stop (after a checkpoint) once this much wall time has passed in this run
    schedule_minutes: float = 0.0  # > 0: the cosine schedule also runs on training time and ends after this long
    checkpoint_minutes: float = 10.0
    val_every: int = 100
    bf16: bool | None = None  # the classifier under bf16 autocast; None: where it pays (loops.native_bf16)
    jpeg_quality: int | None = None  # the bundle's input step: every input (clean or perturbed) goes through it
    augment_pad: int = 0  # > 0: each training image (and its original) is a random crop of it reflect-padded by this
    augment_flip: bool = False  # each training image (and its original) flipped left-right with probability 1/2
    member_attack: str = "all"  # "all" members learn from the ``pgd_member`` copies, or the "others" only
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.member_attack not in MEMBER_ATTACK:
            raise ValueError(f"member_attack is one of {MEMBER_ATTACK}, not {self.member_attack!r}")
        if self.quiet_rows not in QUIET_ROWS:
            raise ValueError(f"quiet_rows is one of {QUIET_ROWS}, not {self.quiet_rows!r}")
        unknown = set(self.mix) - set(KINDS)
        if unknown or not self.mix or any(v < 0 for v in self.mix.values()):
            raise ValueError(f"mix wants shares >= 0 of {KINDS}, got {self.mix}")
        if self.augment_pad < 0:
            raise ValueError(f"augment_pad is >= 0, not {self.augment_pad}")
        if self.bf16 is None:
            self.bf16 = native_bf16(self.device)


def augment_pair(x: torch.Tensor, originals: torch.Tensor | None, gen: torch.Generator, pad: int,
                 flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same random crop (of the image reflect-padded by ``pad``) and left-right flip for each image
    and its uncompressed original, so that the original still lines up with the JPEG image whose
    output and pixels are its target."""
    if originals is None:
        return augment(x, gen, pad, flip), None
    both = augment(torch.cat([x, originals], 1), gen, pad, flip)
    return both[:, : x.shape[1]].contiguous(), both[:, x.shape[1] :].contiguous()


def parse_mix(text: str) -> dict:
    """``"fgsm=1,pgd=1"`` -> {"fgsm": 1.0, "pgd": 1.0}."""
    out = {}
    for item in text.split(","):
        kind, _, share = item.partition("=")
        out[kind.strip()] = float(share or 1)
    return out


def kinds_for(n: int, mix: dict, gen: torch.Generator) -> list[str]:
    """A kind per perturbed copy, in proportion to ``mix`` (the remainder drawn at random)."""
    total = sum(mix.values())
    counts = {k: int(n * v / total) for k, v in mix.items()}
    names = list(mix)
    while sum(counts.values()) < n:
        counts[names[int(torch.randint(len(names), (1,), generator=gen))]] += 1
    return [k for k in names for _ in range(counts[k])]


def perturb(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, kinds: list[str], cfg: ReformerConfig,
            gen: torch.Generator, originals: torch.Tensor | None = None,
            through: nn.Module | None = None) -> torch.Tensor:
    """The perturbed copies of ``x``, each of its kind; ``originals``: the uncompressed original of each row
    (read on the rows of ``ORIGINAL_KINDS`` only); ``through``: the model the ``pgd_member`` rows are
    crafted against (a member's reformer followed by the classifier)."""
    out = x.clone()
    u = torch.rand(len(x), generator=gen).to(x.device)
    kinds_arr = np.array(kinds)
    for kind in dict.fromkeys(kinds):  # in order of first appearance: the draws from gen do not hang on set order
        idx = torch.from_numpy(np.flatnonzero(kinds_arr == kind)).to(x.device)
        xs, ys = x[idx], y[idx]
        if kind == "noise":
            std = (u[idx] * cfg.noise_max).view(-1, 1, 1, 1)
            noise = torch.randn(xs.shape, generator=gen).to(x.device)
            out[idx] = (xs + std * noise).clamp(0.0, 1.0)
            continue
        if kind in ("preimage", *PREIMAGE_ATTACKS):  # start from an uncompressed image this JPEG could have come from
            rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
            spread = (u[idx] * cfg.preimage_max if kind == "preimage" else
                      torch.rand(len(idx), generator=gen).to(x.device) * cfg.preimage_max).cpu().numpy()
            xs = torch.from_numpy(jpeg_preimage(xs.cpu().numpy(), cfg.preimage_quality, spread, rng)).to(x.device)
        if kind in ORIGINAL_KINDS:
            if originals is None:
                raise ValueError(f"mix kind {kind!r} needs the training images' originals")
            xs = originals[idx]
        attack = kind.removesuffix("_pre").removesuffix("_orig")
        if attack in ("preimage", "original"):  # not an attack
            out[idx] = xs
        elif attack == "fgsm":
            out[idx] = fgsm(classifier, xs, ys, u[idx] * cfg.eps_max, bf16=cfg.bf16)
        elif attack in ("pgd", "pgd_member"):
            if attack == "pgd_member" and through is None:
                raise ValueError("mix kind 'pgd_member' needs the member to craft through")
            eps = u[idx] * cfg.eps_max
            out[idx] = pgd_linf(classifier if attack == "pgd" else through, xs, ys, eps, steps=cfg.pgd_steps,
                                step_size=eps / 2, generator=gen, bf16=cfg.bf16)
    return out


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` (one per row) over the rows ``keep`` marks."""
    return (values * keep).sum() / keep.sum().clamp_min(1)


def _kl_rows(target_logits: torch.Tensor, logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(softmax(target / t) || softmax(logits / t)), one value per row."""
    p_log = F.log_softmax(target_logits / t, 1)
    return F.kl_div(F.log_softmax(logits / t, 1), p_log, log_target=True, reduction="none").sum(1)


def _kl(target_logits: torch.Tensor, logits: torch.Tensor, t: float) -> torch.Tensor:
    """``_kl_rows`` averaged over the rows (the batch mean)."""
    return _kl_rows(target_logits, logits, t).mean()


def _quiet_mask(rows: str, n_clean: int, kinds: list[str]) -> np.ndarray:
    """Which rows of the batch (the clean images, then their copies of ``kinds``) the quiet term counts."""
    if rows == "calm":
        return np.array([True] * n_clean + [k not in ATTACKS for k in kinds])
    return np.array([False] * n_clean + [k in ("preimage", "original") for k in kinds])


def _warm(cfg: ReformerConfig) -> int:
    """The linear warm-up's steps."""
    return min(100, cfg.steps // 10)


def _progress(cfg: ReformerConfig, step: int, seconds: float = 0.0) -> float:
    """How far through its decay training is, 0..1 (0 during the warm-up): by steps, or by training time where
    that is further (``schedule_minutes``: a run sized to a fixed time, e.g. a lent GPU's, still ends its decay)."""
    warm = _warm(cfg)
    if step < warm:
        return 0.0
    frac = (step - warm) / max(1, cfg.steps - warm)
    if cfg.schedule_minutes > 0:
        frac = max(frac, seconds / (cfg.schedule_minutes * 60))
    return min(1.0, max(0.0, frac))


def _lr(cfg: ReformerConfig, step: int, seconds: float = 0.0) -> float:
    warm = _warm(cfg)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * _progress(cfg, step, seconds))))


@torch.no_grad()
def _val_row(model: nn.Module, classifier: nn.Module, val_x: torch.Tensor, val_y: torch.Tensor,
             val_adv: torch.Tensor, val_clean: torch.Tensor | None = None) -> dict:
    """``val_x`` and ``val_adv`` as the reformer gets them (after the input step); ``val_clean`` the
    clean images the L1 is measured against (default ``val_x``)."""
    model.eval()
    out = model(val_x)
    clean = classifier(out).argmax(1)
    adv = classifier(model(val_adv)).argmax(1)
    model.train()
    return {"val_reformed_acc": float((clean == val_y).float().mean()),
            "val_fgsm_reformed_acc": float((adv == val_y).float().mean()),
            "val_l1": float((out - (val_x if val_clean is None else val_clean)).abs().mean())}


def jpeg_inputs(x: torch.Tensor, quality: int | None) -> torch.Tensor:
    """``x`` after the bundle's JPEG input step (``service.defense.domain``), so the reformer trains on
    what the core will give it; no gradient flows through it (the inputs are data here)."""
    if quality is None:
        return x
    return torch.from_numpy(jpeg_round_trip(x.detach().cpu().numpy(), quality)).to(x.device)


def _states(models: nn.ModuleList) -> dict:
    if len(models) == 1:
        return {"model": models[0].state_dict()}
    return {"models": [m.state_dict() for m in models]}


def _load_states(models: nn.ModuleList, ckpt: dict, spread: float = 0.0, seed: int = 0) -> None:
    """Load a checkpoint's reformer(s) into ``models``. With ``spread`` > 0 a single reformer may seed a
    pool: every member starts from its weights plus Gaussian noise of ``spread`` times each tensor's std
    (a different draw per member), so that the diversity term has something to push apart; identical
    members would get identical gradients forever."""
    states = [ckpt["model"]] if "model" in ckpt else ckpt["models"]
    if len(states) == 1 and len(models) > 1 and spread > 0:
        gen = torch.Generator().manual_seed(seed)
        for m in models:
            m.load_state_dict(states[0])
            with torch.no_grad():
                for t in m.parameters():
                    if t.numel() > 1:
                        t.add_(torch.randn(t.shape, generator=gen) * (spread * float(t.float().std())))
        return
    if len(states) != len(models):
        raise ValueError(f"the checkpoint holds {len(states)} reformers, the run trains {len(models)}"
                         + (" (a single reformer seeds a pool with init_spread > 0)" if len(states) == 1 else ""))
    for m, state in zip(models, states):
        m.load_state_dict(state)


# ReformerConfig fields a resumed run may change: how long and where it runs, not what it learns
RESUME_FREE = {"max_minutes", "checkpoint_minutes", "val_every", "device", "bf16"}
# and those it may change with a note: more steps (or minutes) stretch the schedule from where it stands
RESUME_NOTED = {"steps", "schedule_minutes"}
PROBE_ROWS = 64  # training images whose cached classifier outputs are checked against the classifier


def _check_resume(path: Path, old: dict, new: dict, log=print) -> None:
    """Resume only a run of the same training settings: any other change is refused with what changed
    (``training.loops.settings_changed``: a setting the checkpoint's run did not record is not compared)."""
    refused = settings_changed(old, new, free=RESUME_FREE | RESUME_NOTED)
    if refused:
        raise SystemExit(f"{path} was trained with other settings ({'; '.join(refused)}): give --fresh to retrain, "
                         "or another --work-dir (or the same settings to resume)")
    for change in settings_changed({k: v for k, v in old.items() if k in RESUME_NOTED}, new, free=set()):
        log(f"reformer: resuming with {change} (the schedule stretches from where it stands)")


def _cached_logits(work: Path, classifier: nn.Module, train: Split, moving: bool, resuming: bool,
                   log=print) -> np.ndarray | None:
    """f on the clean training images, kept in ``work/train_logits.npy`` (None when the images move: then
    the targets are f on each moved image). The cache is checked on its first rows against ``classifier``:
    outputs of another classifier are computed anew, or, when a checkpoint trained through them would be
    resumed, refused."""
    path = work / "train_logits.npy"
    if path.exists():
        cached = np.load(path)
        probe = predict_logits(classifier, train.x[:PROBE_ROWS], batch_size=PROBE_ROWS)
        same = cached.shape == (len(train), probe.shape[1]) and np.allclose(
            cached[:PROBE_ROWS], probe, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(probe).max())))
        if not same:
            if resuming:
                raise SystemExit(f"{work} holds a reformer trained through another classifier (or other images): "
                                 "its cached outputs (train_logits.npy) differ from this classifier's; give --fresh "
                                 "to retrain, or another --work-dir")
            log(f"reformer: {path} holds another classifier's outputs; computing them anew")
            path.unlink()
        elif moving:
            return None
        else:
            return cached
    if moving:
        return None
    np.save(path, predict_logits(classifier, train.x, batch_size=500))
    return np.load(path)


def train_reformer(model: nn.Module | list[nn.Module], classifier: nn.Module, train: Split, val: Split,
                   cfg: ReformerConfig, work: Path, log=print, alpha: float = 0.0,
                   init_from: Path | None = None, init_spread: float = 0.0,
                   originals: tuple[np.ndarray, np.ndarray] | None = None, fresh: bool = False) -> dict:
    """Train ``model`` (in place) as the reformer for the frozen ``classifier``; returns the history.
    ``work`` keeps ``reformer.ckpt`` (resume) and ``train_logits.npy`` (f on the clean training images;
    not with augmentation, whose targets are f on each moved image); ``fresh`` drops both first (retrain).

    A list of models trains a diverse pool (MagNet section 4.3): each member's loss, averaged, minus
    ``alpha`` times the mean squared distance of each member's output from the members' mean.

    ``init_from`` (another run's ``reformer.ckpt``) warm-starts a fresh run: its weights only, with a new
    optimizer and schedule; ignored when ``work`` already holds this run's own checkpoint. A single
    reformer may seed every member of a pool when ``init_spread`` > 0 (see ``_load_states``).

    ``originals`` = (rows of ``train``, their uncompressed originals N x C x H x W float32): what the mix
    kinds ``original``, ``fgsm_orig`` and ``pgd_orig`` start from."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if fresh:  # retrain: this run's checkpoint and cached classifier outputs go
        for name in ("reformer.ckpt", "train_logits.npy"):
            (work / name).unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    classifier = classifier.to(device, memory_format=torch.channels_last).eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    models = nn.ModuleList(model if isinstance(model, list) else [model])
    models = models.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(models.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt_path = work / "reformer.ckpt"
    history = {"config": asdict(cfg), "rows": [], "seconds": 0.0}
    step = 0
    cached = _cached_logits(work, classifier, train, moving=bool(cfg.augment_pad or cfg.augment_flip),
                            resuming=ckpt_path.exists(), log=log)
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _check_resume(ckpt_path, ckpt["history"].get("config", {}), asdict(cfg), log)
        _load_states(models, ckpt)
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        step, history = ckpt["step"], ckpt["history"]
        log(f"reformer: resuming at step {step}/{cfg.steps} from {ckpt_path}")
    elif init_from is not None:
        _load_states(models, torch.load(init_from, map_location="cpu", weights_only=False), spread=init_spread, seed=cfg.seed)
        history["init_from"] = str(init_from)
        if init_spread and len(models) > 1:
            history["init_spread"] = init_spread
        log(f"reformer: starting from the weights in {init_from}")

    def save() -> None:
        torch.save({**_states(models), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                    "history": history}, ckpt_path)

    moving = bool(cfg.augment_pad or cfg.augment_flip)  # then the targets are f on each moved image, as drawn
    train_logits = None if cached is None else torch.from_numpy(cached).to(device)
    x_all, y_all = torch.from_numpy(train.x).to(device), torch.from_numpy(train.y).to(device)
    wants_originals = any(cfg.mix.get(k, 0) > 0 for k in ORIGINAL_KINDS)
    if wants_originals and (originals is None or len(originals[0]) == 0):
        raise ValueError(f"mix kinds {ORIGINAL_KINDS} need originals of some training images")
    if wants_originals:
        orig_rows = torch.from_numpy(np.asarray(originals[0], np.int64)).to(device)
        orig_x = torch.from_numpy(np.asarray(originals[1], np.float32)).to(device)
        if orig_x.shape[1:] != x_all.shape[1:] or int(orig_rows.max()) >= len(train) or int(orig_rows.min()) < 0:
            raise ValueError("originals: rows of the training split and images of its shape")
    # a fixed validation probe: 500 images and their FGSM at eps 0.025 against f
    val_x, val_y = torch.from_numpy(val.x[:500]).to(device), torch.from_numpy(val.y[:500]).to(device)
    val_adv = jpeg_inputs(fgsm(classifier, val_x, val_y, 0.025), cfg.jpeg_quality)
    val_x_in = jpeg_inputs(val_x, cfg.jpeg_quality)
    started, last_save = time.perf_counter(), time.perf_counter()
    run_seconds0, step0 = history["seconds"], step
    sums = {"kl": 0.0, "pixel": 0.0, "diversity": 0.0, "quiet": 0.0, "n": 0}

    def seconds() -> float:
        return run_seconds0 + time.perf_counter() - started

    # a time-scheduled run ends once a step past the warm-up has run at the end of the decay
    last = {"lr": cfg.lr, "progress": _progress(cfg, step - 1, seconds())}

    def done() -> bool:
        return step >= cfg.steps or (cfg.schedule_minutes > 0 and last["progress"] >= 1.0)

    while not done():
        idx = torch.randint(len(train), (cfg.batch_size,), generator=gen).to(device)
        kinds = kinds_for(len(idx), cfg.mix, gen)
        xo = None
        if wants_originals:  # the rows of those kinds are drawn again, among the images that have an original
            rows = torch.from_numpy(np.flatnonzero(np.isin(kinds, ORIGINAL_KINDS))).to(device)
            pick = torch.randint(len(orig_rows), (len(rows),), generator=gen).to(device)
            idx = idx.clone()
            idx[rows] = orig_rows[pick]
            xo = x_all[idx]
            xo[rows] = orig_x[pick]
        xb, yb = x_all[idx], y_all[idx]
        crafter, through = None, None
        if "pgd_member" in kinds:  # the member this step's pgd_member copies are crafted through
            crafter = int(torch.randint(len(models), (1,), generator=gen))
            through = nn.Sequential(models[crafter], classifier)
        if moving:
            xb, xo = augment_pair(xb, xo, gen, cfg.augment_pad, cfg.augment_flip)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                zb = classifier(xb.contiguous(memory_format=torch.channels_last)).float()
        else:
            zb = train_logits[idx]
        x_in = jpeg_inputs(torch.cat([xb, perturb(classifier, xb, yb, kinds, cfg, gen, xo, through)]),
                           cfg.jpeg_quality)
        target, clean = torch.cat([zb, zb]), torch.cat([xb, xb])
        now = seconds()
        last.update(lr=_lr(cfg, step, now), progress=_progress(cfg, step, now))
        for group in opt.param_groups:
            group["lr"] = last["lr"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            x_cl = x_in.contiguous(memory_format=torch.channels_last)
            out = torch.stack([m(x_cl) for m in models]).float()  # M x 2B x C x H x W
            z = classifier(out.flatten(0, 1).contiguous(memory_format=torch.channels_last))
        z = z.float().view(len(models), len(x_in), -1)
        if crafter is not None and cfg.member_attack == "others" and len(models) > 1:
            # the crafting member does not learn from its own attack: a per-member, per-row loss
            keep = torch.ones(len(models), len(x_in), device=device)
            keep[crafter, len(xb) + torch.from_numpy(np.flatnonzero(np.array(kinds) == "pgd_member")).to(device)] = 0
            kl = torch.stack([_masked_mean(_kl_rows(target, z[i], cfg.temperature), keep[i])
                              for i in range(len(models))]).mean()
            pixel = torch.stack([_masked_mean((out[i] - clean).abs().flatten(1).mean(1), keep[i])
                                 for i in range(len(models))]).mean()
        else:
            kl = torch.stack([_kl(target, z[i], cfg.temperature) for i in range(len(models))]).mean()
            pixel = (out - clean).abs().mean()
        diversity = (out - out.mean(0, keepdim=True)).pow(2).mean() if len(models) > 1 else out.new_zeros(())
        loss = cfg.kl_weight * kl + cfg.pixel_weight * pixel - alpha * diversity
        if cfg.quiet_weight:
            calm = torch.from_numpy(_quiet_mask(cfg.quiet_rows, len(xb), kinds)).to(device)
            tq = cfg.quiet_temperature
            quiet = (torch.stack([_kl(target[calm], z[i][calm], tq) for i in range(len(models))]).mean() * tq**2
                     if bool(calm.any()) else z.new_zeros(()))
            loss = loss + cfg.quiet_weight * quiet
            sums["quiet"] += quiet.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        sums["kl"] += kl.item()
        sums["pixel"] += pixel.item()
        sums["diversity"] += diversity.item()
        sums["n"] += 1
        if step % cfg.val_every == 0 or done():
            vals = [_val_row(m, classifier, val_x_in, val_y, val_adv, val_x) for m in models]
            row = {"step": step, "kl": sums["kl"] / sums["n"], "pixel_l1": sums["pixel"] / sums["n"],
                   **({"quiet": sums["quiet"] / sums["n"]} if cfg.quiet_weight else {}),
                   **({"diversity": sums["diversity"] / sums["n"]} if len(models) > 1 else {}),
                   "lr": last["lr"], "seconds": seconds(),
                   **{k: float(np.mean([v[k] for v in vals])) for k in vals[0]}}
            history["rows"].append(row)
            sums = {"kl": 0.0, "pixel": 0.0, "diversity": 0.0, "quiet": 0.0, "n": 0}
            left = (time.perf_counter() - started) / max(step - step0, 1) * (cfg.steps - step)
            if cfg.schedule_minutes > 0:
                left = min(left, max(0.0, cfg.schedule_minutes * 60 - seconds()))
            log("reformer " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
                + f"  ~{duration(left)} left")
        history["seconds"] = seconds()
        if time.perf_counter() - last_save > cfg.checkpoint_minutes * 60:
            save()
            last_save = time.perf_counter()
        if cfg.max_minutes and time.perf_counter() - started > cfg.max_minutes * 60:
            log(f"reformer: {cfg.max_minutes:g} min budget spent at step {step}/{cfg.steps}; checkpointed")
            break
    save()
    models.to("cpu", memory_format=torch.contiguous_format).eval()
    history["finished"] = done()
    (work / "reformer.history.json").write_text(json.dumps(history, indent=1))
    return history
