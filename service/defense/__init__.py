"""MagNet's defense core: numpy + onnxruntime (+ pydantic for the manifest). Shared by the gateway and
by offline evaluation, so published numbers are the numbers the gateway serves."""

from service.defense.bundle import BundleError, Manifest, read_manifest, verify_files
from service.defense.core import Defense, Screening, Verdict

__all__ = ["BundleError", "Defense", "Manifest", "Screening", "Verdict", "read_manifest", "verify_files"]
