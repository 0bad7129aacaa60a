r"""Multi-step generation and DMD2's backward simulation (Sec. 4.4) - one code path for both.

With an inference grid :math:`t_1 > t_2 > \dots > t_N` (SDXL 4-step: 999, 749, 499, 249):

.. math::
    x^{(1)} = \mathrm{prior}(z, t_1), \quad \hat x_0^{(k)} = G(x^{(k)}, t_k, c), \quad
    x^{(k+1)} = \alpha(t_{k+1}) \hat x_0^{(k)} + \sigma(t_{k+1}) \epsilon_k ,

with *fresh, independent* noise :math:`\epsilon_k` at every re-noise; the output is :math:`\hat x_0^{(N)}`.

Training (backward simulation) picks a step ``k`` in ``1..N`` and builds the generator's input at ``t_k`` by running
the *current* generator through steps ``1..k-1`` under no-grad; only the last call (made by the caller) gets
gradients. For ``k = 1`` the input is the prior at ``t_1``. This matches train and test input distributions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .schedules import NoiseSchedule

__all__ = ["BackwardSimulationSampler", "Simulated"]


@dataclass
class Simulated:
    """A training input from :meth:`BackwardSimulationSampler.simulate`: ``x_t`` ``(B, ...)`` at times ``t`` ``(B,)``,
    ``k`` the 1-based step whose input this is."""

    x_t: torch.Tensor
    t: torch.Tensor
    k: int


class BackwardSimulationSampler:
    """Runs a few-step generator ``G(x_t, t, cond) -> x0`` over a fixed descending grid.

    Args:
        schedule: the noise schedule (VP timesteps or EDM sigmas).
        timesteps: the grid, first (noisiest) first; e.g. ``[999, 749, 499, 249]`` or ``[80.0]``.
    """

    def __init__(self, schedule: NoiseSchedule, timesteps: Sequence):
        self.schedule = schedule
        self.timesteps = schedule.timesteps(timesteps)
        if any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError(f"BackwardSimulationSampler: timesteps must be strictly descending, got {self.timesteps}")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def t(self, k: int, batch: int, device) -> torch.Tensor:
        """The ``(batch,)`` time tensor of 1-based step ``k``."""
        return self.schedule.time_tensor(self.timesteps[k - 1], batch, device)

    def draw_k(self, generator: torch.Generator | None = None) -> int:
        """A step index uniform in ``1..N``, drawn from ``generator`` on its device (a CUDA generator costs one host
        sync; the trainer uses a CPU one, seeded alike on all ranks); ``None``: the global CPU RNG."""
        device = generator.device if generator is not None else "cpu"
        return int(torch.randint(1, self.num_steps + 1, (1,), generator=generator, device=device))

    def _renoise(self, x0: torch.Tensor, k_next: int, generator, noises, i: int) -> torch.Tensor:
        if noises is not None:
            eps = noises[i]
            if eps.shape != x0.shape:
                raise ValueError(f"re-noise tensor {i} must have shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
        else:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.schedule.add_noise(x0, eps, self.t(k_next, x0.shape[0], x0.device))

    def input_at(self, G: Callable, noise: torch.Tensor, cond: Any, k: int, generator=None, noises=None) -> torch.Tensor:
        """The generator's input at step ``k``: steps ``1..k-1`` of ``G`` under no-grad, then a fresh re-noise.

        The ``k - 1`` re-noises are drawn from ``generator`` on ``noise``'s device (unless ``noises`` gives them), so a
        generator on another device is refused with ``ValueError`` before ``G`` runs."""
        if not (1 <= k <= self.num_steps):
            raise ValueError(f"step k must lie in [1, {self.num_steps}], got {k}")
        if noises is not None and len(noises) < k - 1:
            raise ValueError(f"need {k - 1} re-noise tensors for step {k}, got {len(noises)}")
        if k > 1 and noises is None and generator is not None and torch.device(generator.device) != noise.device:
            raise ValueError(f"the re-noises are drawn on noise's device {noise.device}, but the generator is on "
                             f"{generator.device}: pass a generator on {noise.device}")
        b = noise.shape[0]
        x = self.schedule.prior(noise, self.t(1, b, noise.device))
        with torch.no_grad():
            for j in range(1, k):
                x0 = G(x, self.t(j, b, noise.device), cond)
                x = self._renoise(x0, j + 1, generator, noises, j - 1)
        return x

    def simulate(self, G: Callable, noise: torch.Tensor, cond: Any = None, k: int | None = None,
                 generator: torch.Generator | None = None, noises: Sequence[torch.Tensor] | None = None) -> Simulated:
        """Backward simulation: a training input for step ``k`` (if None, drawn uniformly in ``1..N`` from ``generator``,
        whatever its device: :meth:`draw_k`).

        ``noise``: unit Gaussian ``(B, ...)`` for the prior; re-noises are drawn from ``generator`` (independent of
        ``noise``) unless ``noises`` (a list of ``k-1`` tensors) is given. The result carries no autograd graph.
        """
        if k is None:
            k = self.draw_k(generator)
        x = self.input_at(G, noise, cond, k, generator, noises)
        return Simulated(x_t=x.detach(), t=self.t(k, noise.shape[0], noise.device), k=k)

    def sample(self, G: Callable, noise: torch.Tensor, cond: Any = None, generator: torch.Generator | None = None,
               noises: Sequence[torch.Tensor] | None = None, steps: int | None = None) -> torch.Tensor:
        """Inference: all ``N`` steps (or the first ``steps``) from unit ``noise``; returns the last x0 estimate.

        Runs without building a graph when called under ``torch.no_grad()``; a 1-step grid is one call of ``G``.
        """
        n = self.num_steps if steps is None else steps
        x = self.input_at(G, noise, cond, n, generator, noises)
        return G(x, self.t(n, noise.shape[0], noise.device), cond)
