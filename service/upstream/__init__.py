"""Upstream adapters behind one interface (``Upstream``), and the factory that picks one from settings."""

from __future__ import annotations

import logging
from concurrent.futures import Executor

from service.access import ConfigError
from service.defense.contract import ClassifierInput
from service.defense.core import Defense
from service.settings import Settings
from service.upstream.base import Upstream
from service.upstream.embedded import EmbeddedUpstream
from service.upstream.oip import OipUpstream
from service.upstream.tfserving import TfServingUpstream

__all__ = ["EmbeddedUpstream", "OipUpstream", "TfServingUpstream", "Upstream", "make_upstream", "upstream_contract"]

log = logging.getLogger("magnet")


# manifest field -> the setting that overrides it for an upstream model server
OVERRIDES = {"input name": "upstream_input", "layout": "upstream_layout", "scale": "upstream_scale",
             "mean": "upstream_mean", "std": "upstream_std", "outputs": "upstream_outputs",
             "output name": "upstream_output"}


def upstream_contract(settings: Settings, defense: Defense) -> tuple[dict, dict]:
    """The classifier contract an upstream gets: the manifest's, each field overridden by its
    ``MAGNET_UPSTREAM_*`` setting when set. Returns (values, where each value came from)."""
    spec = defense.manifest.classifier
    manifest = {"input name": spec.input.name or "input", "layout": spec.input.layout, "scale": spec.input.scale,
                "mean": spec.input.mean, "std": spec.input.std, "outputs": spec.output,
                "output name": spec.output_name}
    values, sources = {}, {}
    for field, setting in OVERRIDES.items():
        given = getattr(settings, setting)
        values[field] = manifest[field] if given is None else given
        sources[field] = "manifest" if given is None else f"MAGNET_{setting.upper()}"
    return values, sources


def make_upstream(settings: Settings, defense: Defense, executor: Executor) -> Upstream:
    """The upstream the settings name: none given -> the bundle's classifier in-process (with the
    manifest's contract; the upstream settings do not apply to it)."""
    if settings.upstream is None:
        return EmbeddedUpstream(defense.classifier, executor, defense.manifest.classifier.output)
    model = settings.upstream_model or defense.manifest.name
    values, sources = upstream_contract(settings, defense)
    log.info("upstream classifier contract: %s", ", ".join(f"{k} {values[k]!r} ({sources[k]})" for k in OVERRIDES))
    contract = ClassifierInput(layout=values["layout"], scale=values["scale"], mean=values["mean"], std=values["std"])
    contract.check_channels(defense.input_shape[0])
    common = dict(output_name=values["output name"], outputs=values["outputs"],
                  timeout_s=settings.upstream_timeout_s, max_connections=settings.upstream_max_connections,
                  contract=contract, max_response_bytes=settings.upstream_max_response_bytes,
                  max_batch=settings.upstream_max_batch, datatype=settings.upstream_datatype)
    if settings.upstream_datatype == "UINT8" and not contract.gives_8bit_pixels:
        raise ConfigError("MAGNET_UPSTREAM_DATATYPE=UINT8 takes 8-bit pixels: set MAGNET_UPSTREAM_SCALE=255 and no "
                          f"MAGNET_UPSTREAM_MEAN / _STD (the contract now: scale {contract.scale:g}, mean "
                          f"{contract.mean}, std {contract.std})")
    if settings.upstream_protocol in ("tfserving", "v1"):
        return TfServingUpstream(settings.upstream, model, server="KServe v1" if settings.upstream_protocol == "v1"
                                 else "TF Serving", **common)
    return OipUpstream(settings.upstream, model, input_name=values["input name"], binary=settings.upstream_binary,
                       **common)
