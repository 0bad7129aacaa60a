r"""ImageNet-64: distil EDM's class-conditional ADM teacher into a 1-step generator (DMD2, Yin et al. 2024, Sec. 5.1).

Networks (all ``EDMPrecond(ADMNet)`` denoisers, EDM preconditioning, sigma_data 0.5):

* teacher ``D_real``: EDM's ``edm-imagenet-64x64-cond-adm.pkl`` (read without running code from the file, or its
  ``python -m dmd2.models.convert_edm`` safetensors), frozen;
* generator ``G`` and fake score ``D_fake``: copies of the teacher (DMD2 initialises both from it), dropout 0;
* GAN head on ``D_fake``'s bottleneck (``model.enc.8x8_block2``, 768 x 8 x 8) as in the official code: conv 4/s2 ->
  GroupNorm -> SiLU -> conv 4/s4 -> GroupNorm -> SiLU -> linear (``gan.hidden=768 gan.depth=1 gan.final_conv=true``),
  a diffusion GAN over the whole noise range (``t'`` uniform over the full 1000-point Karras grid).

1-step generation: ``x = G(80 z, sigma = 80, c)``, ``z ~ N(0, I)``. Schedule: Karras sigmas 0.002..80, rho 7; the DM
term and the fake score's denoising loss draw ``t`` over 2%..98% of the grid. An ``N``-step student uses the first
``N`` sigmas of an ``N + 1``-point Karras grid (``--steps N``; 1 step -> ``[80]``).

Paper hyperparameters (preset ``paper``, also the defaults; every key against the official run script in
docs/presets.md): AdamW lr 2e-6 for both, betas (0.9, 0.999), weight decay 0.01, batch 40 per GPU (7 GPUs), critic
ratio 5 (TTUR), GAN weights 3e-3 (G) / 1e-2 (D), bf16, grad clip 10, warm-up 72 iterations (the official 500
scheduler steps at 7 GPUs), 200k iterations -> FID 1.51. (1.28: a longer run, see docs/imagenet64.md.)

Command line (``dmd2.train`` grammar)::

    torchrun --nproc_per_node 7 -m dmd2.recipes.imagenet64 teacher.path=edm-imagenet-64x64-cond-adm.safetensors \
        data.path=imagenet-64x64.zip train.distributed=ddp --out runs/imagenet64
    python -m dmd2.recipes.imagenet64 --preset tiny          # CPU, seconds, no files needed
    python -m dmd2.recipes.imagenet64 sample RUN_OR_CKPT [OUT.png]  # a grid of 64 images from a checkpoint

For users: ``dmd2.train.load_generator(RUN_OR_CKPT) -> Student`` (:func:`student` builds it),
``gen(noise (B, 3, 64, 64), labels (B,)) -> images`` in [-1, 1].
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..core import BackwardSimulationSampler, EDMSchedule
from ..models.adm import ADMConfig, UNetBlock, bottleneck_name, build_edm_adm
from ..train import Components, Recipe, RecipeConfig, Student, main
from ..train.config import apply_overrides, gan_head, gan_layers
from ..train.data import IndexedBatches

__all__ = [
    "ModelConfig", "TeacherConfig", "DataConfig", "InitConfig", "ImageNet64Config",
    "SyntheticImages", "student_grid", "build", "student", "PRESETS", "RECIPE",
]


@dataclass(frozen=True)
class ModelConfig:
    """The ADM architecture of all three networks (EDM ``DhariwalUNet`` names; defaults = ImageNet-64, 295.9M).

    Attributes:
        img_resolution, img_channels: image size and channels (64, 3).
        label_dim: number of classes (1000).
        model_channels: base channel width (192).
        channel_mult: per-resolution channel multipliers.
        channel_mult_emb: embedding width multiplier.
        num_blocks: residual blocks per resolution.
        attn_resolutions: resolutions with self-attention.
        channels_per_head: attention channels per head.
        dropout: dropout of the trained copies (DMD2 trains them without dropout); the teacher runs in eval mode.
        sigma_data: EDM's data standard deviation (0.5).
    """

    img_resolution: int = 64
    img_channels: int = 3
    label_dim: int = 1000
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (32, 16, 8)
    channels_per_head: int = 64
    dropout: float = 0.0
    sigma_data: float = 0.5

    def __post_init__(self):
        self.adm()  # validates
        if self.label_dim < 1:
            raise ValueError(f"model.label_dim must be >= 1 (ImageNet-64 is class-conditional), got {self.label_dim}")
        if self.sigma_data <= 0:
            raise ValueError(f"model.sigma_data must be > 0, got {self.sigma_data}")

    def adm(self) -> ADMConfig:
        return ADMConfig(img_resolution=self.img_resolution, img_channels=self.img_channels, label_dim=self.label_dim,
                         model_channels=self.model_channels, channel_mult=self.channel_mult,
                         channel_mult_emb=self.channel_mult_emb, num_blocks=self.num_blocks,
                         attn_resolutions=self.attn_resolutions, dropout=self.dropout, label_dropout=0.0,
                         augment_dim=0, channels_per_head=self.channels_per_head)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.img_channels, self.img_resolution, self.img_resolution)


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen EDM teacher.

    Attributes:
        path: EDM's ``.pkl`` (read safely) or its converted ``.safetensors``.
        random: a randomly initialised teacher instead (plumbing tests only).
        dtype: ``float32`` or ``bfloat16`` storage of the frozen teacher.
    """

    path: str = ""
    random: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"teacher.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


@dataclass(frozen=True)
class DataConfig:
    """Real images for the GAN discriminator.

    Attributes:
        path: EDM's dataset zip or a folder of class sub-folders (images at ``model.img_resolution``).
        synthetic: instead, this many images made on the fly (tiny preset); 0 = use ``path``.
        seed: the per-epoch permutation seed.
    """

    path: str = ""
    synthetic: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.synthetic < 0:
            raise ValueError(f"data.synthetic must be >= 0, got {self.synthetic}")


@dataclass(frozen=True)
class InitConfig:
    """Where the trained networks start.

    Attributes:
        checkpoint: start the generator, fake score (and GAN head, when both have one) from another run's
            checkpoint folder (or run folder: its newest checkpoint) instead of the teacher (a fresh run: optimizers
            and step start anew).
    """

    checkpoint: str = ""


@dataclass(frozen=True)
class ImageNet64Config(RecipeConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    init: InitConfig = field(default_factory=InitConfig)


# --------------------------------------------------------------------------------------------------------------------
class SyntheticImages(Dataset):
    """``n`` deterministic class-conditional images ``(C, R, R)`` in [-1, 1] on the uint8 grid (``u / 127.5 - 1``),
    label ``i mod classes``: a smooth per-class pattern plus per-image noise. Stands in for ImageNet in the tiny preset."""

    def __init__(self, n: int, classes: int, shape: tuple[int, int, int], seed: int = 0):
        if n < 1 or classes < 1:
            raise ValueError(f"SyntheticImages: n and classes must be >= 1, got {n}, {classes}")
        self.n, self.classes, self.shape, self.seed = n, classes, tuple(shape), seed
        g = torch.Generator().manual_seed(seed)
        c, r, _ = self.shape
        coarse = torch.randn(classes, c, 4, 4, generator=g)
        self.patterns = torch.tanh(nn.functional.interpolate(coarse, size=(r, r), mode="bilinear", align_corners=True))
        self.num_classes = classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} synthetic images")
        label = i % self.classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        x = 0.8 * self.patterns[label] + 0.1 * torch.randn(self.shape, generator=g)
        u = ((x.clamp(-1, 1) + 1) * 127.5).round()
        return u / 127.5 - 1.0, label


def student_grid(steps: int, schedule: EDMSchedule) -> list[float]:
    """The student's sigmas, noisiest first: the first ``steps`` points of a ``steps + 1``-point Karras grid,
    starting exactly at ``sigma_max`` (1 step: ``[80.0]``)."""
    sig = schedule.karras_sigmas(steps + 1).tolist()[:steps]
    sig[0] = schedule.sigma_max
    return sig


def _open_data(cfg: ImageNet64Config):
    d, m = cfg.data, cfg.model
    if d.path and d.synthetic:
        raise ValueError("set either data.path or data.synthetic, not both")
    if d.synthetic:
        return SyntheticImages(d.synthetic, m.label_dim, m.shape, seed=d.seed)
    if not d.path:
        raise ValueError("data.path is required: EDM's ImageNet-64 dataset zip (imagenet-64x64.zip) or a folder with "
                         "one sub-folder per class (see docs/imagenet64.md)")
    from ..data.images import open_image_dataset

    ds = open_image_dataset(d.path, channels=m.img_channels, resolution=m.img_resolution)
    if ds.num_classes > m.label_dim:
        raise ValueError(f"{d.path}: {ds.num_classes} classes but model.label_dim is {m.label_dim}")
    return ds


def _load_teacher(cfg: ImageNet64Config, meta: bool = False) -> nn.Module:
    """The frozen teacher; ``meta``: its skeleton on the meta device, no weights read (FSDP2 ranks > 0, which
    receive their shards from rank 0)."""
    t, m = cfg.teacher, cfg.model
    arch = dataclasses.replace(m, dropout=0.0).adm()
    if t.random and t.path:
        raise ValueError("set either teacher.path or teacher.random=true, not both")
    if not t.random and not t.path:
        raise ValueError("teacher.path is required: EDM's edm-imagenet-64x64-cond-adm.pkl or its converted "
                         ".safetensors (python -m dmd2.models.convert_edm IN.pkl OUT.safetensors)")
    if meta:
        net = build_edm_adm(arch, sigma_data=m.sigma_data, device="meta")
    elif t.random:
        net = build_edm_adm(arch, sigma_data=m.sigma_data)
    else:
        from ..models.edm_pickle import load_edm_adm

        net = load_edm_adm(t.path, config=arch, sigma_data=m.sigma_data)
    if t.dtype == "bfloat16":
        net = net.to(torch.bfloat16)
    return net.requires_grad_(False).eval()


def _blocks(denoiser: nn.Module) -> list[nn.Module]:
    return [b for b in denoiser.modules() if isinstance(b, UNetBlock)]


def _load_init(cfg: ImageNet64Config, gen: nn.Module, fake: nn.Module, head: nn.Module | None) -> None:
    from ..train import resolve_checkpoint
    from ..train.checkpoint import read_weights

    path = resolve_checkpoint(cfg.init.checkpoint)
    modules = {"generator": gen, "fake_score": fake, "gan_head": head}
    weights = read_weights(path, [n for n, m in modules.items() if m is not None])
    for name, module in modules.items():
        if module is None:
            continue
        if name not in weights:
            if name == "gan_head":
                continue  # e.g. resuming a no-GAN run with a GAN: the head starts fresh
            raise ValueError(f"init.checkpoint={path}: missing {name} weights (expected a checkpoint folder of this recipe)")
        module.load_state_dict(weights[name], strict=True)


def build(cfg: ImageNet64Config, info=None) -> Components:
    """The recipe's components (on CPU; the trainer moves and wraps them). See the module docstring."""
    m = cfg.model
    schedule = EDMSchedule(sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=m.sigma_data)
    sampler = BackwardSimulationSampler(schedule, cfg.sampler.grid(lambda n: student_grid(n, schedule)))
    dataset = _open_data(cfg)
    loads = info is None or info.loads_weights  # under FSDP2 only rank 0 reads weights (DistInfo.loads_weights)
    teacher = _load_teacher(cfg, meta=not loads)
    generator = copy.deepcopy(teacher).float().requires_grad_(True).train()
    if m.dropout:
        for mod in generator.modules():
            if isinstance(mod, UNetBlock):
                mod.dropout = m.dropout
    fake_score = copy.deepcopy(generator)
    layers = gan_layers(cfg, fake_score, [bottleneck_name(fake_score)])
    head = gan_head(cfg, [fake_score.get_submodule(n).out_channels for n in layers])
    if cfg.init.checkpoint and loads:
        _load_init(cfg, generator, fake_score, head)
    world = getattr(info, "world_size", 1)
    batches = IndexedBatches(dataset, shards=world * cfg.train.grad_accum, batch=cfg.train.batch_size, seed=cfg.data.seed)

    def latents(batch: int, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn((batch, *m.shape), generator=g, device=device)
        labels = torch.randint(0, m.label_dim, (batch,), generator=g, device=device)
        return noise, labels

    def sample_fn(gen: nn.Module, device) -> torch.Tensor:
        n = 16
        noise = torch.randn((n, *m.shape), generator=torch.Generator().manual_seed(0)).to(device)
        labels = (torch.arange(n, device=device) * max(1, m.label_dim // n)) % m.label_dim
        g = torch.Generator(device=device).manual_seed(1)
        return sampler.sample(gen, noise, labels, generator=g)

    return Components(generator=generator, fake_score=fake_score, teacher=teacher, schedule=schedule, sampler=sampler,
                      latents=latents, real_data=batches if head is not None else None, gan_head=head,
                      gan_layers=layers, sample_fn=sample_fn,
                      fsdp_units=_blocks, checkpoint_units=_blocks)


# --------------------------------------------------------------------------------------------------------------------
def student(cfg: ImageNet64Config, state_dict: dict[str, torch.Tensor]) -> Student:
    """The trained student of a run with config ``cfg`` (:attr:`Recipe.generator <dmd2.train.Recipe>`): the ADM
    network built on the meta device, ``state_dict`` checked (names and shapes) and assigned, on the run's grid
    (:func:`student_grid`; 1 step: ``G(80 z; 80, c)``)."""
    from ..models.edm_pickle import check_state_dict_matches

    m = cfg.model
    net = build_edm_adm(dataclasses.replace(m, dropout=0.0).adm(), sigma_data=m.sigma_data, device="meta")
    check_state_dict_matches(net, state_dict)
    net.load_state_dict(state_dict, strict=True, assign=True)
    schedule = EDMSchedule(sigma_data=m.sigma_data)
    sampler = BackwardSimulationSampler(schedule, cfg.sampler.grid(lambda n: student_grid(n, schedule)))
    return Student(net, sampler, m.shape, m.label_dim)


def sample_command(cfg: ImageNet64Config, args: list[str]) -> int:
    """``sample RUN_OR_CKPT [OUT.png]``: 64 images (classes spread over the label range, seeds 0..63) as a PNG grid,
    from the EMA weights (the generator's when the run kept no EMA); default PNG ``CKPT/samples.png``."""
    from ..train import load_generator
    from ..train.monitor import save_png

    if not 1 <= len(args) <= 2:
        raise ValueError("usage: python -m dmd2.recipes.imagenet64 sample RUN_OR_CKPT [OUT.png]")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = load_generator(args[0], device=device, recipe=RECIPE)
    n = 64
    from ..eval.fid import sample_seeds_noise

    noise = sample_seeds_noise(range(n), gen.shape).to(device)
    labels = (torch.arange(n, device=device) * max(1, gen.num_classes // n)) % gen.num_classes
    with torch.no_grad():
        imgs = gen(noise, labels, generator=torch.Generator(device=device).manual_seed(0))
    out = save_png(imgs, args[1] if len(args) > 1 else gen.checkpoint / "samples.png", nrow=8)
    print(out)
    return 0


# --------------------------------------------------------------------------------------------------------------------
PAPER: dict[str, Any] = {
    "train.max_steps": 200_000, "train.batch_size": 40, "train.grad_accum": 1,
    "train.lr_generator": 2e-6, "train.lr_critic": 2e-6, "train.betas": (0.9, 0.999), "train.weight_decay": 0.01,
    "train.adam_eps": 1e-8, "train.warmup_steps": 72, "train.grad_clip": 10.0, "train.mixed_precision": "bf16",
    "train.ema_decay": None, "train.seed": 10,
    "train.checkpoint_every": 500, "train.keep_last": 3, "train.log_every": 100, "train.sample_every": 5000,
    "critic.ratio": 5, "sampler.steps": 1, "sampler.timesteps": None,
    "objective.dm_weight": 1.0, "objective.gan_generator_weight": 3e-3, "objective.gan_discriminator_weight": 1e-2,
    "objective.min_frac": 0.02, "objective.max_frac": 0.98, "objective.gan_min_frac": 0.0, "objective.gan_max_frac": 1.0,
    "model.img_resolution": 64, "model.img_channels": 3, "model.label_dim": 1000, "model.model_channels": 192,
    "model.channel_mult": (1, 2, 3, 4), "model.channel_mult_emb": 4, "model.num_blocks": 3,
    "model.attn_resolutions": (32, 16, 8), "model.channels_per_head": 64, "model.dropout": 0.0, "model.sigma_data": 0.5,
    "teacher.random": False, "data.synthetic": 0, "gan.hidden": 768, "gan.depth": 1, "gan.final_conv": True,
}

TINY: dict[str, Any] = {
    "train.max_steps": 6, "train.batch_size": 4, "train.lr_generator": 1e-4, "train.lr_critic": 1e-4,
    "train.mixed_precision": "no", "train.device": "cpu", "train.checkpoint_every": 3, "train.log_every": 2,
    "train.sample_every": 3, "train.ema_decay": 0.9,
    "model.img_resolution": 16, "model.label_dim": 10, "model.model_channels": 16, "model.channel_mult": (1, 2),
    "model.num_blocks": 1, "model.attn_resolutions": (8,), "model.channels_per_head": 16,
    "train.warmup_steps": 0, "train.seed": 0,
    "teacher.random": True, "data.synthetic": 64, "gan.hidden": 16, "gan.depth": 1, "gan.final_conv": False,
}

PRESETS = {"paper": PAPER, "tiny": TINY}

def next_steps(cfg: ImageNet64Config, ckpt: Path) -> list[str]:
    """The summary's commands: a sample grid, the FID evaluation."""
    return [f"python -m dmd2.recipes.imagenet64 sample {ckpt} {Path(cfg.train.out) / 'sample.png'}",
            f"python -m dmd2.eval.fid --ckpt {ckpt} --detector inception-2015-12-05.pt --ref imagenet-64x64.npz"]


RECIPE = Recipe(name="imagenet64", config=apply_overrides(ImageNet64Config(), PAPER), build=build, presets=PRESETS,
                commands={"sample": sample_command}, next_steps=next_steps, generator=student)

if __name__ == "__main__":
    from dmd2.train.distributed import exit_process

    exit_process(main(RECIPE))
