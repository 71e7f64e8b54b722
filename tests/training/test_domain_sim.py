"""training.domain_sim: pre-images of JPEG images (stand-ins for the uncompressed originals)."""

import numpy as np
import pytest

from service.defense.domain import jpeg_round_trip
from training.domain_sim import _dct_matrix, jpeg_preimage, quantization_tables


def _photo_like(n: int, channels: int = 3, size: int = 32) -> np.ndarray:
    """Smooth images with some edges (noise JPEG-compresses badly and says little)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.5, 4, 3)
        base = 0.5 + 0.3 * np.sin(a * 6 * xx + b * 3 * yy) + 0.2 * (xx > rng.uniform(0.3, 0.7))
        out.append(np.stack([np.clip(base * rng.uniform(0.6, 1.0), 0, 1) for _ in range(channels)]))
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_preimage_compresses_back_to_the_jpeg_and_moves_with_the_spread(channels):
    copy = jpeg_round_trip(_photo_like(8, channels), 75)
    distances = []
    for spread in (0.0, 0.25, 0.5):
        pre = jpeg_preimage(copy, 75, spread, np.random.default_rng(1))
        assert pre.shape == copy.shape and pre.dtype == np.float32 and pre.min() >= 0 and pre.max() <= 1
        distances.append(np.abs(pre - copy).mean())
        if spread <= 0.5:  # inside half the bins: the same JPEG again, up to 8-bit rounding
            assert np.abs(jpeg_round_trip(pre, 75) - copy).mean() < 1.0 / 255
    assert distances[0] < 1.5 / 255 < distances[1] < distances[2]


def test_one_spread_per_image_and_bad_inputs():
    copy = jpeg_round_trip(_photo_like(3), 75)
    pre = jpeg_preimage(copy, 75, np.array([0.0, 0.0, 0.8]), np.random.default_rng(0))
    moved = np.abs(pre - copy).mean(axis=(1, 2, 3))
    assert moved[2] > 4 * max(moved[0], moved[1])
    with pytest.raises(ValueError, match="spread"):
        jpeg_preimage(copy, 75, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="even"):
        jpeg_preimage(copy[:, :, :31, :31], 75, 0.2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="N x 1|3"):
        jpeg_preimage(copy[0], 75, 0.2, np.random.default_rng(0))


def test_tables_are_pillows_standard_ones():
    luma, chroma = quantization_tables(50)
    assert luma[0, :4].tolist() == [16, 11, 10, 16] and chroma[0, 0] == 17
    assert (quantization_tables(75)[0] <= luma).all()


def test_the_dct_is_orthonormal_and_matches_the_definition():
    m = _dct_matrix()
    np.testing.assert_allclose(m @ m.T, np.eye(8), atol=1e-12)
    v = np.random.default_rng(0).normal(size=8)
    k = 3  # X_k = sqrt(2/N) sum v_i cos(pi (2i+1) k / 2N)
    assert m[k] @ v == pytest.approx(np.sqrt(2 / 8) * sum(v[i] * np.cos(np.pi * (2 * i + 1) * k / 16) for i in range(8)))
