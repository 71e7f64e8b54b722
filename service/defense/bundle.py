"""The bundle: a directory with ``manifest.json`` and the ONNX files it lists.

The manifest is the one schema shared by training (which writes it) and the gateway (which loads it).
Every file is verified against its sha256 before any model is built from it.

A listed path is relative to the bundle directory and may lead outside it: several bundles can share
one classifier file (``models/shared/cifar10-resnet9.onnx``, which ``models/cifar10`` lists by its path
relative to the bundle) instead of each carrying a copy. A bundle
copied without that file still loads if the file sits in the bundle directory under its own name;
``magnet pack`` writes a self-contained copy (every file inside, manifest rewritten).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from service.defense.contract import ClassifierInput
from service.defense.detectors import DetectorSpec, kind_of

# The manifest's schema version. 2: each detector entry holds only its kind's fields (version 1 wrote
# ``p`` and ``temperature`` on every detector, null where unused). ``read_manifest`` reads every
# earlier version (``migrate``); writers write this one.
FORMAT_VERSION = 2
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
    jpeg_quality: int | None = Field(None, ge=1, le=100, description=(
        "the bundle was trained on JPEG images of this quality: every input is encoded as a JPEG at this "
        "quality and decoded before the defense sees it (service.defense.domain); none: inputs as they come"))


class FileEntry(_Strict):
    path: str = Field(description="relative to the bundle directory; may lead outside it (a shared file)")
    sha256: str
    role: Literal["classifier", "autoencoder"]

    @model_validator(mode="after")
    def _relative(self) -> "FileEntry":
        if Path(self.path).is_absolute() or "\\" in self.path:
            raise ValueError(f"file path {self.path!r} must be relative to the bundle directory, with '/'")
        return self


class MemberSpec(_Strict):
    """One defense of the pool: its reformer and its calibrated detectors."""

    name: str
    reformer: str = Field(description="path of the reformer autoencoder's ONNX file in the bundle")
    detectors: list[SerializeAsAny[DetectorSpec]]

    @model_validator(mode="after")
    def _logits_on_the_reformer(self) -> "MemberSpec":
        for d in self.detectors:
            if kind_of(d).needs_logits and d.autoencoder != self.reformer:
                raise ValueError(f"member {self.name}: detector {d.name} ({d.kind}) compares the classifier on x and "
                                 f"on ae(x), so its autoencoder must be the member's reformer ({self.reformer}), "
                                 f"not {d.autoencoder}")
        return self


class ClassifierSpec(_Strict):
    file: str
    output: Literal["logits", "probabilities"] = "logits"
    classes: list[str]
    input: ClassifierInput = Field(default_factory=ClassifierInput,
                                   description="how the classifier takes the bundle's images (default: as they are)")
    output_name: str | None = Field(None, description="the output tensor to read (default: the first)")


class Manifest(_Strict):
    format_version: Literal[2] = FORMAT_VERSION
    name: str
    dataset: str
    input: InputSpec
    files: list[FileEntry]
    classifier: ClassifierSpec
    members: list[MemberSpec] = Field(min_length=1)
    measurements: dict = Field(default_factory=dict, description="figures measured when the bundle was built")
    provenance: dict = Field(default_factory=dict, description="command, seed, date, git revision")

    @model_validator(mode="after")
    def _channels(self) -> "Manifest":
        self.classifier.input.check_channels(self.input.shape[0])
        return self

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


def fingerprint(manifest: Manifest) -> str:
    """A hash of what decides the bundle's answers: its input, classifier and members (detectors,
    thresholds, temperatures), each file named by its sha256 rather than its path, so a packed or moved
    copy keeps its fingerprint; the measurements and provenance are left out. Evaluation reports record
    it, so a report can be told apart from one measured on an earlier version of the same bundle."""
    digest = {f.path: f.sha256 for f in manifest.files}
    data = manifest.model_dump(mode="json", include={"input", "classifier", "members"})
    data["classifier"]["file"] = digest[data["classifier"]["file"]]
    for member in data["members"]:
        member["reformer"] = digest[member["reformer"]]
        for d in member["detectors"]:
            d["autoencoder"] = digest[d["autoencoder"]]
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def migrate(data: dict) -> dict:
    """A manifest of any earlier ``format_version`` as the current version would write it (in memory;
    ``magnet migrate`` rewrites the file). Raises BundleError for a version this code does not know."""
    version = data.get("format_version")
    if version == FORMAT_VERSION:
        return data
    if version == 1:
        data = json.loads(json.dumps(data))  # a deep copy
        for member in data.get("members", []):
            for d in member.get("detectors", []):
                for unused in ("p", "temperature"):
                    if d.get(unused, 0) is None:
                        del d[unused]
        data["format_version"] = 2
        return data
    raise BundleError(f"manifest format_version {version!r} is not one this gateway reads (1 to {FORMAT_VERSION}); "
                      f"a newer bundle needs a newer magnet, or rebuild the bundle with this one")


def read_manifest(bundle_dir: Path) -> Manifest:
    """The bundle's manifest, migrated in memory from any earlier format version."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"no {MANIFEST} in bundle directory {bundle_dir}")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise BundleError(f"{path} is not a valid bundle manifest: not a JSON object")
        return Manifest.model_validate(migrate(data))
    except (json.JSONDecodeError, ValidationError) as e:
        raise BundleError(f"{path} is not a valid bundle manifest: {e}") from e


def manifest_version(bundle_dir: Path) -> int | None:
    """The format version written in the bundle's manifest file (before any migration)."""
    try:
        return json.loads((Path(bundle_dir) / MANIFEST).read_text()).get("format_version")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def locate(bundle_dir: Path, entry: FileEntry) -> Path:
    """Where ``entry`` is: at its path relative to the bundle, else (for a file listed outside the
    bundle, such as a shared classifier) under its own name inside the bundle directory. Raises
    BundleError naming the file, its sha256 and the ways to fix it."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / entry.path
    if path.is_file():
        return path
    beside = bundle_dir / Path(entry.path).name
    if beside != path and beside.is_file():
        return beside
    if beside == path:
        raise BundleError(f"bundle file {entry.path} is missing from {bundle_dir}")
    raise BundleError(
        f"bundle file {entry.path} ({entry.role}, sha256 {entry.sha256}) is missing: this bundle shares "
        f"it with other bundles and expects it at {path.resolve()}. Copy that file there or into "
        f"{bundle_dir} as {beside.name}, or make a self-contained copy where the file is present: "
        f"magnet pack --bundle <this bundle in the source tree> --out <new directory>")


def verify_files(bundle_dir: Path, manifest: Manifest) -> dict[str, Path]:
    """Raise BundleError unless every listed file exists and matches its sha256; return where each
    listed path was found (manifest path -> file)."""
    found = {}
    for entry in manifest.files:
        path = locate(bundle_dir, entry)
        actual = sha256_of(path)
        if actual != entry.sha256:
            raise BundleError(f"bundle file {entry.path} has sha256 {actual}, the manifest says "
                              f"{entry.sha256}: refusing a modified or corrupted model")
        found[entry.path] = path
    return found


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    path = Path(bundle_dir) / MANIFEST
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path


def pack(bundle_dir: Path, out: Path) -> Path:
    """Copy a bundle into ``out`` (new or empty) with every file it lists inside it, shared files
    included, and the manifest's paths rewritten to those copies: for images, volumes and archives."""
    bundle_dir, out = Path(bundle_dir), Path(out)
    manifest = read_manifest(bundle_dir)
    found = verify_files(bundle_dir, manifest)
    names = {path: Path(path).name for path in found}
    if len(set(names.values())) != len(names):
        raise BundleError(f"cannot pack {bundle_dir}: two listed files share a name ({sorted(found)})")
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"cannot pack into {out}: it exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    for path, source in found.items():
        shutil.copyfile(source, out / names[path])
    data = manifest.model_dump(mode="json")
    for entry in data["files"]:
        entry["path"] = names[entry["path"]]
    data["classifier"]["file"] = names[data["classifier"]["file"]]
    for member in data["members"]:
        member["reformer"] = names[member["reformer"]]
        for d in member["detectors"]:
            d["autoencoder"] = names[d["autoencoder"]]
    packed = Manifest.model_validate(data)
    write_manifest(out, packed)
    verify_files(out, packed)
    return out
