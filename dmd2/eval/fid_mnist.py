"""MNIST evaluation protocol: FID, KID and label accuracy of a class-conditional sampler.

Protocol (the MNIST recipe's, fixed): for each evaluation seed in :data:`EVAL_SEEDS` = (0, 1, 2), ask the sampler
for N = 1,000 images, 100 of each class (labels ``0,...,0,1,...,1,...,9``), and compare the shipped classifier's
128-d features (:func:`dmd2.eval.mnist_classifier.mnist_features`) of those images with the features of the
1,000 held-out digits (``dmd2.data.mnist``, never seen in training):

* FID: :func:`dmd2.eval.metrics.frechet_distance` of the two Gaussian fits;
* KID: :func:`dmd2.eval.metrics.kid` (cubic kernel, subsets of min(1000, N) with the evaluation seed);
* label accuracy: fraction of samples whose classifier argmax equals the requested class.

Each is reported per seed and as mean and sample standard deviation (``ddof=1``) over the seeds.
With N = 1,000 against 1,000 held-out digits every KID subset is the whole set, so KID's per-seed value is the
full-set unbiased MMD^2. Both sets are class-balanced (exactly 100 per class) rather than i.i.d., so two sets of
real digits score slightly BELOW 0 (fewer same-class pairs inside a set than i.i.d. draws would have): the floor.
The floor of the protocol is the train split used as a "sampler" (:func:`dataset_sampler`)::

    python -m dmd2.eval.fid_mnist            # prints the real-train vs held-out floor as JSON
"""
from __future__ import annotations

import functools
import json
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from .metrics import feature_statistics, frechet_distance, kid

__all__ = ["EVAL_SEEDS", "N_PER_CLASS", "MNISTEvaluation", "eval_labels", "evaluate_sampler", "dataset_sampler"]

EVAL_SEEDS = (0, 1, 2)
N_PER_CLASS = 100
NUM_CLASSES = 10

Sampler = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class MNISTEvaluation:
    """Per-seed values (tuples, in the order of ``seeds``) and their mean / sample std (``ddof=1``; 0 for one seed)."""

    seeds: tuple[int, ...]
    n_samples: int
    fid: tuple[float, ...]
    kid: tuple[float, ...]
    label_accuracy: tuple[float, ...]
    fid_mean: float
    fid_std: float
    kid_mean: float
    kid_std: float
    label_accuracy_mean: float
    label_accuracy_std: float

    def to_dict(self) -> dict:
        return asdict(self)


def eval_labels(n_per_class: int = N_PER_CLASS) -> torch.Tensor:
    """int64 ``(10 * n_per_class,)``: ``n_per_class`` zeros, then ones, ..., then nines."""
    return torch.arange(NUM_CLASSES, dtype=torch.int64).repeat_interleave(n_per_class)


@functools.lru_cache(maxsize=4)
def _heldout_features(checkpoint: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from dmd2.data.mnist import load_mnist

    from .mnist_classifier import mnist_features

    x, _ = load_mnist("heldout")
    feats, _ = mnist_features(x, checkpoint=checkpoint)
    f = feats.double().numpy()
    mu, sigma = feature_statistics(f)
    for a in (f, mu, sigma):
        a.setflags(write=False)
    return f, mu, sigma


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def evaluate_sampler(
    sample: Sampler,
    seeds: tuple[int, ...] = EVAL_SEEDS,
    n_per_class: int = N_PER_CLASS,
    kid_subsets: int = 100,
    checkpoint: str | None = None,
) -> MNISTEvaluation:
    """Run the MNIST protocol (module docstring) on ``sample``.

    Args:
        sample: ``sample(labels, seed) -> images``: ``labels`` is int64 ``(N,)`` on CPU (:func:`eval_labels`),
            ``seed`` an int the sampler must derive all its randomness from; ``images`` float ``(N, 1, 32, 32)`` in
            [-1, 1] on any device (values are not clamped).
        seeds: evaluation seeds (default (0, 1, 2)).
        n_per_class: samples per class (default 100: N = 1,000).
        kid_subsets: KID subsets per seed.
        checkpoint: classifier checkpoint (default: the shipped one).

    Raises:
        ValueError: the sampler returns something other than finite float images of shape ``(N, 1, 32, 32)``.
    """
    from .mnist_classifier import mnist_features

    if len(seeds) < 1:
        raise ValueError("need at least one evaluation seed")
    ref_feats, ref_mu, ref_sigma = _heldout_features(checkpoint)
    fids, kids, accs = [], [], []
    for seed in seeds:
        labels = eval_labels(n_per_class)
        images = sample(labels.clone(), int(seed))
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise ValueError(f"sampler must return a floating-point torch.Tensor, got {type(images).__name__}")
        if tuple(images.shape) != (labels.shape[0], 1, 32, 32):
            raise ValueError(f"sampler must return images of shape ({labels.shape[0]}, 1, 32, 32), got {tuple(images.shape)}")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("sampler returned NaN or infinite values")
        feats, logits = mnist_features(images, checkpoint=checkpoint)
        f = feats.double().cpu().numpy()
        fids.append(frechet_distance(*feature_statistics(f), ref_mu, ref_sigma))
        kids.append(kid(f, ref_feats, num_subsets=kid_subsets, seed=int(seed))[0])
        accs.append(float((logits.argmax(1).cpu() == labels).double().mean()))
    fm, fs = _mean_std(fids)
    km, ks = _mean_std(kids)
    am, as_ = _mean_std(accs)
    return MNISTEvaluation(
        seeds=tuple(int(s) for s in seeds),
        n_samples=int(labels.shape[0]),
        fid=tuple(fids),
        kid=tuple(kids),
        label_accuracy=tuple(accs),
        fid_mean=fm,
        fid_std=fs,
        kid_mean=km,
        kid_std=ks,
        label_accuracy_mean=am,
        label_accuracy_std=as_,
    )


def dataset_sampler(images: torch.Tensor, labels: torch.Tensor) -> Sampler:
    """A "sampler" that returns real images of the requested classes: the reference floor of the protocol.

    For ``seed``, each class's images are shuffled by ``torch.Generator().manual_seed(seed)`` and the first ones
    fill that class's requested positions (without replacement).

    Raises:
        ValueError: shapes disagree; at sampling time, a class is requested more often than it occurs.
    """
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}")
    by_class = {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}

    def sample(requested: torch.Tensor, seed: int) -> torch.Tensor:
        if requested.dim() != 1 or requested.dtype != torch.int64:
            raise ValueError(f"expected int64 labels (N,), got {requested.dtype} {tuple(requested.shape)}")
        if requested.numel() and (int(requested.min()) < 0 or int(requested.max()) >= NUM_CLASSES):
            raise ValueError(f"expected labels in 0..{NUM_CLASSES - 1}")
        gen = torch.Generator().manual_seed(seed)
        out = torch.empty((requested.shape[0], *images.shape[1:]), dtype=images.dtype)
        for c in range(NUM_CLASSES):
            pos = torch.nonzero(requested == c).flatten()
            if pos.numel() == 0:
                continue
            pool = by_class.get(c, torch.empty(0, dtype=torch.int64))
            if pos.numel() > pool.numel():
                raise ValueError(f"class {c} requested {pos.numel()} times but the dataset holds {pool.numel()}")
            out[pos] = images[pool[torch.randperm(pool.numel(), generator=gen)[: pos.numel()]]]
        return out

    return sample


def _main() -> int:
    from dmd2.data.mnist import load_mnist

    result = evaluate_sampler(dataset_sampler(*load_mnist("train")))
    print(json.dumps({"reference": "train split as sampler vs held-out", **result.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
