"""A CIFAR-10 bundle whose reformer is trained through the classifier (see ``training/reformer.py``).

    magnet train cifar10-guided --data-dir DATA --work-dir runs/guided --out models/cifar10 \
        --mix fgsm=1,pgd=1          # has seen attacks (FGSM + PGD against the classifier, eps <= 8/255)
    magnet train cifar10-guided ... --mix noise=1 --noise-max 0.05   # attack-free (Gaussian noise only)

MagNet's structure stays: detectors on the reformer (reconstruction error L1 and the Jensen-Shannon
divergence of the classifier's softened outputs on x and D(x)) reject, the reformer D replaces what they
accept, thresholds come from clean validation images at each detector's false-positive rate. The
classifier is the shared file (``--classifier``, default ``models/shared/cifar10-resnet9.onnx``), read
through its torch twin and referenced, not copied, by the bundle. Training resumes from ``--work-dir``;
``--train-only`` stops before the bundle (e.g. on a GPU machine, or when a CPU run must continue later).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from training import bundles as B
from training.build_cifar10 import detectors
from training.bundle_report import clean_figures
from training.evaluate.originals import load_images, paired_rows
from training.from_onnx import torch_twin
from training.images import load_cifar10
from training.loops import AutoencoderConfig, train_autoencoder
from training.nets import GuidedReformer, MagnetAE32
from training.provenance import provenance
from training.reformer import ATTACKS, MEMBER_ATTACK, QUIET_ROWS, ReformerConfig, parse_mix, train_reformer

SHAPE = (3, 32, 32)
REFORMER_FILE = "reformer.onnx"


def parser():
    p = B.base_parser("magnet train cifar10-guided", __doc__, "cifar10")
    p.add_argument("--classifier", type=Path, default=Path("models/shared/cifar10-resnet9.onnx"),
                   help="the classifier's ONNX file (kept where it is and referenced by the bundle)")
    p.add_argument("--name", default="cifar10", help="the bundle's name (the upstream model name by default)")
    p.add_argument("--kind", choices=("guided", "magnet32", "magnet32-bottleneck"), default="guided",
                   help="guided: the residual U-Net trained through the classifier; magnet32[-bottleneck]: the "
                        "MagNet authors' 32-channel autoencoder trained on pixel MSE alone (denoising, --ae-noise)")
    p.add_argument("--ae-noise", type=float, default=0.025, help="magnet32: denoising noise std")
    p.add_argument("--ae-epochs", type=int, default=100, help="magnet32: max epochs (stops early, 5 patience)")
    p.add_argument("--width", type=int, default=32, help="reformer width (channels at full resolution)")
    p.add_argument("--depth", type=int, default=2, help="reformer stride-2 stages")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps in all")
    p.add_argument("--batch-size", type=int, default=128, help="clean images per step (as many perturbed join)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam peak learning rate (cosine decay to 5 %%)")
    p.add_argument("--kl-weight", type=float, default=1.0, help="weight of KL(f(x) || f(D(x_in)))")
    p.add_argument("--pixel-weight", type=float, default=1.0, help="weight of |D(x_in) - x|_1")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the KL term")
    p.add_argument("--quiet-weight", type=float, default=0.0,
                   help="weight of T^2 KL(f(x)/T || f(D(x_in))/T) at --quiet-temperature on the rows that are not "
                        "attacks (clean, noise, pre-images): keeps the divergence detector quiet on clean inputs")
    p.add_argument("--quiet-temperature", type=float, default=40.0, help="the detector term's temperature")
    p.add_argument("--quiet-rows", choices=QUIET_ROWS, default="calm",
                   help="the detector term's rows: clean images and every copy that is not an attack, or the "
                        "clean pre-image copies only")
    p.add_argument("--augment-pad", type=int, default=0,
                   help="move each training image (and its original) by a random crop of it reflect-padded by this "
                        "many pixels; the target is f on the moved image")
    p.add_argument("--augment-flip", action="store_true",
                   help="flip each training image (and its original) left-right with probability 1/2")
    p.add_argument("--mix", type=parse_mix, default={"noise": 1.0},
                   help="perturbed copies by kind and share: noise, fgsm, pgd, clean, pgd_member (PGD through a pool "
                        "member), ... (training.reformer; e.g. fgsm=1,pgd=1)")
    p.add_argument("--noise-max", type=float, default=0.05, help="Gaussian std drawn from U(0, this)")
    p.add_argument("--eps-max", type=float, default=8 / 255, help="attack eps drawn from U(0, this)")
    p.add_argument("--pgd-steps", type=int, default=3, help="PGD steps (of eps/2, random start)")
    p.add_argument("--preimage-max", type=float, default=0.5,
                   help="preimage: spread ~ U(0, this) across each DCT bin (training.domain_sim; 0.4 is about the "
                        "pixel distance of real CIFAR-10 originals from their JPEG copies)")
    p.add_argument("--preimage-quality", type=int, default=75, help="preimage: the training images' JPEG quality")
    p.add_argument("--originals", type=Path, default=None,
                   help="uncompressed originals of some training images, train-<row>-label-<class>.png (as "
                        "scripts/cifar10_originals.py writes them): what the mix kinds original, fgsm_orig, pgd_orig use")
    p.add_argument("--init-from", type=Path, default=None,
                   help="warm start (weights only; new optimizer and schedule): another run's reformer.ckpt, a "
                        "bundle directory (its members' reformers, e.g. models/cifar10-pool) or a reformer .onnx")
    p.add_argument("--init-spread", type=float, default=0.05,
                   help="pools warm-started from one reformer: each member gets Gaussian noise of this times each "
                        "weight tensor's std, so the diversity term can pull them apart")
    p.add_argument("--max-minutes", type=float, default=0, help="stop training after this long (resume later)")
    p.add_argument("--schedule-minutes", type=float, default=0,
                   help="guided: the learning-rate schedule also runs on training time and training ends after "
                        "this long (counted across resumes), its decay finished, even short of --steps")
    p.add_argument("--recon-fpr", type=float, default=0.005, help="FPR of the reconstruction detector (0: none)")
    p.add_argument("--jsd-fpr", type=float, nargs="+", default=[0.01],
                   help="FPR of each divergence detector: one value for all, or one per temperature (0: none)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[10.0, 40.0],
                   help="temperatures of the divergence detectors")
    p.add_argument("--members", type=int, default=1,
                   help="a diverse pool of this many reformers, trained jointly (each its own detectors)")
    p.add_argument("--alpha", type=float, default=0.0, help="weight of the pool's diversity term")
    p.add_argument("--member-attack", choices=MEMBER_ATTACK, default="all",
                   help="mix kind pgd_member (PGD crafted through a member drawn each step): every member learns "
                        "from those copies, or the others only")
    p.add_argument("--figures-limit", type=int, default=0, help="test images for the manifest's figures (0: all)")
    p.add_argument("--candidate", action="store_true",
                   help="a candidate for selection: touch no test image (no test figures in the manifest, "
                        "parity checked on validation images); build the chosen one again without this flag")
    B.add_jpeg_quality(p, also=", which the reformer also trains behind")
    p.add_argument("--seen-attacks", action="store_true",
                   help="record in the manifest that the reformer was trained on adversarial examples "
                        "(set automatically when --mix has fgsm or pgd)")
    return p


def chosen_detectors(recon_fpr: float, jsd_fprs: list[float], temperatures: list[float]) -> list[dict]:
    """MagNet's CIFAR-10 detectors on the reformer, those with an FPR of 0 left out."""
    if len(jsd_fprs) not in (1, len(temperatures)):
        raise SystemExit(f"--jsd-fpr takes one value or one per temperature ({len(temperatures)})")
    fprs = dict(zip(temperatures, jsd_fprs * len(temperatures) if len(jsd_fprs) == 1 else jsd_fprs))
    dets = detectors(REFORMER_FILE, recon_fpr or 0.5, 0.5, temperatures)
    keep = [d for d in dets if (d["kind"] == "reconstruction" and recon_fpr > 0)
            or (d["kind"] == "divergence" and fprs[d["temperature"]] > 0)]
    for d in keep:
        d["fpr"] = recon_fpr if d["kind"] == "reconstruction" else fprs[d["temperature"]]
    if not keep:
        raise SystemExit("every detector is off: give --recon-fpr or --jsd-fpr a value above 0")
    return keep


def init_checkpoint(source: Path, work_dir: Path) -> Path:
    """``source`` as a checkpoint ``train_reformer`` can warm-start from: a ``.ckpt`` as it is; a bundle
    directory or a reformer ``.onnx`` read back into torch (each reformer's twin, checked against
    onnxruntime) and saved as ``work_dir/init.ckpt``; the trained checkpoints do not ship, the bundles do."""
    if source.is_dir():
        manifest = json.loads((source / "manifest.json").read_text())
        files = [source / m["reformer"] for m in manifest["members"]]
    elif source.suffix == ".onnx":
        files = [source]
    else:
        return source
    states = []
    for f in files:
        twin = torch_twin(f, "cifar10", "reformer", SHAPE)
        if not isinstance(twin, GuidedReformer):
            raise SystemExit(f"--init-from {f}: not a classifier-guided reformer ({type(twin).__name__})")
        states.append(twin.state_dict())
    path = Path(work_dir) / "init.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": states[0]} if len(states) == 1 else {"models": states}, path)
    return path


def training_originals(folder: Path | None, data) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows of the training split, their originals) from ``train-<row>-label-<class>.png`` files
    (``training.evaluate.originals.paired_rows`` checks each label against its row's)."""
    if folder is None:
        return None
    x, labels, names = load_images(folder)
    _, rows = paired_rows(names, labels, data, only="train")
    return rows, x


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    ds = load_cifar10(args.data_dir)
    train = ds.train.head(args.train_limit) if args.train_limit else ds.train
    jpeg = B.jpeg_quality(args.jpeg_quality, ds)
    cfg = ReformerConfig(width=args.width, depth=args.depth, steps=args.steps, batch_size=args.batch_size,
                         jpeg_quality=jpeg,
                         lr=args.lr, kl_weight=args.kl_weight, pixel_weight=args.pixel_weight,
                         temperature=args.temperature, quiet_weight=args.quiet_weight,
                         quiet_temperature=args.quiet_temperature, quiet_rows=args.quiet_rows,
                         mix=args.mix, noise_max=args.noise_max,
                         augment_pad=args.augment_pad, augment_flip=args.augment_flip,
                         eps_max=args.eps_max, pgd_steps=args.pgd_steps, preimage_max=args.preimage_max,
                         preimage_quality=args.preimage_quality, max_minutes=args.max_minutes,
                         schedule_minutes=args.schedule_minutes, member_attack=args.member_attack,
                         device=args.device, seed=args.seed)
    B.save_config(args.work_dir, args, reformer=cfg)
    classifier = torch_twin(args.classifier, "cifar10", "classifier", SHAPE)
    if args.init_from is not None:
        args.init_from = init_checkpoint(args.init_from, args.work_dir)
    if args.kind == "guided":
        reformers = [GuidedReformer(3, args.width, args.depth) for _ in range(args.members)]
        history = train_reformer(reformers if args.members > 1 else reformers[0], classifier, train, ds.val, cfg,
                                 args.work_dir, alpha=args.alpha, init_from=args.init_from,
                                 init_spread=args.init_spread, originals=training_originals(args.originals, ds),
                                 fresh=args.fresh)
    else:
        if args.members > 1:
            raise SystemExit("--members > 1 needs --kind guided (magnet32 pools: magnet train pool)")
        reformer = MagnetAE32(3, args.width, bottleneck=args.kind.endswith("bottleneck"))
        ae_cfg = AutoencoderConfig(epochs=args.ae_epochs, patience=5, noise=args.ae_noise,
                                   max_seconds=args.max_minutes * 60, device=args.device, seed=args.seed)
        hist = B.stage(args.work_dir, "ae", [reformer], args.fresh,
                       lambda ms: train_autoencoder(ms[0], train, ds.val, ae_cfg, name=args.kind),
                       {"ae": asdict(ae_cfg), "kind": args.kind, "width": args.width}, keys=("ae", "kind", "width"))
        history = {"finished": True, "seconds": hist["seconds"], "rows": hist["epochs"]}
        reformers = [reformer]
    if args.train_only or not history["finished"]:
        print(f"training stopped at step {history['rows'][-1]['step'] if history['rows'] else 0}/{cfg.steps}; "
              "run again with the same --work-dir to continue" if not history["finished"] else "trained")
        return 0

    classifier = classifier.to("cpu", memory_format=torch.contiguous_format)
    out = B.fresh_dir(args.out)
    check = (ds.val if args.candidate else ds.test).x[:500]
    files = [REFORMER_FILE] if len(reformers) == 1 else [f"reformer_{k}.onnx" for k in range(len(reformers))]
    parity = {**B.export_all(dict(zip(files, reformers)), out, SHAPE, check),
              args.classifier.name: B.shared_classifier(classifier, args.classifier, SHAPE, check)}
    members = []
    for k, file in enumerate(files):
        dets = [{**d, "autoencoder": file} for d in chosen_detectors(args.recon_fpr, args.jsd_fpr, args.temperatures)]
        members.append({"name": "default" if len(files) == 1 else f"member-{k}", "reformer": file,
                        "detectors": B.calibrate(out, dets, ds.val.x, args.classifier,
                                                 jpeg_quality=jpeg)})
    attacks_seen = args.seen_attacks or any(args.mix.get(k, 0) > 0 for k in ATTACKS)
    measurements = {
        "data": "CIFAR-10 as read from --data-dir (the tests use a lossy JPEG re-encoding)",
        "reformer": {"kind": {"guided": "classifier-guided residual U-Net"}.get(args.kind, f"{args.kind}, pixel MSE, "
                     f"denoising noise {args.ae_noise:g}"), "width": args.width, "depth": args.depth,
                     "parameters": sum(p.numel() for p in reformers[0].parameters()), "mix": args.mix,
                     "members": len(reformers), "diversity_alpha": args.alpha if len(reformers) > 1 else None,
                     **({"augment": {"pad": args.augment_pad, "flip": args.augment_flip}}
                        if args.augment_pad or args.augment_flip else {}),
                     "trained_on_adversarial_examples": attacks_seen},
        "training_seconds": history["seconds"], "training_steps": cfg.steps if args.kind == "guided" else None,
        **({"warm_start": history["init_from"]} if history.get("init_from") else {}),
        **({"warm_start_spread": history["init_spread"]} if history.get("init_spread") else {}),
        "last_validation": history["rows"][-1] if history["rows"] else None,
        "onnx_parity_max_abs_diff": parity,
        "validation_images": len(ds.val), "test_images": len(ds.test), "train_images": len(train),
    }
    prov = provenance(["magnet", "train", "cifar10-guided", *(argv if argv is not None else sys.argv[1:])], args.seed)
    write = lambda m: B.write_bundle(out, args.name, "cifar10", SHAPE, list(ds.classes), members, m, prov,  # noqa: E731
                                     args.classifier, jpeg_quality=jpeg)
    if args.candidate:
        measurements["candidate"] = "built for the validation selection: no test figures"
    test = ds.test.head(args.figures_limit) if args.figures_limit else ds.test

    def measure(defense) -> dict:
        if args.candidate:
            return {}
        if len(files) == 1:
            return clean_figures(defense, test)
        return {"member_clean_figures": {m["name"]: clean_figures(defense, test, k) for k, m in enumerate(members)},
                "figures_test_images": len(test)}

    return B.publish(out, write, measurements, measure, started)


if __name__ == "__main__":
    raise SystemExit(main())
