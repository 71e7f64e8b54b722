"""Images that JPEG would have compressed to a given JPEG: a stand-in for the uncompressed originals of a
JPEG data set.

The CIFAR-10 data this project trains on is a quality-75 JPEG re-encoding; users send uncompressed
images too, which hold detail that JPEG quantized away, and a reformer trained on JPEG images treats that
detail like a perturbation (``python -m training.evaluate.domain_shift``). The originals are not at hand,
but every JPEG says which images it could have come from: those whose 8 x 8 block DCT coefficients (of Y,
and of the 2 x 2-subsampled Cb and Cr for 4:2:0 colour) fall in the same quantization bins. A
*pre-image* here moves each coefficient of the decoded JPEG by ``spread`` times a uniform draw across its
bin (``spread`` = 1: anywhere in the bin; 0: the JPEG itself), then rounds to 8-bit pixels.

Uniform draws are harsher than natural detail (natural coefficients crowd the middle of the bins): at the
same mean pixel distance from the JPEG as the 20 real CIFAR-10 originals (6.2/255, about ``spread``
0.4), they move the divergence detector's score of ``models/cifar10`` more than the originals do. So they
serve to train against the domain and to compare reformers, not to measure a false-positive rate.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image


def _dct_matrix(n: int = 8) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``M @ v`` is the DCT of ``v``, ``M.T @ c`` its inverse (JPEG's
    8 x 8 transform is ``M @ block @ M.T``)."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


_M = _dct_matrix()


@lru_cache(maxsize=None)
def quantization_tables(quality: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's (libjpeg's standard) luminance and chrominance tables at ``quality``, 8 x 8, natural order."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        q = im.quantization
    return np.array(q[0], np.float64).reshape(8, 8), np.array(q[1], np.float64).reshape(8, 8)


def _blocks(a: np.ndarray) -> np.ndarray:  # N x H x W -> N x H/8 x W/8 x 8 x 8
    n, h, w = a.shape
    return a.reshape(n, h // 8, 8, w // 8, 8).transpose(0, 1, 3, 2, 4)


def _unblocks(b: np.ndarray) -> np.ndarray:
    n, bh, bw, _, _ = b.shape
    return b.transpose(0, 1, 3, 2, 4).reshape(n, bh * 8, bw * 8)


def _move(plane: np.ndarray, table: np.ndarray, spread: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each 8 x 8 DCT coefficient of ``plane`` (N x H x W, level-shifted, padded to blocks) moved to its
    bin's centre plus ``spread`` (per image) times a uniform draw across the bin."""
    n, h, w = plane.shape
    ph, pw = (-h) % 8, (-w) % 8
    padded = np.pad(plane, ((0, 0), (0, ph), (0, pw)), mode="edge")
    c = _M @ _blocks(padded) @ _M.T
    k = np.rint(c / table)
    c = (k + spread.reshape(-1, 1, 1, 1, 1) * rng.uniform(-0.5, 0.5, size=c.shape)) * table
    return _unblocks(_M.T @ c @ _M)[:, :h, :w]


def jpeg_preimage(x: np.ndarray, quality: int, spread: float | np.ndarray, rng: np.random.Generator,
                  chroma_spread: float | np.ndarray | None = None) -> np.ndarray:
    """A random pre-image of each decoded JPEG in ``x`` (N x C x H x W float in [0, 1], C = 1 or 3, H and W
    even for colour), as float32 in [0, 1]; ``spread``: one value or one per image, in [0, 1], for the
    luma (or the one grey plane); ``chroma_spread`` likewise for Cb and Cr (default: ``spread``)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"jpeg_preimage takes N x 1|3 x H x W images, not {list(x.shape)}")
    spread = np.broadcast_to(np.asarray(spread, np.float64), (len(x),))
    chroma_spread = spread if chroma_spread is None else np.broadcast_to(np.asarray(chroma_spread, np.float64), (len(x),))
    if ((spread < 0) | (spread > 1) | (chroma_spread < 0) | (chroma_spread > 1)).any():
        raise ValueError("spread must lie in [0, 1]")
    luma, chroma = quantization_tables(quality)
    v = x.astype(np.float64) * 255.0
    if x.shape[1] == 1:
        out = _move(v[:, 0] - 128, luma, spread, rng)[:, None] + 128
        return (np.clip(np.rint(out), 0, 255) / 255).astype(np.float32)
    if x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError("colour images need an even height and width (4:2:0 chroma)")
    r, g, b = v[:, 0], v[:, 1], v[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b  # JFIF YCbCr
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    y = _move(y - 128, luma, spread, rng) + 128
    moved = []
    for ch in (cb, cr):  # the 2 x 2 means are what the encoder quantizes; the detail within stays
        n, h, w = ch.shape
        sub = ch.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
        delta = _move(sub - 128, chroma, chroma_spread, rng) + 128 - sub
        moved.append(ch + np.repeat(np.repeat(delta, 2, axis=1), 2, axis=2))
    cb, cr = moved
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], axis=1)
    return (np.clip(np.rint(rgb), 0, 255) / 255).astype(np.float32)


_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_RGB = np.linalg.inv(_YCC)


def _block_mean2(a: np.ndarray) -> np.ndarray:  # N x H x W -> N x H/2 x W/2
    n, h, w = a.shape
    return a.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def _up2(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(a, 2, axis=1), 2, axis=2)


def _box3(a: np.ndarray) -> np.ndarray:
    """Mean over each 3 x 3 window (edges padded by replication)."""
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = a.shape[1:]
    return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def chroma_detail(x: np.ndarray, strength: float | np.ndarray, rng: np.random.Generator,
                  noise: float | np.ndarray = 0.0) -> np.ndarray:
    """Full-resolution colour detail for decoded 4:2:0 JPEGs ``x`` (N x 3 x H x W float in [0, 1], H and W
    even), as float32 in [0, 1].

    A 4:2:0 JPEG keeps only the 2 x 2 means of Cb and Cr, so its decoded colour is smooth at the pixel
    scale, and every image whose colour differs from it by a pattern with zero 2 x 2 means encodes to the
    same chroma. Photographs hold such detail where colour edges follow brightness edges; ``pre_image``s
    (``jpeg_preimage``) never add it. Here each chroma plane gets ``g * alpha * hp``: ``hp`` the luma's
    detail within each 2 x 2 block (zero block means), ``alpha`` the local slope of that chroma plane on
    the luma, fitted over 3 x 3 windows of the 2 x 2 means (colour-from-luma, as in guided upsampling),
    ``g`` ~ U(0, ``strength``) per image; plus, with ``noise`` > 0, Gaussian detail of std
    U(0, ``noise``) (in 0-255 units) with its 2 x 2 means removed. Both keep every 2 x 2 chroma mean, so
    the result is (up to rounding and clipping) another image that the same JPEG could have come from."""
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"chroma_detail takes N x 3 x H x W images with H and W even, not {list(x.shape)}")
    n = len(x)
    g = rng.uniform(0.0, 1.0, n) * np.broadcast_to(np.asarray(strength, np.float64), (n,))
    sd = rng.uniform(0.0, 1.0, n) * np.broadcast_to(np.asarray(noise, np.float64), (n,))
    ycc = np.einsum("ij,njhw->nihw", _YCC, x.astype(np.float64) * 255.0)
    y = ycc[:, 0]
    ys = _block_mean2(y)
    hp = y - _up2(ys)
    my, vy = _box3(ys), _box3(ys * ys) - _box3(ys) ** 2
    for c in (1, 2):
        cs = _block_mean2(ycc[:, c])
        alpha = np.clip((_box3(cs * ys) - _box3(cs) * my) / (vy + 4.0), -1.5, 1.5)
        detail = g[:, None, None] * _up2(alpha) * hp
        if sd.any():
            z = rng.standard_normal(hp.shape) * sd[:, None, None]
            detail = detail + z - _up2(_block_mean2(z))
        ycc[:, c] += detail
    rgb = np.einsum("ij,njhw->nihw", _RGB, ycc)
    return (np.clip(np.rint(rgb), 0, 255) / 255).astype(np.float32)


def detail_components(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """How far each colour image of ``a`` lies from its counterpart in ``b`` (N x 3 x H x W in [0, 1], H and W
    even), per image, as RMS in 0-255 units of three parts of the difference, the parts that JPEG's 4:2:0
    encoding treats apart: ``luma`` (Y), ``chroma_means`` (the 2 x 2 means of Cb and Cr, which the encoder
    quantizes) and ``chroma_within`` (Cb and Cr within each 2 x 2 block, which it drops)."""
    d = np.einsum("ij,njhw->nihw", _YCC, (a.astype(np.float64) - b.astype(np.float64)) * 255.0)
    c = d[:, 1:].reshape(-1, *d.shape[2:])
    means = _block_mean2(c)
    within = (c - _up2(means)).reshape(len(d), 2, *d.shape[2:])
    means = means.reshape(len(d), 2, *means.shape[1:])
    return {"luma": np.sqrt((d[:, 0] ** 2).mean(axis=(1, 2))), "chroma_means": np.sqrt((means ** 2).mean(axis=(1, 2, 3))),
            "chroma_within": np.sqrt((within ** 2).mean(axis=(1, 2, 3)))}


def fit_stand_in(originals: np.ndarray, copies: np.ndarray, x: np.ndarray, quality: int,
                 rng: np.random.Generator) -> dict[str, float]:
    """Stand-in settings whose pre-images of the JPEG images ``x`` sit as far from them, part by part
    (``detail_components``, medians over images), as the real ``originals`` sit from their JPEG
    ``copies``: the luma spread, the chroma spread and the ``chroma_detail`` strength. Each part grows
    about linearly with its setting, so one probe at a known setting scales to the target; the luma and
    the chroma means move independently, and the colour detail does not touch the 2 x 2 chroma means."""
    target = {k: float(np.median(v)) for k, v in detail_components(originals, copies).items()}
    probe = jpeg_preimage(x, quality, 0.5, rng, chroma_spread=0.5)
    at_half = {k: float(np.median(v)) for k, v in detail_components(probe, x).items()}
    spread = float(np.clip(0.5 * target["luma"] / at_half["luma"], 0.0, 1.0))
    chroma_spread = float(np.clip(0.5 * target["chroma_means"] / at_half["chroma_means"], 0.0, 1.0))
    base = jpeg_preimage(x, quality, spread, rng, chroma_spread=chroma_spread)
    floor = float(np.median(detail_components(base, x)["chroma_within"]))  # rounding to 8 bits alone
    with_detail = float(np.median(detail_components(chroma_detail(base, 2.0, rng), x)["chroma_within"]))
    gain = max(with_detail - floor, 1e-9) / 2.0
    strength = float(max(target["chroma_within"] - floor, 0.0) / gain)
    return {"spread": spread, "chroma_spread": chroma_spread, "chroma": strength, "target": target}
