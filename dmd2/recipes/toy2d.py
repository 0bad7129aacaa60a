r"""DMD2 on a 2-D mixture of Gaussians with an exact teacher: the end-to-end proof, written the way a user writes a
custom trainer around :class:`~dmd2.core.DMD2` and :class:`~dmd2.core.CriticScheduler`.

The data is ``K`` isotropic Gaussians (std ``s``) on a ring of radius ``r``. Its exact denoiser under
``x_t = x_0 + sigma * eps`` is the posterior mean

.. math::
    D(x_t;\sigma) = \sum_k p(k \mid x_t)\,\Big(\mu_k + \tfrac{s^2}{s^2+\sigma^2}(x_t - \mu_k)\Big),\qquad
    p(k \mid x_t) \propto \pi_k\, \mathcal N(x_t; \mu_k, (s^2+\sigma^2) I),

(:class:`~dmd2.models.mixture.GaussianMixtureDenoiser` with :math:`\alpha = 1`), so the teacher is perfect and any
error is the distillation's. The GAN term is OFF: the distribution-matching gradient alone must move the student
onto the mixture.

The shared command line (:mod:`dmd2.train.cli`; the loop is this file's own, not the shared Trainer)::

    python -m dmd2.recipes.toy2d [train] [--preset default|four-step|tiny] [--steps N] [--out DIR] [key.sub=value ...]
    python -m dmd2.recipes.toy2d compare [--out DIR] [train.max_steps=N] [train.seed=S]

``train`` distils one student (``OUT/toy2d.json``: sliced W2 and mode coverage; ``OUT/toy2d.png``;
``OUT/generator.safetensors``); ``compare`` runs five (untrained, 1-step, 4-step, 4-step with one fake score, 1-step
with the DM gradient's sign flipped) and writes ``OUT/compare.json`` / ``OUT/compare.png``. Of the shared keys this
loop reads ``train.max_steps`` (iterations), ``train.batch_size``, ``train.lr_generator``, ``train.lr_critic``,
``train.ema_decay``, ``train.seed``, ``train.log_every``, ``critic.ratio``, ``sampler.steps`` and
``objective.fake_step_conditioning``; setting any other shared key is refused.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..core import DMD2, EMA, BackwardSimulationSampler, CriticScheduler, DMD2Config, EDMPrecond, EDMSchedule
from ..models.mixture import GaussianMixtureDenoiser
from ..train import Recipe, RecipeConfig, apply_overrides, config_to_dict, config_to_json, main as cli_main, valid_keys

# ------------------------------------------------------------------------------------------------ the data


@dataclass(frozen=True)
class Mixture:
    """Isotropic Gaussians evenly spaced on a ring (equal weights).

    Attributes:
        modes: number of Gaussians.
        radius: radius of the ring of their means.
        std: standard deviation of each.
    """

    modes: int = 8
    radius: float = 2.0
    std: float = 0.15

    def means(self) -> torch.Tensor:
        a = torch.arange(self.modes, dtype=torch.float64) * (2 * math.pi / self.modes)
        return (self.radius * torch.stack([a.cos(), a.sin()], dim=1)).float()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(0, self.modes, (n,), generator=generator)
        return self.means()[k] + self.std * torch.randn(n, 2, generator=generator)

    @property
    def data_std(self) -> float:
        return math.sqrt(self.radius**2 / 2 + self.std**2)

    def denoiser(self, schedule: EDMSchedule) -> GaussianMixtureDenoiser:
        """The exact x0-denoiser (module docstring), frozen: ``(x_t (B, 2), sigma (B,), cond=None) -> x0``."""
        return GaussianMixtureDenoiser(self.means(), self.std, schedule).requires_grad_(False)


# ------------------------------------------------------------------------------------------------ the networks


class MLP(nn.Module):
    """``F(x_in (B, 2), c_noise (B,), labels=None, step_index=None) -> (B, 2)``: an MLP with a Fourier noise embedding
    and an optional step-index embedding; ``zero_out`` initialises the last layer to 0."""

    def __init__(self, hidden: int = 128, depth: int = 3, num_steps: int = 0, zero_out: bool = False,
                 input_features: int = 0, feature_scale: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, 9, dtype=torch.float32) * math.pi / 2, persistent=False)
        # optional random Fourier features of the input (fixed): lets a small MLP make sharp maps (spectral bias)
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("proj", feature_scale * torch.randn(2, input_features, generator=g), persistent=False)
        self.inp = nn.Linear(2 + 16 + 2 * input_features, hidden)
        self.step_emb = nn.Embedding(num_steps, hidden) if num_steps else None
        self.body = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, 2)
        if zero_out:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x, c_noise, labels=None, step_index=None):
        e = c_noise[:, None] * self.freqs[None]
        xp = x @ self.proj
        h = self.inp(torch.cat([x, e.sin(), e.cos(), xp.sin(), xp.cos()], dim=1))
        if self.step_emb is not None:
            if step_index is None:
                raise ValueError("this MLP is step-conditioned: pass step_index (B,)")
            h = h + self.step_emb(step_index)
        h = torch.nn.functional.silu(h)
        for layer in self.body:
            h = torch.nn.functional.silu(layer(h))
        return self.out(h)


class Precond(EDMPrecond):
    """EDM preconditioning that forwards an optional ``step_index`` to the net, plus an optional exact base denoiser:
    ``D(x) = base(x) + c_out * F(c_in x, c_noise)`` when ``base`` is given (start from the teacher), else EDM's
    ``c_skip x + c_out F``."""

    def __init__(self, model: nn.Module, sigma_data: float, base: nn.Module | None = None):
        super().__init__(model, sigma_data=sigma_data)
        self.base = base

    def forward(self, x_t, sigma, cond=None, step_index=None):
        s = sigma.float()[:, None]
        sd = self.sigma_data
        c_in, c_out = 1 / (s**2 + sd**2).sqrt(), s * sd / (s**2 + sd**2).sqrt()
        f = self.model(c_in * x_t.float(), sigma.float().log() / 4, None, step_index)
        skip = self.base(x_t, sigma) if self.base is not None else (sd**2 / (s**2 + sd**2)) * x_t.float()
        return (skip + c_out * f).to(x_t.dtype)


# ------------------------------------------------------------------------------------------------ metrics


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point sets ``(N, d)``: the root mean over random unit
    directions of the 1-D W2^2 between the sorted projections."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_w2: point sets must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a.double() @ dirs).sort(dim=0)
    pb, _ = (b.double() @ dirs).sort(dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def mode_coverage(x: torch.Tensor, mixture: Mixture, radius_stds: float = 2.5) -> list[float]:
    """Fraction of samples that lie ON each mode: within ``radius_stds`` standard deviations of its centre (a true
    sample does so with probability ``1 - exp(-radius_stds^2 / 2)``: 0.956 at 2.5). Mass smeared between modes
    counts for none of them: a uniform ring through the modes scores only ~0.43 in all, although its nearest-mode
    shares are even and its sliced W2 is small."""
    d = torch.cdist(x.float(), mixture.means())
    dist, k = d.min(dim=1)
    on = dist < radius_stds * mixture.std
    return (torch.bincount(k[on], minlength=mixture.modes).float() / x.shape[0]).tolist()


# ------------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class ToyConfig:
    """One toy run. ``steps``: the student's sampling steps (1 or more). ``init`` (generator) and ``fake_init``:
    "random" (plain EDM preconditioning) or "teacher" (exact denoiser plus a zero-initialised MLP correction).
    ``gen_features``: fixed random Fourier features of the generator's input (a plain small MLP is biased to smooth
    maps and smears mass between the modes: measured on-mode mass 0.57 without, 0.88 with, 1-step at 20k iterations).
    ``flip_sign`` negates the DM loss (a negative control). ``ema_decay``: the evaluated weights are the EMA."""

    steps: int = 1
    iters: int = 20000
    batch: int = 256
    lr_generator: float = 1e-3
    lr_critic: float = 1e-3
    ratio: int = 5
    init: str = "random"
    fake_init: str = "teacher"
    gen_depth: int = 3
    gen_features: int = 32
    gen_feature_scale: float = 1.0
    gen_betas: tuple = (0.0, 0.99)
    fake_step_conditioning: bool = False
    flip_sign: bool = False
    seed: int = 0
    hidden: int = 128
    final_lr_frac: float = 1.0
    ema_decay: float = 0.995


def student_sigmas(schedule: EDMSchedule, steps: int) -> list[float]:
    """The student's grid: Karras-grid fractions 1, (N-1)/N, ..., 1/N (the analogue of SDXL's 999/749/499/249)."""
    return [float(schedule.karras(torch.tensor((steps - i) / steps))) for i in range(steps)]


def build(cfg: ToyConfig, mixture: Mixture):
    """Teacher, generator, fake score, schedule and sampler of one toy run."""
    torch.manual_seed(cfg.seed)
    schedule = EDMSchedule(sigma_data=mixture.data_std)
    teacher = mixture.denoiser(schedule)
    gen_base = mixture.denoiser(schedule) if cfg.init == "teacher" else None
    if cfg.init not in ("random", "teacher"):
        raise ValueError(f"init must be 'random' or 'teacher', got {cfg.init!r}")
    generator = Precond(MLP(cfg.hidden, cfg.gen_depth, zero_out=cfg.init == "teacher", input_features=cfg.gen_features,
                            feature_scale=cfg.gen_feature_scale), mixture.data_std, base=gen_base)
    nsteps = cfg.steps if cfg.fake_step_conditioning else 0
    if cfg.fake_init not in ("random", "teacher"):
        raise ValueError(f"fake_init must be 'random' or 'teacher', got {cfg.fake_init!r}")
    fake_base = mixture.denoiser(schedule) if cfg.fake_init == "teacher" else None
    fake = Precond(MLP(cfg.hidden, num_steps=nsteps, zero_out=cfg.fake_init == "teacher"), mixture.data_std, base=fake_base)
    sampler = BackwardSimulationSampler(schedule, student_sigmas(schedule, cfg.steps))
    return teacher, generator, fake, schedule, sampler


def sample(generator: nn.Module, sampler: BackwardSimulationSampler, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return sampler.sample(generator, torch.randn(n, 2, generator=g), None, generator=g)


def train(cfg: ToyConfig, mixture: Mixture = Mixture(), log_every: int = 0):
    """Distil the exact teacher into ``cfg.steps``-step generator. Returns ``(generator, sampler, info)``, where
    ``info`` has the histogram of backward-simulation steps ``k`` and the wall time."""
    teacher, generator, fake, schedule, sampler = build(cfg, mixture)
    dmd = DMD2(generator, fake, teacher, schedule, sampler,
               # the fake score learns on the DM term's own range here: with the whole schedule (the library's default,
               # the official choice at ImageNet / SDXL scale) this small random-init critic misses modes (1-step
               # sliced W2 0.163 against the 0.074 bound of tests/recipes/test_toy2d.py)
               config=DMD2Config(fake_step_conditioning=cfg.fake_step_conditioning, critic_min_frac=0.02,
                                 critic_max_frac=0.98))
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_generator, betas=tuple(cfg.gen_betas))
    opt_c = torch.optim.Adam(fake.parameters(), lr=cfg.lr_critic, betas=(0.0, 0.99))
    ema = EMA(generator, cfg.ema_decay) if cfg.ema_decay > 0 else None
    sched = CriticScheduler(cfg.ratio)
    # learning rates decay linearly to final_lr_frac of their start over the run (less end-of-run jitter)
    decay = lambda it: 1.0 - (1.0 - cfg.final_lr_frac) * it / max(1, cfg.iters)  # noqa: E731
    lr_sched = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_g, opt_c)]
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    k_hist = [0] * cfg.steps
    t0 = time.perf_counter()
    for it in range(cfg.iters):
        phase = sched.next()
        if phase.generator:
            k = sampler.draw_k(rng)
            k_hist[k - 1] += 1
            fake.requires_grad_(False)
            loss, logs = dmd.generator_loss(torch.randn(cfg.batch, 2, generator=rng), k=k, generator=rng)
            opt_g.zero_grad(set_to_none=True)
            (-loss if cfg.flip_sign else loss).backward()
            opt_g.step()
            if ema is not None:
                ema.update(generator)
            fake.requires_grad_(True)
        generator.requires_grad_(False)
        closs, clogs = dmd.critic_loss(torch.randn(cfg.batch, 2, generator=rng), generator=rng)
        opt_c.zero_grad(set_to_none=True)
        closs.backward()
        opt_c.step()
        generator.requires_grad_(True)
        for s in lr_sched:
            s.step()
        if log_every and it % log_every == 0:
            print(f"  iter {it:6d}  loss_fake {float(clogs['loss_fake']):.4f}", flush=True)
    seconds = time.perf_counter() - t0
    if ema is not None:  # evaluate the averaged weights
        ema.copy_to(generator)
    return generator, sampler, {"k_histogram": k_hist, "seconds": seconds, "weights": "ema" if ema else "raw"}


def evaluate(generator, sampler, mixture: Mixture, n: int = 4000, seed: int = 123) -> dict:
    """Sliced W2 to fresh true samples and mode coverage on ``n`` samples."""
    x = sample(generator, sampler, n, seed)
    ref = mixture.sample(n, torch.Generator().manual_seed(seed + 7))
    return {"sliced_w2": sliced_w2(x, ref), "coverage": mode_coverage(x, mixture), "samples": x}


def floor(mixture: Mixture, n: int = 4000, seed: int = 123) -> float:
    """Sliced W2 between two independent true sample sets of size ``n``: what "perfect" measures as."""
    a = mixture.sample(n, torch.Generator().manual_seed(seed + 7))
    b = mixture.sample(n, torch.Generator().manual_seed(seed + 8))
    return sliced_w2(a, b)


# ------------------------------------------------------------------------------------------------ command line
@dataclass(frozen=True)
class ToyNetConfig:
    """The toy's own settings (the shared sections give iterations, batch, learning rates, ratio, steps, EMA, seed).

    Attributes:
        init: generator start: ``random`` (plain EDM preconditioning) or ``teacher`` (exact denoiser plus a
            zero-initialised MLP correction).
        fake_init: fake-score start, ``random`` or ``teacher``.
        hidden: MLP width.
        gen_depth: generator MLP depth.
        gen_features: fixed random Fourier features of the generator's input (a plain small MLP smears mass between
            the modes: on-mode mass 0.57 without, 0.88 with, 1-step at 20k iterations).
        gen_feature_scale: scale of those features' frequencies.
        gen_betas: the generator's Adam betas.
        final_lr_frac: learning rates decay linearly to this fraction of their start.
        flip_sign: negate the DM loss (a negative control).
    """

    init: str = "random"
    fake_init: str = "teacher"
    hidden: int = 128
    gen_depth: int = 3
    gen_features: int = 32
    gen_feature_scale: float = 1.0
    gen_betas: tuple[float, float] = (0.0, 0.99)
    final_lr_frac: float = 1.0
    flip_sign: bool = False


@dataclass(frozen=True)
class Toy2DConfig(RecipeConfig):
    toy: ToyNetConfig = field(default_factory=ToyNetConfig)
    mixture: Mixture = field(default_factory=Mixture)


#: the shared keys this loop reads (``toy_config``), besides the run folder, origin and progress flag
USED_KEYS = ("train.max_steps", "train.batch_size", "train.lr_generator", "train.lr_critic", "train.ema_decay",
             "train.seed", "train.log_every", "critic.ratio", "sampler.steps", "objective.fake_step_conditioning")
_BOOKKEEPING = ("train.out", "train.origin", "train.progress")


def toy_config(cfg: Toy2DConfig) -> ToyConfig:
    """The loop's :class:`ToyConfig` of a resolved config; ``ValueError`` names a shared key set that the loop
    does not read."""
    ref = config_to_dict(RECIPE.config)
    got = config_to_dict(cfg)
    for key in valid_keys(cfg):
        section, name = key.split(".", 1)
        if section in ("toy", "mixture") or key in USED_KEYS or key in _BOOKKEEPING:
            continue
        if got[section][name] != ref[section][name]:
            raise ValueError(f"toy2d's own loop does not read {key} (set to {got[section][name]!r}); it reads "
                             f"{', '.join(USED_KEYS)} and the toy.* / mixture.* keys")
    t = cfg.train
    return ToyConfig(steps=cfg.sampler.steps, iters=t.max_steps, batch=t.batch_size, lr_generator=t.lr_generator,
                     lr_critic=t.lr_critic, ratio=cfg.critic.ratio, seed=t.seed, ema_decay=t.ema_decay or 0.0,
                     fake_step_conditioning=cfg.objective.fake_step_conditioning, **asdict(cfg.toy))


def _scatter(panels: list[tuple[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (name, pts) in zip(axes, panels):
        pts = pts.clamp(-4, 4)  # display only; metrics use the raw samples
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-3.5, 3.5)
        ax.set_ylim(-3.5, 3.5)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _line(name: str, ev: dict, info: dict, fl: float) -> str:
    cov = ev["coverage"]
    return (f"{name:24s} sliced W2 {ev['sliced_w2']:.4f} ({ev['sliced_w2'] / fl:.1f}x floor)  on-mode {sum(cov):.3f}  "
            f"min mode share {min(cov):.3f}  k histogram {info['k_histogram']}  {info['seconds']:.1f} s")


def train_command(cfg: Toy2DConfig, args: list[str]) -> int:
    """(default) distil one student with this file's loop -> OUT/toy2d.json (sliced W2, coverage), toy2d.png,
    generator.safetensors."""
    from safetensors.torch import save_file

    if args:
        raise ValueError(f"train takes no positional arguments, got {args} (overrides look like key.sub=value)")
    tc = toy_config(cfg)
    torch.set_num_threads(1)
    out = Path(cfg.train.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config_to_json(cfg))
    gen, smp, info = train(tc, cfg.mixture, log_every=cfg.train.log_every if cfg.train.progress else 0)
    ev = evaluate(gen, smp, cfg.mixture)
    samples = ev.pop("samples")
    fl = floor(cfg.mixture)
    save_file({k: v.contiguous() for k, v in gen.state_dict().items()}, str(out / "generator.safetensors"))
    (out / "toy2d.json").write_text(json.dumps({"floor": fl, **ev, **info, "config": asdict(tc)}, indent=2))
    _scatter([("true mixture", cfg.mixture.sample(4000, torch.Generator().manual_seed(0))),
              (f"{tc.steps}-step student\nSW2 {ev['sliced_w2']:.3f} (floor {fl:.3f})", samples)], out / "toy2d.png")
    print(_line(f"{tc.steps}-step student", ev, info, fl))
    print(f"toy2d: done. Run folder {out} (config.json, toy2d.json, toy2d.png, generator.safetensors)\n"
          f"  next:\n    python -m dmd2.recipes.toy2d compare --out {out / 'compare'} train.max_steps={tc.iters}"
          "   # against untrained, 4-step and sign-flipped runs", flush=True)
    return 0


def compare_command(cfg: Toy2DConfig, args: list[str]) -> int:
    """five runs of train.max_steps iterations (untrained, 1-step, 4-step, 4-step with one fake score, sign flipped)
    -> OUT/compare.json, OUT/compare.png."""
    if args:
        raise ValueError(f"compare takes no positional arguments, got {args}")
    base = toy_config(cfg)
    torch.set_num_threads(1)
    mixture = cfg.mixture
    out = Path(cfg.train.out)
    out.mkdir(parents=True, exist_ok=True)
    one = replace(base, steps=1, fake_step_conditioning=False)
    four = replace(base, steps=4, init="teacher")
    runs = {
        "untrained": replace(one, iters=0, ema_decay=0.0),
        "1-step": one,
        "4-step": replace(four, fake_step_conditioning=True),
        "4-step, one fake score": replace(four, fake_step_conditioning=False),
        "1-step, sign flipped": replace(one, flip_sign=True),
    }
    fl = floor(mixture)
    results, samples = {}, {}
    print(f"true-vs-true sliced W2 floor: {fl:.4f}")
    for name, tc in runs.items():
        gen, smp, info = train(tc, mixture)
        ev = evaluate(gen, smp, mixture)
        samples[name] = ev.pop("samples")
        results[name] = {**ev, **info, "config": asdict(tc)}
        print(_line(name, ev, info, fl), flush=True)
    (out / "compare.json").write_text(json.dumps({"floor": fl, "runs": results}, indent=2))
    panels = [("true mixture", mixture.sample(4000, torch.Generator().manual_seed(0)))] + [
        (f"{n}\nSW2 {results[n]['sliced_w2']:.3f}", samples[n]) for n in ("untrained", "1-step", "4-step", "1-step, sign flipped")]
    _scatter(panels, out / "compare.png")
    print(f"toy2d compare: done; wrote {out / 'compare.png'} and {out / 'compare.json'}")
    return 0


DEFAULTS = {"train.max_steps": ToyConfig.iters, "train.batch_size": ToyConfig.batch,
            "train.lr_generator": ToyConfig.lr_generator, "train.lr_critic": ToyConfig.lr_critic,
            "train.ema_decay": ToyConfig.ema_decay, "train.seed": ToyConfig.seed, "train.log_every": 2000,
            "critic.ratio": ToyConfig.ratio, "sampler.steps": ToyConfig.steps}

PRESETS = {
    "default": {},
    # 4 steps need a fake score told the student's step (one pooled fake score collapses), from the teacher
    "four-step": {"sampler.steps": 4, "toy.init": "teacher", "objective.fake_step_conditioning": True},
    "tiny": {"train.max_steps": 50, "train.batch_size": 64, "train.log_every": 25, "toy.hidden": 32},
}

RECIPE = Recipe(name="toy2d", config=apply_overrides(Toy2DConfig(), DEFAULTS), build=None, presets=PRESETS,
                commands={"train": train_command, "compare": compare_command})


if __name__ == "__main__":
    import sys

    sys.exit(cli_main(RECIPE))
