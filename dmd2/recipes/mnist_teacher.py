r"""The MNIST teacher: a small class-conditional ADM with EDM preconditioning, trained with EDM's loss
(Karras et al. 2022, Sec. 5 and Table 1, "EDM" column):

.. math::
    \ln\sigma \sim \mathcal N(P_{mean}, P_{std}^2),\quad
    L = \mathbb E\,\lambda(\sigma)\,\lVert D(x_0 + \sigma\epsilon;\sigma, y) - x_0\rVert^2,\quad
    \lambda(\sigma) = 1/\sigma^2 + 1/\sigma_{data}^2

on the TRAIN split of :mod:`dmd2.data.mnist` only, with Adam, a linear learning-rate warm-up and an EMA of the
weights (what ships), by the library's denoiser loop (:func:`dmd2.train.denoiser.train_denoiser`). Everything random
comes from ``seed``: the initialisation (``torch.manual_seed``) and one ``torch.Generator`` for the batch indices,
the noise levels and the noise, so a run is reproducible on CPU with the same thread count. The network is
deliberately small (:func:`teacher_adm_config`, ~0.33M parameters) so that it trains, and later distils, on two CPU
cores.

Run as ``python -m dmd2.recipes.mnist teacher [--out DIR] [teacher.iters=N ...]`` (or this module directly,
``python -m dmd2.recipes.mnist_teacher --out DIR``). ``DIR`` receives ``teacher.safetensors`` (EMA weights),
``teacher.json`` (config, seed, loss curve, wall time) and ``state.pt`` (everything needed to continue exactly:
raw weights, EMA, Adam state, generator state, iteration), written every ``checkpoint_every`` iterations.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from ..core import EDMSchedule
from ..data.mnist import load_mnist
from ..models.adm import ADMConfig, build_edm_adm
from ..train.checkpoint import load_weights

__all__ = ["TeacherConfig", "teacher_adm_config", "build_teacher", "load_teacher", "train_teacher",
           "evaluate_teacher", "metrics_entry", "DEFAULT_TEACHER", "IMAGE_SHAPE"]

DEFAULT_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "mnist_teacher.safetensors"
#: one image: MNIST padded to 32 x 32, one channel (:mod:`dmd2.data.mnist`)
IMAGE_SHAPE = (1, 32, 32)


def teacher_adm_config(dropout: float = 0.0) -> ADMConfig:
    """The MNIST teacher's network: ADM at 32x32 -> 16x16 -> 8x8 with widths 16, 32, 32, one residual block per
    encoder level (two per decoder level), self-attention only in the decoder's 8x8 ``in0`` block (one head of 32
    channels), 10 classes. 0.33M parameters; the GAN head reads ``enc.8x8_block0`` (32 x 8 x 8)."""
    return ADMConfig(img_resolution=32, img_channels=1, label_dim=10, model_channels=16, channel_mult=(1, 2, 2),
                     channel_mult_emb=4, num_blocks=1, attn_resolutions=(), dropout=dropout, label_dropout=0.0,
                     channels_per_head=32)


@dataclass(frozen=True)
class TeacherConfig:
    """EDM training of the MNIST teacher (EDM's CIFAR-10 loss settings: P_mean -1.2, P_std 1.2, sigma_data 0.5).

    Attributes:
        iters: optimizer steps.
        batch: images per step (drawn with replacement from the 4,000 train digits).
        lr: Adam learning rate after the warm-up.
        warmup: steps of linear learning-rate warm-up.
        ema_decay: per-step EMA decay.
        p_mean, p_std: EDM's log-normal noise-level distribution, ``ln sigma ~ N(p_mean, p_std^2)``.
        sigma_data: EDM's data standard deviation.
        dropout: the ADM blocks' dropout.
        seed: all randomness.
        threads: ``torch.set_num_threads`` (0 = leave).
        checkpoint_every: iterations between writes of the run folder.
        log_every: iterations per loss-curve point.
    """

    iters: int = 4000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    dropout: float = 0.0
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 500
    log_every: int = 50

    def __post_init__(self):
        for name in ("iters", "batch", "warmup", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TeacherConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0 or not self.sigma_data > 0 or not self.p_std > 0:
            raise ValueError("TeacherConfig: lr, sigma_data and p_std must be positive")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TeacherConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")


def build_teacher(dropout: float = 0.0, sigma_data: float = 0.5) -> torch.nn.Module:
    """``EDMPrecond(ADMNet(teacher_adm_config()))``: ``D(x_t (B,1,32,32), sigma (B,), labels (B,) int) -> x0``."""
    return build_edm_adm(teacher_adm_config(dropout), sigma_data=sigma_data)


def load_teacher(path: str | Path | None = None) -> torch.nn.Module:
    """The shipped (or given) teacher's EMA weights in a :func:`build_teacher` network, in eval mode, frozen.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the checkpoint's tensors do not match the teacher network (names or shapes).
    """
    path = Path(path) if path is not None else DEFAULT_TEACHER
    if not path.is_file():
        raise FileNotFoundError(f"expected the MNIST teacher's safetensors at {path}; train one with "
                                f"`python -m dmd2.recipes.mnist teacher --out DIR`")
    state = load_weights(path)
    net = build_teacher()
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:5]
        raise ValueError(f"{path}: tensors do not match the MNIST teacher network (first differences: {diff})")
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def _resume_key(cfg: TeacherConfig) -> str:
    """The configuration without ``iters``/``checkpoint_every``/``log_every``: a run may be continued to more iterations."""
    d = asdict(cfg)
    for k in ("iters", "checkpoint_every", "log_every"):
        d.pop(k)
    return json.dumps(d, sort_keys=True)


def train_teacher(cfg: TeacherConfig, out: str | Path, resume: bool = False, progress: bool = True,
                  command: str = "") -> dict:
    """Train the teacher into the run folder ``out`` (module docstring; the loop is
    :func:`dmd2.train.denoiser.train_denoiser`); returns the ``teacher.json`` record.

    With ``resume`` and an ``out/state.pt``, training continues exactly where that state stopped (same batches and
    noise as an uninterrupted run, since the generator state is restored). ``command`` is recorded as given.
    """
    from ..train.denoiser import train_denoiser

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    images, labels = load_mnist("train")
    net = build_teacher(cfg.dropout, cfg.sigma_data)
    meta = {"config": asdict(cfg), "command": command, "adm_config": teacher_adm_config(cfg.dropout).to_dict()}
    return train_denoiser(net, images, labels, EDMSchedule(sigma_data=cfg.sigma_data), cfg, out, name="teacher",
                          resume_key=_resume_key(cfg), meta=meta, resume=resume, progress=progress)


def metrics_entry(ev, nfe: int, seconds: float, weights: str) -> dict:
    """One row of ``metrics.json`` from a :class:`~dmd2.eval.fid_mnist.MNISTEvaluation`: means, stds, per-seed values."""
    return {"fid": ev.fid_mean, "fid_std": ev.fid_std, "kid": ev.kid_mean, "kid_std": ev.kid_std,
            "label_accuracy": ev.label_accuracy_mean, "label_accuracy_std": ev.label_accuracy_std,
            "nfe": int(nfe), "seconds": round(float(seconds), 2), "weights": weights, "n_samples": ev.n_samples,
            "seeds": list(ev.seeds), "per_seed": {"fid": list(ev.fid), "kid": list(ev.kid),
                                                  "label_accuracy": list(ev.label_accuracy)}}


def evaluate_teacher(path: str | Path, n_per_class: int = 100, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """``{"teacher_ode": ..., "teacher_1step": ...}``: the MNIST protocol (:mod:`dmd2.eval.fid_mnist`) on the teacher
    at ``path`` with EDM's Heun sampler at 18 steps (35 NFE) and in one step (1 NFE, ``D(80 z; 80, y)``)."""
    from ..eval.fid_mnist import evaluate_sampler
    from ..eval.samplers import heun_nfe, heun_sampler

    net = load_teacher(path)
    out = {}
    for key, steps in (("teacher_ode", 18), ("teacher_1step", 1)):
        t = time.perf_counter()
        with torch.no_grad():
            ev = evaluate_sampler(heun_sampler(net, IMAGE_SHAPE, steps), seeds=seeds, n_per_class=n_per_class)
        out[key] = metrics_entry(ev, heun_nfe(steps), time.perf_counter() - t, "teacher EMA")
        out[key]["sampler"] = f"EDM Heun, {steps} step(s)"
    return out


def config_from_args(items: list[str], base: TeacherConfig | None = None) -> TeacherConfig:
    """``["iters=100", "lr=5e-4"]`` (a ``teacher.`` prefix is allowed) -> :class:`TeacherConfig`."""
    base = base or TeacherConfig()
    types = {f.name: type(getattr(base, f.name)) for f in fields(base)}
    kw = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.removeprefix("teacher.")
        if not sep or key not in types:
            raise ValueError(f"expected teacher overrides key=value with key in {sorted(types)}, got {item!r}")
        kw[key] = types[key](value)
    return replace(base, **kw)


def teacher_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dmd2.recipes.mnist teacher",
                                description="Train the MNIST teacher (EDM loss) into a run folder.")
    p.add_argument("--out", default="runs/mnist-teacher")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = config_from_args(rest)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = train_teacher(cfg, args.out, resume=args.resume,
                         command="python -m dmd2.recipes.mnist_teacher " + " ".join(sys.argv[1:] if argv is None else argv))
    print(json.dumps({k: info[k] for k in ("iters_done", "seconds", "params")}))
    return 0


if __name__ == "__main__":
    sys.exit(teacher_main())
