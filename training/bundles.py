"""Shared steps of every bundle recipe: stage reuse, export with parity, calibration, the manifest."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.defense.contract import ClassifierInput
from service.defense.core import Classifier
from service.defense.detectors import DetectorSpec, kind_of
from service.defense.domain import jpeg_round_trip
from service.defense.bundle import FileEntry, Manifest, sha256_of, write_manifest
from service.defense.runtime import CPU, OnnxModel
from training.export import export_onnx, parity
from training.loops import settings_changed

if TYPE_CHECKING:
    from service.defense.core import Defense

CLASSIFIER_FILE = "classifier.onnx"


def reuse_changes(old: dict | None, new: dict | None, keys: tuple[str, ...]) -> list[str]:
    """``key.field old -> new`` for each training setting under ``keys`` that differs between the stored
    configuration ``old`` and this run's ``new`` (``training.loops.settings_changed``)."""
    if not old or not new:
        return []
    out = []
    for key in keys:
        if key not in old:  # recorded since
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_changed(a, b, prefix=f"{key}.")
        elif a != b:
            out.append(f"{key} {a!r} -> {b!r}")
    return out


def stage(work: Path, name: str, models: list[nn.Module], fresh: bool, train_fn: Callable,
          config: dict | None = None, keys: tuple[str, ...] = ()) -> dict:
    """Train ``models`` unless ``work/name.pt`` holds their weights, then load them from that file, so a
    fresh run exports exactly what a later reuse would. The history file keeps the configuration of the
    run that trained the stage (``config.json`` holds the latest run's, which may only have reused it).
    Weights trained under other settings in ``config[k]`` for ``k`` in ``keys`` are not reused: refused
    with what changed (``--fresh`` retrains)."""
    weights, hist_path = work / f"{name}.pt", work / f"{name}.history.json"
    if not fresh and weights.exists() and hist_path.exists():
        changed = reuse_changes(json.loads(hist_path.read_text()).get("config"), config, keys)
        if changed:
            raise SystemExit(f"{weights} was trained with other settings ({'; '.join(changed)}): give --fresh to "
                             "retrain, or another --work-dir (or the same settings to reuse it)")
    if fresh or not (weights.exists() and hist_path.exists()):
        hist = train_fn(models)
        torch.save([_compact(m.state_dict(), _is_large(m)) for m in models], weights)
        hist_path.write_text(json.dumps({"best_epoch": hist.best_epoch, "seconds": hist.seconds,
                                         "config": config, "epochs": hist.epochs}, indent=1))
    else:
        print(f"{name}: reusing {weights}", flush=True)
    for model, state in zip(models, torch.load(weights, map_location="cpu")):
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        model.eval()
    return json.loads(hist_path.read_text())


def _is_large(model: nn.Module) -> bool:
    return sum(p.numel() for p in model.parameters()) > 1_000_000


def _compact(state: dict, half: bool) -> dict:
    """Half precision halves a large model's file (a ResNet9 is 26 MB in fp32); the models are
    exported in fp32 from the reloaded half weights, and the bundle's figures are measured on those."""
    return {k: v.half() if half and v.is_floating_point() else v for k, v in state.items()}


def fresh_dir(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def export_all(models: dict[str, nn.Module], out: Path, shape: tuple[int, int, int],
               x_check: np.ndarray) -> dict[str, float]:
    """Export each model to ``out/<file>``; returns torch-vs-onnxruntime max |diff| per file."""
    diffs = {}
    for fname, model in models.items():
        export_onnx(model, out / fname, shape, "logits" if fname == CLASSIFIER_FILE else "output")
        diffs[fname] = parity(model, out / fname, x_check)
        print(f"exported {fname}: torch vs onnxruntime max |diff| {diffs[fname]:.2e}", flush=True)
    return diffs


def run_batched(model: OnnxModel, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    return np.concatenate([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def calibrate(out: Path, detectors: list[dict], x_val: np.ndarray, classifier: Path | None = None,
              contract: ClassifierInput | None = None, output: str = "logits",
              output_name: str | None = None, jpeg_quality: int | None = None) -> list[dict]:
    """Fill in each detector's threshold from clean validation images, scored exactly as the core
    scores them (the bundle's input domain step, ``jpeg_quality``, then the ONNX files, then the
    detector registry). ``classifier`` defaults to the bundle's own
    ``classifier.onnx``; a shared classifier lives elsewhere. ``contract``, ``output`` and ``output_name``:
    how the classifier takes the bundle's images and what it returns (the manifest's ``classifier``)."""
    classifier = Path(classifier) if classifier else out / CLASSIFIER_FILE
    contract = contract or ClassifierInput()
    if jpeg_quality is not None:
        x_val = jpeg_round_trip(x_val, jpeg_quality)
    cache: dict[tuple[str, str], np.ndarray] = {}  # (model file, input) -> output, computed once

    def run(path: Path, x: np.ndarray, key: str) -> np.ndarray:
        if (str(path), key) not in cache:
            model = (Classifier(OnnxModel(path, [CPU], input_name=contract.name, output_name=output_name),
                                contract, output).logits if path == classifier else OnnxModel(path, [CPU]))
            cache[str(path), key] = run_batched(model, x)
        return cache[str(path), key]

    calibrated = []
    for d in detectors:
        spec = DetectorSpec.model_validate({**d, "threshold": 0.0})
        kind = kind_of(spec)
        rec = run(out / d["autoencoder"], x_val, "x")
        if kind.needs_logits:
            logits_x = run(classifier, x_val, "x")
            rec_c = np.clip(rec, 0, 1)
            scores = kind.score(spec, x_val, rec_c, logits_x, run(classifier, rec_c, d["autoencoder"]))
        else:
            scores = kind.score(spec, x_val, rec)
        calibrated.append({**d, "threshold": kind.infer_threshold(scores, d["fpr"])})
    return calibrated


def write_bundle(out: Path, name: str, dataset: str, shape: tuple[int, int, int], classes: list[str],
                 members: list[dict], measurements: dict, provenance: dict,
                 classifier: Path | None = None, classifier_fields: dict | None = None,
                 jpeg_quality: int | None = None) -> Manifest:
    """Write ``manifest.json`` listing every ONNX file in ``out`` with its sha256. ``classifier``: a
    classifier file shared with other bundles (listed by its path relative to ``out``) instead of
    ``out/classifier.onnx``. ``classifier_fields``: the classifier's input contract, output kind and
    output name (``input``, ``output``, ``output_name``) when they are not the defaults. ``jpeg_quality``:
    the training images were JPEGs of this quality (``Dataset.jpeg_quality``): the core puts every input
    through a JPEG round trip at it (``service.defense.domain``)."""
    classifier = Path(classifier) if classifier else out / CLASSIFIER_FILE
    clf_path = os.path.relpath(classifier, out).replace(os.sep, "/")
    files = [FileEntry(path=clf_path, sha256=sha256_of(classifier), role="classifier")]
    files += [FileEntry(path=p.name, sha256=sha256_of(p), role="autoencoder") for p in sorted(out.glob("*.onnx"))
              if p.name != clf_path]
    manifest = Manifest(name=name, dataset=dataset, input={"shape": shape, "jpeg_quality": jpeg_quality}, files=files,
                        classifier={"file": clf_path, "output": "logits", "classes": classes,
                                    **(classifier_fields or {})},
                        members=members, measurements=measurements, provenance=provenance)
    write_manifest(out, manifest)
    return manifest


def shared_classifier(model: nn.Module, path: Path, shape: tuple[int, int, int], x_check: np.ndarray) -> float:
    """Export ``model`` to the shared file ``path``, or, if that file exists, check that it computes what
    ``model`` computes (the bundles sharing it must all describe this model). Returns the parity."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(model, path, shape, "logits")
    diff = parity(model, path, x_check)
    if diff > 1e-4:
        raise SystemExit(f"{path} holds another classifier (max |diff| {diff:.2e} from the trained one): "
                         "pass a new --shared-classifier path")
    return diff


def quality_arg(text: str) -> int | str | None:
    """``--jpeg-quality``: ``auto``, ``none`` (None) or a quality 1-100."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError("a JPEG quality is 1 to 100")
    return value


def add_jpeg_quality(p: argparse.ArgumentParser, default: str = "none", also: str = "") -> None:
    """The recipes' ``--jpeg-quality``: the bundle's JPEG input step (``service.defense.domain``)."""
    p.add_argument("--jpeg-quality", type=quality_arg, default=default,
                   help=f"the bundle's JPEG input step{also}: none (default {default}), auto (the quality every "
                        "training image was saved at, none when they are not all JPEGs of one) or a quality 1-100")


def jpeg_quality(choice: int | str | None, ds) -> int | None:
    """``--jpeg-quality`` resolved against the data set (``Dataset.jpeg_quality`` for ``auto``)."""
    return ds.jpeg_quality if choice == "auto" else choice


def base_parser(prog: str, doc: str, dataset: str) -> argparse.ArgumentParser:
    """Flags every recipe shares."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help=f"directory holding the {dataset} data (see training/data.py and training/images.py)")
    p.add_argument("--out", type=Path, default=Path(f"models/{dataset}"), help="bundle directory to write")
    p.add_argument("--work-dir", type=Path, default=Path(f"runs/{dataset}"),
                   help="where weights, per-epoch histories and the resolved config are saved")
    p.add_argument("--fresh", action="store_true", help="retrain every stage even if its weights exist")
    p.add_argument("--seed", type=int, default=0, help="seed for every random number in the run")
    p.add_argument("--device", default="cpu", help="torch device for training: cpu or cuda")
    p.add_argument("--train-only", action="store_true",
                   help="stop after training (e.g. on a GPU machine); a later run without it reuses the "
                        "weights and writes the bundle")
    p.add_argument("--train-limit", type=int, default=0,
                   help="use only the first N training images (0: all); for smoke runs")
    return p


def save_config(work: Path, args: argparse.Namespace, **configs) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    config = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              **{k: asdict(v) if is_dataclass(v) else v for k, v in configs.items()}}
    (work / "config.json").write_text(json.dumps(config, indent=2))
    return config


def publish(out: Path, write: Callable[[dict], Manifest], measurements: dict,
            measure: Callable[[Defense], dict], started: float) -> int:
    """Write the manifest, measure the bundle through the core (which needs the manifest), write again."""
    from service.defense.core import Defense

    write(measurements)
    measurements.update(measure(Defense(out, device="cpu")))
    measurements["build_wall_seconds"] = time.perf_counter() - started
    write(measurements)
    print(json.dumps(measurements, indent=2))
    return 0
