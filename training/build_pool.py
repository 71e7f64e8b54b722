"""Build a diverse pool bundle: n autoencoders trained jointly, each a member with its own thresholds.

    magnet train pool --dataset cifar10 --base models/cifar10 --out models/cifar10-pool

Loss = Σᵢ MSE(x, aeᵢ(x̃)) − α·Σᵢ MSE(aeᵢ(x̃), mean_j aeⱼ(x̃)) (MagNet section 4.3), after each member is
pre-trained alone (its own seed) for --pretrain-epochs. The base bundle gives the classifier, the
detector layout (the base reformer's detectors move to each member's autoencoder; other autoencoders,
such as MNIST's AE-II, are shared) and the single-autoencoder baseline the pool is compared with.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np

from service.defense.bundle import read_manifest
from service.defense.core import Defense
from service.defense.runtime import CPU, OnnxModel
from training import bundles as B
from training.bundle_report import clean_figures
from training.data import load_mnist
from training.images import load_cifar10
from training.loops import AutoencoderConfig, train_autoencoder, train_autoencoders
from training.nets import make_autoencoder
from training.provenance import provenance

# dataset -> (autoencoder architecture of the reformer, denoising noise, loader)
POOLS = {"mnist": ("mnist_ae_i", 0.1, load_mnist), "cifar10": ("cifar_ae", 0.025, load_cifar10)}


def parser():
    p = B.base_parser("magnet train pool", __doc__, "pool")
    p.add_argument("--dataset", choices=sorted(POOLS), required=True, help="which data set's pool")
    p.add_argument("--base", type=Path, required=True, help="the single-autoencoder bundle to build on")
    p.add_argument("--members", type=int, default=8, help="autoencoders in the pool")
    p.add_argument("--alpha", type=float, default=0.2, help="weight of the diversity penalty")
    p.add_argument("--pretrain-epochs", type=int, default=5, help="epochs each member trains alone first")
    p.add_argument("--epochs", type=int, default=30, help="max joint epochs")
    p.add_argument("--patience", type=int, default=10, help="joint epochs without improvement before stopping")
    p.add_argument("--max-minutes", type=float, default=0, help="wall-time cap of the joint stage (0: none)")
    p.add_argument("--figures-limit", type=int, default=2000,
                   help="test images used for each member's defense figures (all test images for MSEs)")
    return p


def reconstructions(path: Path, x: np.ndarray) -> np.ndarray:
    return np.clip(B.run_batched(OnnxModel(path, [CPU]), x), 0, 1)


def pool_figures(out: Path, files: list[str], baseline: Path, x: np.ndarray) -> dict:
    """Per-member test MSE, the single-autoencoder baseline, and diversity: the mean squared difference
    between two members' reconstructions, averaged over all pairs."""
    recs = [reconstructions(out / f, x) for f in files]
    pairwise = [float(np.mean((recs[i] - recs[j]) ** 2)) for i, j in combinations(range(len(recs)), 2)]
    return {"member_test_mse": {f: float(np.mean((r - x) ** 2)) for f, r in zip(files, recs)},
            "baseline_test_mse": float(np.mean((reconstructions(baseline, x) - x) ** 2)),
            "diversity_pairwise_mse": float(np.mean(pairwise)),
            "diversity_pairwise_min_max": [min(pairwise), max(pairwise)]}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    started = time.perf_counter()
    kind, noise, loader = POOLS[args.dataset]
    ds = loader(args.data_dir)
    train = ds.train.head(args.train_limit) if args.train_limit else ds.train
    pre_cfg = AutoencoderConfig(epochs=args.pretrain_epochs, patience=args.pretrain_epochs, noise=noise,
                                device=args.device, seed=args.seed)
    joint_cfg = replace(pre_cfg, epochs=args.epochs, patience=args.patience, max_seconds=args.max_minutes * 60)
    config = B.save_config(args.work_dir, args, pretrain=pre_cfg, joint=joint_cfg, architecture=kind,
                           members=args.members, alpha=args.alpha)
    aes = [make_autoencoder(kind) for _ in range(args.members)]

    def pretrain_then_joint(models):
        for k, m in enumerate(models):
            train_autoencoder(m, train, ds.val, replace(pre_cfg, seed=args.seed + k), name=f"member {k}")
        return train_autoencoders(models, train, ds.val, joint_cfg, alpha=args.alpha, name="pool")

    history = B.stage(args.work_dir, "pool", aes, args.fresh, pretrain_then_joint, config,
                      keys=("pretrain", "joint", "architecture", "members", "alpha"))
    if args.train_only:
        return 0

    base = read_manifest(args.base)
    base_member = base.members[0]
    out = B.fresh_dir(args.out)
    # the pool shares the base bundle's classifier file when the base keeps it outside itself
    base_classifier = Defense(args.base, device="cpu").classifier_file
    if base.classifier.file == Path(base.classifier.file).name:
        shutil.copy(base_classifier, out / B.CLASSIFIER_FILE)
        classifier = out / B.CLASSIFIER_FILE
    else:
        classifier = base_classifier
    files = [f"ae_{k}.onnx" for k in range(args.members)]
    parity = B.export_all(dict(zip(files, aes)), out, base.input.shape, ds.test.x[:500])
    members = []
    for k, f in enumerate(files):
        dets = [{**d.model_dump(exclude={"threshold"}, exclude_none=True),
                 "autoencoder": f if d.autoencoder == base_member.reformer else d.autoencoder}
                for d in base_member.detectors]
        for shared in {d["autoencoder"] for d in dets} - set(files):
            shutil.copy(args.base / shared, out / shared)
        members.append({"name": f"member-{k}", "reformer": f, "detectors": B.calibrate(out, dets, ds.val.x, classifier,
                                                                                 jpeg_quality=base.input.jpeg_quality)})
    measurements = {
        "alpha": args.alpha, "members": args.members,
        "joint_training_seconds": history["seconds"], "joint_best_epoch": history["best_epoch"],
        "joint_epochs_run": len(history["epochs"]), "onnx_parity_max_abs_diff": parity,
        **pool_figures(out, files, args.base / base_member.reformer, ds.test.x),
    }
    prov = provenance(["magnet", "train", "pool", *(argv if argv is not None else sys.argv[1:])], args.seed)
    name = f"{base.name}-pool"
    write = lambda m: B.write_bundle(out, name, base.dataset, base.input.shape, base.classifier.classes,  # noqa: E731
                                     members, m, prov, classifier,
                                     jpeg_quality=base.input.jpeg_quality)
    test = ds.test.head(args.figures_limit)

    def member_figures(defense: Defense) -> dict:
        return {"member_clean_figures": {f"member-{k}": clean_figures(defense, test, k) for k in range(args.members)},
                "figures_test_images": len(test)}

    return B.publish(out, write, measurements, member_figures, started)


if __name__ == "__main__":
    raise SystemExit(main())
