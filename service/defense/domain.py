"""The input domain a bundle was trained in: a JPEG round trip for bundles trained on JPEG images.

A bundle whose autoencoders and classifier were trained on JPEG-compressed images (the CIFAR-10 data
this project ships is a quality-75 re-encoding) has learned that domain: its reformer removes the
fine detail that JPEG removes, so an uncompressed image (the original CIFAR-10 PNGs, a camera's
output) reconstructs with a larger error than any validation image and its detectors reject it
(`models/cifar10-jpeg-inputs`, judging them as they are: 7 of the 20 original CIFAR-10 test images that
Foolbox ships, against 0 of their JPEG copies). ``input.jpeg_quality`` in the manifest names the
quality; every input is then encoded as a JPEG at that quality by Pillow (its defaults: standard
tables, 4:2:0 chroma for colour, the way the data set was written) and decoded before the defense
sees it. An original CIFAR-10 image comes out
within 0.56/255 (mean absolute difference) of the data set's JPEG copy of it, against 6.2/255 for
the original itself, and a copy moves by 0.08/255 (``python -m bench.jpeg_step``,
docs/results/jpeg-step.json).

Pixels are rounded to 8 bits first, as any image file would hold them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_round_trip(x: np.ndarray, quality: int, subsampling: str | None = None) -> np.ndarray:
    """``x`` (N x C x H x W float32 in [0, 1], C = 1 or 3) encoded as JPEG at ``quality`` and decoded,
    as float32 in [0, 1] of the same shape (0.19 ms per 32 x 32 colour image on one core of the
    development machine: docs/results/jpeg-step.json). ``subsampling``: Pillow's chroma subsampling,
    "4:4:4", "4:2:2" or "4:2:0"; None (the input step) keeps Pillow's default, 4:2:0 for colour."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"a JPEG round trip takes N x 1|3 x H x W images, not {list(x.shape)}")
    pixels = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    pixels = pixels[:, 0] if x.shape[1] == 1 else pixels.transpose(0, 2, 3, 1)
    out = np.empty_like(pixels)
    buf = io.BytesIO()
    options = {"quality": quality} if subsampling is None else {"quality": quality, "subsampling": subsampling}
    for i, image in enumerate(pixels):
        buf.seek(0)
        buf.truncate()
        Image.fromarray(np.ascontiguousarray(image)).save(buf, "JPEG", **options)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded)
    out = out[:, None] if x.shape[1] == 1 else out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out, dtype=np.float32) / np.float32(255.0)


def jpeg_quality_of(qtables: dict[int, list[int]]) -> int | None:
    """The Pillow/libjpeg quality (1-100) whose standard tables equal ``qtables`` (a decoded JPEG's
    ``.quantization``), or None when none does (a non-standard encoder)."""
    probe = Image.new("RGB" if len(qtables) > 1 else "L", (8, 8))
    for quality in range(100, 0, -1):
        buf = io.BytesIO()
        probe.save(buf, "JPEG", quality=quality)
        with Image.open(buf) as im:
            if {k: list(v) for k, v in im.quantization.items()} == {k: list(v) for k, v in qtables.items()}:
                return quality
    return None
