r"""FID as EDM (Karras et al. 2022) and DMD2 (Yin et al. 2024, Sec. 5.1, Table 1) compute it on ImageNet-64.

Pipeline (EDM's ``fid.py``):

1. generate ``N`` images (50,000; the class of image ``i`` is ``i mod num_classes``; the noise of image ``i`` comes
   from seed ``seed + i``, so the set does not depend on the batch size);
2. convert ``x in [-1, 1]`` to ``uint8 = clip(x * 127.5 + 128, 0, 255)`` (EDM's ``generate.py``);
3. features: the Inception-v3 detector ``inception-2015-12-05`` (TorchScript) at the images' native 64x64 resolution:
   ``detector(images_uint8 (B, 3, H, W), return_features=True) -> (B, 2048)`` (the detector resizes to 299 inside);
4. Gaussian statistics ``mu = mean f``, ``Sigma = (sum f f^T - N mu mu^T) / (N - 1)`` (float64, accumulated over
   batches), and the Frechet distance to a reference ``npz`` with keys ``mu (d,)``, ``sigma (d, d)`` (EDM's
   ``imagenet-64x64.npz`` layout) via :func:`dmd2.eval.metrics.frechet_distance`.

Feature modes (``--mode``; the reference statistics must come from the same mode):

* ``edm`` (default): step 3 as above, so the number compares with EDM's and DMD2's tables (DMD2 1-step: 1.51 /
  1.28; EDM teacher, Heun 18 steps = 35 NFE: 2.32 in DMD2's Table 1).
* ``legacy_tensorflow``: clean-fid's name for the same computation (the detector resizes inside); identical features.
* ``clean``: clean-fid's "clean" mode (Parmar et al. 2022): each channel resized to 299x299 by PIL's bicubic filter in
  float, then ``(x - 128) / 128`` fed to the detector's ``layers`` submodule (bypassing its internal resize).
* clean-fid's ``legacy_pytorch`` uses a different network (pytorch-fid's Inception weights) and is refused.

The detector is read from a LOCAL TorchScript file (``torch.jit.load``; the ``inception-2015-12-05.pt`` that
StyleGAN2-ADA and clean-fid publish). EDM's ``inception-2015-12-05.pkl`` is a Python pickle (loading it can run code)
and is refused with a message saying so. Nothing is downloaded.

Command line::

    python -m dmd2.eval.fid --ckpt RUN_OR_CHECKPOINT --detector inception-2015-12-05.pt \
        --ref imagenet-64x64.npz [--num 50000] [--batch 250] [--mode edm] [--out fid.json]
    python -m dmd2.eval.fid --sampler heun18 --teacher edm-imagenet-64x64-cond-adm.pkl --detector ... --ref ...
    python -m dmd2.eval.fid ref --data imagenet-64x64.zip --detector ... --dest imagenet-64x64.npz

The result JSON holds ``fid``, the settings, the detector's SHA-256 and the wall time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import frechet_distance

__all__ = [
    "MODES",
    "images_to_uint8",
    "load_detector",
    "FeatureExtractor",
    "FeatureStats",
    "load_reference",
    "save_reference",
    "sample_seeds_noise",
    "generated_statistics",
    "dataset_statistics",
    "fid_from_statistics",
    "main",
]

MODES = ("edm", "legacy_tensorflow", "clean")
CLEAN_SIZE = 299


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` images in [-1, 1] -> uint8 ``clip(x * 127.5 + 128, 0, 255)`` (EDM's conversion: round half
    up through the ``+128`` and truncation). Values outside [-1, 1] are clipped, as EDM does when saving PNGs;
    non-finite values raise ``ValueError`` (a NaN would otherwise become a black pixel)."""
    if x.dim() != 4:
        raise ValueError(f"images_to_uint8: expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"images_to_uint8: expected float images in [-1, 1] or uint8, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images_to_uint8: the generated images contain NaN or infinite values")
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_detector(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The Inception detector from a local TorchScript file (``torch.jit.load``), in eval mode on ``device``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a ``.pkl`` (EDM's pickled detector: refused, it could run code) or not a TorchScript archive.
    """
    p = os.fspath(path)
    if p.endswith(".pkl"):
        raise ValueError(
            f"{p}: refused - EDM's inception-2015-12-05.pkl is a Python pickle and unpickling it can run code; pass "
            f"the TorchScript file inception-2015-12-05.pt (the same network, as StyleGAN2-ADA / clean-fid publish it)"
        )
    if not os.path.isfile(p):
        raise FileNotFoundError(f"Inception detector not found: {p} (expected the TorchScript file "
                                f"inception-2015-12-05.pt)")
    try:
        det = torch.jit.load(p, map_location=torch.device(device))
    except RuntimeError as e:
        raise ValueError(f"{p}: not a TorchScript archive ({e.__class__.__name__}: {str(e).splitlines()[0]}); "
                         f"expected inception-2015-12-05.pt") from e
    return det.eval()


class FeatureExtractor:
    """uint8 images -> detector features ``(B, d)`` float64 (d = 2048 for Inception), in one of :data:`MODES`.

    Args:
        detector: a TorchScript (or any) module ``detector(x, return_features=True) -> (B, d)``; ``clean`` mode also
            needs its ``layers`` submodule (normalised 299x299 input -> features).
        mode: ``"edm"`` / ``"legacy_tensorflow"`` (native resolution, detector resizes inside) or ``"clean"``.
        device: where the detector runs.
    """

    def __init__(self, detector: Callable, mode: str = "edm", device: torch.device | str = "cpu"):
        if mode == "legacy_pytorch":
            raise ValueError("mode 'legacy_pytorch' uses pytorch-fid's Inception weights, a different network from the "
                             "TorchScript detector; use 'edm' (== clean-fid 'legacy_tensorflow') or 'clean'")
        if mode not in MODES:
            raise ValueError(f"unknown FID mode {mode!r}; expected one of {MODES}")
        if mode == "clean" and not hasattr(detector, "layers"):
            raise ValueError("mode 'clean' needs the detector's 'layers' submodule (inception-2015-12-05.pt has it)")
        self.detector, self.mode, self.device = detector, mode, torch.device(device)

    @staticmethod
    def clean_resize(images: torch.Tensor, size: int = CLEAN_SIZE) -> torch.Tensor:
        """clean-fid's "clean" resize: each channel of each uint8 image -> ``size x size`` with PIL bicubic in float
        (``mode='F'``), no quantisation. ``(B, C, H, W)`` uint8 -> ``(B, C, size, size)`` float32 in ~[0, 255]."""
        from PIL import Image

        arr = images.cpu().numpy().astype(np.float32)
        out = np.empty((arr.shape[0], arr.shape[1], size, size), dtype=np.float32)
        for i in range(arr.shape[0]):
            for c in range(arr.shape[1]):
                im = Image.fromarray(arr[i, c], mode="F").resize((size, size), resample=Image.BICUBIC)
                out[i, c] = np.asarray(im)
        return torch.from_numpy(out)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"FeatureExtractor: expected uint8 images (B, 1|3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # grayscale -> RGB, as EDM does
        b = images.shape[0]
        if self.mode == "clean":
            x = self.clean_resize(images).to(self.device)
            feats = self.detector.layers((x - 128) / 128)
        else:
            feats = self.detector(images.to(self.device), return_features=True)
        feats = feats.reshape(b, -1)
        return feats.double()


class FeatureStats:
    """Running float64 sums for the Gaussian fit of features: ``n``, ``sum f (d,)``, ``sum f f^T (d, d)``.

    :meth:`statistics` returns ``mu = s1 / n`` and ``Sigma = (s2 - n mu mu^T) / (n - 1)`` (the unbiased covariance,
    equal to :func:`dmd2.eval.metrics.feature_statistics` of all features at once), as NumPy float64.
    """

    def __init__(self):
        self.n = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def update(self, feats: torch.Tensor) -> None:
        if feats.dim() != 2:
            raise ValueError(f"FeatureStats.update: expected features (B, d), got {tuple(feats.shape)}")
        f = feats.double()
        if self.s1 is None:
            self.s1 = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.s2 = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        elif f.shape[1] != self.s1.shape[0]:
            raise ValueError(f"FeatureStats.update: feature dimension changed from {self.s1.shape[0]} to {f.shape[1]}")
        self.s1 += f.sum(0)
        self.s2 += f.T @ f
        self.n += f.shape[0]

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"FeatureStats: need at least 2 feature vectors, got {self.n}")
        mu = self.s1 / self.n
        sigma = (self.s2 - self.n * torch.outer(mu, mu)) / (self.n - 1)
        if not bool(torch.isfinite(sigma).all()):
            raise ValueError("FeatureStats: the detector produced non-finite features")
        return mu.cpu().numpy(), sigma.cpu().numpy()


def load_reference(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (d,), sigma (d, d))`` from an ``npz`` in EDM's layout (keys ``mu`` and ``sigma``), float64."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"reference statistics not found: {p} (expected an npz with keys mu, sigma, e.g. "
                                f"EDM's imagenet-64x64.npz)")
    with np.load(p, allow_pickle=False) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{p}: missing keys {missing}; expected EDM's layout with 'mu' (d,) and 'sigma' (d, d), "
                             f"found {z.files}")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{p}: expected mu (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    return mu, sigma


def save_reference(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write ``mu``, ``sigma`` to ``path`` (``np.savez``, EDM's layout)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:
        np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    return p


def sample_seeds_noise(seeds: Iterable[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Unit Gaussian noise ``(len(seeds), *shape)``: row ``i`` from ``torch.Generator().manual_seed(seeds[i])`` (CPU),
    so an image depends on its seed only (EDM's per-image seeds)."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def generated_statistics(sample_fn: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor],
                         extractor: FeatureExtractor, num: int = 50_000, batch: int = 250, num_classes: int = 1000,
                         shape: tuple[int, ...] = (3, 64, 64), seed: int = 0, device: torch.device | str = "cpu",
                         progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of ``num`` generated images.

    Image ``i`` has class ``i mod num_classes`` (``num_classes = 0``: unconditional, labels None) and unit noise from
    seed ``seed + i`` (:func:`sample_seeds_noise`); ``sample_fn(noise (B, *shape), labels (B,) long | None,
    generator) -> images (B, C, H, W) in [-1, 1]`` runs on ``device``; ``generator`` (seeded by the batch's first
    index) is for any further randomness (re-noising of multi-step students).
    """
    if num < 2 or batch < 1:
        raise ValueError(f"need num >= 2 and batch >= 1, got num={num}, batch={batch}")
    device = torch.device(device)
    stats = FeatureStats()
    with _progress(num, "FID samples", progress) as bar:
        for start in range(0, num, batch):
            idx = range(start, min(start + batch, num))
            noise = sample_seeds_noise([seed + i for i in idx], shape).to(device)
            labels = (torch.tensor(list(idx), device=device) % num_classes) if num_classes else None
            g = torch.Generator(device=device).manual_seed(seed + start + (1 << 40))
            with torch.no_grad():
                images = sample_fn(noise, labels, g)
            if images.shape[0] != len(idx):
                raise ValueError(f"sample_fn returned {images.shape[0]} images for a batch of {len(idx)}")
            stats.update(extractor(images_to_uint8(images)))
            bar.update(len(idx))
    return stats.statistics()


def dataset_statistics(dataset, extractor: FeatureExtractor, batch: int = 250, num: int | None = None,
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of the first ``num`` (all when None) images of a dataset returning ``(uint8 (C, H, W), label)``
    (e.g. :class:`dmd2.data.ImageZipDataset` with ``as_uint8=True``): the reference of ``fid.py ref``."""
    n = len(dataset) if num is None else min(num, len(dataset))
    if n < 2:
        raise ValueError(f"dataset_statistics: need at least 2 images, got {n}")
    stats = FeatureStats()
    with _progress(n, "reference images", progress) as bar:
        for start in range(0, n, batch):
            imgs = torch.stack([dataset[i][0] for i in range(start, min(start + batch, n))])
            stats.update(extractor(images_to_uint8(imgs)))
            bar.update(imgs.shape[0])
    return stats.statistics()


def fid_from_statistics(mu: np.ndarray, sigma: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """The Frechet distance; ValueError when the feature dimensions differ (a reference from another detector)."""
    if mu.shape != ref_mu.shape:
        raise ValueError(f"generated features have dimension {mu.shape[0]} but the reference has {ref_mu.shape[0]}; "
                         f"the reference must come from the same detector and mode")
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


# --------------------------------------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def _heun_steps(sampler: str) -> int:
    if not sampler.startswith("heun") or not sampler[4:].isdigit() or int(sampler[4:]) < 1:
        raise ValueError(f"--sampler must be 'student' or 'heunN' (EDM's Heun sampler with N steps, e.g. heun18), "
                         f"got {sampler!r}")
    return int(sampler[4:])


def build_sample_fn(args, device: torch.device) -> tuple[Callable, dict[str, Any]]:
    """``(sample_fn, info)`` for ``--sampler student`` (``--ckpt``) or ``--sampler heunN`` (``--teacher``)."""
    if args.sampler == "student":
        if not args.ckpt:
            raise ValueError("--sampler student needs --ckpt (a run or checkpoint folder of a class-conditional recipe, "
                             "e.g. python -m dmd2.recipes.imagenet64)")
        from ..train.loading import load_generator

        student = load_generator(args.ckpt, weights=args.weights, device=device, steps=args.steps,
                                 recipe=args.recipe or None)
        if not student.num_classes:
            raise ValueError(f"--ckpt {args.ckpt}: FID here needs a class-conditional image generator (labels as cond)")

        def sample_fn(noise, labels, g):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                return student(noise, labels, generator=g).float()

        info = {"sampler": "student", "ckpt": os.fspath(student.checkpoint), "weights": student.weights,
                "steps": student.num_steps, "nfe": student.num_steps}
        return sample_fn, {**info, "num_classes": student.num_classes, "shape": student.shape}
    n = _heun_steps(args.sampler)
    if not args.teacher:
        raise ValueError(f"--sampler {args.sampler} needs --teacher (EDM's .pkl, read safely, or its .safetensors)")
    from ..core.schedules import EDMSchedule
    from ..models.edm_pickle import load_edm_adm
    from .samplers import edm_heun, heun_nfe

    teacher = load_edm_adm(args.teacher, device=device).eval()
    schedule = EDMSchedule(sigma_data=teacher.sigma_data)
    c = teacher.model.config

    def sample_fn(noise, labels, g):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            return edm_heun(teacher, noise, labels, num_steps=n, schedule=schedule).float()

    info = {"sampler": args.sampler, "teacher": os.fspath(args.teacher), "steps": n, "nfe": heun_nfe(n)}
    return sample_fn, {**info, "num_classes": c.label_dim, "shape": (c.img_channels, c.img_resolution, c.img_resolution)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dmd2.eval.fid", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="gen", choices=["gen", "ref"],
                   help="gen (default): FID of generated images; ref: reference statistics of a dataset")
    p.add_argument("--detector", required=True, help="local TorchScript Inception file (inception-2015-12-05.pt)")
    p.add_argument("--mode", default="edm", choices=list(MODES), help="feature mode (default edm)")
    p.add_argument("--batch", type=int, default=250, help="images per batch")
    p.add_argument("--num", type=int, default=None, help="images (gen: default 50000; ref: default all)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    # gen
    p.add_argument("--ref", help="gen: reference npz (keys mu, sigma), e.g. EDM's imagenet-64x64.npz")
    p.add_argument("--sampler", default="student", help="gen: 'student' (--ckpt) or 'heunN' (EDM Heun, --teacher), "
                                                         "e.g. heun18 = the teacher baseline (35 NFE)")
    p.add_argument("--ckpt", help="gen: run folder (its newest checkpoint) or checkpoint folder, e.g. of imagenet64")
    p.add_argument("--recipe", default="", help="gen: the recipe's module (e.g. dmd2.recipes.imagenet64), for a "
                                                "checkpoint whose config.json names none")
    p.add_argument("--weights", default="generator", choices=["generator", "ema"], help="gen: which student weights")
    p.add_argument("--steps", type=int, default=None, help="gen: student steps (default: the checkpoint's)")
    p.add_argument("--teacher", help="gen: EDM teacher .pkl / .safetensors for --sampler heunN")
    p.add_argument("--seed", type=int, default=0, help="gen: image i uses seed + i")
    p.add_argument("--bf16", action="store_true", help="gen: run the generator under bf16 autocast")
    p.add_argument("--out", help="gen: result JSON path (default: printed only)")
    # ref
    p.add_argument("--data", help="ref: EDM dataset zip or class folders")
    p.add_argument("--dest", help="ref: output npz")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        device = _device(args.device)
        detector = load_detector(args.detector, device)
        extractor = FeatureExtractor(detector, args.mode, device)
        t0 = time.perf_counter()
        if args.command == "ref":
            if not args.data or not args.dest:
                raise ValueError("ref needs --data (dataset zip or folder) and --dest (output npz)")
            from ..data.images import open_image_dataset

            ds = open_image_dataset(args.data, as_uint8=True, **({"use_labels": False} if os.path.isfile(args.data) else {}))
            mu, sigma = dataset_statistics(ds, extractor, args.batch, args.num, progress=not args.no_progress)
            print(save_reference(args.dest, mu, sigma))
            return 0
        if not args.ref:
            raise ValueError("gen needs --ref (reference statistics npz with keys mu, sigma)")
        ref_mu, ref_sigma = load_reference(args.ref)
        sample_fn, info = build_sample_fn(args, device)
        num = 50_000 if args.num is None else args.num
        mu, sigma = generated_statistics(sample_fn, extractor, num=num, batch=args.batch,
                                         num_classes=info.pop("num_classes"), shape=tuple(info.pop("shape")),
                                         seed=args.seed, device=device, progress=not args.no_progress)
        fid = fid_from_statistics(mu, sigma, ref_mu, ref_sigma)
        result = {"fid": fid, "num_samples": num, "mode": args.mode, **info, "seed": args.seed, "bf16": args.bf16,
                  "ref": os.fspath(args.ref), "detector": os.fspath(args.detector),
                  "detector_sha256": _sha256(args.detector), "device": str(device),
                  "time_s": round(time.perf_counter() - t0, 3)}
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        if not math.isfinite(fid):
            raise ValueError(f"FID is not finite ({fid})")
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
