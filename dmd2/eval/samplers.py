r"""Teacher samplers: evaluation baselines, the ODE solutions that the 1-step SDXL warm start regresses to, and the
seeded wrapper evaluation protocols call.

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

:func:`ddim`: the deterministic DDIM sampler (Song et al. 2021, Eq. 12 with :math:`\eta = 0`) of a VP teacher on a
descending grid :math:`t_0 > \dots > t_{N-1}`:

.. math::
    \hat x_0^{(i)} = D(x_i, t_i), \quad \hat\epsilon^{(i)} = (x_i - \alpha_i \hat x_0^{(i)})/\sigma_i, \quad
    x_{i+1} = \alpha_{i+1} \hat x_0^{(i)} + \sigma_{i+1} \hat\epsilon^{(i)},

returning :math:`\hat x_0^{(N-1)}`. In the variables :math:`\tilde x = x/\alpha`, :math:`\tilde\sigma = \sigma/\alpha`
this is one Euler step of the probability-flow ODE :math:`d\tilde x/d\tilde\sigma = (\tilde x - \hat x_0)/\tilde\sigma`,
i.e. exactly diffusers' ``EulerDiscreteScheduler`` (whose last step goes to :math:`\tilde\sigma = 0`); with
:func:`trailing_timesteps` it is the sampler the official DMD2 SDXL ODE pairs were made with (50 steps, trailing
spacing, the pipeline's CFG). ``N`` steps cost ``N`` network evaluations. The start :math:`x_0` is the caller's: unit
noise is the VP prior; diffusers' Euler pipelines with trailing (or linspace) spacing scale the initial noise by
``init_noise_sigma`` :math:`= \tilde\sigma_{max}` rather than :math:`\sqrt{\tilde\sigma_{max}^2 + 1}`, i.e. start from
:math:`x = \sigma(t_0) z` (:func:`euler_trailing_start`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..core.schedules import EDMSchedule, VPSchedule

__all__ = ["edm_heun", "heun_nfe", "heun_sampler", "seeded_sampler", "ddim", "trailing_timesteps", "euler_trailing_start"]


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


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' ``timestep_spacing="trailing"`` grid: ``round(arange(T, 0, -T / n)) - 1`` (50 of 1000 -> 999, 979,
    ..., 19), first (noisiest) first."""
    if not (1 <= num_steps <= num_train_timesteps):
        raise ValueError(f"trailing_timesteps: num_steps must lie in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps / num_steps
    return [round(num_train_timesteps - i * ratio) - 1 for i in range(num_steps)]


def euler_trailing_start(noise: torch.Tensor, schedule: VPSchedule, t0: int) -> torch.Tensor:
    """The VP state diffusers' ``EulerDiscreteScheduler`` (trailing spacing) starts from unit ``noise``:
    ``sigma(t0) * noise`` (module docstring; 0.23% below unit scale at SDXL's t0 = 999)."""
    return noise * schedule.sigma(schedule.time_tensor(t0, 1, noise.device))[0].to(noise.dtype)


@torch.no_grad()
def ddim(denoiser: Callable, x: torch.Tensor, cond: Any, schedule: VPSchedule, timesteps: list[int]) -> torch.Tensor:
    """Deterministic DDIM (module docstring) from the state ``x`` ``(B, ...)`` at ``timesteps[0]``; returns the last x0
    estimate in fp32 (the state is kept in fp32 whatever the denoiser's dtype)."""
    steps = schedule.timesteps(timesteps)
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"ddim: timesteps must be strictly descending, got {steps}")
    b, dev = x.shape[0], x.device
    x = x.float()
    for i, ti in enumerate(steps):
        t = schedule.time_tensor(ti, b, dev)
        x0 = denoiser(x, t, cond).float()
        if i + 1 == len(steps):
            return x0
        x = schedule.add_noise(x0, schedule.eps_from_x0(x, x0, t), schedule.time_tensor(steps[i + 1], b, dev))
