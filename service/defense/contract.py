"""The classifier's input contract: how the bundle's images (N x C x H x W float32 in [0, 1], what the
autoencoders see) become what the classifier takes.

``prepare`` multiplies by ``scale`` (255 for classifiers trained on 0..255 pixels), subtracts ``mean``
and divides by ``std`` per channel (when given, in the scaled units), and transposes to ``layout``.
The manifest records the contract (``classifier.input``); the defaults are the identity, so bundles
written before it existed keep working. The gateway applies it to the embedded classifier and to every
upstream protocol; ``MAGNET_UPSTREAM_*`` settings override the manifest for an upstream.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Layout = Literal["NCHW", "NHWC"]


class ClassifierInput(BaseModel):
    """What the classifier takes (defaults: the bundle's images as they are)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, description="input tensor name (default: the model's first input)")
    layout: Layout = Field("NCHW", description="NCHW or NHWC (any case)")
    scale: float = Field(1.0, gt=0, description="pixels in [0, 1] are multiplied by this (255: 0..255 pixels)")
    mean: tuple[float, ...] | None = Field(None, description="subtracted per channel after scaling")
    std: tuple[float, ...] | None = Field(None, description="divided per channel after the mean")

    @field_validator("layout", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _stats(self) -> "ClassifierInput":
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"classifier input std must be positive, got {list(self.std)}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"classifier input mean and std differ in length ({len(self.mean)}, {len(self.std)})")
        return self

    @property
    def is_identity(self) -> bool:
        return self.layout == "NCHW" and self.scale == 1.0 and self.mean is None and self.std is None

    @property
    def gives_8bit_pixels(self) -> bool:
        """Whether the contract turns [0, 1] pixels into 0..255 values, as a UINT8 input needs."""
        return self.scale == 255 and self.mean is None and self.std is None

    def check_channels(self, channels: int) -> None:
        for what, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, channels):
                raise ValueError(f"classifier input {what} has {len(values)} values for {channels} channel(s)")


def normalize(x: np.ndarray, contract: ClassifierInput) -> np.ndarray:
    """Scale, mean and std of ``contract`` applied to an N x C x H x W batch (layout unchanged)."""
    if contract.scale == 1.0 and contract.mean is None and contract.std is None:
        return x
    out = x.astype(np.float32) * np.float32(contract.scale)
    if contract.mean is not None:
        out -= np.asarray(contract.mean, np.float32).reshape(1, -1, 1, 1)
    if contract.std is not None:
        out /= np.asarray(contract.std, np.float32).reshape(1, -1, 1, 1)
    return out


def to_layout(x: np.ndarray, layout: Layout) -> np.ndarray:
    """An N x C x H x W batch in ``layout``, C-contiguous float32."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1) if layout == "NHWC" else x, np.float32)


def prepare(x: np.ndarray, contract: ClassifierInput) -> np.ndarray:
    """The batch as the classifier takes it."""
    return to_layout(normalize(x, contract), contract.layout)
