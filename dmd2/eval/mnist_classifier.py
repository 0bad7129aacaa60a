"""A small MNIST classifier: the feature extractor of the MNIST recipe's FID / KID and its label-accuracy judge.

The network (:class:`MNISTClassifier`, 223k parameters) reads 32x32 digits in [-1, 1] (``dmd2.data.mnist``);
every conv is 3x3, padding 1, followed by BatchNorm and ReLU:

    conv(1->32), maxpool2                       32x32 -> 16x16
    conv(32->64), conv(64->64), maxpool2        16x16 -> 8x8
    conv(64->96), conv(96->128), global mean    8x8   -> 128    <- features (the "pool3" of this recipe)
    linear(128->10)                                              <- logits

It is trained by :func:`train_classifier` on the TRAIN split only (the held-out split stays unseen: FID references
it), with random affine augmentation (rotation, scale, shear, shift), seeded, on CPU in a few minutes. The trained
weights ship as ``dmd2/assets/mnist_classifier.safetensors`` with a JSON record (held-out accuracy, seed, time,
command) next to them; :func:`mnist_features` loads them once per device.

Command line::

    python -m dmd2.eval.mnist_classifier train --out dmd2/assets/mnist_classifier.safetensors [--seed 0] [--epochs E]
    python -m dmd2.eval.mnist_classifier evaluate [--checkpoint PATH]
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FEATURE_DIM",
    "DEFAULT_CHECKPOINT",
    "MNISTClassifier",
    "ClassifierTrainConfig",
    "train_classifier",
    "load_classifier",
    "mnist_features",
    "heldout_accuracy",
]

FEATURE_DIM = 128
STAGES = ((32,), (64, 64), (96, FEATURE_DIM))  # conv widths per resolution: 32x32, 16x16, 8x8
NUM_CLASSES = 10
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "mnist_classifier.safetensors"


class MNISTClassifier(nn.Module):
    """Small CNN: ``(B, 1, 32, 32)`` in [-1, 1] -> ``(features (B, 128), logits (B, 10))`` (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for stage, widths in enumerate(STAGES):
            for c_out in widths:
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            if stage < len(STAGES) - 1:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x).mean(dim=(2, 3))
        return feats, self.head(feats)


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Training hyperparameters of the shipped classifier (AdamW, cosine decay with linear warm-up).

    Augmentation per image: rotation ``U(-rot_deg, rot_deg)``, isotropic scale ``U(1-scale, 1+scale)``,
    shear ``U(-shear, shear)``, shift ``U(-shift_px, shift_px)`` pixels on each axis; background stays -1.
    """

    seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup_frac: float = 0.05
    rot_deg: float = 12.0
    scale: float = 0.1
    shear: float = 0.15
    shift_px: float = 2.5
    label_smoothing: float = 0.05


def random_affine(x: torch.Tensor, cfg: ClassifierTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random affine warp of ``(B, 1, H, W)`` images in [-1, 1]; pixels from outside the frame are -1 (background)."""
    b, _, h, w = x.shape
    u = lambda lo, hi: torch.rand(b, generator=generator) * (hi - lo) + lo  # noqa: E731
    angle = u(-cfg.rot_deg, cfg.rot_deg) * (math.pi / 180)
    scale = u(1 - cfg.scale, 1 + cfg.scale)
    shear = u(-cfg.shear, cfg.shear)
    tx, ty = u(-cfg.shift_px, cfg.shift_px) * (2 / w), u(-cfg.shift_px, cfg.shift_px) * (2 / h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # output->input sampling matrix: rotation/scale, then a shear along x; grid coordinates are in [-1, 1]
    theta = torch.stack(
        [torch.stack([cos + shear * sin, -sin + shear * cos, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def _cosine_lr(step: int, total: int, cfg: ClassifierTrainConfig) -> float:
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    for i in range(0, images.shape[0], batch_size):
        f, l = model(images[i : i + batch_size])
        feats.append(f)
        logits.append(l)
    return torch.cat(feats), torch.cat(logits)


def heldout_accuracy(model: nn.Module) -> tuple[float, int]:
    """``(accuracy, correct count)`` of ``model`` (in eval mode) on the 1,000 held-out digits."""
    from dmd2.data.mnist import load_mnist

    x, y = load_mnist("heldout")
    _, logits = _predict(model.eval(), x.to(next(model.parameters()).device))
    correct = int((logits.argmax(1).cpu() == y).sum())
    return correct / y.shape[0], correct


def train_classifier(
    out: str | Path, cfg: ClassifierTrainConfig = ClassifierTrainConfig(), command: str | None = None, log=print
) -> dict:
    """Train :class:`MNISTClassifier` on the TRAIN split, save ``out`` (safetensors) and ``out`` with ``.json``.

    Deterministic for a given ``cfg.seed`` and thread count (the caller's global RNG state is restored after).
    Returns the JSON record: held-out accuracy, seed, config, training seconds, command, parameter count, sha256.
    """
    from safetensors.torch import save_file

    from dmd2.data.mnist import load_mnist

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"expected an output path ending in .safetensors, got {out}")
    x, y = load_mnist("train")
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = MNISTClassifier()
        decay = [p for p in model.parameters() if p.dim() > 1]
        no_decay = [p for p in model.parameters() if p.dim() <= 1]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
        )
        step = 0
        for epoch in range(cfg.epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            loss_sum = torch.zeros(())
            for i in range(0, n, cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                xb = random_affine(x[idx], cfg, gen)
                for group in opt.param_groups:
                    group["lr"] = _cosine_lr(step, total, cfg)
                _, logits = model(xb)
                loss = F.cross_entropy(logits, y[idx], label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * idx.shape[0]
                step += 1
            log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {float(loss_sum) / n:.4f}  ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    acc, correct = heldout_accuracy(model)
    log(f"held-out accuracy {acc:.4f} ({correct}/1000)  training time {seconds:.0f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "heldout_accuracy": f"{acc:.4f}", "seed": str(cfg.seed)})
    os.replace(tmp, out)
    record = {
        "heldout_accuracy": acc,
        "heldout_correct": correct,
        "heldout_size": 1000,
        "train_split_size": n,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "feature_dim": FEATURE_DIM,
        "command": command,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> MNISTClassifier:
    """The classifier from a safetensors checkpoint (default: the shipped one), in eval mode, without gradients."""
    from safetensors.torch import load_file

    path = DEFAULT_CHECKPOINT if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"expected the MNIST classifier checkpoint at {path}; train one with "
            f"`python -m dmd2.eval.mnist_classifier train --out {path}`"
        )
    model = MNISTClassifier()
    model.load_state_dict(load_file(str(path)))  # strict: names and shapes must match
    model.eval().requires_grad_(False)
    return model.to(device)


@functools.lru_cache(maxsize=8)
def _cached_classifier(path: str, device: str) -> MNISTClassifier:
    return load_classifier(path, device)


def mnist_features(
    images: torch.Tensor, batch_size: int = 500, checkpoint: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of the shipped classifier (loaded once per device and cached).

    Args:
        images: float ``(B, 1, 32, 32)`` digits in [-1, 1] (the ``dmd2.data.mnist`` convention), any device.
        batch_size: images per forward pass.
        checkpoint: another classifier checkpoint (default: ``dmd2/assets/mnist_classifier.safetensors``).

    Returns:
        ``(features, logits)``: float32 ``(B, 128)`` and ``(B, 10)`` on the device of ``images``.
    """
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"expected a floating-point torch.Tensor of images, got {type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 32, 32):
        raise ValueError(f"expected images of shape (B, 1, 32, 32) in [-1, 1], got {tuple(images.shape)}")
    path = str(DEFAULT_CHECKPOINT if checkpoint is None else Path(checkpoint).resolve())
    model = _cached_classifier(path, str(images.device))
    return _predict(model, images.float(), batch_size)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmd2.eval.mnist_classifier", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train on the train split and save safetensors + json")
    tr.add_argument("--out", required=True, help="output .safetensors path (a .json record is written next to it)")
    tr.add_argument("--seed", type=int, default=ClassifierTrainConfig.seed)
    tr.add_argument("--epochs", type=int, default=ClassifierTrainConfig.epochs)
    ev = sub.add_parser("evaluate", help="held-out accuracy of a checkpoint")
    ev.add_argument("--checkpoint", default=None, help=f"default: {DEFAULT_CHECKPOINT}")
    args = parser.parse_args(argv)
    if args.cmd == "train":
        cfg = ClassifierTrainConfig(seed=args.seed, epochs=args.epochs)
        env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        command = env + "python -m dmd2.eval.mnist_classifier " + " ".join(sys.argv[1:] if argv is None else argv)
        train_classifier(args.out, cfg, command=command)
    else:
        acc, correct = heldout_accuracy(load_classifier(args.checkpoint))
        print(f"held-out accuracy {acc:.4f} ({correct}/1000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
