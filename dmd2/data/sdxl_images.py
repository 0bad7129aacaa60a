r"""Real images (with captions) for DMD2's GAN term on SDXL (Sec. 4.2), as VAE latents.

Sources (all indexable, so :class:`~dmd2.train.IndexedBatches` can serve batch ``(step, shard)`` without state):

* :class:`ImageCaptionFolder` - a folder of images plus ``captions.jsonl`` with ``{"file": ..., "caption": ...}``
  per line (``file`` relative to the folder);
* :class:`WebDatasetShards` - webdataset ``.tar`` shards: members sharing a key (the name up to the first dot) form a
  sample, an image (``.jpg``/``.jpeg``/``.png``/``.webp``) and a caption (``.txt``, or ``.json`` with ``caption``);
  an index of the tar headers (:mod:`tarfile`), each image read by offset. Not the ``webdataset`` package: its
  pipelines stream samples in order, while exact resume and a change of rank count need sample ``i`` of batch
  ``(step, shard)`` by index (its indexed reader, ``wids``, is not part of webdataset 1.0);
* :class:`LatentCache` - latents precomputed by :func:`cache_latents` (``latents.safetensors`` + ``captions.jsonl``).

Images are resized (shorter side to ``resolution``, bicubic) and centre-cropped to ``resolution`` x ``resolution``,
then scaled to ``[-1, 1]``. VAE latents are ``scaling_factor * mean(q(z | x))`` (the posterior mean: deterministic, so
the same sample gives the same latent on every run and in the cache).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["IMAGE_SUFFIXES", "load_image", "ImageCaptionFolder", "WebDatasetShards", "LatentCache", "vae_encode",
           "cache_latents", "open_image_source"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def load_image(data: bytes | str | Path, resolution: int) -> torch.Tensor:
    """Decode an image (bytes or path) to ``(3, resolution, resolution)`` float in ``[-1, 1]``: RGB, shorter side
    resized to ``resolution`` (bicubic), centre crop."""
    from PIL import Image

    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


class ImageCaptionFolder:
    """``root/captions.jsonl`` (``{"file": "a.jpg", "caption": "..."}`` per line) and the images it names.

    ``ds[i] -> (image (3, R, R) in [-1, 1], caption)``.
    """

    def __init__(self, root: str | Path, resolution: int, captions: str = "captions.jsonl"):
        self.root, self.resolution = Path(root), int(resolution)
        f = self.root / captions
        if not f.is_file():
            raise ValueError(f"image folder {str(self.root)!r}: missing {captions} (one JSON object per line with "
                             "'file' and 'caption')")
        self.items: list[tuple[str, str]] = []
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or "file" not in obj or "caption" not in obj:
                raise ValueError(f"{f}:{i + 1}: expected an object with 'file' and 'caption'")
            if not (self.root / obj["file"]).is_file():
                raise ValueError(f"{f}:{i + 1}: image {str(self.root / obj['file'])!r} does not exist")
            self.items.append((obj["file"], obj["caption"]))
        if not self.items:
            raise ValueError(f"{f}: no images listed")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        name, caption = self.items[i]
        return load_image(self.root / name, self.resolution), caption


class WebDatasetShards:
    """Samples of webdataset ``.tar`` shards (module docstring); ``ds[i] -> (image (3, R, R), caption)``.

    Args:
        shards: tar paths, or one folder (all ``*.tar`` inside, sorted).
        resolution: output size.
    """

    def __init__(self, shards: str | Path | Sequence[str | Path], resolution: int):
        if isinstance(shards, (str, Path)):
            p = Path(shards)
            paths = sorted(p.glob("*.tar")) if p.is_dir() else [p]
        else:
            paths = [Path(s) for s in shards]
        missing = [str(p) for p in paths if not p.is_file()]
        if not paths or missing:
            raise ValueError(f"webdataset shards: {missing or str(shards)!r} not found (expected .tar files)")
        self.paths, self.resolution = paths, int(resolution)
        #: (shard index, image offset, image size, caption)
        self.index: list[tuple[int, int, int, str]] = []
        for si, path in enumerate(paths):
            samples: dict[str, dict] = {}
            order: list[str] = []
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    name = m.name.rsplit("/", 1)[-1]
                    key = m.name[: len(m.name) - len(name)] + name.split(".", 1)[0]
                    ext = "." + name.split(".", 1)[1].lower() if "." in name else ""
                    s = samples.get(key)
                    if s is None:
                        s = samples[key] = {}
                        order.append(key)
                    if ext in IMAGE_SUFFIXES:
                        s["image"] = (m.offset_data, m.size)
                    elif ext == ".txt":
                        s["caption"] = tar.extractfile(m).read().decode("utf-8").strip()
                    elif ext == ".json" and "caption" not in s:
                        obj = json.loads(tar.extractfile(m).read())
                        if isinstance(obj, dict) and isinstance(obj.get("caption"), str):
                            s["caption"] = obj["caption"]
            for key in order:
                s = samples[key]
                if "image" in s and "caption" in s:
                    self.index.append((si, *s["image"], s["caption"]))
        if not self.index:
            raise ValueError(f"webdataset shards {[str(p) for p in paths]}: no sample with both an image "
                             f"({'/'.join(IMAGE_SUFFIXES)}) and a caption (.txt or .json)")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        si, offset, size, caption = self.index[i]
        with open(self.paths[si], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return load_image(data, self.resolution), caption


class LatentCache:
    """Latents written by :func:`cache_latents`: ``root/latents.safetensors`` (``latents`` ``(N, C, h, w)``) and
    ``root/captions.jsonl``; ``ds[i] -> (latent (C, h, w) fp32, caption)``."""

    def __init__(self, root: str | Path):
        from safetensors.torch import load_file

        self.root = Path(root)
        lat, cap = self.root / "latents.safetensors", self.root / "captions.jsonl"
        if not lat.is_file() or not cap.is_file():
            raise ValueError(f"latent cache {str(self.root)!r}: expected latents.safetensors and captions.jsonl "
                             "(write one with cache_latents / `python -m dmd2.recipes.sdxl cache-latents`)")
        self.latents = load_file(str(lat))["latents"]
        self.captions = [json.loads(line)["caption"] for line in cap.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(self.captions) != self.latents.shape[0]:
            raise ValueError(f"latent cache {str(self.root)!r}: {self.latents.shape[0]} latents but {len(self.captions)} captions")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        return self.latents[i].float(), self.captions[i]


@torch.no_grad()
def vae_encode(vae, images: torch.Tensor) -> torch.Tensor:
    """``scaling_factor * E[q(z | x)]`` for images ``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, C, H/f, W/f)`` fp32."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"vae_encode: expected images (B, 3, H, W), got {tuple(images.shape)}")
    p = next(vae.parameters())
    dist = vae.encode(images.to(p.device, p.dtype)).latent_dist
    return (dist.mean * vae.config.scaling_factor).float()


def cache_latents(dataset, vae, out: str | Path, batch: int = 16, progress: Callable | None = None) -> Path:
    """Encode every ``(image, caption)`` of ``dataset`` with ``vae`` into a :class:`LatentCache` folder ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chunks, caps = [], []
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        chunks.append(vae_encode(vae, torch.stack([x for x, _ in items])).cpu())
        caps += [c for _, c in items]
        if progress is not None:
            progress(len(caps), len(dataset))
    tmp = out / "latents.safetensors.tmp"
    save_file({"latents": torch.cat(chunks).contiguous()}, str(tmp))
    (out / "captions.jsonl").write_text("".join(json.dumps({"caption": c}) + "\n" for c in caps), encoding="utf-8")
    tmp.replace(out / "latents.safetensors")
    return out


def open_image_source(kind: str, path: str | Path, resolution: int):
    """The real-image dataset of ``data.real_kind``: ``folder`` | ``webdataset`` | ``latents``."""
    if kind == "folder":
        return ImageCaptionFolder(path, resolution)
    if kind == "webdataset":
        return WebDatasetShards(path, resolution)
    if kind == "latents":
        return LatentCache(path)
    raise ValueError(f"data.real_kind must be 'folder', 'webdataset' or 'latents', got {kind!r}")
