r"""The DMD2 objective (Yin et al. 2024) over any denoisers ``D(x_t, t, cond) -> x0``: generator and critic losses
for a user's own training loop.

Generator loss (Sec. 3-4):

1. ``x = G(x_in, t_in, c)`` with ``x_in`` from backward simulation (Sec. 4.4; pure prior for 1-step students);
2. ``t ~ U[min_frac, max_frac]`` of the schedule, ``x_t = alpha(t) x + sigma(t) eps``;
3. ``real_x0 = D_real(x_t, t, c)`` (the teacher, CFG inside it), ``fake_x0 = D_fake(x_t, t, c)``, no grad;
4. ``L_dm = dm_loss(x, real_x0, fake_x0)`` (gradient ``dm_grad / numel``);
5. ``L_G = mean softplus(-H(F_fake(x_t', t')))`` at an independent ``t'`` (diffusion GAN, Sec. 4.2);
6. ``loss = w_dm L_dm + w_gan_g L_G``.

Critic loss (run ``ratio`` times per generator update, :class:`~dmd2.core.critic.CriticScheduler`):

1. ``x = G(...)`` under no-grad (same backward simulation);
2. ``L_fake = mean lambda(t) |D_fake(x_t, t, c) - x|^2`` (denoising score matching on generator samples);
3. ``L_D = mean softplus(H(F(fake_t'))) + softplus(-H(F(real_t'')))``, training the head and the fake backbone;
4. ``loss = L_fake + w_gan_d L_D``.

Both return ``(loss, logs)``; ``logs`` holds detached tensors (no host sync).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import kernels

from .critic import CriticScheduler
from .gan import FeatureHooks, GANHead
from .losses import denoising_loss, dm_loss, gan_discriminator_loss, gan_generator_loss
from .sampler import BackwardSimulationSampler
from .schedules import NoiseSchedule

__all__ = ["DMD2", "DMD2Config"]


@dataclass(frozen=True)
class DMD2Config:
    """Weights and noise ranges of the objective (paper values in the recipes' presets).

    Attributes:
        dm_weight: weight of the distribution-matching surrogate.
        gan_generator_weight: weight of the generator's GAN term (ImageNet 3e-3, SDXL 5e-3); needs a GAN head.
        gan_discriminator_weight: weight of the critic's GAN term (1e-2); needs a GAN head.
        min_frac, max_frac: range of ``t`` (fraction of the schedule) for the DM term and the fake score's denoising loss.
        gan_min_frac, gan_max_frac: range of ``t'`` for the diffusion GAN.
        fake_step_conditioning: also give the fake score the student's 0-based step index, as keyword
            ``step_index`` (a ``(B,)`` long tensor) - one fake distribution per step of a multi-step student.
        dm_eps: the ``eps`` of ``dm_grad``'s normaliser.
        impl: kernel implementation for the fused ops (see :mod:`dmd2.kernels`): ``"auto"`` runs Triton on CUDA
            tensors and the PyTorch reference elsewhere.
        fused_ops: use the counter-based fused ops of :mod:`dmd2.kernels`: the objective's noise comes from the Philox
            stream ``(noise_seed, DMD2.noise_offset)`` through ``noise_add`` (instead of ``torch.randn`` from
            ``generator``; eps is never materialised), the DM term from ``fused_dm`` and the fake score's denoising
            loss from ``denoise_loss``. Same math; a different (but reproducible) noise stream.
        noise_seed: the Philox key of ``fused_ops`` noise.
    """

    dm_weight: float = 1.0
    gan_generator_weight: float = 0.0
    gan_discriminator_weight: float = 0.0
    min_frac: float = 0.02
    max_frac: float = 0.98
    gan_min_frac: float = 0.0
    gan_max_frac: float = 1.0
    fake_step_conditioning: bool = False
    dm_eps: float = 1e-6
    impl: str = "auto"
    fused_ops: bool = False
    noise_seed: int = 0

    def __post_init__(self):
        if not 0 <= self.noise_seed < 2**63:
            raise ValueError(f"DMD2Config: noise_seed must lie in [0, 2**63), got {self.noise_seed}")
        for a, b in ((self.min_frac, self.max_frac), (self.gan_min_frac, self.gan_max_frac)):
            if not (0.0 <= a <= b <= 1.0):
                raise ValueError(f"DMD2Config: noise ranges must satisfy 0 <= min <= max <= 1, got ({a}, {b})")
        for name in ("dm_weight", "gan_generator_weight", "gan_discriminator_weight"):
            if not getattr(self, name) >= 0 or math.isinf(getattr(self, name)):  # NaN fails ">= 0"
                raise ValueError(f"DMD2Config: {name} must be finite and >= 0, got {getattr(self, name)}")
        if not (0 < self.dm_eps < math.inf):
            raise ValueError(f"DMD2Config: dm_eps must be finite and > 0, got {self.dm_eps}")
        if self.impl not in kernels.IMPLS:
            raise ValueError(f"DMD2Config: impl must be one of {kernels.IMPLS}, got {self.impl!r}")


class DMD2:
    """DMD2 losses over a generator, a fake score, a frozen teacher and (optionally) a GAN head.

    Args:
        generator: ``G(x_t, t, cond) -> x0``, the student (trained).
        fake_score: ``D_fake(x_t, t, cond) -> x0`` (trained by :meth:`critic_loss`).
        teacher: ``D_real(x_t, t, cond) -> x0``, frozen; wrap it in :class:`~dmd2.core.denoisers.CFGDenoiser` for
            guidance (one batched ``2B`` call per use). Never differentiated; its weights are never touched.
        schedule: the noise schedule shared by all three networks.
        sampler: the student's grid and backward simulation (:class:`BackwardSimulationSampler`).
        gan_head: optional :class:`GANHead` over features of ``fake_score``; requires ``gan_layers``.
        gan_layers: names of ``fake_score`` submodules whose outputs feed the head (e.g. ``["unet.mid_block"]``).
        config: :class:`DMD2Config`.
    """

    def __init__(self, generator: Callable, fake_score: Callable, teacher: Callable, schedule: NoiseSchedule,
                 sampler: BackwardSimulationSampler, gan_head: GANHead | None = None,
                 gan_layers: Sequence[str] | None = None, config: DMD2Config = DMD2Config()):
        self.generator, self.fake_score, self.teacher = generator, fake_score, teacher
        self.schedule, self.sampler, self.config = schedule, sampler, config
        self.gan_head = gan_head
        #: next Philox counter of ``fused_ops`` noise; each draw of n elements consumes [noise_offset, noise_offset + n).
        #: Save it with a checkpoint to resume the same stream.
        self.noise_offset = 0
        if gan_head is None:
            if config.gan_generator_weight > 0 or config.gan_discriminator_weight > 0:
                raise ValueError("DMD2: GAN weights > 0 need a gan_head (and gan_layers)")
            self.features = None
        else:
            if not gan_layers:
                raise ValueError("DMD2: a gan_head needs gan_layers, the fake_score submodules it reads")
            if not isinstance(fake_score, nn.Module):
                raise ValueError("DMD2: a GAN head reads fake_score features through hooks, so fake_score must be an nn.Module")
            self.features = FeatureHooks(fake_score, gan_layers)

    @property
    def has_gan(self) -> bool:
        return self.gan_head is not None

    # -- helpers -----------------------------------------------------------------------------------------------
    def _add_noise(self, x, t, generator):
        """``x_t = alpha(t) x + sigma(t) eps`` with eps from ``generator``, or (``fused_ops``) from the Philox stream."""
        c = self.config
        if not c.fused_ops:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return self.schedule.add_noise(x, eps, t)
        self.schedule.check_t(t)
        offset, self.noise_offset = self.noise_offset, self.noise_offset + x.numel()
        return kernels.noise_add(x, self.schedule.alpha(t), self.schedule.sigma(t), c.noise_seed, offset, impl=c.impl)

    def _fake(self, x_t, t, cond, k: int):
        if self.config.fake_step_conditioning:
            step = torch.full((x_t.shape[0],), k - 1, dtype=torch.long, device=x_t.device)
            return self.fake_score(x_t, t, cond, step_index=step)
        return self.fake_score(x_t, t, cond)

    def _logits(self, x, cond, k: int, generator):
        """GAN logits of the head on fake-score features at an independent diffusion-GAN time."""
        c = self.config
        t = self.schedule.sample_t(x.shape[0], c.gan_min_frac, c.gan_max_frac, generator=generator, device=x.device)
        x_t = self._add_noise(x, t, generator)
        _, feats = self.features.run(self._fake, x_t, t, cond, k)
        return self.gan_head(feats)

    def generate(self, noise: torch.Tensor, cond: Any = None, k: int | None = None, generator=None):
        """Backward-simulated input and the generator's differentiable output: ``(x, simulated)``."""
        sim = self.sampler.simulate(self.generator, noise, cond, k=k, generator=generator)
        return self.generator(sim.x_t, sim.t, cond), sim

    # -- losses ------------------------------------------------------------------------------------------------
    def generator_loss(self, noise: torch.Tensor, cond: Any = None, k: int | None = None,
                       generator: torch.Generator | None = None):
        """Generator loss from unit ``noise`` ``(B, ...)``; ``k`` the backward-simulation step (drawn if None).

        Returns ``(loss, logs)`` with logs ``loss_dm``, ``loss_gan_g`` (when a head exists), ``dm_grad_abs``, ``k``.
        Gradients reach the generator's parameters (and, through the GAN term, the fake score's and head's, which
        the caller's generator optimizer does not own: zero them before the critic update).
        """
        c = self.config
        x, sim = self.generate(noise, cond, k, generator)
        b = x.shape[0]
        t = self.schedule.sample_t(b, c.min_frac, c.max_frac, generator=generator, device=x.device)
        with torch.no_grad():
            x_t = self._add_noise(x.detach(), t, generator)
            real_x0 = self.teacher(x_t, t, cond)
            fake_x0 = self._fake(x_t, t, cond, sim.k)
        if c.fused_ops:
            loss_dm = kernels.fused_dm(x, None, real_x0.to(x.dtype), None, fake_x0.to(x.dtype), eps=c.dm_eps,
                                       impl=c.impl).loss
        else:
            loss_dm = dm_loss(x, real_x0.to(x.dtype), fake_x0.to(x.dtype), eps=c.dm_eps, impl=c.impl)
        loss = c.dm_weight * loss_dm
        logs = {"loss_dm": loss_dm.detach(), "k": torch.tensor(sim.k)}
        if self.has_gan:
            loss_g = gan_generator_loss(self._logits(x, cond, sim.k, generator)).mean()
            loss = loss + c.gan_generator_weight * loss_g
            logs["loss_gan_g"] = loss_g.detach()
        logs["loss_g"] = loss.detach()
        return loss, logs

    def critic_loss(self, noise: torch.Tensor, cond: Any = None, real: torch.Tensor | None = None,
                    real_cond: Any = None, k: int | None = None, generator: torch.Generator | None = None):
        """Critic loss: the fake score's denoising loss on fresh generator samples, plus the GAN discriminator loss
        on diffused ``real`` images vs diffused samples when a head exists (``real`` is then required).

        The generator is run under no-grad: it receives no gradient. Returns ``(loss, logs)``.
        """
        c = self.config
        if self.has_gan and real is None:
            raise ValueError("DMD2.critic_loss: this objective has a GAN head; pass real images (real=...)")
        with torch.no_grad():
            x, sim = self.generate(noise, cond, k, generator)
        x = x.detach()
        b = x.shape[0]
        t = self.schedule.sample_t(b, c.min_frac, c.max_frac, generator=generator, device=x.device)
        x_t = self._add_noise(x, t, generator)
        pred = self._fake(x_t, t, cond, sim.k)
        if c.fused_ops:
            weight = self.schedule.denoising_weight(t)
            loss_fake = kernels.denoise_loss(pred, weight, "x0", x0=x.to(pred.dtype), impl=c.impl).mean()
        else:
            loss_fake = denoising_loss(pred, x, t, self.schedule).mean()
        loss = loss_fake
        logs = {"loss_fake": loss_fake.detach()}
        if self.has_gan:
            if real.shape[1:] != x.shape[1:]:
                raise ValueError(f"DMD2.critic_loss: real images must have shape (B', {tuple(x.shape[1:])}), got {tuple(real.shape)}")
            rc = cond if real_cond is None else real_cond
            fake_logits = self._logits(x, cond, sim.k, generator)
            real_logits = self._logits(real.to(x.dtype), rc, sim.k, generator)
            loss_d = gan_discriminator_loss(fake_logits, real_logits).mean()
            loss = loss + c.gan_discriminator_weight * loss_d
            logs.update(loss_gan_d=loss_d.detach(), logits_fake=fake_logits.detach().mean(),
                        logits_real=real_logits.detach().mean())
        logs["loss_critic"] = loss.detach()
        return loss, logs
