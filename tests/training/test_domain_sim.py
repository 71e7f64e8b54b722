"""training.domain_sim: pre-images of JPEG images (stand-ins for the uncompressed originals) and the
full-resolution colour detail that 4:2:0 JPEG drops."""

import numpy as np
import pytest

from service.defense.domain import jpeg_round_trip
from training.domain_sim import (_RGB, _YCC, _block_mean2, _dct_matrix, chroma_detail, detail_components, fit_stand_in,
                                 jpeg_preimage, quantization_tables)


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


def _coloured_edges(n: int, size: int = 32) -> np.ndarray:
    """Images whose colour changes where their brightness does (odd positions: detail inside 2 x 2 blocks)."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        edge = (xx + yy * rng.uniform(0.2, 1.5)) > rng.uniform(8, 24)
        a, b = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
        out.append(np.where(edge[None], a[:, None, None], b[:, None, None]))
    return np.asarray(out, np.float32)


def _ycc(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,njhw->nihw", _YCC, x.astype(np.float64) * 255)


def test_chroma_detail_keeps_luma_and_the_chroma_block_means_and_grows_with_its_gain():
    copy = jpeg_round_trip(_coloured_edges(16), 75)  # smooth chroma: 4:2:0 dropped the detail
    moved = []
    for gain in (0.0, 1.0, 3.0):
        out = chroma_detail(copy, np.full(len(copy), gain), np.random.default_rng(0))
        assert out.shape == copy.shape and out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
        before, after = _ycc(copy), _ycc(out)
        assert np.abs(after[:, 0] - before[:, 0]).mean() < 0.6  # luma: rounding only
        for c in (1, 2):  # the 2 x 2 chroma means that the encoder keeps: rounding (and clipping) only
            assert np.abs(_block_mean2(after[:, c]) - _block_mean2(before[:, c])).mean() < 0.6
        assert np.abs(jpeg_round_trip(out, 75) - copy).mean() < 1.0 / 255  # the same JPEG again
        moved.append(np.abs(after[:, 1:] - before[:, 1:]).mean())
    assert moved[0] < 0.05 < moved[1] < moved[2] and moved[2] > 2 * moved[1]


def test_chroma_detail_goes_where_the_luma_has_detail():
    copy = jpeg_round_trip(_coloured_edges(16), 75)
    out = chroma_detail(copy, 3.0, np.random.default_rng(0))
    y = _ycc(copy)[:, 0]
    hp = np.abs(y - np.repeat(np.repeat(_block_mean2(y), 2, 1), 2, 2))
    change = np.abs(_ycc(out)[:, 1:] - _ycc(copy)[:, 1:]).sum(axis=1)
    busy = hp > 2
    assert busy.any() and change[busy].mean() > 5 * change[~busy].mean()
    with pytest.raises(ValueError, match="N x 3"):
        chroma_detail(copy[:, :1], 1.0, np.random.default_rng(0))


def test_luma_and_chroma_spreads_move_their_own_parts():
    copy = jpeg_round_trip(_photo_like(8), 75)
    luma_only = detail_components(jpeg_preimage(copy, 75, 0.5, np.random.default_rng(0), chroma_spread=0.0), copy)
    chroma_only = detail_components(jpeg_preimage(copy, 75, 0.0, np.random.default_rng(0), chroma_spread=0.5), copy)
    both = detail_components(jpeg_preimage(copy, 75, 0.5, np.random.default_rng(0)), copy)
    assert np.median(luma_only["luma"]) > 5 * np.median(luma_only["chroma_means"])
    assert np.median(chroma_only["chroma_means"]) > 5 * np.median(chroma_only["luma"])
    assert np.median(both["luma"]) == pytest.approx(np.median(luma_only["luma"]), rel=0.1)
    assert np.median(both["chroma_means"]) == pytest.approx(np.median(chroma_only["chroma_means"]), rel=0.1)
    with pytest.raises(ValueError, match="spread"):
        jpeg_preimage(copy, 75, 0.2, np.random.default_rng(0), chroma_spread=-0.1)


def test_detail_components_split_a_known_difference():
    base = np.full((2, 3, 8, 8), 0.5)
    grey = base + 4 / 255  # the same step on R, G and B: luma only
    pattern = np.zeros((8, 8))
    pattern[0::2, 0::2], pattern[1::2, 1::2], pattern[0::2, 1::2], pattern[1::2, 0::2] = 3, 3, -3, -3  # zero 2 x 2 means
    ycc = np.zeros((2, 3, 8, 8))
    ycc[:, 1] = pattern  # Cb detail within the blocks, in 0-255 units
    ycc[:, 2] = 2.0  # and a flat Cr shift, which the 2 x 2 means hold
    coloured = base + np.einsum("ij,njhw->nihw", _RGB, ycc) / 255
    parts = detail_components(grey, base)
    np.testing.assert_allclose(parts["luma"], 4.0, rtol=1e-6)
    np.testing.assert_allclose(parts["chroma_means"], 0.0, atol=1e-6)
    np.testing.assert_allclose(parts["chroma_within"], 0.0, atol=1e-6)
    parts = detail_components(coloured, base)
    np.testing.assert_allclose(parts["luma"], 0.0, atol=1e-6)
    np.testing.assert_allclose(parts["chroma_means"], np.sqrt(2.0 ** 2 / 2), rtol=1e-6)  # RMS over Cb (0) and Cr (2)
    np.testing.assert_allclose(parts["chroma_within"], np.sqrt(3.0 ** 2 / 2), rtol=1e-6)


def test_the_fit_recovers_the_settings_that_made_the_originals():
    copy = jpeg_round_trip(_coloured_edges(64), 75)
    made = chroma_detail(jpeg_preimage(copy, 75, 0.5, np.random.default_rng(5), chroma_spread=0.2), 2.0,
                         np.random.default_rng(6))
    fit = fit_stand_in(made, copy, copy, 75, np.random.default_rng(7))
    assert fit["spread"] == pytest.approx(0.5, abs=0.05)
    assert fit["chroma_spread"] == pytest.approx(0.2, abs=0.04)
    assert fit["chroma"] == pytest.approx(2.0, rel=0.3)


def test_stand_in_cli_fits_the_shipped_originals(tmp_path):
    import json
    from pathlib import Path

    from tests.conftest import DATA_DIR
    from training.evaluate.stand_in import main

    if not (DATA_DIR / "cifar10").is_dir():
        pytest.skip(f"CIFAR-10 not found under {DATA_DIR} (set MAGNET_TEST_DATA)")
    originals = Path(__file__).resolve().parents[1] / "data" / "cifar10-originals"
    out = tmp_path / "fit.json"
    assert main(["--images", str(originals), "--data-dir", str(DATA_DIR), "--val-images", "200", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["parts_quartiles_0_255"]
    for part in ("luma", "chroma_means", "chroma_within"):  # the fitted stand-in's medians land on the originals'
        assert rows["fitted"][part][1] == pytest.approx(rows["originals"][part][1], rel=0.2)
    assert rows["spread 0.4"]["chroma_means"][1] > 1.2 * rows["originals"]["chroma_means"][1]  # the old mix
    assert 0 < report["fit"]["chroma_spread"] < report["fit"]["spread"] < 1
