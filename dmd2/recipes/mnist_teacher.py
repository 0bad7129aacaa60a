r"""The MNIST teacher: a small class-conditional ADM with EDM preconditioning, trained with EDM's loss
(Karras et al. 2022, Sec. 5 and Table 1, "EDM" column):

.. math::
    \ln\sigma \sim \mathcal N(P_{mean}, P_{std}^2),\quad
    L = \mathbb E\,\lambda(\sigma)\,\lVert D(x_0 + \sigma\epsilon;\sigma, y) - x_0\rVert^2,\quad
    \lambda(\sigma) = 1/\sigma^2 + 1/\sigma_{data}^2

on the TRAIN split of :mod:`dmd2.data.mnist` only, with Adam, a linear learning-rate warm-up and an EMA of the
weights (what ships). Everything random comes from ``seed``: the initialisation (``torch.manual_seed``) and one
``torch.Generator`` for the batch indices, the noise levels and the noise, so a run is reproducible on CPU with the
same thread count. The network is deliberately small (:func:`teacher_adm_config`, ~0.33M parameters) so that it
trains, and later distils, on two CPU cores.

Run as ``python -m dmd2.recipes.mnist teacher [--out DIR] [teacher.iters=N ...]`` (or this module directly,
``python -m dmd2.recipes.mnist_teacher --out DIR``). ``DIR`` receives ``teacher.safetensors`` (EMA weights),
``teacher.json`` (config, seed, loss curve, wall time) and ``state.pt`` (everything needed to continue exactly:
raw weights, EMA, Adam state, generator state, iteration), written every ``checkpoint_every`` iterations.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core import EMA, EDMSchedule, denoising_loss
from ..data.mnist import load_mnist
from ..models.adm import ADMConfig, build_edm_adm
from ..train.checkpoint import load_weights

__all__ = ["TeacherConfig", "teacher_adm_config", "build_teacher", "load_teacher", "train_teacher",
           "heun_sampler", "evaluate_teacher", "metrics_entry", "DEFAULT_TEACHER"]

DEFAULT_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "mnist_teacher.safetensors"


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


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def train_teacher(cfg: TeacherConfig, out: str | Path, resume: bool = False, progress: bool = True,
                  command: str = "") -> dict:
    """Train the teacher into the run folder ``out`` (module docstring); returns the ``teacher.json`` record.

    With ``resume`` and an ``out/state.pt``, training continues exactly where that state stopped (same batches and
    noise as an uninterrupted run, since the generator state is restored). ``command`` is recorded as given.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    images, labels = load_mnist("train")
    net = build_teacher(cfg.dropout, cfg.sigma_data).train()
    ema = EMA(net, cfg.ema_decay)
    sched = EDMSchedule(sigma_data=cfg.sigma_data)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(cfg.seed)
    start, curve, elapsed_before = 0, [], 0.0
    state_path = out / "state.pt"
    if resume and state_path.is_file():
        st = torch.load(state_path, weights_only=True)
        if st["config"] != _resume_key(cfg):
            raise ValueError(f"{state_path} was written with another configuration; refusing to resume")
        net.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        g.set_state(st["generator"])
        start, curve, elapsed_before = int(st["iter"]), json.loads(st["curve"]), float(st["seconds"])
    t0 = time.perf_counter()

    def record(it: int) -> dict:
        info = {
            "config": asdict(cfg), "command": command, "iters_done": it, "params": sum(p.numel() for p in net.parameters()),
            "adm_config": teacher_adm_config(cfg.dropout).to_dict(), "seconds": elapsed_before + time.perf_counter() - t0,
            "loss_curve": curve, "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                                           f"{torch.get_num_threads()} thread(s)",
        }
        ema_net = build_teacher(0.0, cfg.sigma_data)
        ema.copy_to(ema_net)
        save_file({k: v.detach().contiguous() for k, v in ema_net.state_dict().items()}, str(out / "teacher.safetensors.tmp"))
        os.replace(out / "teacher.safetensors.tmp", out / "teacher.safetensors")
        torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "generator": g.get_state(),
                    "iter": it, "curve": json.dumps(curve), "seconds": info["seconds"],
                    "config": _resume_key(cfg)}, str(state_path) + ".tmp")
        os.replace(str(state_path) + ".tmp", state_path)
        _write_json(out / "teacher.json", info)
        return info

    running, n_running, info = torch.zeros(()), 0, None
    for it in range(start, cfg.iters):
        idx = torch.randint(0, images.shape[0], (cfg.batch,), generator=g)
        x0, y = images[idx], labels[idx]
        sigma = (torch.randn(cfg.batch, generator=g) * cfg.p_std + cfg.p_mean).exp()
        x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
        loss = denoising_loss(net(x_t, sigma, y), x0, sigma, sched).mean()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (it + 1) / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net)
        running += loss.detach()
        n_running += 1
        if (it + 1) % cfg.log_every == 0:
            point = {"iter": it + 1, "loss": float(running) / n_running,
                     "seconds": round(elapsed_before + time.perf_counter() - t0, 1)}
            curve.append(point)
            running, n_running = torch.zeros(()), 0
            if progress:
                print(json.dumps(point), flush=True)
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iters:
            info = record(it + 1)
    return info if info is not None else record(start)


def heun_sampler(denoiser: torch.nn.Module, num_steps: int = 18, chunk: int = 500):
    """A sampler for :func:`dmd2.eval.fid_mnist.evaluate_sampler`: EDM's Heun sampler (:func:`dmd2.eval.samplers.edm_heun`)
    with ``num_steps`` steps (``2 num_steps - 1`` NFE; 1 step = one call ``D(80 z; 80, y)``) from unit noise
    ``z ~ N(0, I)`` of shape ``(N, 1, 32, 32)`` drawn from ``torch.Generator().manual_seed(seed)``, in chunks of ``chunk``."""
    from ..eval.samplers import edm_heun

    def sample(labels: torch.Tensor, seed: int) -> torch.Tensor:
        z = torch.randn((labels.shape[0], 1, 32, 32), generator=torch.Generator().manual_seed(seed))
        return torch.cat([edm_heun(denoiser, z[i:i + chunk], labels[i:i + chunk], num_steps=num_steps)
                          for i in range(0, labels.shape[0], chunk)])

    return sample


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
    from ..eval.samplers import heun_nfe

    net = load_teacher(path)
    out = {}
    for key, steps in (("teacher_ode", 18), ("teacher_1step", 1)):
        t = time.perf_counter()
        with torch.no_grad():
            ev = evaluate_sampler(heun_sampler(net, steps), seeds=seeds, n_per_class=n_per_class)
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
