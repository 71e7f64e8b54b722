"""Rebuild the MNIST bundle from scratch: train, export, calibrate, measure, write the manifest.

    magnet train mnist --data-dir DATA --out models/mnist

Weights, per-epoch histories and the resolved configuration are kept in ``--work-dir``; a stage whose
weights are already there is reused (pass --fresh to retrain everything).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from service.defense.bundle import FileEntry, Manifest, sha256_of, write_manifest
from service.defense.core import Defense
from training import data as D
from training.bundle_report import clean_figures
from training.calibrate import calibrate_reconstruction
from training.export import export_onnx, parity
from training.loops import (AutoencoderConfig, ClassifierConfig, accuracy, reconstruction_mse,
                            train_autoencoder, train_classifier)
from training.nets import make_autoencoder, make_classifier
from training.provenance import provenance


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="magnet train mnist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="directory holding the MNIST IDX .gz files (downloaded there when missing)")
    p.add_argument("--out", type=Path, default=Path("models/mnist"), help="bundle directory to write")
    p.add_argument("--work-dir", type=Path, default=Path("runs/mnist"),
                   help="where weights, histories and the resolved config are saved")
    p.add_argument("--fresh", action="store_true", help="retrain every stage even if weights exist")
    p.add_argument("--seed", type=int, default=0, help="seed for every random number in the run")
    p.add_argument("--classifier-epochs", type=int, default=40, help="SGD epochs for the classifier")
    p.add_argument("--ae-epochs", type=int, default=100, help="max epochs per autoencoder")
    p.add_argument("--ae-patience", type=int, default=10,
                   help="stop an autoencoder after this many epochs without validation improvement")
    p.add_argument("--fpr", type=float, default=0.001, help="target false-positive rate per detector")
    p.add_argument("--train-limit", type=int, default=0,
                   help="use only the first N training images (0: all); for smoke runs")
    return p


def _stage(work: Path, name: str, model: torch.nn.Module, fresh: bool, train_fn) -> dict:
    """Train ``model`` unless ``work/name.pt`` exists; save weights and history either way."""
    weights, hist_path = work / f"{name}.pt", work / f"{name}.history.json"
    if weights.exists() and hist_path.exists() and not fresh:
        model.load_state_dict(torch.load(weights))
        print(f"{name}: reusing {weights}")
        return json.loads(hist_path.read_text())
    hist = train_fn(model)
    torch.save(model.state_dict(), weights)
    record = {"best_epoch": hist.best_epoch, "seconds": hist.seconds, "epochs": hist.epochs}
    hist_path.write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # per-epoch lines show up at once in a log file
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    work, out = args.work_dir, args.out
    work.mkdir(parents=True, exist_ok=True)
    ds = D.load_mnist(args.data_dir)
    train = ds.train.head(args.train_limit) if args.train_limit else ds.train
    clf_cfg = ClassifierConfig(epochs=args.classifier_epochs, seed=args.seed)
    ae_cfg = AutoencoderConfig(epochs=args.ae_epochs, patience=args.ae_patience, seed=args.seed)
    config = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "classifier": asdict(clf_cfg), "autoencoder": asdict(ae_cfg),
              "autoencoder_specs": {"ae_i": "mnist_ae_i", "ae_ii": "mnist_ae_ii"}}
    (work / "config.json").write_text(json.dumps(config, indent=2))

    clf = make_classifier("mnist")
    histories = {"classifier": _stage(work, "classifier", clf, args.fresh,
                                      lambda m: train_classifier(m, train, ds.val, clf_cfg))}
    aes = {}
    for name, kind in config["autoencoder_specs"].items():
        aes[name] = make_autoencoder(kind)
        histories[name] = _stage(work, name, aes[name], args.fresh,
                                 lambda m, n=name: train_autoencoder(m, train, ds.val, ae_cfg, name=n))

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shape = (1, 28, 28)
    files = {"classifier.onnx": (clf, "logits", "classifier")}
    files.update({f"{n}.onnx": (m, "output", "autoencoder") for n, m in aes.items()})
    parity_max = {}
    for fname, (model, output_name, _) in files.items():
        export_onnx(model, out / fname, shape, output_name)
        parity_max[fname] = parity(model, out / fname, ds.test.x[:1000])
        print(f"exported {fname}: torch vs onnxruntime max |diff| {parity_max[fname]:.2e}")

    detectors = [calibrate_reconstruction("I", out / "ae_i.onnx", ds.val.x, 2, args.fpr),
                 calibrate_reconstruction("II", out / "ae_ii.onnx", ds.val.x, 1, args.fpr)]
    measurements = {
        "torch_classifier_test_accuracy": accuracy(clf, ds.test),
        "autoencoder_val_mse": {n: reconstruction_mse(m, ds.val.x) for n, m in aes.items()},
        "onnx_parity_max_abs_diff": parity_max,
        "training_seconds": {k: h["seconds"] for k, h in histories.items()},
        "best_epochs": {k: h["best_epoch"] for k, h in histories.items()},
        "validation_images": len(ds.val), "test_images": len(ds.test), "train_images": len(train),
    }
    manifest = Manifest(
        name="mnist", dataset="mnist", input={"shape": shape},
        files=[FileEntry(path=f, sha256=sha256_of(out / f), role=role) for f, (_, _, role) in files.items()],
        classifier={"file": "classifier.onnx", "output": "logits", "classes": list(ds.classes)},
        members=[{"name": "default", "reformer": "ae_i.onnx", "detectors": detectors}],
        measurements=measurements,
        provenance=provenance(["magnet", "train", "mnist", *(argv if argv is not None else sys.argv[1:])],
                              args.seed),
    )
    write_manifest(out, manifest)
    measurements.update(clean_figures(Defense(out, device="cpu"), ds.test))
    measurements["build_wall_seconds"] = time.perf_counter() - started
    manifest = manifest.model_copy(update={"measurements": measurements})
    write_manifest(out, manifest)
    print(json.dumps(measurements, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
