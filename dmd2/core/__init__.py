"""The DMD2 algorithm, framework-free: schedules, denoiser adapters, losses, GAN head, critic scheduler,
backward-simulation sampler, EMA and the objective. Everything works on CPU, any ``(B, ...)`` shape, fp32 / bf16."""
from .critic import CriticScheduler, Phase
from .denoisers import CFGDenoiser, DiffusersDenoiser, EDMPrecond, cat_cond
from .ema import EMA
from .gan import FeatureHooks, GANHead, shift_images
from .losses import cfg, denoising_loss, dm_grad, dm_loss, gan_discriminator_loss, gan_generator_loss
from .objective import DMD2, DMD2Config
from .sampler import BackwardSimulationSampler, Simulated
from .schedules import EDMSchedule, NoiseSchedule, VPSchedule, expand_like

__all__ = [
    "VPSchedule", "EDMSchedule", "NoiseSchedule", "expand_like",
    "dm_grad", "dm_loss", "cfg", "denoising_loss", "gan_generator_loss", "gan_discriminator_loss",
    "GANHead", "FeatureHooks", "shift_images",
    "CriticScheduler", "Phase",
    "BackwardSimulationSampler", "Simulated",
    "EMA",
    "DMD2", "DMD2Config",
    "EDMPrecond", "DiffusersDenoiser", "CFGDenoiser", "cat_cond",
]
