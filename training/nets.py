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


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """The DAWNBench ResNet-9 (Page, 2018) of width ``w``, with the input normalization inside the
    model so that callers (and the ONNX graph) take plain [0, 1] pixels."""

    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))
        self.features = nn.Sequential(
            _conv_bn(3, w),
            _conv_bn(w, 2 * w, pool=True), _Residual(2 * w),
            _conv_bn(2 * w, 4 * w, pool=True),
            _conv_bn(4 * w, 8 * w, pool=True), _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(8 * w, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the 1/8 scale keeps early logits small, as in the original recipe
        return self.head(self.features((x - self.mean) / self.std)) * 0.125


# MagNet, Table 1: MNIST detector I / reformer and detector II; the CIFAR-10 autoencoder.
AE_SPECS = {
    "mnist_ae_i": (1, [3, "pool", 3, 3, "up", 3, 1]),
    "mnist_ae_ii": (1, [3, 3, 1]),
    "cifar_ae": (3, [3, 3, 3]),
}

CLASSIFIERS = {"mnist": MnistClassifier, "cifar10": ResNet9}


def make_autoencoder(kind: str) -> SigmoidAutoencoder:
    in_channels, spec = AE_SPECS[kind]
    return SigmoidAutoencoder(in_channels, spec)


def make_classifier(dataset: str, **kwargs) -> nn.Module:
    return CLASSIFIERS[dataset](**kwargs)


class GuidedReformer(nn.Module):
    """A small residual U-Net: ``clamp(x + Δ(x), 0, 1)``, for a reformer trained through the classifier.

    Two 3x3 convs at full resolution (``width`` channels), a stride-2 stage at ``2 width``
    (and, with ``depth=2``, a second at ``4 width``), transposed convs back up with skip concatenations,
    and a 3x3 conv to the input's channels. The output is a residual on the input, so the net starts near
    the identity and its capacity goes into what it changes.
    """

    def __init__(self, channels: int = 3, width: int = 32, depth: int = 1) -> None:
        super().__init__()
        self.width, self.depth = width, depth
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.enc = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), relu(),
                                 nn.Conv2d(width, width, 3, padding=1), relu())
        downs, ups, decs = [], [], []
        c = width
        for _ in range(depth):
            downs.append(nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), relu(),
                                       nn.Conv2d(2 * c, 2 * c, 3, padding=1), relu()))
            ups.append(nn.ConvTranspose2d(2 * c, c, 2, stride=2))
            decs.append(nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), relu()))
            c *= 2
        self.downs, self.ups, self.decs = nn.ModuleList(downs), nn.ModuleList(ups), nn.ModuleList(decs)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # start as the identity
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.enc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up, dec in zip(reversed(self.ups), reversed(self.decs)):
            h = dec(torch.cat([skips.pop(), up(h)], 1))
        return (x + self.out(h)).clamp(0.0, 1.0)


class MagnetAE32(nn.Module):
    """The MagNet authors' later CIFAR-10 autoencoder (Trevillie/MagNet#2 and #7): 3x3x32 conv, BN, ReLU,
    3x3x32 conv, BN, ReLU, 3x3x3 conv, sigmoid. (Their post puts the second BN after the ReLU; here
    both come before it, so the exporter folds them into the convolutions.) ``bottleneck`` adds an
    average pool after the first block and an upsample before the last conv (a lossier variant)."""

    def __init__(self, channels: int = 3, width: int = 32, bottleneck: bool = False) -> None:
        super().__init__()
        block = lambda a, b: nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b),  # noqa: E731
                                           nn.ReLU(inplace=True))
        layers = [block(channels, width), *([nn.AvgPool2d(2)] if bottleneck else []), block(width, width),
                  *([nn.Upsample(scale_factor=2, mode="nearest")] if bottleneck else []),
                  nn.Sequential(nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid())]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def forward_with_activity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the denoising loop: no activity regularization (BN keeps the activations in scale)."""
        return self(x), x.new_zeros(())
