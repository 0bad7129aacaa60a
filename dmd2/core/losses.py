r"""Losses of DMD2 (Yin et al. 2024). All per-sample (shape ``(B,)``) except ``dm_loss``, the one scalar surrogate.

* :func:`dm_grad`, :func:`dm_loss`: the distribution-matching gradient (DMD Eq. 7, DMD2 Sec. 3) through the
  kernel dispatch (math in :mod:`dmd2.kernels.reference`).
* :func:`denoising_loss`: the fake score's denoising score matching on generator samples, as a weighted x0-MSE
  :math:`\lambda(t)\,\mathrm{mean}((\hat x_0 - x_0)^2)`; :math:`\lambda` from the schedule makes it the eps-MSE
  for VP and EDM's weighted loss for EDM.
* :func:`gan_generator_loss` (non-saturating, ``softplus(-D(fake))``) and :func:`gan_discriminator_loss`
  (``softplus(D(fake)) + softplus(-D(real))``), DMD2 Sec. 4.2 / Eq. 4-5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from .schedules import NoiseSchedule

__all__ = ["dm_grad", "dm_loss", "cfg", "denoising_loss", "gan_generator_loss", "gan_discriminator_loss"]

cfg = kernels.cfg


def dm_grad(x, real_x0, fake_x0, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    r"""``g_i = (fake_x0_i - real_x0_i) / (mean(|x_i - real_x0_i|) + eps)``; shape of ``x`` ``(B, ...)``.

    See :func:`dmd2.kernels.reference.dm_grad`. Raises ``ValueError`` on mismatched shape / dtype / device.
    """
    return kernels.dm_grad(x, real_x0, fake_x0, eps=eps, impl=impl)


def dm_loss(x, real_x0, fake_x0, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    r"""Scalar surrogate ``0.5 * mse(x, (x - g).detach())``: ``d loss / dx == dm_grad(x, ...) / x.numel()``."""
    return kernels.dm_loss(x, real_x0, fake_x0, eps=eps, impl=impl)


def denoising_loss(pred_x0: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    r"""Per-sample critic loss :math:`\lambda(t)\, \mathrm{mean}_j (\hat x_{0,j} - x_{0,j})^2`, shape ``(B,)``, fp32.

    VP: :math:`\lambda = \alpha^2/\sigma^2`, which equals the epsilon-MSE ``mean((eps_hat - eps)^2)``.
    EDM: :math:`\lambda = 1/\sigma^2 + 1/\sigma_{data}^2` (EDM Eq. 8 with Table 1's weighting).
    """
    if pred_x0.shape != x0.shape:
        raise ValueError(f"denoising_loss: pred_x0 {tuple(pred_x0.shape)} and x0 {tuple(x0.shape)} must have the same shape")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"denoising_loss: t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    se = (pred_x0.float() - x0.float()).pow(2).flatten(1).mean(1)
    return schedule.denoising_weight(t) * se


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.dim() != 1:
        raise ValueError(f"{name}: expected logits of shape (B,), got {tuple(logits.shape)}")


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    r"""Non-saturating generator loss :math:`\mathrm{softplus}(-D(G(z)))` per sample, ``(B,)``."""
    _check_logits("gan_generator_loss", fake_logits)
    return F.softplus(-fake_logits.float())


def gan_discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{softplus}(D(\text{fake})) + \mathrm{softplus}(-D(\text{real}))` per sample, ``(B,)``.

    Fake and real batches may differ in size only if one of them is broadcastable; normally both are ``(B,)``.
    """
    _check_logits("gan_discriminator_loss (fake)", fake_logits)
    _check_logits("gan_discriminator_loss (real)", real_logits)
    if fake_logits.shape != real_logits.shape:
        raise ValueError(f"gan_discriminator_loss: fake {tuple(fake_logits.shape)} and real {tuple(real_logits.shape)} logits must match")
    return F.softplus(fake_logits.float()) + F.softplus(-real_logits.float())
