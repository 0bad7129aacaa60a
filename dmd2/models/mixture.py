r"""The exact denoiser of a Gaussian mixture: an analytic teacher that needs no training (tiny and toy2d recipes).

Data :math:`x_0 = \mu_k + s\,\epsilon` with equal weights over ``K`` means :math:`\mu_k` of any shape, noised as
:math:`x_t = \alpha x_0 + \sigma\epsilon` (VP: :math:`\alpha^2 + \sigma^2 = 1`; EDM: :math:`\alpha = 1`). Given the
component, :math:`E[x_0 \mid x_t, k] = \mu_k + g\,(x_t - \alpha\mu_k)` with :math:`g = \alpha s^2 / (\alpha^2 s^2 +
\sigma^2)`; without it, the components are weighted by their posterior

.. math::
    p(k \mid x_t) \propto \exp\!\Big(-\frac{\lVert x_t - \alpha\mu_k\rVert^2}{2(\alpha^2 s^2 + \sigma^2)}\Big),
    \qquad E[x_0 \mid x_t] = \sum_k p(k \mid x_t)\, E[x_0 \mid x_t, k].
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.schedules import NoiseSchedule

__all__ = ["GaussianMixtureDenoiser"]


class GaussianMixtureDenoiser(nn.Module):
    """``D(x_t (B, *S), t (B,), cond=None) -> x0 (B, *S)`` of the mixture with ``means (K, *S)`` and std ``std``.

    ``cond``: the component (class label) of each sample ``(B,)``, or None for the posterior mixture (module
    docstring). Math in fp32; the result has ``x_t``'s dtype. Extra keyword arguments (e.g. ``step_index``) are
    ignored: the exact denoiser does not depend on them.
    """

    def __init__(self, means: torch.Tensor, std: float, schedule: NoiseSchedule):
        super().__init__()
        if means.dim() < 2:
            raise ValueError(f"GaussianMixtureDenoiser: means must be (K, ...), got {tuple(means.shape)}")
        if not std > 0:
            raise ValueError(f"GaussianMixtureDenoiser: std must be > 0, got {std}")
        self.register_buffer("means", means.float(), persistent=False)
        self.var = float(std) ** 2
        self.schedule = schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None, **_) -> torch.Tensor:
        if tuple(x_t.shape[1:]) != tuple(self.means.shape[1:]):
            raise ValueError(f"GaussianMixtureDenoiser: x_t must be (B, {', '.join(map(str, self.means.shape[1:]))}), "
                             f"got {tuple(x_t.shape)}")
        b = x_t.shape[0]
        a = self.schedule.alpha(t).view(b, 1)
        total = a * a * self.var + self.schedule.sigma(t).view(b, 1) ** 2  # alpha^2 s^2 + sigma^2, (B, 1)
        gain = a * self.var / total
        x = x_t.float().reshape(b, -1)
        mu = self.means.reshape(self.means.shape[0], -1)  # (K, D)
        if cond is not None:
            m = mu[cond.long()]
            out = m + gain * (x - a * m)
        else:
            d2 = (x[:, None, :] - a[:, :, None] * mu[None]).pow(2).sum(-1)  # (B, K)
            post = torch.softmax(-d2 / (2 * total), dim=1)
            comp = mu[None] + gain[:, :, None] * (x[:, None, :] - a[:, :, None] * mu[None])  # (B, K, D)
            out = (post[:, :, None] * comp).sum(1)
        return out.reshape(x_t.shape).to(x_t.dtype)
