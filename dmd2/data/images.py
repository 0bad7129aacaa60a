r"""Image datasets for class-conditional training: EDM's dataset zip and a folder of class sub-folders.

Both return ``(image, label)``: ``image`` is ``(C, H, W)`` float32 in ``[-1, 1]`` (``x = u8 / 127.5 - 1``, the range
EDM and DMD2 train in) or, with ``as_uint8=True``, the raw ``uint8`` in ``[0, 255]``; ``label`` is an ``int`` class
index. The order is deterministic: images sorted by their path inside the archive / below the root.

* :class:`ImageZipDataset` - EDM's format (``dataset_tool.py``; DMD2's ImageNet-64 data): a zip of PNG (or other
  image) files plus ``dataset.json`` with ``{"labels": [[relative_path, class_index], ...]}`` (``null`` when
  unlabelled).
* :class:`ImageFolderDataset` - ``root/<class_name>/**/<image>``; classes are the sorted sub-folder names.

Images are decoded as stored: ``L`` -> 1 channel, ``RGB`` -> 3; set ``channels=1|3`` to convert other modes. Nothing is
resized: with ``resolution=R`` an image that is not ``R x R`` is an error.
"""
from __future__ import annotations

import io
from abc import ABC, abstractmethod
import json
import os
import zipfile
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageZipDataset", "ImageFolderDataset", "open_image_dataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class _ImageDataset(Dataset, ABC):
    """Shared decoding: bytes -> (C, H, W) uint8 -> optional float in [-1, 1]."""

    def __init__(self, channels: int | None, resolution: int | None, as_uint8: bool):
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None (as stored), 1 or 3, got {channels!r}")
        if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
            raise ValueError(f"resolution must be a positive int or None, got {resolution!r}")
        self.channels = channels
        self.resolution = resolution
        self.as_uint8 = as_uint8
        self.names: list[str] = []
        self.labels: list[int] | None = None

    def _decode(self, data: bytes, name: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            if self.channels == 1:
                im = im.convert("L")
            elif self.channels == 3:
                im = im.convert("RGB")
            elif im.mode not in ("L", "RGB"):
                raise ValueError(f"{self.where(name)}: image mode {im.mode!r}; pass channels=1 or channels=3 to convert")
            arr = np.array(im, dtype=np.uint8)  # a writable copy
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.resolution is not None and arr.shape[:2] != (self.resolution, self.resolution):
            raise ValueError(
                f"{self.where(name)}: image is {arr.shape[1]}x{arr.shape[0]}, expected "
                f"{self.resolution}x{self.resolution} (images are not resized)"
            )
        img = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return img if self.as_uint8 else img.float() / 127.5 - 1.0

    @abstractmethod
    def where(self, name: str) -> str:
        """Where image ``name`` lives, for error messages."""

    @abstractmethod
    def _read(self, index: int) -> bytes:
        """The encoded bytes of image ``index``."""

    @property
    def num_classes(self) -> int:
        """``max(label) + 1`` (0 without labels)."""
        return 0 if not self.labels else max(self.labels) + 1

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index %= len(self)
        img = self._decode(self._read(index), self.names[index])
        return img, (self.labels[index] if self.labels is not None else -1)


class ImageZipDataset(_ImageDataset):
    """EDM's dataset zip: images plus ``dataset.json`` ``{"labels": [[path, class], ...]}``.

    Args:
        path: the ``.zip`` file.
        use_labels: read class labels from ``dataset.json`` (ValueError when absent, ``null`` or incomplete);
            ``False`` returns label ``-1`` for every image.
        channels / resolution / as_uint8: see the module docstring.

    The archive is opened lazily once per process, so the dataset can be used with DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, use_labels: bool = True, channels: int | None = None,
                 resolution: int | None = None, as_uint8: bool = False):
        super().__init__(channels, resolution, as_uint8)
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"dataset zip not found: {self.path}")
        if not zipfile.is_zipfile(self.path):
            raise ValueError(f"{self.path} is not a zip archive (expected EDM's dataset zip)")
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None
        with zipfile.ZipFile(self.path) as z:
            members = z.namelist()
            self.names = sorted(n for n in members if _is_image(n) and not n.endswith("/"))
            if not self.names:
                raise ValueError(f"{self.path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the archive")
            if use_labels:
                if "dataset.json" not in members:
                    raise ValueError(f"{self.path}: no dataset.json with labels (use_labels=False for unlabelled data)")
                meta = json.loads(z.read("dataset.json"))
                self.labels = self._parse_labels(meta)

    def _parse_labels(self, meta: Any) -> list[int]:
        raw = meta.get("labels") if isinstance(meta, dict) else None
        if raw is None:
            raise ValueError(f"{self.path}: dataset.json has no labels (\"labels\": null or missing)")
        if not isinstance(raw, list):
            raise ValueError(f"{self.path}: dataset.json 'labels' must be a list of [path, class], got {type(raw).__name__}")
        table: dict[str, int] = {}
        for entry in raw:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
                raise ValueError(f"{self.path}: dataset.json label entries must be [path, class], got {entry!r}")
            label = entry[1]
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise ValueError(
                    f"{self.path}: label of {entry[0]!r} must be a non-negative integer class index, got {label!r}"
                )
            table[entry[0].replace("\\", "/")] = label
        missing = [n for n in self.names if n not in table]
        if missing:
            raise ValueError(f"{self.path}: {len(missing)} images have no label in dataset.json, e.g. {missing[:3]}")
        return [table[n] for n in self.names]

    def where(self, name: str) -> str:
        return f"{self.path}:{name}"

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def _read(self, index: int) -> bytes:
        return self._archive().read(self.names[index])

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None
        return state


class ImageFolderDataset(_ImageDataset):
    """``root/<class_name>/**/<image>``: label = index of the class folder in sorted order (:attr:`classes`).

    Args:
        root: directory with one sub-folder per class (files directly in ``root`` are an error: they have no class).
        channels / resolution / as_uint8: see the module docstring.
    """

    def __init__(self, root: str | os.PathLike, channels: int | None = None, resolution: int | None = None,
                 as_uint8: bool = False):
        super().__init__(channels, resolution, as_uint8)
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder not found: {self.root}")
        loose = sorted(f for f in os.listdir(self.root) if _is_image(f) and os.path.isfile(os.path.join(self.root, f)))
        if loose:
            raise ValueError(
                f"{self.root}: images directly in the root have no class ({loose[:3]}); put each class in a sub-folder"
            )
        self.classes = sorted(d for d in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, d)))
        if not self.classes:
            raise ValueError(f"{self.root}: no class sub-folders (expected root/<class_name>/<image>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        items = []
        for c in self.classes:
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, c)):
                dirnames.sort()
                for f in filenames:
                    if _is_image(f):
                        rel = os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/")
                        items.append((rel, self.class_to_idx[c]))
        items.sort()
        seen = {lab for _, lab in items}
        empty = [c for c in self.classes if self.class_to_idx[c] not in seen]
        if empty:
            raise ValueError(f"{self.root}: class folders without images: {empty[:5]}")
        self.names = [n for n, _ in items]
        self.labels = [lab for _, lab in items]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def where(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _read(self, index: int) -> bytes:
        with open(os.path.join(self.root, self.names[index]), "rb") as f:
            return f.read()


def open_image_dataset(path: str | os.PathLike, **kwargs) -> _ImageDataset:
    """:class:`ImageZipDataset` for a ``.zip`` file, :class:`ImageFolderDataset` for a directory."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return ImageFolderDataset(p, **kwargs)
    if os.path.isfile(p):
        return ImageZipDataset(p, **kwargs)
    raise FileNotFoundError(f"dataset not found: {p} (expected EDM's dataset .zip or a folder of class sub-folders)")
