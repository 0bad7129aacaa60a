"""Datasets: EDM's dataset zip and class-folder images, as (C, H, W) tensors in [-1, 1] with integer labels."""
from .images import IMAGE_EXTENSIONS, ImageFolderDataset, ImageZipDataset, open_image_dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "ImageZipDataset", "open_image_dataset"]
