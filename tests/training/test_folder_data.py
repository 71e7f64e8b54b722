"""A user's image folder as a data set: classes, sizes, modes, splits, and clear errors."""

import numpy as np
import pytest
from PIL import Image

from training.data import DataError
from training.images import load_folder


def _write(root, split, cls, k, size=(8, 6), mode="L", fmt="png"):
    folder = root / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    value = 40 * (k % 5) + (0 if cls == "a" else 20)
    image = Image.new(mode, size, value if mode == "L" else (value, 255 - value, 7))
    path = folder / f"{k:03d}.{fmt}"
    image.save(path)
    return path


def _tree(root, n=20, test=True, **kw):
    for cls in ("b", "a"):
        for k in range(n):
            _write(root, "train", cls, k, **kw)
            if test:
                _write(root, "test", cls, k, **kw)
    return root


def test_a_grey_folder_with_a_test_split(tmp_path):
    ds = load_folder(_tree(tmp_path / "d"), validation=0.25)
    assert ds.classes == ("a", "b") and ds.train.x.shape[1:] == (1, 6, 8) and ds.train.x.dtype == np.float32
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 40)
    assert 0.0 <= ds.train.x.min() and ds.train.x.max() <= 1.0 and set(ds.test.y.tolist()) == {0, 1}


def test_rgb_without_a_test_folder_holds_one_out_and_says_so(tmp_path):
    ds = load_folder(_tree(tmp_path / "d", test=False, mode="RGB", fmt="jpg"), validation=0.1, test=0.2)
    assert ds.train.x.shape[1:] == (3, 6, 8) and (len(ds.train), len(ds.val), len(ds.test)) == (28, 4, 8)
    assert "held out" in ds.name


def test_classes_txt_sets_the_order_and_must_list_every_folder(tmp_path):
    root = _tree(tmp_path / "d")
    (root / "classes.txt").write_text("b\na\n")
    assert load_folder(root).classes == ("b", "a")
    (root / "classes.txt").write_text("b\n")
    with pytest.raises(DataError, match=r"\['a'\] are not listed in classes.txt"):
        load_folder(root)


def test_mixed_sizes_name_a_file_unless_resized(tmp_path):
    root = _tree(tmp_path / "d")
    odd = _write(root, "train", "a", 99, size=(9, 6))
    with pytest.raises(DataError, match=f"{odd.name} is 9x6.*--size H W"):
        load_folder(root)
    assert load_folder(root, size=(4, 4)).train.x.shape[1:] == (1, 4, 4)


def test_mixed_modes_name_a_file(tmp_path):
    root = _tree(tmp_path / "d")
    odd = _write(root, "test", "b", 77, mode="RGB")
    with pytest.raises(DataError, match=f"{odd.name} is RGB.*all grey or all colour"):
        load_folder(root)


def test_missing_train_and_too_few_images_are_clear(tmp_path):
    with pytest.raises(DataError, match="no train/ folder"):
        load_folder(tmp_path)
    with pytest.raises(DataError, match="too few"):
        load_folder(_tree(tmp_path / "d", n=1, test=False), validation=0.5, test=0.5)


def test_pixels_are_read_as_the_gateway_reads_an_upload(tmp_path, capsys):
    """16-bit grey PNGs, drawings in an alpha channel, RGBA over black and EXIF-rotated images: each training
    row equals what the gateway's ``decode_image`` makes of the same file, so the bundle is trained on what it
    is served (before, these were clipped to 8 bits, lost their drawing, or kept their stored orientation).
    Files of other types are skipped with a note."""
    import base64

    from service.codecs import decode_image
    from service.defense.bundle import InputSpec

    rng = np.random.default_rng(0)
    grey, colour = tmp_path / "grey", tmp_path / "colour"
    made = {grey: [], colour: []}

    def save(root, cls, name, image, **kw):
        folder = root / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / name, **kw)
        made[root].append(folder / name)

    for k in range(5):
        save(grey, "a", f"{k}.png", Image.fromarray((rng.uniform(size=(6, 8)) * 65535).astype(np.uint16)))
        drawing = np.zeros((6, 8, 2), np.uint8)
        drawing[..., 1] = rng.integers(0, 256, (6, 8))
        save(grey, "b", f"{k}.png", Image.fromarray(drawing))  # LA: the digit in the alpha channel alone
        turned = Image.fromarray(np.tril(np.full((8, 6), 255, np.uint8)))  # stored 6 x 8, displayed 8 x 6
        exif = turned.getexif()
        exif[0x0112] = 6
        save(grey, "c", f"{k}.png", turned, exif=exif)
        save(colour, "a", f"{k}.png", Image.fromarray(rng.integers(0, 256, (6, 8, 4), dtype=np.uint8)))  # RGBA
        save(colour, "b", f"{k}.jpg", Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)), quality=90)
    (grey / "train" / "a" / "notes.txt").write_text("not an image")
    (grey / "train" / "b" / "scan.webp").write_bytes(b"RIFF")
    for root, channels in ((grey, 1), (colour, 3)):
        ds = load_folder(root, validation=0.1, test=0.1)
        rows = np.concatenate([ds.train.x, ds.val.x, ds.test.x])
        rows = rows.reshape(len(rows), -1)
        spec = InputSpec(shape=(channels, 6, 8))
        for path in made[root]:
            served = decode_image(base64.b64encode(path.read_bytes()).decode(), 0, spec).ravel()
            assert np.abs(rows - served).max(1).min() == 0.0, path
    assert "2 file(s) under" in capsys.readouterr().out
