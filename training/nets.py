"""The paper's networks: Carlini's MNIST classifier and MagNet's sigmoid autoencoders.

All models take N x C x H x W float32 in [0, 1]; classifiers return logits.
"""

from __future__ import annotations

import torch
from torch import nn


class MnistClassifier(nn.Module):
    """Carlini & Wagner's MNIST net: Conv32 Conv32 Pool Conv64 Conv64 Pool FC200 Drop FC200 FC10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 200), nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SigmoidAutoencoder(nn.Module):
    """A stack of 3x3 'same' convolutions with sigmoid activations, optionally with pooling.

    ``spec`` lists the layers: an int is a Conv.Sigmoid with that many filters, ``"pool"`` an average
    pool of 2, ``"up"`` a nearest-neighbour upsample of 2. The last entry must be the channel count of
    the input, so the output has the input's shape and lies in (0, 1).
    """

    def __init__(self, in_channels: int, spec: list) -> None:
        super().__init__()
        self.spec = list(spec)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in spec:
            if item == "pool":
                layers.append(nn.AvgPool2d(2))
            elif item == "up":
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            else:
                layers.append(nn.Sequential(nn.Conv2d(channels, int(item), 3, padding=1), nn.Sigmoid()))
                channels = int(item)
        if channels != in_channels:
            raise ValueError(f"the last conv must have {in_channels} filters, has {channels}")
        self.layers = nn.ModuleList(layers)

    def forward_with_activity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and the sum of squared conv activations (for L2 activity regularization)."""
        activity = x.new_zeros(())
        for layer in self.layers:
            x = layer(x)
            if isinstance(layer, nn.Sequential):
                activity = activity + x.float().pow(2).sum()
        return x, activity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# MagNet, Table 1 (MNIST): detector I / reformer and detector II.
AE_SPECS = {
    "mnist_ae_i": (1, [3, "pool", 3, 3, "up", 3, 1]),
    "mnist_ae_ii": (1, [3, 3, 1]),
}

CLASSIFIERS = {"mnist": MnistClassifier}


def make_autoencoder(kind: str) -> SigmoidAutoencoder:
    in_channels, spec = AE_SPECS[kind]
    return SigmoidAutoencoder(in_channels, spec)


def make_classifier(dataset: str) -> nn.Module:
    return CLASSIFIERS[dataset]()
