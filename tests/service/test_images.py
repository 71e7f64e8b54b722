"""Image decoding (``{"images": [...]}``): sizes checked from the header before any pixel is decoded,
16-bit and alpha images converted by the stated rules, EXIF orientation honoured, and every broken
file a 400, never a 500."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.codecs import decode_image
from service.defense.bundle import InputSpec
from service.errors import BadInput
from tests.fakes import make_client

GREY = InputSpec(shape=(1, 4, 4))
RGB = InputSpec(shape=(3, 4, 4))


def b64(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return base64.b64encode(buf.getvalue()).decode()


def png_claiming(width: int, height: int) -> str:
    """A PNG whose header claims ``width`` x ``height`` grey pixels, with one row of data: tiny to send,
    enormous to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("side", [12000, 30000])
def test_huge_claimed_sizes_are_refused_from_the_header(side, monkeypatch):
    from PIL import ImageFile

    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, *a, **k: decoded.append(self.size) or real(self, *a, **k))
    with pytest.raises(BadInput, match=f"is {side}x{side} pixels; expected 4x4|claims more pixels"):
        decode_image(png_claiming(side, side), 0, GREY)
    assert decoded == []  # nothing was decoded: the header's size was enough
    # the spy sees a decode: an image of the right size is decoded through it
    assert decode_image(b64(Image.new("L", (4, 4), 7)), 0, GREY).shape == (1, 4, 4) and set(decoded) == {(4, 4)}


def test_sixteen_bit_grey_keeps_its_levels():
    levels = np.array([[0, 1000, 30000, 65535]] * 4, dtype=np.uint16)
    image = Image.frombytes("I;16", (4, 4), levels.astype("<u2").tobytes())
    got = decode_image(b64(image), 0, GREY)[0]
    np.testing.assert_allclose(got, levels / 65535.0, atol=1e-6)
    assert len(np.unique(got)) == 4  # not binarised


def test_a_drawing_in_the_alpha_channel_alone_is_the_image():
    ink = np.array([[0, 255, 255, 0]] * 4, dtype=np.uint8)
    la = Image.merge("LA", [Image.new("L", (4, 4), 0), Image.fromarray(ink)])  # black everywhere, shape in alpha
    np.testing.assert_allclose(decode_image(b64(la), 0, GREY)[0], ink / 255.0, atol=1e-6)
    np.testing.assert_allclose(decode_image(b64(la), 0, RGB), np.repeat((ink / 255.0)[None], 3, 0), atol=1e-6)


def test_coloured_images_with_alpha_are_composited_over_black():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    rgba.putpixel((0, 0), (0, 255, 0, 255))
    got = decode_image(b64(rgba), 0, RGB)
    assert got[:, 0, 0].tolist() == pytest.approx([0, 1, 0])
    assert got[:, 1, 1].tolist() == pytest.approx([128 / 255, 0, 0], abs=1e-6)
    grey = decode_image(b64(rgba), 0, GREY)[0]
    assert grey[1, 1] == pytest.approx(0.299 * 128 / 255, abs=1e-6)


@pytest.mark.parametrize("orientation, turn", [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                               (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(orientation, turn):
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    exif = Image.Exif()
    exif[0x0112] = orientation
    got = decode_image(b64(Image.fromarray(pixels), "JPEG", quality=100, exif=exif.tobytes()), 0, GREY)[0]
    np.testing.assert_allclose(got, turn(pixels) / 255.0, atol=6 / 255)  # JPEG rounding


def test_a_rotated_photo_is_checked_at_its_displayed_size():
    spec = InputSpec(shape=(1, 4, 2))  # 4 high, 2 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 4 wide and 2 high, shown turned by 90 degrees
    stored = Image.new("L", (4, 2), 100)
    assert decode_image(b64(stored, "JPEG", exif=exif.tobytes()), 0, spec).shape == (1, 4, 2)
    with pytest.raises(BadInput, match="is 4x2 pixels; expected 2x4"):
        decode_image(b64(stored), 0, spec)  # the same pixels without the tag


def noise_file(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (4, 4), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def corrupt_idat() -> str:
    raw = bytearray(noise_file("PNG"))
    raw[raw.index(b"IDAT") + 6] ^= 0xFF  # the chunk's CRC no longer matches
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("blob", [
    corrupt_idat,
    lambda: base64.b64encode(noise_file("JPEG")[:200]).decode(),  # a JPEG cut short
    lambda: base64.b64encode(noise_file("PNG")[:40]).decode(),  # a PNG cut inside its header
    lambda: base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).decode(),  # a signature, nothing valid
    lambda: base64.b64encode(b"GIF89a" + b"\x00" * 20).decode(),
])
def test_broken_files_are_400_through_the_gateway(toy_bundle, blob):
    c, _ = make_client(toy_bundle)
    with c:
        r = c.post("/classify", json={"images": [blob()]})
        assert r.status_code == 400, r.text
        assert c.post("/classify", json={"images": [b64(Image.new("L", (4, 4), 128))]}).status_code == 200


def test_a_large_body_is_decoded_off_the_event_loop_with_the_same_result(toy_bundle):
    c, _ = make_client(toy_bundle)
    small = [b64(Image.new("L", (4, 4), 128))]
    with c:
        one = c.post("/classify", json={"images": small}).json()["results"]
        many = c.post("/classify", json={"images": small * 256}).json()["results"]  # > 64 KiB of JSON
    assert many == one * 256


def test_a_data_url_decodes_as_its_base64_does_and_a_non_base64_one_is_a_clear_error():
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5, "RGB")
    plain = b64(image)
    np.testing.assert_array_equal(decode_image("data:image/png;base64," + plain, 0, RGB), decode_image(plain, 0, RGB))
    with pytest.raises(BadInput, match=r"images\[2\] is a data URL without ';base64,'"):
        decode_image("data:image/png," + plain, 2, RGB)
    with pytest.raises(BadInput, match=r"images\[0\] is not valid base64"):
        decode_image("data:image/png;base64,%%%", 0, RGB)


@pytest.mark.parametrize("shape, transpose", [((4, 4, 3), "2, 0, 1"), ((2, 4, 4, 3), "0, 3, 1, 2")])
def test_channels_last_arrays_are_refused_with_the_transpose_that_fixes_them(shape, transpose):
    from service.codecs import decode_array

    with pytest.raises(BadInput, match=rf"channels last\? .*x\.transpose\({transpose}\)"):
        decode_array(np.full(shape, 0.5).tolist(), RGB)
    fixed = np.full(shape, 0.5).transpose(*map(int, transpose.split(", ")))
    assert decode_array(fixed.tolist(), RGB).shape[1:] == (3, 4, 4)
    with pytest.raises(BadInput) as refused:  # a shape that is wrong otherwise gets no such hint
        decode_array(np.full((4, 3, 4), 0.5).tolist(), RGB)
    assert "channels last" not in str(refused.value)


def test_null_inputs_are_named_as_null():
    from service.codecs import decode_array

    with pytest.raises(BadInput, match="inputs must be numbers; got null$"):
        decode_array(None, RGB)
