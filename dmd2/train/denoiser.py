r"""Training a denoiser from data with EDM's loss (Karras et al. 2022, Sec. 5 and Table 1): how a teacher is made.

.. math::
    \ln\sigma \sim \mathcal N(P_{mean}, P_{std}^2),\quad
    L = \mathbb E\,\lambda(\sigma)\,\lVert D(x_0 + \sigma\epsilon;\sigma, y) - x_0\rVert^2,\quad
    \lambda(\sigma) = 1/\sigma^2 + 1/\sigma_{data}^2

(:func:`dmd2.core.denoising_loss` on an :class:`~dmd2.core.EDMSchedule`), with Adam, a linear learning-rate warm-up
and an EMA of the weights. Randomness: the caller seeds the initialisation; one ``torch.Generator(seed)`` draws,
per iteration and in this order, the batch indices (with replacement), the noise levels and the noise, so a run is
reproducible on CPU at a fixed thread count, and continues exactly from its ``state.pt``.

Run folder ``out``: ``NAME.safetensors`` (the EMA weights, a plain state dict of the network), ``NAME.json`` (the
caller's ``meta`` plus iterations, parameters, wall time, loss curve, machine) and ``state.pt`` (raw weights, EMA,
Adam state, generator state, iteration), written every ``checkpoint_every`` iterations and at the end.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from ..core import EMA, EDMSchedule, denoising_loss

__all__ = ["train_denoiser"]


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def train_denoiser(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, schedule: EDMSchedule, cfg: Any,
                   out: str | Path, name: str = "teacher", resume_key: str = "", meta: Mapping[str, Any] | None = None,
                   resume: bool = False, progress: bool = True) -> dict:
    """Train ``net`` (``D(x_t, sigma, labels) -> x0``, built by the caller after seeding) into ``out``.

    Args:
        images, labels: the training set, ``(N, ...)`` and ``(N,)``, on CPU.
        cfg: the hyperparameters, read as attributes: ``iters``, ``batch``, ``lr``, ``warmup``, ``ema_decay``,
            ``p_mean``, ``p_std``, ``seed``, ``checkpoint_every``, ``log_every`` (e.g.
            :class:`dmd2.recipes.mnist_teacher.TeacherConfig`).
        name: the stem of the weight and record files.
        resume_key: what a continued run must share with the one that wrote ``state.pt`` (refused otherwise).
        meta: fields recorded first in ``NAME.json`` (the caller's config, command, ...).
        resume: continue from ``out/state.pt`` when it exists.

    Returns the ``NAME.json`` record.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net.train()
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(cfg.seed)
    start, curve, elapsed_before = 0, [], 0.0
    state_path = out / "state.pt"
    if resume and state_path.is_file():
        st = torch.load(state_path, weights_only=True)
        if st["config"] != resume_key:
            raise ValueError(f"{state_path} was written with another configuration; refusing to resume")
        net.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        g.set_state(st["generator"])
        start, curve, elapsed_before = int(st["iter"]), json.loads(st["curve"]), float(st["seconds"])
    t0 = time.perf_counter()

    def record(it: int) -> dict:
        info = {
            **(meta or {}), "iters_done": it, "params": sum(p.numel() for p in net.parameters()),
            "seconds": elapsed_before + time.perf_counter() - t0, "loss_curve": curve,
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} thread(s)",
        }
        weights = out / f"{name}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in ema.state_dict().items()}, str(weights) + ".tmp")
        os.replace(str(weights) + ".tmp", weights)
        torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "generator": g.get_state(),
                    "iter": it, "curve": json.dumps(curve), "seconds": info["seconds"], "config": resume_key},
                   str(state_path) + ".tmp")
        os.replace(str(state_path) + ".tmp", state_path)
        _write_json(out / f"{name}.json", info)
        return info

    running, n_running, info = torch.zeros(()), 0, None
    for it in range(start, cfg.iters):
        idx = torch.randint(0, images.shape[0], (cfg.batch,), generator=g)
        x0, y = images[idx], labels[idx]
        sigma = (torch.randn(cfg.batch, generator=g) * cfg.p_std + cfg.p_mean).exp()
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
        loss = denoising_loss(net(x_t, sigma, y), x0, sigma, schedule).mean()
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
