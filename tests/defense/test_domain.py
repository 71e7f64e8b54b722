"""A bundle's input domain: the JPEG round trip of bundles trained on JPEG images (``input.jpeg_quality``)."""

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.defense import Defense
from service.defense.bundle import read_manifest, write_manifest
from service.defense.domain import jpeg_quality_of, jpeg_round_trip
from tests import fakes
from tests.conftest import (SHIPPED_CIFAR10, SHIPPED_CIFAR10_CLEAN, SHIPPED_CIFAR10_JPEG_INPUTS, SHIPPED_CIFAR10_PAPER,
                            SHIPPED_CIFAR10_POOL)
from tests.fakes import make_client

ORIGINALS = Path(__file__).resolve().parents[1] / "data" / "cifar10-originals"


def smooth_images(n: int, channels: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Images with a natural image's low-frequency content: blurred noise, in [0, 1]."""
    g = np.random.default_rng(seed).uniform(size=(n, channels, size // 4, size // 4)).astype(np.float32)
    return np.ascontiguousarray(g.repeat(4, axis=2).repeat(4, axis=3))


def originals() -> tuple[np.ndarray, np.ndarray]:
    files = sorted(ORIGINALS.glob("test-*-label-*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float32) / 255
    y = np.array([int(re.search(r"label-(\d+)", f.name).group(1)) for f in files])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y


def with_quality(bundle: Path, quality: int | None) -> Path:
    manifest = read_manifest(bundle)
    write_manifest(bundle, manifest.model_copy(update={"input": manifest.input.model_copy(update={"jpeg_quality": quality})}))
    return bundle


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_is_a_lossy_jpeg_of_the_same_shape_and_nearly_idempotent(channels):
    x = smooth_images(4, 1) if channels == 1 else originals()[0][:4]  # photographs for colour: 4:2:0 chroma
    once = jpeg_round_trip(x, 75)
    assert once.shape == x.shape and once.dtype == np.float32 and 0 <= once.min() and once.max() <= 1
    assert np.abs(once - x).mean() > 1 / 255  # it changes an image that was not a JPEG
    twice = jpeg_round_trip(once, 75)
    assert np.abs(twice - once).mean() < 0.5 / 255  # a JPEG of that quality barely moves
    # what Pillow writes at that quality (how the CIFAR-10 JPEG data set was made): the same for colour;
    # for grey, Pillow's libjpeg rounds differently (same tables; about 1/255 apart on average)
    buf = io.BytesIO()
    pixels = np.rint(x[0].transpose(1, 2, 0) * 255).astype(np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buf, "JPEG", quality=75)
    pil = np.asarray(Image.open(buf), dtype=np.float32) / 255
    pil = pil[None] if channels == 1 else pil.transpose(2, 0, 1)
    assert np.abs(once[0] - pil).mean() < (0.5 if channels == 3 else 2.0) / 255


def test_round_trip_refuses_what_is_not_an_image_batch():
    with pytest.raises(ValueError, match="N x 1|3"):
        jpeg_round_trip(np.zeros((2, 2, 8, 8), np.float32), 75)


@pytest.mark.parametrize("quality", [50, 75, 90])
def test_the_quality_is_read_back_from_a_jpegs_tables(quality):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, "JPEG", quality=quality)
    assert jpeg_quality_of(Image.open(buf).quantization) == quality
    assert jpeg_quality_of({0: [1] * 64, 1: [2] * 64}) is None  # tables no standard quality makes


def test_the_core_judges_the_round_tripped_input_and_keeps_the_original(tmp_path):
    plain = Defense(fakes.make_bundle(tmp_path / "plain"), device="cpu")
    domain = Defense(with_quality(fakes.make_bundle(tmp_path / "jpeg"), 75), device="cpu")
    x = np.random.default_rng(1).uniform(size=(3, *fakes.SHAPE)).astype(np.float32)
    s = domain.screen(x)
    np.testing.assert_array_equal(s.x, jpeg_round_trip(x, 75))
    assert s.original is x and plain.screen(x).original is None
    # the same scores as the plain bundle gives the round-tripped images
    np.testing.assert_allclose(s.scores["R"], plain.screen(jpeg_round_trip(x, 75)).scores["R"], atol=1e-7)
    assert not np.allclose(s.scores["R"], plain.screen(x).scores["R"], atol=1e-4)


def test_shadow_mode_answers_the_input_as_it_came_and_scores_what_the_defense_judged(tmp_path):
    detectors = [{"name": "jsd", "kind": "divergence", "autoencoder": "half.onnx", "temperature": 1.0, "fpr": 0.01,
                  "threshold": 0.04}]
    bundle = with_quality(fakes.make_bundle(tmp_path / "b", detectors=detectors), 75)
    x = np.random.default_rng(2).uniform(size=(2, *fakes.SHAPE)).astype(np.float32)
    c, upstream = make_client(bundle, mode="shadow")
    with c:
        assert c.post("/classify", json={"inputs": x.tolist()}).status_code == 200
    sent = upstream.batches[0]
    assert sent.shape[0] == 6  # the inputs as they came, then x as judged and its reformed copy
    np.testing.assert_allclose(sent[:2], x, atol=1e-6)
    np.testing.assert_allclose(sent[2:4], jpeg_round_trip(x, 75), atol=1e-6)
    np.testing.assert_allclose(sent[4:], np.clip(0.5 * jpeg_round_trip(x, 75) + 0.25, 0, 1), atol=1e-6)


def test_straight_through_round_trip_is_the_jpeg_forward_and_the_identity_backward():
    from training.evaluate.torch_defense import jpeg_straight_through

    x = torch.from_numpy(smooth_images(2, 3)).requires_grad_(True)
    out = jpeg_straight_through(x, 75)
    np.testing.assert_allclose(out.detach().numpy(), jpeg_round_trip(x.detach().numpy(), 75), atol=1e-7)
    (out * 3).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 3.0)
    assert jpeg_straight_through(x, None) is x


def test_an_image_folder_of_one_jpeg_quality_says_so_and_a_mixed_one_does_not(tmp_path):
    from training.images import load_folder

    rng = np.random.default_rng(0)
    for k in range(24):
        folder = tmp_path / "jpeg" / "train" / ("a" if k % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{k}.jpg", quality=80)
    assert load_folder(tmp_path / "jpeg").jpeg_quality == 80
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "jpeg" / "train" / "a" / "x.png")
    assert load_folder(tmp_path / "jpeg").jpeg_quality is None


KNOWN = pytest.mark.xfail(strict=True, reason="trained on JPEG CIFAR-10 without the input step: "
                           "cifar10-jpeg-inputs accepts and classifies right 12 of the 20 originals (README, input "
                           "domain); models/cifar10, whose reformer saw JPEG pre-images (round 6), passes")


@pytest.mark.parametrize("bundle", [SHIPPED_CIFAR10, SHIPPED_CIFAR10_CLEAN,
                                    pytest.param(SHIPPED_CIFAR10_JPEG_INPUTS, marks=KNOWN),
                                    SHIPPED_CIFAR10_PAPER, SHIPPED_CIFAR10_POOL],
                         ids=lambda b: b.name)
def test_shipped_cifar10_bundles_accept_and_classify_the_original_cifar10_images(bundle):
    """The shipped bundles were trained on a JPEG re-encoding of CIFAR-10; the original test images (20
    lossless PNGs) should pass as their JPEG copies do: at most two rejected, at most two not accepted
    and right."""
    defense = Defense(bundle, device="cpu")
    x, y = originals()
    for member in range(len(defense.members)):
        verdict = defense.inspect(x, member)
        labels = defense.classifier(verdict.reformed).argmax(1)
        assert verdict.rejected.sum() <= 2, (member, verdict.fired)
        assert (verdict.accepted & (labels == y)).sum() >= 18, member


def test_with_the_round_trip_a_guided_bundle_accepts_the_original_images_without_it_not():
    """What the step does for a bundle with the reconstruction detector (cifar10-jpeg-inputs, thresholds
    as shipped): the 20 originals pass with it, many are rejected without it; its cost to the defense
    is in the README (input domain)."""
    defense = Defense(SHIPPED_CIFAR10_JPEG_INPUTS, device="cpu")
    x, y = originals()
    assert defense.manifest.input.jpeg_quality is None and defense.inspect(x).rejected.sum() >= 4
    defense.manifest = defense.manifest.model_copy(
        update={"input": defense.manifest.input.model_copy(update={"jpeg_quality": 75})})
    verdict = defense.inspect(x)
    assert verdict.rejected.sum() <= 1
    assert (verdict.accepted & (defense.classifier(verdict.reformed).argmax(1) == y)).sum() >= 19


def test_the_default_rejects_fewer_originals_than_its_jpeg_inputs_twin_and_no_jpeg_copy():
    """Round 4's point: without the reconstruction detector the default turns away at most 2 of the 20
    originals (its twin with it: at least 5), and neither rejects their JPEG copies' round trip."""
    x, y = originals()
    default, twin = Defense(SHIPPED_CIFAR10, device="cpu"), Defense(SHIPPED_CIFAR10_JPEG_INPUTS, device="cpu")
    assert "recon" not in {d.name for d in default.members[0].detectors}
    assert default.inspect(x).rejected.sum() <= 2 and twin.inspect(x).rejected.sum() >= 5
    copies = jpeg_round_trip(x, 75)
    assert default.inspect(copies).rejected.sum() == 0 and twin.inspect(copies).rejected.sum() == 0


def test_the_jpeg_step_bench_brings_originals_close_to_the_data_sets_copies(tmp_path):
    from bench import jpeg_step
    from tests.conftest import DATA_DIR

    if not (DATA_DIR / "cifar10").is_dir():
        pytest.skip(f"CIFAR-10 not found under {DATA_DIR} (set MAGNET_TEST_DATA)")
    out = tmp_path / "jpeg-step.json"
    assert jpeg_step.main(["--data-dir", str(DATA_DIR), "--images", str(ORIGINALS), "--seconds", "0.05",
                           "--out", str(out)]) == 0
    r = __import__("json").loads(out.read_text())
    assert r["originals"] == 20 and r["us_per_image_batch_1"] > 0 and r["us_per_image_batch_256"] > 0
    # the data set's copies are Pillow JPEGs of the originals at quality 75: the round trip lands near them
    assert r["mean_abs_round_trip_to_copy_255"] < 1.0 < 4.0 < r["mean_abs_original_to_copy_255"]
    assert r["mean_abs_copy_round_trip_to_copy_255"] < 0.5
