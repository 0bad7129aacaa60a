r"""Real images (with captions) for DMD2's GAN term on SDXL (Sec. 4.2), as VAE latents.

Sources (all indexable, so :class:`~dmd2.train.IndexedBatches` can serve batch ``(step, shard)`` without state):

* :class:`ImageCaptionFolder` - a folder of images plus ``captions.jsonl`` with ``{"file": ..., "caption": ...}``
  per line (``file`` relative to the folder);
* :class:`WebDatasetShards` - webdataset ``.tar`` shards: members sharing a key (the name up to the first dot) form a
  sample, an image (``.jpg``/``.jpeg``/``.png``/``.webp``) and a caption (``.txt``, or ``.json`` with ``caption``);
  an index of the tar headers (:mod:`tarfile`), each image read by offset. Not the ``webdataset`` package: its
  pipelines stream samples in order, while exact resume and a change of rank count need sample ``i`` of batch
  ``(step, shard)`` by index (its indexed reader, ``wids``, is not part of webdataset 1.0);
* :class:`LatentCache` - the VAE posterior's moments precomputed by :func:`cache_latents` (``latents.safetensors``
  with ``mean`` and ``std``, + ``captions.jsonl``), read lazily per item.

Images are resized (shorter side to ``resolution``, bicubic) and centre-cropped to ``resolution`` x ``resolution``,
then scaled to ``[-1, 1]``. The VAE's posterior is ``q(z | x) = N(mu(x), diag sigma(x)^2)``; a real latent for the
GAN is a *sample* ``s (mu + sigma eps)`` with the scaling factor ``s`` (the official code samples it too: the posterior
mean alone lacks the sample noise a discriminator can tell from generator latents). Every source therefore yields
``moments (2, C, h, w) = stack(s mu, s sigma)`` (:func:`vae_moments`), and :func:`sample_posterior` draws from them
with a caller-keyed generator. Every source lists its ``captions()`` (``data.prompts=real``: the generator's prompts).

The pipeline of the GAN's real data: :class:`LatentCollate` turns a batch of source items into posterior moments
(encoding images with the VAE; a cache's moments as they are) and the conditions of their captions, and
:class:`PosteriorSamples` draws one posterior sample per read from a generator keyed by the batch (the SDXL recipe:
``(data.seed, step, shard)``, a fresh sample per read that resume reproduces). :func:`vae_decode` is the way back,
latents to images (sample grids, the 1-step warm start's LPIPS).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["IMAGE_SUFFIXES", "load_image", "ImageCaptionFolder", "WebDatasetShards", "LatentCache", "vae_moments",
           "vae_decode", "sample_posterior", "LatentCollate", "PosteriorSamples", "cache_latents", "open_image_source"]

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

    def captions(self) -> list[str]:
        return [c for _, c in self.items]

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

    def captions(self) -> list[str]:
        return [c for *_, c in self.index]

    def __getitem__(self, i: int):
        si, offset, size, caption = self.index[i]
        with open(self.paths[si], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return load_image(data, self.resolution), caption


class LatentCache:
    """The posterior moments written by :func:`cache_latents`: ``root/latents.safetensors`` (``mean`` and ``std``,
    each ``(N, C, h, w)``, already times the VAE's scaling factor) and ``root/captions.jsonl``;
    ``ds[i] -> (moments (2, C, h, w) fp32, caption)``, read from the file per item (the cache is not held in memory).

    A cache of an older dmd2 (one ``latents`` tensor: posterior means only) is refused with the command that rebuilds it.
    """

    def __init__(self, root: str | Path):
        from safetensors import safe_open

        self.root = Path(root)
        lat, cap = self.root / "latents.safetensors", self.root / "captions.jsonl"
        if not lat.is_file() or not cap.is_file():
            raise ValueError(f"latent cache {str(self.root)!r}: expected latents.safetensors and captions.jsonl "
                             "(write one with cache_latents / `python -m dmd2.recipes.sdxl cache-latents`)")
        self._file = safe_open(str(lat), "pt")
        keys = set(self._file.keys())
        if keys != {"mean", "std"}:
            raise ValueError(f"latent cache {str(self.root)!r} holds {sorted(keys)}, not the posterior's mean and std "
                             "(an older cache of posterior means only); rebuild it: python -m dmd2.recipes.sdxl "
                             "cache-latents OUT_DIR data.real=IMAGES data.real_kind=folder|webdataset")
        self._mean, self._std = self._file.get_slice("mean"), self._file.get_slice("std")
        shape = self._mean.get_shape()
        if self._std.get_shape() != shape or len(shape) != 4:
            raise ValueError(f"latent cache {str(self.root)!r}: mean {self._mean.get_shape()} and std "
                             f"{self._std.get_shape()} must be one (N, C, h, w) shape")
        self.captions_list = [json.loads(line)["caption"] for line in cap.read_text(encoding="utf-8").splitlines()
                              if line.strip()]
        if len(self.captions_list) != shape[0]:
            raise ValueError(f"latent cache {str(self.root)!r}: {shape[0]} latents but {len(self.captions_list)} captions")

    def __len__(self) -> int:
        return len(self.captions_list)

    def captions(self) -> list[str]:
        return list(self.captions_list)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"latent cache {str(self.root)!r}: index {i} out of range for {len(self)} latents")
        return torch.stack([self._mean[i], self._std[i]]).float(), self.captions_list[i]


@torch.no_grad()
def vae_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """``stack(s mu(x), s sigma(x))`` of the VAE posterior, ``s = scaling_factor``: images ``(B, 3, H, W)`` in
    ``[-1, 1]`` -> ``(B, 2, C, H/f, W/f)`` fp32."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"vae_moments: expected images (B, 3, H, W), got {tuple(images.shape)}")
    p = next(vae.parameters())
    dist = vae.encode(images.to(p.device, p.dtype)).latent_dist
    s = vae.config.scaling_factor
    return torch.stack([dist.mean * s, dist.std * s], dim=1).float()


def sample_posterior(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``mean + std * eps``, ``eps ~ N(0, I)`` from ``generator``: moments ``(B, 2, C, h, w)`` -> latents
    ``(B, C, h, w)`` (one fresh posterior sample per call)."""
    if moments.dim() != 5 or moments.shape[1] != 2:
        raise ValueError(f"sample_posterior: expected moments (B, 2, C, h, w), got {tuple(moments.shape)}")
    mean, std = moments.unbind(1)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` fp32, about ``[-1, 1]`` and not clamped, of latents ``(B, C, h, w)`` in the UNet's
    (scaled) space: ``dec(z / s)``, ``s = scaling_factor`` (the inverse of :func:`vae_moments`' scaling); ``z / s`` is
    computed in fp32, then cast to the VAE's dtype. Differentiable: gradients flow to ``latents``."""
    p = next(vae.parameters())
    return vae.decode((latents.float() / vae.config.scaling_factor).to(p.dtype), return_dict=False)[0].float()


class LatentCollate:
    """``collate`` of the real-data batches (:class:`~dmd2.train.IndexedBatches`): source items ``(x, caption)`` ->
    ``(moments (B, 2, C, h, w) fp32, encode(captions))``.

    Args:
        encode: ``list of captions -> cond`` (the SDXL recipe: :meth:`PromptEncoder.cond
            <dmd2.models.sdxl.PromptEncoder.cond>` at the run's resolution).
        latent_shape: ``(C, h, w)`` the run's latents have; a batch of another shape is a ``ValueError``.
        vae: the VAE that encodes image items ``(3, R, R)`` (:func:`vae_moments`, on the VAE's device); ``None``: the
            items are already moments ``(2, C, h, w)`` (a :class:`LatentCache`).
    """

    def __init__(self, encode: Callable, latent_shape: Sequence[int], vae=None):
        self.encode, self.latent_shape, self.vae = encode, tuple(latent_shape), vae

    def __call__(self, items) -> tuple[torch.Tensor, object]:
        x = torch.stack([a for a, _ in items])
        moments = x if self.vae is None else vae_moments(self.vae, x)
        if tuple(moments.shape[2:]) != self.latent_shape:
            raise ValueError(f"real latents have shape {tuple(moments.shape[2:])}; the run expects {self.latent_shape} "
                             "(a latent cache written at another model.resolution?)")
        return moments, self.encode([c for _, c in items])


class PosteriorSamples:
    """The GAN's real latents (DMD2 Sec. 4.2) by batch: ``(step, shard, batch, device) -> (mean + std * eps, cond)``.

    ``moments_of(step, shard, batch, device) -> (moments (B, 2, C, h, w), cond)`` gives the batch's posterior
    moments (:class:`LatentCollate` under :class:`~dmd2.train.IndexedBatches`); ``eps`` comes from a generator on the
    moments' device seeded ``seed_of(step, shard)`` (:func:`sample_posterior`): the same read gives the same
    sample, another step or shard of the same images another one, and a resume needs no generator state.
    """

    def __init__(self, moments_of: Callable, seed_of: Callable[[int, int], int]):
        self.moments_of, self.seed_of = moments_of, seed_of

    def __call__(self, step: int, shard: int, batch: int, device) -> tuple[torch.Tensor, object]:
        moments, cond = self.moments_of(step, shard, batch, device)
        g = torch.Generator(device=moments.device).manual_seed(self.seed_of(step, shard))
        return sample_posterior(moments, g), cond


def cache_latents(dataset, vae, out: str | Path, batch: int = 16, progress: Callable | None = None,
                  dtype: torch.dtype = torch.float16) -> Path:
    """Encode every ``(image, caption)`` of ``dataset`` with ``vae`` into a :class:`LatentCache` folder ``out``:
    the posterior's scaled mean and std, stored in ``dtype`` (fp16 by default, as the official latents; 2 x 128 KiB
    per 1024 px image)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chunks, caps = [], []
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        chunks.append(vae_moments(vae, torch.stack([x for x, _ in items])).cpu())
        caps += [c for _, c in items]
        if progress is not None:
            progress(len(caps), len(dataset))
    moments = torch.cat(chunks).to(dtype)
    tmp = out / "latents.safetensors.tmp"
    save_file({"mean": moments[:, 0].contiguous(), "std": moments[:, 1].contiguous()}, str(tmp))
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
