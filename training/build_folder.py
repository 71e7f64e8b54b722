"""Defend your own classifier: a bundle from a folder of images and an ONNX classifier.

    magnet train folder --data DIR --classifier MODEL.onnx --out BUNDLE [--name NAME]
        [--layout nchw|nhwc] [--scale 1|255] [--mean M ...] [--std S ...]
        [--outputs logits|probabilities] [--fpr F] [--pool N] [--device cpu|cuda] [--max-minutes M]

DIR holds ``train/<class>/*`` and, optionally, ``test/<class>/*`` (PNG or JPEG); class index = the lines of
``DIR/classes.txt``, else the sorted folder names. A seeded tenth of train is the validation split (and
another tenth the test split when there is no test folder). The images must share a size and be all grey
or all RGB (``--size H W`` resizes); heights and widths from 8 to 128, multiples of 4, are supported.

The classifier's input contract (``--layout``, ``--scale``, ``--mean``/``--std``, ``--input``,
``--outputs``, ``--output-name``) says how it takes the images; it is checked on the validation split
(accuracy is printed) and recorded in the manifest, where the gateway reads it.

Recipes, picked by the images:
- **grey**: MagNet's MNIST defense. Two denoising autoencoders (AE-I: conv, pool, conv, conv, up, conv;
  AE-II: three convs) trained on the training split; detector I = AE-I's L2 reconstruction error,
  detector II = AE-II's L1, each at ``--fpr`` (default 0.001); AE-I reforms. Attack-free.
- **rgb**: the CIFAR-10 defense of this project: a residual U-Net reformer trained through *your*
  classifier (KL between its outputs on x and on the reformed x, plus pixel L1), on clean images and on
  FGSM + PGD examples crafted against your classifier on the training split (eps up to 8/255; so the
  bundle has seen attacks, and says so: ``--attack-free`` trains on Gaussian noise instead); detectors:
  reconstruction L1 and the Jensen-Shannon divergence at temperature 40 (``--fpr`` each; default
  0.005 / 0.02 as chosen on CIFAR-10's validation split).

``--pool N`` trains N reformers jointly with a diversity term (MagNet section 4.3), one member each.
The manifest records clean accuracy with and without the defense on the test split, each detector's test
FPR, the share of uniform noise rejected, and FGSM / PGD rows crafted against your classifier (through a
torch twin of its ONNX graph, checked against onnxruntime). Weights and progress are kept in
``--work-dir``: run the same command again to resume (``--max-minutes`` stops training early).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from service.defense.bundle import sha256_of
from service.defense.contract import ClassifierInput
from service.defense.core import Classifier, Defense
from service.defense.runtime import CPU, OnnxModel
from training import bundles as B
from training.build_cifar10 import detectors as cifar10_detectors
from training.build_mnist import detectors as mnist_detectors
from training.bundle_report import clean_figures
from training.data import DataError, Dataset
from training.from_onnx import TwinError, torch_twin
from training.images import load_folder
from training.loops import AutoencoderConfig, train_autoencoders
from training.nets import GuidedReformer, make_autoencoder
from training.provenance import provenance
from training.reformer import ReformerConfig, train_reformer
from training.specs import BUDGETS, BUILD_EPS, check_size, family_of

VALIDATION, TEST = 0.1, 0.1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="magnet train folder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the image folder: DATA/train/<class>/*, optional test/")
    p.add_argument("--classifier", type=Path, required=True, help="your classifier's ONNX file (copied into the bundle)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--name", default=None, help="the bundle's name (default: the folder's name)")
    p.add_argument("--work-dir", type=Path, default=None, help="weights and progress (default: runs/folder-NAME)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="resize every image")
    B.add_jpeg_quality(p)
    c = p.add_argument_group("the classifier's input contract (defaults: NCHW, pixels in [0, 1], logits)")
    c.add_argument("--layout", type=str.upper, choices=("NCHW", "NHWC"), default="NCHW", help="nchw or nhwc")
    c.add_argument("--scale", type=float, default=1.0, help="pixels in [0, 1] are multiplied by this (255: 0..255)")
    c.add_argument("--mean", type=float, nargs="+", default=None, help="subtracted per channel after scaling")
    c.add_argument("--std", type=float, nargs="+", default=None, help="divided per channel after the mean")
    c.add_argument("--input", default=None, help="input tensor name (default: the first)")
    c.add_argument("--outputs", choices=("logits", "probabilities"), default="logits", help="what the classifier returns")
    c.add_argument("--output-name", default=None, help="output tensor to read (default: the first)")
    p.add_argument("--fpr", type=float, default=None,
                   help="false-positive rate of every detector on the validation split (default: grey 0.001; "
                        "rgb 0.005 for the reconstruction detector and 0.02 for the divergence detector)")
    p.add_argument("--pool", type=int, default=1, help="a diverse pool of this many members")
    p.add_argument("--alpha", type=float, default=None, help="weight of the pool's diversity term "
                                                              "(default: grey 0.2, rgb 1.0)")
    p.add_argument("--device", default="cpu", help="torch device for training: cpu or cuda")
    p.add_argument("--max-minutes", type=float, default=0, help="stop training after this long (run again to resume)")
    p.add_argument("--epochs", type=int, default=100, help="grey: max epochs per autoencoder (10 patience)")
    p.add_argument("--min-steps", type=int, default=3000,
                   help="grey: train each autoencoder for at least this many steps (more epochs on small folders)")
    p.add_argument("--steps", type=int, default=2000, help="rgb: reformer optimizer steps")
    p.add_argument("--attack-free", action="store_true", help="rgb: train the reformer on Gaussian noise, no attacks")
    p.add_argument("--attack-examples", type=int, default=500, help="test images per FGSM / PGD row of the manifest")
    p.add_argument("--fresh", action="store_true", help="retrain from scratch even if --work-dir holds weights")
    p.add_argument("--seed", type=int, default=0, help="seed for the splits and the training")
    return p


def contract_of(args) -> ClassifierInput:
    try:
        return ClassifierInput(name=args.input, layout=args.layout, scale=args.scale,
                               mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None)
    except ValueError as e:
        raise SystemExit(f"classifier input contract: {e}") from e


def check_classifier(path: Path, contract: ClassifierInput, output: str, output_name: str | None,
                     ds: Dataset) -> float:
    """Run the classifier on the validation split through the contract; returns its accuracy. Exits with a
    clear message when it does not take the images or returns the wrong number of classes."""
    contract.check_channels(ds.val.x.shape[1])
    try:
        model = Classifier(OnnxModel(path, [CPU], input_name=contract.name, output_name=output_name), contract, output)
        logits = B.run_batched(model.logits, ds.val.x, 500)
    except Exception as e:  # onnxruntime raises its own types (InvalidArgument, Fail, ...)
        raise SystemExit(f"{path} does not take the images as the contract gives them ({contract.layout}, "
                         f"{tuple(ds.val.x.shape[1:])} as C x H x W, scale {contract.scale:g}): {e}") from e
    if logits.ndim != 2 or logits.shape[1] != len(ds.classes):
        raise SystemExit(f"{path} returns shape {logits.shape[1:]} per image; the data has {len(ds.classes)} classes "
                         f"({', '.join(ds.classes[:5])}{', ...' if len(ds.classes) > 5 else ''})")
    sums = np.exp(logits).sum(1) if output == "probabilities" else logits.sum(1)
    looks_like_probabilities = bool(np.all(np.abs(sums - 1) < 1e-3))
    if output == "probabilities" and not looks_like_probabilities:
        raise SystemExit(f"--outputs probabilities, but {path}'s outputs do not sum to 1: are they logits? "
                         "(give --outputs logits)")
    if output == "logits" and looks_like_probabilities and logits.min() >= 0:
        raise SystemExit(f"{path}'s outputs are >= 0 and sum to 1 on every validation image: they are probabilities; "
                         "give --outputs probabilities (the divergence detectors and the attacks need to know)")
    accuracy = float((logits.argmax(1) == ds.val.y).mean())
    print(f"classifier: {accuracy:.2%} on the {len(ds.val)} validation images", flush=True)
    if accuracy < min(0.5, 2.0 / len(ds.classes)):
        print("warning: that is close to chance: check --layout, --scale, --mean/--std and classes.txt", flush=True)
    return accuracy


def work_inputs(args, ds: Dataset, family: str, contract: ClassifierInput) -> dict:
    """What the weights in ``--work-dir`` were trained from: the training images and split, and for the RGB
    recipe (trained through the classifier) the classifier file and its contract and the training mix."""
    inputs = {"train images sha256": hashlib.sha256(np.ascontiguousarray(ds.train.x).tobytes()).hexdigest(),
              "classes": list(ds.classes), "seed": args.seed, "pool": args.pool}
    if family == "rgb":
        inputs.update({"classifier sha256": sha256_of(Path(args.classifier)),
                       "contract": contract.model_dump(), "outputs": args.outputs, "output name": args.output_name,
                       "attack-free": bool(args.attack_free)})
    return inputs


def guard_work(work: Path, inputs: dict, fresh: bool) -> None:
    """Resume only what was trained from the same inputs: a work dir from other inputs (a re-exported
    classifier, other images) is refused unless ``--fresh`` (``train_reformer`` then drops its checkpoint and
    cached classifier outputs)."""
    path = work / "inputs.json"
    if path.exists() and not fresh:
        old = json.loads(path.read_text())
        changed = sorted(k for k in {**old, **inputs} if old.get(k) != inputs.get(k))
        if changed:
            raise SystemExit(f"{work} holds weights trained from other inputs ({', '.join(changed)} changed): give "
                             "--fresh to retrain there, or another --work-dir")
    path.write_text(json.dumps(inputs, indent=1) + "\n")


def train_grey(args, ds: Dataset, work: Path, started: float) -> tuple[dict, dict]:
    """AE-I (one per pool member, jointly when a pool) and AE-II; returns ({file: model}, histories)."""
    budget = args.max_minutes * 60

    # MagNet's sigmoid autoencoders need a few thousand optimizer steps whatever the data's size (MNIST's
    # AE-I leaves its plateau after ~1,000): small folders get more epochs, up to --min-steps steps
    per_epoch = math.ceil(len(ds.train) / 256)
    epochs = max(args.epochs, math.ceil(args.min_steps / per_epoch))
    if epochs > args.epochs:
        print(f"{len(ds.train)} training images make {per_epoch} steps per epoch: up to {epochs} epochs "
              f"(--min-steps {args.min_steps})", flush=True)

    def cfg(share: float) -> AutoencoderConfig:
        left = budget - (time.perf_counter() - started) if budget else 0
        return AutoencoderConfig(epochs=epochs, patience=10, noise=0.1, device=args.device, seed=args.seed,
                                 max_seconds=max(left * share, 1.0) if budget else 0.0)

    shape_note = {"shape": list(ds.train.x.shape[1:])}
    members = [make_autoencoder("mnist_ae_i") for _ in range(args.pool)]
    alpha = 0.2 if args.alpha is None else args.alpha
    names = ["ae_i.onnx"] if args.pool == 1 else [f"ae_i_{k}.onnx" for k in range(args.pool)]
    hist = {"ae_i": B.stage(work, "ae_i", members, args.fresh,
                            lambda ms: train_autoencoders(ms, ds.train, ds.val, cfg(0.6),
                                                          alpha=alpha if args.pool > 1 else 0.0, name="AE-I"),
                            shape_note)}
    ae_ii = make_autoencoder("mnist_ae_ii")
    hist["ae_ii"] = B.stage(work, "ae_ii", [ae_ii], args.fresh,
                            lambda ms: train_autoencoders(ms, ds.train, ds.val, cfg(1.0), name="AE-II"), shape_note)
    return {**dict(zip(names, members)), "ae_ii.onnx": ae_ii}, hist


def train_rgb(args, ds: Dataset, work: Path, twin) -> tuple[dict, dict] | None:
    """The guided reformer(s) through the classifier's twin; None when training stopped early."""
    mix = {"noise": 1.0} if args.attack_free else {"fgsm": 3.0, "pgd": 1.0}
    cfg = ReformerConfig(width=32, depth=2, steps=args.steps, batch_size=128, lr=1e-3, mix=mix,
                         max_minutes=args.max_minutes, device=args.device, seed=args.seed)
    torch.manual_seed(args.seed)
    reformers = [GuidedReformer(ds.train.x.shape[1], 32, 2) for _ in range(args.pool)]
    alpha = 1.0 if args.alpha is None else args.alpha
    history = train_reformer(reformers if args.pool > 1 else reformers[0], twin, ds.train, ds.val, cfg, work,
                             alpha=alpha if args.pool > 1 else 0.0, fresh=args.fresh)
    if not history["finished"]:
        return None
    names = ["reformer.onnx"] if args.pool == 1 else [f"reformer_{k}.onnx" for k in range(args.pool)]
    history["mix"] = mix
    return dict(zip(names, reformers)), history


def attack_rows(defense: Defense, twin, test, eps_values: tuple[float, ...], n: int, device: str) -> list[dict]:
    """FGSM and PGD (10 steps of eps/4, random start) against the classifier's twin on the first ``n`` test
    images it gets right, judged by the core the gateway serves (member 0)."""
    from training.attacks.pgd import fgsm, pgd_linf
    from training.evaluate.run import judge

    correct = np.flatnonzero(B.run_batched(defense.classifier, test.x).argmax(1) == test.y)[:n]
    if len(correct) == 0:
        return []
    x, y = test.x[correct], test.y[correct]
    twin = twin.to(device)
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    for name in ("fgsm", "pgd"):
        for eps in eps_values:
            started, parts = time.perf_counter(), []
            for i in range(0, len(x), 100):
                xb, yb = torch.from_numpy(x[i:i + 100]).to(device), torch.from_numpy(y[i:i + 100]).to(device)
                adv = fgsm(twin, xb, yb, eps) if name == "fgsm" else pgd_linf(twin, xb, yb, eps, 10, generator=gen)
                parts.append(adv.cpu().numpy())
            judged = judge(defense, np.concatenate(parts), y)
            row = {"attack": name, "eps": round(eps, 6), "examples": len(x), "seconds": time.perf_counter() - started,
                   **{k: judged[k] for k in ("no_defense", "detectors_only", "reformer_only", "full_defense",
                                             "rejected")}}
            if name == "pgd":
                row["steps"] = 10
            print(f"{name} eps {eps:.4g}: no defense {row['no_defense']:.1%}, full defense {row['full_defense']:.1%} "
                  f"({len(x)} examples)", flush=True)
            rows.append(row)
    return rows


def noise_rejection(defense: Defense, shape: tuple[int, int, int], n: int = 1000, seed: int = 0) -> dict:
    x = np.random.default_rng(seed).uniform(size=(n, *shape)).astype(np.float32)
    return {f"member-{k}" if len(defense.members) > 1 else "default":
            float(np.concatenate([defense.inspect(x[i:i + 500], k).rejected for i in range(0, n, 500)]).mean())
            for k in range(len(defense.members))}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    started = time.perf_counter()
    if not args.classifier.is_file():
        raise SystemExit(f"--classifier {args.classifier}: no such file")
    if args.pool < 1:
        raise SystemExit("--pool wants 1 or more members")
    if args.fpr is not None and not 0 < args.fpr < 0.5:
        raise SystemExit("--fpr wants a rate between 0 and 0.5, e.g. 0.005")
    try:
        ds = load_folder(args.data, size=tuple(args.size) if args.size else None, validation=VALIDATION, test=TEST,
                         seed=args.seed, name=args.name)
        shape = tuple(int(v) for v in ds.train.x.shape[1:])
        check_size(shape)
        family = family_of(shape[0])
    except DataError as e:
        raise SystemExit(str(e)) from e
    name = args.name or args.data.resolve().name
    work = args.work_dir or Path("runs") / f"folder-{name}"
    work.mkdir(parents=True, exist_ok=True)
    print(f"data: {len(ds.train)} train / {len(ds.val)} validation / {len(ds.test)} test images, "
          f"{len(ds.classes)} classes, {shape[0]} x {shape[1]} x {shape[2]} ({family} recipe)", flush=True)
    contract = contract_of(args)
    check_classifier(args.classifier, contract, args.outputs, args.output_name, ds)
    n_val, floor = len(ds.val), 1.0 / len(ds.val)
    if args.fpr is not None:
        if args.fpr * n_val < 1 - 1e-9:
            raise SystemExit(f"--fpr {args.fpr:g} on {n_val} validation images keeps no image above a threshold: "
                             f"give --fpr {floor:.2g} or more, or more training images (a tenth are held out)")
        if args.fpr * n_val < 5:
            print(f"warning: --fpr {args.fpr:g} on {n_val} validation images leaves fewer than 5 images above "
                  "each threshold: the rate is poorly determined", flush=True)
    else:
        default = 0.001 if family == "grey" else 0.005
        if default * n_val < 1:
            args.fpr = math.ceil(floor * 1e4) / 1e4
            print(f"note: {n_val} validation images cannot calibrate the default FPR {default:g}; every detector "
                  f"gets {args.fpr:.3g} (1 image per detector). More images give lower rates", flush=True)
    try:
        twin = torch_twin(args.classifier, f"folder:{name}", "classifier", shape, contract=contract,
                          output_name=args.output_name, output=args.outputs)
    except TwinError as e:
        raise SystemExit(f"no differentiable twin of {args.classifier}: {e}") from e
    guard_work(work, work_inputs(args, ds, family, contract), args.fresh)
    (work / "config.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()}, indent=1))
    if family == "grey":
        models, history = train_grey(args, ds, work, started)
        seen_attacks = False
    else:
        trained = train_rgb(args, ds, work, twin)
        if trained is None:
            print("training stopped early (--max-minutes); run the same command again to continue", flush=True)
            return 0
        models, history = trained
        seen_attacks = not args.attack_free

    out = B.fresh_dir(args.out)
    shutil.copyfile(args.classifier, out / B.CLASSIFIER_FILE)
    parity = B.export_all(models, out, shape, ds.test.x[:500])
    reformers = [f for f in models if f != "ae_ii.onnx"]
    classifier_fields = {"input": contract.model_dump(exclude_defaults=True), "output": args.outputs,
                         **({"output_name": args.output_name} if args.output_name else {})}
    members = []
    for k, file in enumerate(reformers):
        # the paper's MNIST detectors (AE-I L2 on the member's reformer, the shared AE-II L1), or the CIFAR-10
        # recipe's reconstruction L1 and divergence at T = 40 on the reformer
        dets = (mnist_detectors(args.fpr or 0.001, file) if family == "grey"
                else cifar10_detectors(file, args.fpr or 0.005, args.fpr or 0.02, [40.0]))
        members.append({"name": "default" if len(reformers) == 1 else f"member-{k}", "reformer": file,
                        "detectors": B.calibrate(out, dets, ds.val.x, contract=contract, output=args.outputs,
                                                 output_name=args.output_name,
                                                 jpeg_quality=B.jpeg_quality(args.jpeg_quality, ds))})
    measurements = {
        "data": {"folder": str(args.data), "seed": args.seed, "validation": VALIDATION, "test": TEST,
                 "held_out_test": not (args.data / "test").is_dir(), "size": list(shape[1:]),
                 "train_images": len(ds.train), "validation_images": len(ds.val), "test_images": len(ds.test)},
        "recipe": family, "members": len(reformers),
        "reformer": {"kind": "MagNet AE-I (denoising, pixel MSE)" if family == "grey" else
                     "classifier-guided residual U-Net", "trained_on_adversarial_examples": seen_attacks,
                     **({"mix": history["mix"]} if family == "rgb" else {})},
        # magnet evaluate's strengths for this bundle (the family's: grey = MNIST's, rgb = CIFAR-10's); edit to change
        "attack_budgets": {k: list(v) for k, v in BUDGETS[family].items()},
        "training_seconds": ({k: h["seconds"] for k, h in history.items()} if family == "grey"
                             else history["seconds"]),
        "onnx_parity_max_abs_diff": parity,
    }
    prov = provenance(["magnet", "train", "folder", *(argv if argv is not None else sys.argv[1:])], args.seed)

    def write(m: dict):
        return B.write_bundle(out, name, f"folder:{name}", shape, list(ds.classes), members, m, prov,
                              classifier_fields=classifier_fields,
                              jpeg_quality=B.jpeg_quality(args.jpeg_quality, ds))

    per_member: dict[str, dict] = {}

    def measure(defense: Defense) -> dict:
        per_member.update({m["name"]: clean_figures(defense, ds.test, k) for k, m in enumerate(members)})
        figures = {"clean": per_member["default"] if len(members) == 1 else per_member,
                   "uniform_noise_rejected": noise_rejection(defense, shape)}
        print("measuring the FGSM / PGD rows against your classifier ...", flush=True)
        figures["attacks"] = attack_rows(defense, twin, ds.test, BUILD_EPS[family], args.attack_examples, args.device)
        return figures

    code = B.publish(out, write, measurements, measure, started)
    for member, figures in per_member.items():  # after the manifest's figures, where the user looks last
        warn_if_costly(member, figures)
    return code


def warn_if_costly(member: str, f: dict, budget: float = 0.04) -> None:
    """Say so when the defense costs more clean accuracy than ``budget`` (a reformer that did not learn the
    data, or thresholds too tight), with what to try."""
    cost = f["classifier_test_accuracy"] - f["defense_clean_test_accuracy"]
    if cost > budget:
        why = ("the reformer loses accuracy (reformer only "
               f"{f['reformer_only_test_accuracy']:.1%}): train longer (--min-steps, --steps) or on more images"
               if f["classifier_test_accuracy"] - f["reformer_only_test_accuracy"] > budget / 2
               else f"the detectors reject {f['defense_test_rejected']:.1%} of clean test images: lower --fpr")
        print(f"warning: {member}: the defense costs {cost:.1%} of clean accuracy "
              f"({f['classifier_test_accuracy']:.1%} -> {f['defense_clean_test_accuracy']:.1%}); {why}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
