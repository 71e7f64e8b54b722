"""Rebuild the CIFAR-10 bundle: classifier, autoencoder, three detectors, reformer.

    magnet train cifar10 --data-dir DATA --out models/cifar10 [--device cuda]

MagNet's CIFAR-10 defense: one denoising autoencoder (Conv.Sigmoid 3x3x3 three times, noise 0.025) used
by a reconstruction detector (p=1, FPR 0.005), two divergence detectors JSD(softmax(z(x)/T),
softmax(z(ae(x))/T)) at T=10 and T=40 (FPR 0.01 each), and as the reformer. The classifier is a
ResNet-9 (normalization inside, [0, 1] pixels in, logits out) trained with a one-cycle schedule, flips
and crops. Stages reuse weights found in --work-dir, so training can run elsewhere (--train-only on a
GPU machine) and the bundle be written here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from training import bundles as B
from training.bundle_report import clean_figures
from training.images import load_cifar10
from training.loops import (AutoencoderConfig, ClassifierConfig, reconstruction_mse,
                            train_autoencoder, train_classifier)
from training.nets import make_autoencoder, make_classifier
from training.provenance import provenance

SHAPE = (3, 32, 32)


def parser():
    p = B.base_parser("magnet train cifar10", __doc__, "cifar10")
    p.add_argument("--name", default="cifar10", help="the bundle's name (the upstream model name by default)")
    B.add_jpeg_quality(p)
    p.add_argument("--width", type=int, default=64, help="ResNet-9 base width (64: 6.6 M parameters)")
    p.add_argument("--classifier-epochs", type=int, default=24, help="one-cycle epochs for the classifier")
    p.add_argument("--classifier-lr", type=float, default=0.4, help="peak learning rate (mean loss)")
    p.add_argument("--batch-size", type=int, default=512, help="classifier batch size")
    p.add_argument("--ae-epochs", type=int, default=400, help="max autoencoder epochs (the paper's 400)")
    p.add_argument("--ae-patience", type=int, default=20,
                   help="stop the autoencoder after this many epochs without validation improvement")
    p.add_argument("--ae-max-minutes", type=float, default=0, help="wall-time cap of the autoencoder (0: none)")
    p.add_argument("--ae-noise", type=float, default=0.025, help="denoising noise (std of N(0, 1) scale)")
    p.add_argument("--recon-fpr", type=float, default=0.005, help="FPR of the reconstruction detector")
    p.add_argument("--jsd-fpr", type=float, default=0.01, help="FPR of each divergence detector")
    p.add_argument("--shared-classifier", type=Path, default=None,
                   help="keep the classifier in this file, shared with other bundles (e.g. "
                        "models/shared/cifar10-resnet9.onnx), instead of a copy in the bundle; an existing "
                        "file must hold the same classifier")
    p.add_argument("--temperatures", type=float, nargs="+", default=[10.0, 40.0],
                   help="temperatures of the divergence detectors")
    return p


def detectors(ae: str, recon_fpr: float, jsd_fpr: float, temperatures: list[float]) -> list[dict]:
    """The paper's CIFAR-10 detectors on autoencoder file ``ae`` (thresholds still to be calibrated)."""
    return [{"name": "recon", "kind": "reconstruction", "autoencoder": ae, "p": 1, "fpr": recon_fpr},
            *({"name": f"jsd_t{t:g}", "kind": "divergence", "autoencoder": ae, "temperature": t, "fpr": jsd_fpr}
              for t in temperatures)]


def configs(args) -> tuple[ClassifierConfig, AutoencoderConfig]:
    clf = ClassifierConfig(epochs=args.classifier_epochs, batch_size=args.batch_size, lr=args.classifier_lr,
                           weight_decay=5e-4, label_smoothing=0.2, schedule="onecycle", augment=True,
                           device=args.device, seed=args.seed)
    ae = AutoencoderConfig(epochs=args.ae_epochs, patience=args.ae_patience, noise=args.ae_noise,
                           max_seconds=args.ae_max_minutes * 60, device=args.device, seed=args.seed)
    return clf, ae


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    ds = load_cifar10(args.data_dir)
    jpeg = B.jpeg_quality(args.jpeg_quality, ds)
    train = ds.train.head(args.train_limit) if args.train_limit else ds.train
    clf_cfg, ae_cfg = configs(args)
    config = B.save_config(args.work_dir, args, classifier=clf_cfg, autoencoder=ae_cfg)
    clf = make_classifier("cifar10", width=args.width)
    ae = make_autoencoder("cifar_ae")
    histories = {
        "classifier": B.stage(args.work_dir, "classifier", [clf], args.fresh,
                              lambda ms: train_classifier(ms[0], train, ds.val, clf_cfg), config, keys=("classifier",)),
        "ae": B.stage(args.work_dir, "ae", [ae], args.fresh,
                      lambda ms: train_autoencoder(ms[0], train, ds.val, ae_cfg, name="ae"), config,
                      keys=("autoencoder",)),
    }
    if args.train_only:
        return 0

    out = B.fresh_dir(args.out)
    if args.shared_classifier:
        parity = {**B.export_all({"ae.onnx": ae}, out, SHAPE, ds.test.x[:500]),
                  args.shared_classifier.name: B.shared_classifier(clf, args.shared_classifier, SHAPE, ds.test.x[:500])}
    else:
        parity = B.export_all({B.CLASSIFIER_FILE: clf, "ae.onnx": ae}, out, SHAPE, ds.test.x[:500])
    dets = detectors("ae.onnx", args.recon_fpr, args.jsd_fpr, args.temperatures)
    member = {"name": "default", "reformer": "ae.onnx",
              "detectors": B.calibrate(out, dets, ds.val.x, args.shared_classifier, jpeg_quality=jpeg)}
    measurements = {
        "data": "CIFAR-10 as read from --data-dir (the tests use a lossy JPEG re-encoding)",
        "autoencoder_val_mse": reconstruction_mse(ae, ds.val.x),
        "autoencoder_test_mse": reconstruction_mse(ae, ds.test.x),
        "onnx_parity_max_abs_diff": parity,
        "training_seconds": {k: h["seconds"] for k, h in histories.items()},
        "best_epochs": {k: h["best_epoch"] for k, h in histories.items()},
        "epochs_run": {k: len(h["epochs"]) for k, h in histories.items()},
        "validation_images": len(ds.val), "test_images": len(ds.test), "train_images": len(train),
    }
    prov = provenance(["magnet", "train", "cifar10", *(argv if argv is not None else sys.argv[1:])], args.seed)
    write = lambda m: B.write_bundle(out, args.name, "cifar10", SHAPE, list(ds.classes), [member], m, prov,  # noqa: E731
                                     args.shared_classifier, jpeg_quality=jpeg)
    return B.publish(out, write, measurements, lambda defense: clean_figures(defense, ds.test), started)


if __name__ == "__main__":
    raise SystemExit(main())
