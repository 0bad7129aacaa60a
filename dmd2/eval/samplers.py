r"""Teacher samplers used as evaluation baselines.

:func:`edm_heun`: EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1 with
``S_churn = 0``) on the Karras grid :math:`\sigma_0 = \sigma_{max} > \dots > \sigma_{N-1} = \sigma_{min}`,
:math:`\sigma_N = 0`:

.. math::
    d_i = (x_i - D(x_i;\sigma_i))/\sigma_i,\quad \tilde x = x_i + (\sigma_{i+1}-\sigma_i) d_i,\quad
    x_{i+1} = x_i + (\sigma_{i+1}-\sigma_i)\tfrac12\big(d_i + (\tilde x - D(\tilde x;\sigma_{i+1}))/\sigma_{i+1}\big)

(the correction is skipped on the last step, to sigma 0). ``N`` steps cost ``2N - 1`` network evaluations (18 -> 35).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..core.schedules import EDMSchedule

__all__ = ["edm_heun", "heun_nfe"]


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
