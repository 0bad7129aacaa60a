"""The MNIST evaluation protocol on real images (its floor), on noise, and on wrongly-labelled real images."""
import numpy as np
import pytest
import torch

from dmd2.data.mnist import load_mnist
from dmd2.eval.fid_mnist import EVAL_SEEDS, dataset_sampler, eval_labels, evaluate_sampler
from dmd2.eval.mnist_classifier import heldout_accuracy, load_classifier


@pytest.fixture(scope="module")
def train():
    return load_mnist("train")


@pytest.fixture(scope="module")
def floor(train):
    return evaluate_sampler(dataset_sampler(*train))


def _noise(labels, seed):
    return torch.rand(labels.shape[0], 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def noise():
    return evaluate_sampler(_noise)


def test_protocol_calls_sampler_with_balanced_labels_and_fixed_seeds():
    calls = []

    def spy(labels, seed):
        calls.append((labels.clone(), seed))
        return _noise(labels, seed)

    res = evaluate_sampler(spy)
    assert [s for _, s in calls] == list(EVAL_SEEDS) == [0, 1, 2]
    for labels, _ in calls:
        assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [100] * 10
    assert res.n_samples == 1000 and res.seeds == (0, 1, 2)
    assert len(res.fid) == len(res.kid) == len(res.label_accuracy) == 3
    assert res.fid_mean == pytest.approx(np.mean(res.fid)) and res.fid_std == pytest.approx(np.std(res.fid, ddof=1))
    assert res.kid_mean == pytest.approx(np.mean(res.kid)) and res.kid_std == pytest.approx(np.std(res.kid, ddof=1))


def test_heldout_as_sampler_gives_zero_fid_and_classifier_accuracy():
    x, y = load_mnist("heldout")  # exactly 100 per class: the "sample" is the reference set itself, reordered
    res = evaluate_sampler(dataset_sampler(x, y), seeds=(0,))
    assert abs(res.fid[0]) < 1e-6
    acc, _ = heldout_accuracy(load_classifier())
    assert res.label_accuracy[0] == pytest.approx(acc, abs=1e-12)


def test_train_split_floor_is_small_and_noise_is_large(floor, noise):
    assert floor.fid_mean < 0.05 * noise.fid_mean, (floor.fid_mean, noise.fid_mean)
    assert max(floor.fid) < min(noise.fid)
    assert floor.kid_mean < 0.05 * noise.kid_mean
    assert floor.label_accuracy_mean >= 0.98  # the classifier's accuracy on real digits of the requested class
    assert noise.label_accuracy_mean < 0.5
    assert floor.fid_std > 0  # the three seeds draw different train subsets


def test_label_accuracy_judges_the_requested_class(train):
    images, labels = train
    real = dataset_sampler(images, labels)

    def off_by_one(requested, seed):  # real digits, but of the next class
        return real((requested + 1) % 10, seed)

    res = evaluate_sampler(off_by_one, seeds=(0,))
    assert res.label_accuracy[0] < 0.05
    assert res.fid[0] < 0.05 * evaluate_sampler(_noise, seeds=(0,)).fid[0]  # the image distribution is still real


def test_deterministic(floor, train):
    again = evaluate_sampler(dataset_sampler(*train))
    assert again == floor


def test_dataset_sampler_returns_requested_classes_without_replacement():
    n = 60
    labels = torch.arange(10).repeat_interleave(6)
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()  # image i holds i
    sample = dataset_sampler(images, labels)
    req = torch.tensor([3, 3, 7, 0, 3, 9], dtype=torch.int64)
    out = sample(req, 5)
    idx = out[:, 0, 0, 0].long()
    assert torch.equal(labels[idx], req)
    assert len(set(idx.tolist())) == req.numel()
    assert torch.equal(sample(req, 5), out) and not torch.equal(sample(req, 6), out)
    with pytest.raises(ValueError, match="requested 7 times"):
        sample(torch.full((7,), 2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="labels in 0..9"):
        sample(torch.tensor([10]), 0)


def test_bad_sampler_output_raises():
    with pytest.raises(ValueError, match=r"\(1000, 1, 32, 32\)"):
        evaluate_sampler(lambda labels, seed: torch.zeros(labels.shape[0], 1, 28, 28), seeds=(0,))
    with pytest.raises(ValueError, match="NaN"):
        evaluate_sampler(lambda labels, seed: torch.full((labels.shape[0], 1, 32, 32), float("nan")), seeds=(0,))
    with pytest.raises(ValueError, match="floating-point"):
        evaluate_sampler(lambda labels, seed: labels, seeds=(0,))
    assert eval_labels(2).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
