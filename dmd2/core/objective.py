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

1. ``x = G(...)`` under no-grad (same backward simulation), or given: the generator turn's detached output
   (:attr:`DMD2.last_samples`), as the official code does on generator turns;
2. ``L_fake = mean lambda(t) |D_fake(x_t, t, c) - x|^2`` (denoising score matching on generator samples), ``t`` in
   ``[critic_min_frac, critic_max_frac]`` (the whole schedule, as the official code's ``t ~ U[0, 1000)``);
3. ``L_D = mean softplus(H(F(fake_t'))) + softplus(-H(F(real_t'')))``, training the head and the fake backbone;
4. ``loss = L_fake + w_gan_d L_D``.

Both return ``(loss, logs)``; ``logs`` holds detached tensors (no host sync).

Cost: ``F`` is a features-only pass of ``D_fake`` (:class:`~dmd2.core.gan.FeatureHooks` ends the forward after the
tapped layer: the decoder never runs for the GAN), and the critic's fake and real features come from ONE such pass
of ``2B``. Under bf16 autocast the head and the DM term's fake-score query run with autocast disabled (fp32 where
the networks hold fp32 weights), as the official code does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import kernels

from .critic import CriticScheduler
from .denoisers import _expand_cond, cat_cond
from .gan import FeatureHooks, GANHead, shift_images
from .losses import denoising_loss, dm_loss, gan_discriminator_loss, gan_generator_loss
from .sampler import BackwardSimulationSampler
from .schedules import NoiseSchedule

__all__ = ["DMD2", "DMD2Config", "Samples"]


@dataclass(frozen=True)
class DMD2Config:
    """Weights and noise ranges of the objective (paper values in the recipes' presets).

    Attributes:
        dm_weight: weight of the distribution-matching surrogate.
        gan_generator_weight: weight of the generator's GAN term (ImageNet 3e-3, SDXL 5e-3); needs a GAN head.
        gan_discriminator_weight: weight of the critic's GAN term (1e-2); needs a GAN head.
        min_frac, max_frac: range of ``t`` (fraction of the schedule) for the DM term (paper: 2%..98%).
        critic_min_frac, critic_max_frac: range of ``t`` for the fake score's denoising loss (official: the whole
            schedule, ``t ~ U[0, 1000)``).
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
        gan_from_critic_pass: read the discriminator loss's fake logits from the fake score's denoising pass on the
            same noisy sample (its features at the tap), saving one features-only pass of ``B`` per critic update.
            Needs ``critic_min_frac/critic_max_frac == gan_min_frac/gan_max_frac`` so that each term keeps its
            marginal over ``t``; only the two terms then share noise (a change to the estimator: opt-in; on MNIST
            its quality matches the default's over three training seeds, docs/mnist.md).
        gan_shift: translate every image the diffusion GAN sees (reals and fakes alike, in the generator's and the
            critic's GAN terms) by an integer offset drawn per image and axis from ``[-gan_shift, gan_shift]``
            pixels before it is noised: edge pixels repeat into the gap and the shift is differentiable, so the
            generator's GAN gradient passes through it (the translation of DiffAugment, Zhao et al. 2020, a remedy
            for a discriminator that outgrows little real data). ``0`` (default, the paper): off, and no draws.
            Needs ``(B, C, H, W)`` images; not with ``gan_from_critic_pass`` (its fakes are the unshifted
            denoising pass's).
        critic_fresh_samples: on generator turns, let the critic update generate fresh samples with the updated
            generator (this project's behaviour before the official one was adopted) instead of reusing the
            generator turn's detached, pre-update output (:attr:`DMD2.last_samples`; the official code's and the
            default). Read by the trainer.
    """

    dm_weight: float = 1.0
    gan_generator_weight: float = 0.0
    gan_discriminator_weight: float = 0.0
    min_frac: float = 0.02
    max_frac: float = 0.98
    critic_min_frac: float = 0.0
    critic_max_frac: float = 1.0
    gan_min_frac: float = 0.0
    gan_max_frac: float = 1.0
    fake_step_conditioning: bool = False
    dm_eps: float = 1e-6
    impl: str = "auto"
    fused_ops: bool = False
    noise_seed: int = 0
    gan_from_critic_pass: bool = False
    gan_shift: int = 0
    critic_fresh_samples: bool = False

    def __post_init__(self):
        if not 0 <= self.noise_seed < 2**63:
            raise ValueError(f"DMD2Config: noise_seed must lie in [0, 2**63), got {self.noise_seed}")
        for a, b in ((self.min_frac, self.max_frac), (self.critic_min_frac, self.critic_max_frac),
                     (self.gan_min_frac, self.gan_max_frac)):
            if not (0.0 <= a <= b <= 1.0):
                raise ValueError(f"DMD2Config: noise ranges must satisfy 0 <= min <= max <= 1, got ({a}, {b})")
        if self.gan_from_critic_pass and (self.critic_min_frac, self.critic_max_frac) != (self.gan_min_frac, self.gan_max_frac):
            raise ValueError("DMD2Config: gan_from_critic_pass reads the GAN's fake logits from the denoising pass, so "
                             "critic_min_frac/critic_max_frac must equal gan_min_frac/gan_max_frac; got "
                             f"({self.critic_min_frac}, {self.critic_max_frac}) vs ({self.gan_min_frac}, {self.gan_max_frac})")
        if isinstance(self.gan_shift, bool) or not isinstance(self.gan_shift, int) or self.gan_shift < 0:
            raise ValueError(f"DMD2Config: gan_shift must be an int >= 0 (pixels), got {self.gan_shift!r}")
        if self.gan_shift and self.gan_from_critic_pass:
            raise ValueError("DMD2Config: gan_shift shifts the GAN's images, but gan_from_critic_pass takes the fakes' "
                             "features from the unshifted denoising pass; use one of them")
        for name in ("dm_weight", "gan_generator_weight", "gan_discriminator_weight"):
            if not getattr(self, name) >= 0 or math.isinf(getattr(self, name)):  # NaN fails ">= 0"
                raise ValueError(f"DMD2Config: {name} must be finite and >= 0, got {getattr(self, name)}")
        if not (0 < self.dm_eps < math.inf):
            raise ValueError(f"DMD2Config: dm_eps must be finite and > 0, got {self.dm_eps}")
        if self.impl not in kernels.IMPLS:
            raise ValueError(f"DMD2Config: impl must be one of {kernels.IMPLS}, got {self.impl!r}")


@dataclass(frozen=True)
class Samples:
    """Generator output handed from :meth:`DMD2.generator_loss` to :meth:`DMD2.critic_loss`: ``x`` (detached,
    ``(B, ...)``) made at backward-simulation step ``k``."""

    x: torch.Tensor
    k: int


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
        #: :class:`Samples` of the last :meth:`generator_loss` call (its detached output and ``k``), for a critic
        #: update on the same samples.
        self.last_samples: Samples | None = None
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

    def _fp32(self, device: torch.device):
        """Autocast off (the head and the DM fake query run in the networks' own precision, fp32 masters)."""
        return torch.autocast(device.type, enabled=False)

    def _head(self, feats):
        with self._fp32(feats[0].device):
            return self.gan_head([f.float() for f in feats])

    def _features(self, xs: Sequence[torch.Tensor], conds: Sequence[Any], k: int, generator) -> list[torch.Tensor]:
        """Fake-score features (one tensor per tapped layer, batches concatenated) of each batch in ``xs`` at
        independent diffusion-GAN times, all in ONE features-only pass (conds joined with ``cat_cond``).

        Per batch, in order: the ``gan_shift`` offsets (when on), ``t' ~ U[gan_min_frac, gan_max_frac]``, then its
        noise (the same draws as one pass per batch).
        """
        c = self.config
        x_ts, ts = [], []
        for x in xs:
            if c.gan_shift:
                x = shift_images(x, c.gan_shift, generator)
            t = self.schedule.sample_t(x.shape[0], c.gan_min_frac, c.gan_max_frac, generator=generator, device=x.device)
            x_ts.append(self._add_noise(x, t, generator))
            ts.append(t)
        cond = conds[0]
        if len(xs) > 1:
            cond = _expand_cond(cond, xs[0].shape[0])
            for x, cd in zip(xs[1:], conds[1:]):
                cond = cat_cond(cond, _expand_cond(cd, x.shape[0]))
        x_t, t = (x_ts[0], ts[0]) if len(xs) == 1 else (torch.cat(x_ts), torch.cat(ts))
        return self.features.run(self._fake, x_t, t, cond, k, features_only=True)[1]

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
        self.last_samples = Samples(x.detach(), sim.k)
        with torch.no_grad():
            x_t = self._add_noise(x.detach(), t, generator)
            real_x0 = self.teacher(x_t, t, cond)
            with self._fp32(x_t.device):
                fake_x0 = self._fake(x_t.float(), t, cond, sim.k)
        if c.fused_ops:
            loss_dm = kernels.fused_dm(x, None, real_x0.to(x.dtype), None, fake_x0.to(x.dtype), eps=c.dm_eps,
                                       impl=c.impl).loss
        else:
            loss_dm = dm_loss(x, real_x0.to(x.dtype), fake_x0.to(x.dtype), eps=c.dm_eps, impl=c.impl)
        loss = c.dm_weight * loss_dm
        logs = {"loss_dm": loss_dm.detach(), "k": torch.tensor(sim.k)}
        if self.has_gan:
            loss_g = gan_generator_loss(self._head(self._features([x], [cond], sim.k, generator))).mean()
            loss = loss + c.gan_generator_weight * loss_g
            logs["loss_gan_g"] = loss_g.detach()
        logs["loss_g"] = loss.detach()
        return loss, logs

    def critic_loss(self, noise: torch.Tensor | None, cond: Any = None, real: torch.Tensor | None = None,
                    real_cond: Any = None, k: int | None = None, generator: torch.Generator | None = None,
                    samples: Samples | None = None):
        """Critic loss: the fake score's denoising loss on generator samples, plus the GAN discriminator loss on
        diffused ``real`` images vs diffused samples when a head exists (``real`` is then required).

        The samples are ``samples`` when given (e.g. :attr:`last_samples` of the generator turn, with its ``cond``;
        ``noise`` and ``k`` are then unused), else fresh ones from ``noise`` under no-grad. The generator receives
        no gradient. Returns ``(loss, logs)``.
        """
        c = self.config
        if self.has_gan and real is None:
            raise ValueError("DMD2.critic_loss: this objective has a GAN head; pass real images (real=...)")
        if samples is None:
            if noise is None:
                raise ValueError("DMD2.critic_loss: pass noise (fresh samples) or samples (given ones)")
            with torch.no_grad():
                x, sim = self.generate(noise, cond, k, generator)
            x, k = x.detach(), sim.k
        else:
            x, k = samples.x.detach(), samples.k
        b = x.shape[0]
        t = self.schedule.sample_t(b, c.critic_min_frac, c.critic_max_frac, generator=generator, device=x.device)
        x_t = self._add_noise(x, t, generator)
        shared = self.has_gan and c.gan_from_critic_pass
        if shared:
            pred, feats = self.features.run(self._fake, x_t, t, cond, k)
        else:
            pred = self._fake(x_t, t, cond, k)
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
            if shared:  # the denoising pass's features of the fakes, a features-only pass of the reals
                real_feats = self._features([real.to(x.dtype)], [rc], k, generator)
                feats = [torch.cat([f, r]) for f, r in zip(feats, real_feats)]
            else:
                feats = self._features([x, real.to(x.dtype)], [cond, rc], k, generator)
            fake_logits, real_logits = self._head(feats).split([b, real.shape[0]])  # one head call
            loss_d = gan_discriminator_loss(fake_logits, real_logits).mean()
            loss = loss + c.gan_discriminator_weight * loss_d
            logs.update(loss_gan_d=loss_d.detach(), logits_fake=fake_logits.detach().mean(),
                        logits_real=real_logits.detach().mean())
        logs["loss_critic"] = loss.detach()
        return loss, logs
