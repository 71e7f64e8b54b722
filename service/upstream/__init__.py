"""Upstream adapters behind one interface (``Upstream``), and the factory that picks one from settings."""

from __future__ import annotations

from concurrent.futures import Executor

from service.defense.core import Defense
from service.settings import Settings
from service.upstream.base import Upstream
from service.upstream.embedded import EmbeddedUpstream
from service.upstream.oip import OipUpstream
from service.upstream.tfserving import TfServingUpstream

__all__ = ["EmbeddedUpstream", "OipUpstream", "TfServingUpstream", "Upstream", "make_upstream"]


def make_upstream(settings: Settings, defense: Defense, executor: Executor) -> Upstream:
    """The upstream the settings name: none given -> the bundle's classifier in-process."""
    if settings.upstream is None:
        return EmbeddedUpstream(defense.classifier, executor, defense.manifest.classifier.output)
    model = settings.upstream_model or defense.manifest.name
    common = dict(output_name=settings.upstream_output, outputs=settings.upstream_outputs,
                  timeout_s=settings.upstream_timeout_s, max_connections=settings.upstream_max_connections,
                  layout=settings.upstream_layout)
    if settings.upstream_protocol == "tfserving":
        return TfServingUpstream(settings.upstream, model, **common)
    return OipUpstream(settings.upstream, model, input_name=settings.upstream_input, **common)
