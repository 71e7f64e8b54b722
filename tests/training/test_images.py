"""Image-folder and CIFAR-10 loaders on small hand-made trees and archives."""

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from training.data import DataError
from training.images import dataset_from_folder, hold_out, load_cifar10, read_image_folder
from training.data import Split


def png(value, size=(4, 4)):
    buf = io.BytesIO()
    Image.new("RGB", size, color=(value, 0, 255 - value)).save(buf, format="PNG")
    return buf.getvalue()


def make_tree(root, per_class=3, splits=("train", "test"), classes=("cat", "dog")):
    for split in splits:
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                (root / split / cls / f"{i}.png").write_bytes(png(100 * c + i))
    return root


def test_folder_tree_values_layout_and_labels(tmp_path):
    splits = read_image_folder(make_tree(tmp_path / "data"))
    x, names = splits["train"]
    assert x.shape == (6, 3, 4, 4) and x.dtype == np.float32
    assert names == ["cat"] * 3 + ["dog"] * 3
    # red channel holds 100 * class + i, blue its complement
    assert x[4, 0, 0, 0] == pytest.approx(101 / 255) and x[4, 2, 0, 0] == pytest.approx(154 / 255)


def test_tar_gz_reads_the_same_as_the_folder(tmp_path):
    root = make_tree(tmp_path / "data")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="mydata")
    from_dir = dataset_from_folder(root, "toy", validation=2)
    from_tar = dataset_from_folder(archive, "toy", validation=2)
    assert from_tar.classes == from_dir.classes == ("cat", "dog")
    np.testing.assert_array_equal(from_tar.train.x, from_dir.train.x)
    np.testing.assert_array_equal(from_tar.test.y, from_dir.test.y)
    assert (len(from_tar.train), len(from_tar.val), len(from_tar.test)) == (4, 2, 6)


def test_missing_split_and_mixed_sizes_are_refused(tmp_path):
    with pytest.raises(DataError, match="missing split"):
        dataset_from_folder(make_tree(tmp_path / "a", splits=("train",)), "toy", validation=1)
    root = make_tree(tmp_path / "b")
    (root / "train" / "cat" / "big.png").write_bytes(png(1, size=(5, 5)))
    with pytest.raises(DataError, match="differ in size"):
        read_image_folder(root)


def test_hold_out_is_a_seeded_partition():
    train = Split(np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1), np.arange(20))
    rest, val = hold_out(train, 5, seed=0)
    assert sorted(np.concatenate([rest.y, val.y]).tolist()) == list(range(20))
    assert hold_out(train, 5, seed=0)[1].y.tolist() == val.y.tolist()
    assert hold_out(train, 5, seed=1)[1].y.tolist() != val.y.tolist()


def test_cifar_python_batches_are_preferred(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = {b"data": rng.integers(0, 256, (1100, 3072), dtype=np.uint8), b"labels": list(range(10)) * 110}
        (batches / name).write_bytes(pickle.dumps(data))
    ds = load_cifar10(tmp_path)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (500, 5000, 1100)
    assert ds.classes[0] == "airplane" and ds.test.x.shape[1:] == (3, 32, 32)


def test_no_cifar_names_the_data_dir(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_cifar10(tmp_path)


def test_shipped_cifar_archive(cifar10):
    assert (len(cifar10.train), len(cifar10.val), len(cifar10.test)) == (45000, 5000, 10000)
    assert np.bincount(cifar10.test.y).tolist() == [1000] * 10
