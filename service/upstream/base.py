"""The one interface every upstream adapter implements."""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np


class Upstream(Protocol):
    """A classifier behind the defense: N x C x H x W float32 in, N x K scores out."""

    #: what ``infer`` returns: raw logits or softmax probabilities
    outputs: Literal["logits", "probabilities"]
    #: whether the classifier runs elsewhere (a model server), so that the gateway's own work can overlap
    #: the call (``MAGNET_SPECULATE``); an adapter without it counts as not remote
    remote: bool

    def describe(self) -> str:
        """One line for logs and the readiness answer."""
        ...

    async def start(self) -> None:
        """Open connections / sessions; called once before the first request."""
        ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """Whether the classifier can take requests now."""
        ...

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """Classify one batch (in one call, or, for the HTTP adapters, in several at once past the model
        server's batch limit: ``MAGNET_UPSTREAM_MAX_BATCH``); returns N x K float32.

        Raises UpstreamError / UpstreamUnavailable / UpstreamTimeout from ``service.errors``.
        """
        ...
