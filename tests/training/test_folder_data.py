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
