r"""Samplers for evaluation: teacher baselines and the seeded wrapper that evaluation protocols call.

:func:`seeded_sampler` turns ``fn(noise, labels, generator) -> images`` into the protocol's ``sample(labels, seed)``
(:func:`dmd2.eval.fid_mnist.evaluate_sampler`): unit noise from ``torch.Generator().manual_seed(seed)``, in chunks;
:func:`heun_sampler` is it around :func:`edm_heun`.

:func:`edm_heun`: EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1 with
``S_churn = 0``) on the Karras grid :math:`\sigma_0 = \sigma_{max} > \dots > \sigma_{N-1} = \sigma_{min}`,
:math:`\sigma_N = 0`:

.. math::
    d_i = (x_i - D(x_i;\sigma_i))/\sigma_i,\quad \tilde x = x_i + (\sigma_{i+1}-\sigma_i) d_i,\quad
    x_{i+1} = x_i + (\sigma_{i+1}-\sigma_i)\tfrac12\big(d_i + (\tilde x - D(\tilde x;\sigma_{i+1}))/\sigma_{i+1}\big)

(the correction is skipped on the last step, to sigma 0). ``N`` steps cost ``2N - 1`` network evaluations (18 -> 35).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..core.schedules import EDMSchedule

__all__ = ["edm_heun", "heun_nfe", "heun_sampler", "seeded_sampler"]


def heun_nfe(num_steps: int) -> int:
    """Network evaluations of :func:`edm_heun` with ``num_steps`` steps."""
    return 2 * num_steps - 1


@torch.no_grad()
def edm_heun(denoiser: Callable, noise: torch.Tensor, cond: Any = None, num_steps: int = 18,
             schedule: EDMSchedule | None = None) -> torch.Tensor:
    """Sample with EDM's Heun sampler from unit ``noise`` ``(B, ...)``; returns x0 in the dtype of ``noise`` (fp64 steps)."""
    if num_steps < 1:
        raise ValueError(f"edm_heun: num_steps must be >= 1, got {num_steps}")
    schedule = schedule or EDMSchedule()
    sig = torch.cat([schedule.karras_sigmas(num_steps, device=noise.device), noise.new_zeros(1, dtype=torch.float64)])
    b = noise.shape[0]
    x = noise.double() * sig[0]

    def d(x, s):
        x0 = denoiser(x.to(noise.dtype), torch.full((b,), float(s), device=noise.device), cond).double()
        return (x - x0) / s

    for i in range(num_steps):
        s, s_next = sig[i], sig[i + 1]
        di = d(x, s)
        x_next = x + (s_next - s) * di
        if i < num_steps - 1:
            x_next = x + (s_next - s) * 0.5 * (di + d(x_next, s_next))
        x = x_next
    return x.to(noise.dtype)


def seeded_sampler(fn: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor], shape: Sequence[int],
                   chunk: int = 500) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``sample(labels (N,), seed) -> images (N, *shape)`` under no-grad: ``z ~ N(0, I)`` of shape ``(N, *shape)``
    drawn first from ``g = torch.Generator().manual_seed(seed)``, then ``fn(z[i:i+chunk], labels[i:i+chunk], g)``
    chunk by chunk (``g`` carries any further randomness, e.g. a multi-step student's re-noising)."""
    if chunk < 1:
        raise ValueError(f"seeded_sampler: chunk must be >= 1, got {chunk}")

    @torch.no_grad()
    def sample(labels: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((labels.shape[0], *shape), generator=g)
        return torch.cat([fn(z[i:i + chunk], labels[i:i + chunk], g) for i in range(0, labels.shape[0], chunk)])

    return sample


def heun_sampler(denoiser: Callable, shape: Sequence[int], num_steps: int = 18, chunk: int = 500,
                 schedule: EDMSchedule | None = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """:func:`seeded_sampler` around :func:`edm_heun` with ``num_steps`` steps (``2 num_steps - 1`` NFE; 1 step is one
    call ``D(sigma_max z; sigma_max, y)``)."""
    return seeded_sampler(lambda z, y, g: edm_heun(denoiser, z, y, num_steps=num_steps, schedule=schedule), shape, chunk)
