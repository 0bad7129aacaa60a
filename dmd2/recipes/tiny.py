r"""A tiny, download-free DMD2 recipe: distil an *analytic* teacher on a Gaussian mixture into a small conv student.

Data: ``K`` class means :math:`\mu_k \in \mathbb R^{C\times H\times W}` (fixed by ``data.seed``) and
:math:`x_0 = \mu_c + s\,\epsilon`, class ``c`` uniform. On a VP schedule (:math:`x_t = \alpha x_0 + \sigma\epsilon`) the
exact denoiser is known in closed form, so the teacher needs no training
(:class:`~dmd2.models.mixture.GaussianMixtureDenoiser`):

.. math::
    E[x_0 \mid x_t, c] = \mu_c + \frac{\alpha s^2}{\alpha^2 s^2 + \sigma^2}(x_t - \alpha\mu_c),

and without a class the mixture posterior weights :math:`p(k\mid x_t) \propto \exp(-\|x_t - \alpha\mu_k\|^2 /
2(\alpha^2 s^2 + \sigma^2))`. Generator and fake score are the same small conv denoiser (identical initialisation,
as DMD2 initialises both from the teacher); the GAN head reads the ``mid`` block.

Run ``python -m dmd2.recipes.tiny --preset tiny`` (a few CPU iterations), ``... sample RUN_OR_CKPT [PNG]``;
``dmd2.train.load_generator(RUN)`` gives the trained student.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core import BackwardSimulationSampler, VPSchedule
from ..models.mixture import GaussianMixtureDenoiser
from ..train import Components, Recipe, RecipeConfig, Student, main
from ..train.config import GANConfig, gan_head, gan_layers
from ..train.randomness import derive_seed

__all__ = ["TinyConfig", "TinyModelConfig", "TinyDataConfig", "TinyDenoiser", "mixture_means", "build", "student",
           "RECIPE", "PRESETS"]


@dataclass(frozen=True)
class TinyModelConfig:
    """The student / fake-score network (the GAN head, section ``gan``, reads its ``mid`` block).

    Attributes:
        hidden: channels of the network.
    """

    hidden: int = 16


@dataclass(frozen=True)
class TinyDataConfig:
    """The Gaussian mixture the tiny teacher denoises exactly.

    Attributes:
        classes: number of mixture components (one per class).
        channels, resolution: each mean has shape ``(channels, resolution, resolution)``.
        std: standard deviation of every component.
        seed: fixes the means.
        conditional: class-conditional (the class picks the component) or unconditional.
    """

    classes: int = 4
    channels: int = 3
    resolution: int = 8
    std: float = 0.2
    seed: int = 1234
    conditional: bool = True


@dataclass(frozen=True)
class TinyConfig(RecipeConfig):
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    data: TinyDataConfig = field(default_factory=TinyDataConfig)


def mixture_means(d: TinyDataConfig) -> torch.Tensor:
    """``(classes, C, H, W)`` means in (-0.8, 0.8): smooth random patterns fixed by ``d.seed``."""
    g = torch.Generator().manual_seed(d.seed)
    coarse = torch.randn(d.classes, d.channels, 2, 2, generator=g)
    up = nn.functional.interpolate(coarse, size=(d.resolution, d.resolution), mode="bilinear", align_corners=True)
    return 0.8 * torch.tanh(up)


class TinyDenoiser(nn.Module):
    r"""``D(x_t, t, c) = \alpha(t) x_t + F(x_t, \alpha, \sigma, c)``: a 3-conv net predicting the x0 residual."""

    def __init__(self, schedule: VPSchedule, channels: int, hidden: int, classes: int):
        super().__init__()
        self.schedule = schedule
        groups = 4 if hidden % 4 == 0 else 1
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.temb = nn.Linear(2, hidden)
        self.cemb = nn.Embedding(classes, hidden) if classes else None
        self.mid = nn.Sequential(nn.GroupNorm(groups, hidden), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1))
        self.out = nn.Sequential(nn.GroupNorm(groups, hidden), nn.SiLU(), nn.Conv2d(hidden, channels, 3, padding=1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        h = self.inp(x_t) + self.temb(torch.stack([a, s], 1).to(x_t.dtype))[:, :, None, None]
        if self.cemb is not None and cond is not None:
            h = h + self.cemb(cond.long())[:, :, None, None]
        h = h + self.mid(h)
        return (a.view(-1, 1, 1, 1) * x_t.float() + self.out(h).float()).to(x_t.dtype)


def grid(steps: int) -> list[int]:
    """Evenly spaced VP timesteps, noisiest first: 1 -> [999], 2 -> [999, 499], 4 -> [999, 749, 499, 249]."""
    return [int(999 - i * 1000 / steps) for i in range(steps)]


def _generator(cfg: TinyConfig) -> tuple[TinyDenoiser, BackwardSimulationSampler]:
    """The student network (random initialisation) and its sampler on ``cfg.sampler``'s grid."""
    d = cfg.data
    schedule = VPSchedule.linear()
    sampler = BackwardSimulationSampler(schedule, cfg.sampler.grid(grid))
    return TinyDenoiser(schedule, d.channels, cfg.model.hidden, d.classes if d.conditional else 0), sampler


def _sample_grid(sample, d: TinyDataConfig, device) -> torch.Tensor:
    """``4 K`` samples (classes ``0..K-1`` in turn when conditional) from ``sample(noise, cond, generator)``, seed 0."""
    g = torch.Generator(device=device).manual_seed(0)
    n = 4 * d.classes
    noise = torch.randn((n, d.channels, d.resolution, d.resolution), generator=g, device=device)
    cond = torch.arange(n, device=device) % d.classes if d.conditional else None
    return sample(noise, cond, g)


def build(cfg: TinyConfig, info=None) -> Components:
    """The tiny recipe's components (everything on CPU; the trainer moves them)."""
    d, m = cfg.data, cfg.model
    generator, sampler = _generator(cfg)
    schedule = sampler.schedule
    means = mixture_means(d)
    teacher = GaussianMixtureDenoiser(means, d.std, schedule)
    fake_score = copy.deepcopy(generator)
    layers = gan_layers(cfg, fake_score, ["mid"], configurable=False)
    head = gan_head(cfg, [m.hidden])
    shape = (d.channels, d.resolution, d.resolution)

    def latents(batch, g, device):
        noise = torch.randn((batch, *shape), generator=g, device=device)
        cond = torch.randint(0, d.classes, (batch,), generator=g, device=device) if d.conditional else None
        return noise, cond

    def real_data(step, shard, batch, device):
        g = torch.Generator().manual_seed(derive_seed(d.seed, step, shard))
        c = torch.randint(0, d.classes, (batch,), generator=g)
        x = means[c] + d.std * torch.randn((batch, *shape), generator=g)
        return x.to(device), (c.to(device) if d.conditional else None)

    def sample_fn(gen, device):
        return _sample_grid(lambda noise, cond, g: sampler.sample(gen, noise, cond, generator=g), d, device)

    return Components(generator=generator, fake_score=fake_score, teacher=teacher, schedule=schedule, sampler=sampler,
                      latents=latents, real_data=real_data if head is not None else None, gan_head=head,
                      gan_layers=layers,
                      sample_fn=sample_fn, checkpoint_units=lambda mod: [mod.mid, mod.out])


def student(cfg: TinyConfig, state_dict: dict[str, torch.Tensor]) -> Student:
    """The trained student of a run with config ``cfg`` (:attr:`Recipe.generator <dmd2.train.Recipe>`)."""
    net, sampler = _generator(cfg)
    net.load_state_dict(state_dict, strict=True)
    d = cfg.data
    return Student(net, sampler, (d.channels, d.resolution, d.resolution), d.classes if d.conditional else 0)


def sample_command(cfg: TinyConfig, args: list[str]) -> int:
    """``sample RUN_OR_CKPT [OUT.png]``: a grid from a checkpoint's EMA weights (its generator weights when the run
    kept no EMA); a run folder means its newest checkpoint. Default PNG: ``CKPT/samples.png``."""
    from ..train import load_config, load_generator
    from ..train.monitor import save_png

    if not 1 <= len(args) <= 2:
        raise ValueError("usage: sample RUN_OR_CKPT [OUT.png]")
    G = load_generator(args[0], recipe=RECIPE)
    _, run_cfg = load_config(G.checkpoint, RECIPE)
    with torch.no_grad():
        imgs = _sample_grid(G, run_cfg.data, torch.device("cpu"))
    out = save_png(imgs, args[1] if len(args) > 1 else G.checkpoint / "samples.png")
    print(out)
    return 0


PRESETS = {
    "tiny": {
        "train.max_steps": 20, "train.batch_size": 4, "train.lr_generator": 1e-3, "train.lr_critic": 1e-3,
        "train.warmup_steps": 2, "train.checkpoint_every": 10, "train.log_every": 5, "train.sample_every": 10,
        "train.ema_decay": 0.9, "train.device": "cpu", "critic.ratio": 2, "sampler.steps": 2,
        "objective.gan_generator_weight": 3e-3, "objective.gan_discriminator_weight": 1e-2,
    },
}

def next_steps(cfg: TinyConfig, ckpt: Path) -> list[str]:
    """The summary's command: a sample grid from the checkpoint (it reads the run's config from the checkpoint)."""
    return [f"python -m dmd2.recipes.tiny sample {ckpt} {Path(cfg.train.out) / 'sample.png'}"]


RECIPE = Recipe(name="tiny", config=TinyConfig(gan=GANConfig(hidden=16, depth=1)), build=build, presets=PRESETS,
                commands={"sample": sample_command}, next_steps=next_steps, generator=student)

if __name__ == "__main__":
    from dmd2.train.distributed import exit_process

    exit_process(main(RECIPE))
