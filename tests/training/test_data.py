import gzip
import struct

import numpy as np
import pytest

from training.data import DataError, load_mnist, read_idx


def test_mnist_split_sizes_and_range(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (55000, 5000, 10000)
    assert mnist.train.x.shape[1:] == (1, 28, 28) and mnist.train.x.dtype == np.float32
    assert 0.0 == mnist.train.x.min() and mnist.train.x.max() == 1.0
    assert set(np.unique(mnist.test.y)) == set(range(10))


def test_validation_is_the_first_5000_training_images(mnist):
    from tests.conftest import DATA_DIR

    raw = read_idx(DATA_DIR / "mnist" / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(mnist.val.x[0, 0], raw[0].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(mnist.train.x[0, 0], raw[5000].astype(np.float32) / 255.0)


def test_idx_parser_on_a_handmade_file(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBBII", 0, 8, 2, 2, 3) + bytes(range(6)))
    np.testing.assert_array_equal(read_idx(path), [[0, 1, 2], [3, 4, 5]])


def test_truncated_idx_is_refused(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBBII", 0, 8, 2, 2, 3) + bytes(range(5)))
    with pytest.raises(DataError, match="expected 6"):
        read_idx(path)


def test_missing_files_without_download_name_the_data_dir(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_mnist(tmp_path, download=False)
