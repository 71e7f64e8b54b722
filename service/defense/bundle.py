"""The bundle: a directory with ``manifest.json`` and the ONNX files it lists.

The manifest is the one schema shared by training (which writes it) and the gateway (which loads it).
Every file is verified against its sha256 before any model is built from it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle is missing, malformed, or a file does not match its recorded sha256."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """What one input image is: C x H x W float32 values in ``range``."""

    shape: tuple[int, int, int] = Field(description="channels, height, width")
    dtype: Literal["float32"] = "float32"
    range: tuple[float, float] = (0.0, 1.0)
    layout: Literal["NCHW"] = "NCHW"


class FileEntry(_Strict):
    path: str
    sha256: str
    role: Literal["classifier", "autoencoder"]


class DetectorSpec(_Strict):
    """One detector. ``reconstruction`` uses ``p``; ``divergence`` uses ``temperature``."""

    name: str
    kind: Literal["reconstruction", "divergence"]
    autoencoder: str = Field(description="path of the autoencoder's ONNX file in the bundle")
    fpr: float = Field(gt=0, lt=1)
    threshold: float
    p: int | None = None
    temperature: float | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> "DetectorSpec":
        if self.kind == "reconstruction" and self.p not in (1, 2):
            raise ValueError(f"detector {self.name}: a reconstruction detector needs p = 1 or 2")
        if self.kind == "divergence" and not (self.temperature and self.temperature > 0):
            raise ValueError(f"detector {self.name}: a divergence detector needs temperature > 0")
        return self


class MemberSpec(_Strict):
    """One defense of the pool: its reformer and its calibrated detectors."""

    name: str
    reformer: str = Field(description="path of the reformer autoencoder's ONNX file in the bundle")
    detectors: list[DetectorSpec]


class ClassifierSpec(_Strict):
    file: str
    output: Literal["logits", "probabilities"] = "logits"
    classes: list[str]


class Manifest(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    name: str
    dataset: str
    input: InputSpec
    files: list[FileEntry]
    classifier: ClassifierSpec
    members: list[MemberSpec] = Field(min_length=1)
    measurements: dict = Field(default_factory=dict, description="figures measured when the bundle was built")
    provenance: dict = Field(default_factory=dict, description="command, seed, date, git revision")

    @model_validator(mode="after")
    def _references(self) -> "Manifest":
        known = {f.path for f in self.files}
        used = {self.classifier.file}
        for m in self.members:
            used.add(m.reformer)
            used.update(d.autoencoder for d in m.detectors)
        missing = used - known
        if missing:
            raise ValueError(f"files used but not listed with a sha256: {sorted(missing)}")
        return self

    def autoencoder_files(self) -> list[str]:
        return [f.path for f in self.files if f.role == "autoencoder"]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"no {MANIFEST} in bundle directory {bundle_dir}")
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as e:
        raise BundleError(f"{path} is not a valid bundle manifest: {e}") from e


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Raise BundleError unless every listed file exists and matches its sha256."""
    for entry in manifest.files:
        path = Path(bundle_dir) / entry.path
        if not path.is_file():
            raise BundleError(f"bundle file {entry.path} is missing from {bundle_dir}")
        actual = sha256_of(path)
        if actual != entry.sha256:
            raise BundleError(f"bundle file {entry.path} has sha256 {actual}, the manifest says "
                              f"{entry.sha256}: refusing a modified or corrupted model")


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / MANIFEST
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path
