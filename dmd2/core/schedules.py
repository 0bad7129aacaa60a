r"""Noise schedules: one interface for discrete VP (DDPM / SD / SDXL) and continuous EDM (Karras et al. 2022).

A schedule maps a per-sample "time" ``t`` of shape ``(B,)`` to the coefficients of the forward process

.. math::  x_t = \alpha(t)\, x_0 + \sigma(t)\, \epsilon, \qquad \epsilon \sim \mathcal N(0, I).

* :class:`VPSchedule`: ``t`` is an integer timestep in ``[0, T-1]``; :math:`\alpha^2 + \sigma^2 = 1`.
* :class:`EDMSchedule`: ``t`` *is* the noise level sigma (float, > 0); :math:`\alpha = 1`.

Both offer ``add_noise``, ``alpha``, ``sigma``, ``x0_from_eps``, ``eps_from_x0``, ``sample_t`` (DMD2 draws
``t`` in a fraction ``[min_frac, max_frac]`` of the schedule: paper 2%..98%), ``prior`` (the generator's input at
the first sampling time), and ``denoising_weight`` (the per-sample weight that turns an x0-MSE into the critic's
denoising loss). Value checks (``t`` in range) run only on CPU tensors, never forcing a device sync.
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod

import torch

__all__ = ["NoiseSchedule", "VPSchedule", "EDMSchedule", "expand_like"]


def expand_like(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient ``(B,)`` to ``(B, 1, ..., 1)`` so it broadcasts against ``x`` ``(B, ...)``."""
    return c.reshape(c.shape[0], *([1] * (x.dim() - 1)))


def _check_pair(x: torch.Tensor, y: torch.Tensor, names: str, what: str) -> None:
    """``y`` must have the shape of ``x`` exactly (no broadcasting), and both must be floating point."""
    a, b = names.split(",")
    if y.shape != x.shape:
        raise ValueError(f"{what}: {b} must have the shape of {a} {tuple(x.shape)}, got {tuple(y.shape)}")
    for n, v in ((a, x), (b, y)):
        if not v.dtype.is_floating_point:
            raise ValueError(f"{what}: {n} must be a floating-point tensor, got {v.dtype}")


def _check_batch(t: torch.Tensor, x: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"{what}: t must be a 1-d tensor of shape (B,), got {getattr(t, 'shape', type(t))}")
    if x.dim() < 1 or x.shape[0] != t.shape[0]:
        raise ValueError(f"{what}: batch size mismatch, t has B={t.shape[0]} but x has shape {tuple(x.shape)}")
    if t.device != x.device:
        raise ValueError(f"{what}: t is on {t.device} but x is on {x.device}; expected the same device")


def _integer(v, what: str) -> int:
    """``v`` as an int; ``ValueError`` for a non-integer value (999.9 is not rounded to 999)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, numbers.Real) and math.isfinite(v) and float(v).is_integer():
        return int(v)
    raise ValueError(f"{what} must be an integer, got {v!r}")


class NoiseSchedule(ABC):
    """Interface shared by :class:`VPSchedule` and :class:`EDMSchedule` (see the module docstring)."""

    #: "vp" or "edm"
    kind: str = ""

    # --- per-schedule hooks -------------------------------------------------------------------------------
    num_grid: int  # points of the grid that ``sample_t``'s fractions refer to

    @abstractmethod
    def check_t(self, t: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``t`` is a valid ``(B,)`` time tensor (values checked on CPU only)."""

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample signal scale, float32 ``(B,)``."""

    @abstractmethod
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample noise scale, float32 ``(B,)``."""

    @abstractmethod
    def t_from_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Times at integer grid indices ``idx`` in ``[0, num_grid - 1]``."""

    @abstractmethod
    def timesteps(self, values) -> list:
        """Validate a sampling grid given as plain numbers (first = noisiest)."""

    @abstractmethod
    def time_tensor(self, value, batch: int, device) -> torch.Tensor:
        """``(batch,)`` tensor of one grid value, in this schedule's dtype."""

    # --- shared math -------------------------------------------------------------------------------------
    def _coefficients(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, names: str, what: str):
        """The checked inputs' ``(alpha(t), sigma(t))`` as float32 ``(B, 1, ..., 1)``, for the maps between ``x_0``,
        ``epsilon``, ``v`` and ``x_t`` below: ``y`` must have ``x``'s shape and ``t`` be ``(B,)`` on ``x``'s device
        (``alpha`` / ``sigma`` check its values)."""
        _check_pair(x, y, names, what)
        _check_batch(t, x, what)
        return expand_like(self.alpha(t), x), expand_like(self.sigma(t), x)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r""":math:`x_t = \alpha(t) x_0 + \sigma(t) \epsilon`; ``x0``, ``noise``: ``(B, ...)``; ``t``: ``(B,)``. fp32 math."""
        a, s = self._coefficients(x0, noise, t, "x0,noise", "add_noise")
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\hat x_0 = (x_t - \sigma \hat\epsilon) / \alpha` (epsilon-prediction to x0)."""
        a, s = self._coefficients(x_t, eps, t, "x_t,eps", "x0_from_eps")
        return ((x_t.float() - s * eps.float()) / a).to(x_t.dtype)

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\hat\epsilon = (x_t - \alpha \hat x_0) / \sigma`."""
        a, s = self._coefficients(x_t, x0, t, "x_t,x0", "eps_from_x0")
        return ((x_t.float() - a * x0.float()) / s).to(x_t.dtype)

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r"""v-prediction (Salimans & Ho 2022): :math:`v = \alpha\epsilon - \sigma x_0`, so
        :math:`\hat x_0 = (\alpha x_t - \sigma v) / (\alpha^2 + \sigma^2)`."""
        a, s = self._coefficients(x_t, v, t, "x_t,v", "x0_from_v")
        return ((a * x_t.float() - s * v.float()) / (a * a + s * s)).to(x_t.dtype)

    @abstractmethod
    def denoising_weight(self, t: torch.Tensor) -> torch.Tensor:
        r"""Per-sample weight :math:`\lambda(t)` with ``loss = lambda * mean((x0_hat - x0)^2)``.

        VP: the epsilon-MSE, since :math:`\hat\epsilon - \epsilon = -(\alpha/\sigma)(\hat x_0 - x_0)`, is the
        x0-MSE times :math:`\alpha^2/\sigma^2`. EDM: :math:`1/\sigma^2 + 1/\sigma_{data}^2` (EDM Eq. 8 / Table 1).
        """

    def sample_t(
        self,
        batch: int,
        min_frac: float = 0.02,
        max_frac: float = 0.98,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw ``(batch,)`` times uniformly over the fraction ``[min_frac, max_frac]`` of the schedule.

        VP: integer timesteps ``randint(round(min_frac*(T-1)), round(max_frac*(T-1)))`` inclusive.
        EDM: uniform over the same fraction of a 1000-point Karras grid index (``num_grid``), i.e. of
        ``sigma(u) = (sigma_min^(1/rho) + u (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``.
        """
        if not (0.0 <= min_frac <= max_frac <= 1.0):
            raise ValueError(f"sample_t: expected 0 <= min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
        if batch < 1:
            raise ValueError(f"sample_t: batch must be >= 1, got {batch}")
        if device is None and generator is not None:
            device = generator.device
        n = self.num_grid
        lo, hi = round(min_frac * (n - 1)), round(max_frac * (n - 1))
        idx = torch.randint(lo, hi + 1, (batch,), generator=generator, device=device)
        return self.t_from_index(idx)

    @abstractmethod
    def prior(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The sampler's starting point at its first time ``t`` from unit noise (VP: ``noise``; EDM: ``sigma * noise``)."""


class VPSchedule(NoiseSchedule):
    r"""Discrete variance-preserving schedule (DDPM; Stable Diffusion / SDXL).

    ``alphas_cumprod = cumprod(1 - betas)``, :math:`\alpha_t = \sqrt{\bar\alpha_t}`,
    :math:`\sigma_t = \sqrt{1 - \bar\alpha_t}`; ``t`` is an integer timestep tensor ``(B,)`` in ``[0, T-1]``.
    The generator input at any first time is pure unit noise (``x_T ~ N(0, I)``, diffusers' ``init_noise_sigma = 1``).
    """

    kind = "vp"

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"VPSchedule: betas must be a 1-d tensor of length >= 2, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("VPSchedule: every beta must lie in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_train_timesteps = betas.numel()
        self.num_grid = self.num_train_timesteps
        self._alpha = self.alphas_cumprod.sqrt().float()
        self._sigma = (1.0 - self.alphas_cumprod).sqrt().float()
        self._weight = (self.alphas_cumprod / (1.0 - self.alphas_cumprod)).float()
        self._cache: dict = {}

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000):
        """SD / SDXL: ``betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``."""
        b = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64) ** 2
        return cls(b)

    @classmethod
    def linear(cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_train_timesteps: int = 1000):
        """DDPM (Ho et al. 2020): ``betas = linspace(beta_start, beta_end, T)``."""
        return cls(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64))

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = getattr(self, "_" + name).to(device)
        return self._cache[key]

    def check_t(self, t: torch.Tensor) -> None:
        if t.dim() != 1:
            raise ValueError(f"VPSchedule: t must have shape (B,), got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"VPSchedule: t must be an integer timestep tensor (e.g. torch.long), got {t.dtype}")
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) > self.num_train_timesteps - 1):
            raise ValueError(
                f"VPSchedule: timesteps must lie in [0, {self.num_train_timesteps - 1}], got min {int(t.min())}, max {int(t.max())}"
            )

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        self.check_t(t)
        return self._table("alpha", t.device)[t]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        self.check_t(t)
        return self._table("sigma", t.device)[t]

    def denoising_weight(self, t: torch.Tensor) -> torch.Tensor:
        self.check_t(t)
        return self._table("weight", t.device)[t]

    def t_from_index(self, idx: torch.Tensor) -> torch.Tensor:
        return idx.long()

    def timesteps(self, values) -> list[int]:
        """Validate an inference grid given as integers (descending), e.g. SDXL 4-step ``[999, 749, 499, 249]``."""
        vals = [_integer(v, "VPSchedule timestep") for v in values]
        if not vals or any(v < 0 or v > self.num_train_timesteps - 1 for v in vals):
            raise ValueError(f"VPSchedule: timesteps must be non-empty and lie in [0, {self.num_train_timesteps - 1}], got {vals}")
        return vals

    def time_tensor(self, value, batch: int, device) -> torch.Tensor:
        return torch.full((batch,), _integer(value, "VPSchedule timestep"), dtype=torch.long, device=device)

    def prior(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise

    def __repr__(self) -> str:
        return f"VPSchedule(T={self.num_train_timesteps}, beta[0]={float(self.betas[0]):.6g}, beta[-1]={float(self.betas[-1]):.6g})"


class EDMSchedule(NoiseSchedule):
    r"""EDM (Karras et al. 2022): :math:`x_t = x_0 + \sigma\epsilon`, ``t`` is sigma itself (float ``(B,)``, > 0).

    The Karras grid of ``n`` points (EDM Eq. 5), ascending in ``u`` from ``sigma_min`` to ``sigma_max``:
    :math:`\sigma(u) = (\sigma_{min}^{1/\rho} + u(\sigma_{max}^{1/\rho} - \sigma_{min}^{1/\rho}))^\rho`.
    ``sigma_data`` enters the preconditioning and the loss weight :math:`1/\sigma^2 + 1/\sigma_{data}^2`.
    The generator input at sigma is ``sigma * N(0, I)`` (paper: ``80 * N(0, I)`` at sigma 80).
    """

    kind = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5,
                 num_grid: int = 1000):
        if not all(math.isfinite(v) for v in (sigma_min, sigma_max, rho, sigma_data)):
            raise ValueError(f"EDMSchedule: sigma_min, sigma_max, rho and sigma_data must be finite, got "
                             f"{sigma_min}, {sigma_max}, {rho}, {sigma_data}")
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"EDMSchedule: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if rho <= 0 or sigma_data <= 0 or num_grid < 2:
            raise ValueError(f"EDMSchedule: expected rho > 0, sigma_data > 0, num_grid >= 2; got {rho}, {sigma_data}, {num_grid}")
        self.sigma_min, self.sigma_max, self.rho, self.sigma_data = float(sigma_min), float(sigma_max), float(rho), float(sigma_data)
        self.num_grid = int(num_grid)

    def check_t(self, t: torch.Tensor) -> None:
        if t.dim() != 1:
            raise ValueError(f"EDMSchedule: sigma must have shape (B,), got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"EDMSchedule: sigma must be a floating-point tensor, got {t.dtype}")
        if t.device.type == "cpu" and t.numel() and not bool(((t > 0) & torch.isfinite(t)).all()):
            raise ValueError(f"EDMSchedule: sigma must be finite and > 0, got min {float(t.min())}, max {float(t.max())}")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        self.check_t(t)
        return torch.ones_like(t, dtype=torch.float32)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        self.check_t(t)
        return t.float()

    def denoising_weight(self, t: torch.Tensor) -> torch.Tensor:
        self.check_t(t)
        s = t.float()
        return 1.0 / s**2 + 1.0 / self.sigma_data**2

    def karras(self, u: torch.Tensor) -> torch.Tensor:
        """sigma at grid fraction ``u`` in [0, 1] (0 -> sigma_min, 1 -> sigma_max)."""
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + u.double() * (hi - lo)) ** self.rho

    def karras_sigmas(self, n: int, device=None) -> torch.Tensor:
        """EDM's sampling grid: ``n`` sigmas DESCENDING from sigma_max to sigma_min (EDM Eq. 5), float64."""
        u = torch.linspace(1.0, 0.0, n, dtype=torch.float64, device=device) if n > 1 else torch.ones(1, dtype=torch.float64, device=device)
        return self.karras(u)

    def t_from_index(self, idx: torch.Tensor) -> torch.Tensor:
        return self.karras(idx.double() / (self.num_grid - 1)).float()

    def timesteps(self, values) -> list[float]:
        vals = [float(v) for v in values]
        if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
            raise ValueError(f"EDMSchedule: sampling sigmas must be non-empty, finite and > 0, got {vals}")
        return vals

    def time_tensor(self, value, batch: int, device) -> torch.Tensor:
        return torch.full((batch,), float(value), dtype=torch.float32, device=device)

    def prior(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (expand_like(self.sigma(t), noise) * noise.float()).to(noise.dtype)

    def __repr__(self) -> str:
        return f"EDMSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho}, sigma_data={self.sigma_data})"
