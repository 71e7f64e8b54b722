"""Rebuild the MNIST bundle from scratch: train, export, calibrate, measure, write the manifest.

    magnet train mnist --data-dir DATA --out models/mnist

The paper's defense (MagNet, Table 1): Carlini's classifier; detector I = AE-I with p=2, detector II =
AE-II with p=1, each at --fpr on the 5,000 validation images; the reformer is AE-I. Weights, per-epoch
histories and the resolved configuration are kept in --work-dir; a stage whose weights are already
there is reused (pass --fresh to retrain everything).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from training import bundles as B
from training.bundle_report import clean_figures
from training.export import parity as onnx_parity
from training.data import load_mnist
from training.loops import (AutoencoderConfig, History, ClassifierConfig, accuracy, reconstruction_mse,
                            train_autoencoder, train_classifier)
from training.nets import make_autoencoder, make_classifier
from training.provenance import provenance

SHAPE = (1, 28, 28)
AUTOENCODERS = {"ae_i": "mnist_ae_i", "ae_ii": "mnist_ae_ii"}


def parser():
    p = B.base_parser("magnet train mnist", __doc__, "mnist")
    p.add_argument("--classifier-epochs", type=int, default=50, help="SGD epochs for the classifier")
    p.add_argument("--classifier-schedule", choices=["constant", "step", "onecycle"], default="step",
                   help="learning-rate schedule of the classifier ('step': /10 at 50%% and 75%% of training)")
    p.add_argument("--classifier-init", choices=["default", "glorot"], default="glorot",
                   help="weight initialization ('glorot' as in Carlini's Keras model)")
    p.add_argument("--classifier-shift", type=int, default=2,
                   help="train on random shifts of up to this many pixels (0: no augmentation)")
    p.add_argument("--ae-epochs", type=int, default=400, help="max epochs per autoencoder (the shipped ones ran to 400)")
    p.add_argument("--ae-patience", type=int, default=20,
                   help="stop an autoencoder after this many epochs without validation improvement")
    p.add_argument("--classifier-from", type=Path, default=None,
                   help="take the classifier's weights from this ONNX file (e.g. models/mnist/classifier.onnx, to "
                        "retrain only the autoencoders) instead of training it; checked against onnxruntime. "
                        "The bundle carries this very file (same sha256)")
    p.add_argument("--autoencoders", default=",".join(AUTOENCODERS),
                   help="with --train-only: the autoencoder stages to train (comma-separated), so that they can "
                        "train in separate processes sharing one --work-dir")
    p.add_argument("--ae-init-from", type=Path, default=None, metavar="BUNDLE",
                   help="start each autoencoder from BUNDLE's ae_i.onnx / ae_ii.onnx (e.g. models/mnist, to train the "
                        "shipped ones further, towards a plateau) instead of from random weights; checked against "
                        "onnxruntime. A checkpoint in --work-dir still wins (resume)")
    p.add_argument("--ae-max-minutes", type=float, default=0.0,
                   help="stop each autoencoder after the epoch that passes this many minutes (0: no limit)")
    p.add_argument("--ae-lr-decay", type=float, default=1.0,
                   help="multiply an autoencoder's learning rate by this after --ae-lr-patience epochs without "
                        "validation improvement (e.g. 0.5, to train to a plateau; 1: constant, as the shipped ones)")
    p.add_argument("--ae-lr-patience", type=int, default=10, help="epochs without improvement before each decay")
    p.add_argument("--ae-min-lr", type=float, default=1e-5,
                   help="with --ae-lr-decay below 1: stop (converged) once the learning rate would fall below this")
    p.add_argument("--fpr", type=float, default=0.001, help="target false-positive rate per detector")
    return p


def autoencoder_from_onnx(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load ``model`` (the project's architecture) with the weights of the autoencoder ``path``, verified
    against onnxruntime by :func:`training.from_onnx.torch_twin`."""
    from training.from_onnx import torch_twin

    if not path.is_file():
        raise SystemExit(f"--ae-init-from: {path} not found (a bundle folder holding ae_i.onnx and ae_ii.onnx)")
    twin = torch_twin(path, "mnist", "autoencoder", SHAPE)
    try:
        model.load_state_dict(twin.state_dict())
    except RuntimeError as e:
        raise SystemExit(f"{path} is not this autoencoder's architecture: {e}") from e
    return model


def detectors(fpr: float, ae_i: str = "ae_i.onnx", ae_ii: str = "ae_ii.onnx") -> list[dict]:
    """The paper's MNIST detectors (thresholds still to be calibrated)."""
    return [{"name": "I", "kind": "reconstruction", "autoencoder": ae_i, "p": 2, "fpr": fpr},
            {"name": "II", "kind": "reconstruction", "autoencoder": ae_ii, "p": 1, "fpr": fpr}]


def classifier_from_onnx(model: torch.nn.Module, path: Path) -> History:
    """Fill ``model`` with the weights of the classifier in ``path`` (its torch twin, verified against
    onnxruntime); the history records where they came from, no epochs."""
    from training.from_onnx import torch_twin

    twin = torch_twin(path, "mnist", "classifier", SHAPE)
    model.load_state_dict(twin.state_dict())
    hist = History()
    hist.epochs.append({"epoch": 0, "from_onnx": str(path)})
    hist.best_epoch = 0
    return hist


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    wanted = set(args.autoencoders.split(","))
    if not wanted <= set(AUTOENCODERS) or (wanted != set(AUTOENCODERS) and not args.train_only):
        raise SystemExit(f"--autoencoders takes names from {sorted(AUTOENCODERS)}; a subset needs --train-only")
    try:
        ae_cfg = AutoencoderConfig(epochs=args.ae_epochs, patience=args.ae_patience, device=args.device,
                                   seed=args.seed, max_seconds=60.0 * args.ae_max_minutes, lr_decay=args.ae_lr_decay,
                                   lr_patience=args.ae_lr_patience, min_lr=args.ae_min_lr)
    except ValueError as e:
        raise SystemExit(f"--ae-lr-decay: {e}") from None
    sys.stdout.reconfigure(line_buffering=True)  # per-epoch lines show up at once in a log file
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    ds = load_mnist(args.data_dir)
    train = ds.train.head(args.train_limit) if args.train_limit else ds.train
    clf_cfg = ClassifierConfig(epochs=args.classifier_epochs, schedule=args.classifier_schedule,
                               init=args.classifier_init, augment=args.classifier_shift > 0,
                               augment_pad=args.classifier_shift, flip=False, device=args.device, seed=args.seed)
    config = B.save_config(args.work_dir, args, classifier=clf_cfg, autoencoder=ae_cfg, autoencoder_specs=AUTOENCODERS)

    clf = make_classifier("mnist")
    train_clf = (lambda ms: train_classifier(ms[0], train, ds.val, clf_cfg)) if args.classifier_from is None \
        else (lambda ms: classifier_from_onnx(ms[0], args.classifier_from))
    histories = {"classifier": B.stage(args.work_dir, "classifier", [clf], args.fresh, train_clf, config,
                                       keys=("classifier",) if args.classifier_from is None else ())}
    aes = {name: make_autoencoder(kind) for name, kind in AUTOENCODERS.items()}
    for name, ae in aes.items():
        if name not in wanted:
            continue
        if args.fresh:
            (args.work_dir / f"{name}.checkpoint.pt").unlink(missing_ok=True)
        if args.ae_init_from is not None:
            autoencoder_from_onnx(ae, args.ae_init_from / f"{name}.onnx")
        histories[name] = B.stage(args.work_dir, name, [ae], args.fresh,
                                  lambda ms, n=name: train_autoencoder(
                                      ms[0], train, ds.val,
                                      replace(ae_cfg, checkpoint=str(args.work_dir / f"{n}.checkpoint.pt")), name=n),
                                  config, keys=("autoencoder", "autoencoder_specs"))
    if args.train_only:
        return 0

    out = B.fresh_dir(args.out)
    models = {B.CLASSIFIER_FILE: clf, **{f"{n}.onnx": m for n, m in aes.items()}}
    if args.classifier_from is not None:
        # the bundle carries that very file (same sha256: model servers, caches of adversarial examples
        # and reports keyed by it stay valid); its parity is its twin's against it
        shutil.copyfile(args.classifier_from, out / B.CLASSIFIER_FILE)
        del models[B.CLASSIFIER_FILE]
    parity = B.export_all(models, out, SHAPE, ds.test.x[:1000])
    if args.classifier_from is not None:
        parity[B.CLASSIFIER_FILE] = onnx_parity(clf, out / B.CLASSIFIER_FILE, ds.test.x[:1000])
    member = {"name": "default", "reformer": "ae_i.onnx", "detectors": B.calibrate(out, detectors(args.fpr), ds.val.x)}
    measurements = {
        "torch_classifier_test_accuracy": accuracy(clf, ds.test),
        "autoencoder_val_mse": {n: reconstruction_mse(m, ds.val.x) for n, m in aes.items()},
        "onnx_parity_max_abs_diff": parity,
        "training_seconds": {k: h["seconds"] for k, h in histories.items()},
        "best_epochs": {k: h["best_epoch"] for k, h in histories.items()},
        "validation_images": len(ds.val), "test_images": len(ds.test), "train_images": len(train),
    }
    prov = provenance(["magnet", "train", "mnist", *(argv if argv is not None else sys.argv[1:])], args.seed)
    write = lambda m: B.write_bundle(out, "mnist", "mnist", SHAPE, list(ds.classes), [member], m, prov)  # noqa: E731
    return B.publish(out, write, measurements, lambda defense: clean_figures(defense, ds.test), started)


if __name__ == "__main__":
    raise SystemExit(main())
