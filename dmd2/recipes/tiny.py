r"""A tiny, download-free DMD2 recipe: distil an *analytic* teacher on a Gaussian mixture into a small conv student.

Data: ``K`` class means :math:`\mu_k \in \mathbb R^{C\times H\times W}` (fixed by ``data.seed``) and
:math:`x_0 = \mu_c + s\,\epsilon`, class ``c`` uniform. On a VP schedule (:math:`x_t = \alpha x_0 + \sigma\epsilon`) the
exact denoiser is known in closed form, so the teacher needs no training:

.. math::
    E[x_0 \mid x_t, c] = \mu_c + \frac{\alpha s^2}{\alpha^2 s^2 + \sigma^2}(x_t - \alpha\mu_c),

and without a class the mixture posterior weights :math:`p(k\mid x_t) \propto \exp(-\|x_t - \alpha\mu_k\|^2 /
2(\alpha^2 s^2 + \sigma^2))`. Generator and fake score are the same small conv denoiser (identical initialisation,
as DMD2 initialises both from the teacher); the GAN head reads the ``mid`` block.

Run ``python -m dmd2.recipes.tiny --preset tiny`` (a few CPU iterations), ``... sample CKPT [PNG]``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core import BackwardSimulationSampler, GANHead, VPSchedule
from ..train import Components, Recipe, RecipeConfig, main
from ..train.trainer import derive_seed

__all__ = ["TinyConfig", "TinyModelConfig", "TinyDataConfig", "TinyDenoiser", "MixtureTeacher", "build", "RECIPE", "PRESETS"]


@dataclass(frozen=True)
class TinyModelConfig:
    """The student / fake-score network.

    Attributes:
        hidden: channels of the network.
        gan: add a GAN head.
        gan_hidden: width of the GAN head.
    """

    hidden: int = 16
    gan: bool = True
    gan_hidden: int = 16


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


class MixtureTeacher(nn.Module):
    """The exact denoiser of the mixture (module docstring); ``cond``: class labels ``(B,)`` or None."""

    def __init__(self, means: torch.Tensor, std: float, schedule: VPSchedule):
        super().__init__()
        self.register_buffer("means", means.float())
        self.var = float(std) ** 2
        self.schedule = schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        a = self.schedule.alpha(t).view(-1, 1, 1, 1)
        s2 = self.schedule.sigma(t).view(-1, 1, 1, 1) ** 2
        x = x_t.float()
        gain = a * self.var / (a * a * self.var + s2)
        if cond is not None:
            mu = self.means[cond.long()]
        else:
            d2 = (x[:, None] - a[:, None] * self.means[None]).pow(2).flatten(2).sum(-1)  # (B, K)
            w = torch.softmax(-d2 / (2 * (a * a * self.var + s2)).view(-1, 1), dim=1)
            mu = torch.einsum("bk,kchw->bchw", w, self.means)
        return (mu + gain * (x - a * mu)).to(x_t.dtype)


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


def build(cfg: TinyConfig, info=None) -> Components:
    """The tiny recipe's components (everything on CPU; the trainer moves them)."""
    d, m = cfg.data, cfg.model
    schedule = VPSchedule.linear()
    timesteps = cfg.sampler.grid(grid)
    sampler = BackwardSimulationSampler(schedule, timesteps)
    means = mixture_means(d)
    teacher = MixtureTeacher(means, d.std, schedule)
    classes = d.classes if d.conditional else 0
    generator = TinyDenoiser(schedule, d.channels, m.hidden, classes)
    fake_score = copy.deepcopy(generator)
    head = GANHead([m.hidden], hidden=m.gan_hidden, depth=1) if m.gan else None
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
        g = torch.Generator(device=device).manual_seed(0)
        n = 4 * d.classes
        noise = torch.randn((n, *shape), generator=g, device=device)
        cond = torch.arange(n, device=device) % d.classes if d.conditional else None
        return sampler.sample(gen, noise, cond, generator=g)

    return Components(generator=generator, fake_score=fake_score, teacher=teacher, schedule=schedule, sampler=sampler,
                      latents=latents, real_data=real_data, gan_head=head, gan_layers=["mid"] if head else [],
                      sample_fn=sample_fn, checkpoint_units=lambda mod: [mod.mid, mod.out])


def sample_command(cfg: TinyConfig, args: list[str]) -> int:
    """``sample CKPT [OUT.png]``: a grid from a checkpoint's EMA weights (generator weights if it has no EMA)."""
    from ..train.checkpoint import read_checkpoint
    from ..train.monitor import save_png

    if not 1 <= len(args) <= 2:
        raise ValueError("usage: sample CKPT [OUT.png]")
    weights, _, _ = read_checkpoint(args[0])
    c = build(cfg)
    sd = {k: v for k, v in weights.get("ema", weights["generator"]).items() if not k.startswith("buffer::")}
    c.generator.load_state_dict(sd, strict=False)
    with torch.no_grad():
        imgs = c.sample_fn(c.generator, torch.device("cpu"))
    out = save_png(imgs, args[1] if len(args) > 1 else Path(args[0]) / "samples.png")
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
    """The summary's command: a sample grid from the checkpoint (the run's config)."""
    out = Path(cfg.train.out)
    return [f"python -m dmd2.recipes.tiny sample {ckpt} {out / 'sample.png'} --config {out / 'config.json'}"]


RECIPE = Recipe(name="tiny", config=TinyConfig(), build=build, presets=PRESETS, commands={"sample": sample_command},
                next_steps=next_steps)

if __name__ == "__main__":
    from dmd2.train.distributed import exit_process

    exit_process(main(RECIPE))
