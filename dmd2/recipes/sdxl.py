r"""DMD2 for SDXL (Yin et al. 2024, Sec. 5.2): a 4-step (or 1-step) text-to-image student of SDXL base 1.0.

Presets + builders on :mod:`dmd2.train` (no loop of its own)::

    python -m dmd2.recipes.sdxl --preset paper --steps 4 data.prompts=prompts.parquet data.real=laion/ ...
    python -m dmd2.recipes.sdxl --preset single-gpu ...          # shared-base: one SDXL copy, fits one 80 GB GPU
    python -m dmd2.recipes.sdxl --preset tiny --out runs/tiny     # CPU, no download (tiny SDXL-shaped components)
    python -m dmd2.recipes.sdxl export CKPT OUT                   # diffusers StableDiffusionXLPipeline folder
    python -m dmd2.recipes.sdxl sample CKPT OUT.png ["a prompt" ...]   # a sample grid from a checkpoint
    python -m dmd2.recipes.sdxl memory                            # memory plan per mode (meta-device SDXL UNet)
    python -m dmd2.recipes.sdxl cache-latents OUT_DIR             # VAE latents of data.real, for data.real_kind=latents
    python -m dmd2.recipes.sdxl ode-pairs PAIRS --num 10000 --preset ode-paper   # the 1-step warm start
    python -m dmd2.recipes.sdxl ode-pretrain PAIRS --preset ode-paper --out WARM  # (:mod:`dmd2.recipes.sdxl_ode`)
    python -m dmd2.recipes.sdxl --preset paper --steps 1 model.generator_init=WARM ...

The pieces: teacher = SDXL with classifier-free guidance 8 (standard form, one batched 2B forward, unconditional =
zero text embeddings); generator and fake score initialised from the teacher (full copies or LoRA adapters, per
``model.memory_mode``, see :mod:`dmd2.models.sdxl`); the GAN head reads the fake UNet's mid-block (1280 channels at
1/32 of the image size, any resolution); ``--steps 4`` uses timesteps 999, 749, 499, 249 with backward simulation,
``--steps 1`` the conditioning timestep 399 on pure noise.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import BackwardSimulationSampler, CFGDenoiser, GANHead
from ..models.sdxl import DEFAULT_LORA_TARGETS, MEMORY_MODES, PromptEncoder, build_networks, load_sdxl
from ..train import Components, IndexedBatches, Recipe, RecipeConfig, apply_overrides, main
from .sdxl_ode import (ODE_PRESETS, SDXLODEConfig, generator_init_checkpoint, load_generator_init, ode_pairs_command,
                       ode_pretrain_command)

__all__ = ["SDXLModelConfig", "SDXLDataConfig", "SDXLExportConfig", "SDXLEvalConfig", "SDXLConfig", "grid", "build",
           "base_path", "PRESETS", "RECIPE", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SDXLModelConfig:
    """The networks.

    Attributes:
        path: hub id or local diffusers folder of the teacher (``tiny``: empty, then ``OUT/tiny-base``).
        local_files_only: never download (``HF_HUB_OFFLINE=1`` implies it).
        tiny: write tiny SDXL-shaped components (and tiny data) into ``OUT/tiny-base`` / ``OUT/tiny-data`` first.
        memory_mode: ``full`` | ``lora`` | ``shared-base`` (:mod:`dmd2.models.sdxl`).
        frozen_dtype: dtype of frozen weights (teacher, LoRA bases, text encoders); trained weights are fp32.
        vae_dtype: dtype of the VAE (fp32: SDXL's VAE overflows in fp16).
        lora_rank, lora_alpha, lora_targets: LoRA adapters (paper LoRA variant: rank 64).
        guidance_scale: the teacher's CFG scale (paper: 8).
        uncond: ``zeros`` (zero text embeddings, the paper's choice) or ``empty`` (the encoded empty prompt).
        resolution: training resolution in pixels (time ids ``(R, R, 0, 0, R, R)``).
        gan_hidden, gan_depth: the GAN head on the fake UNet's mid-block.
        generator_init: start the generator (``full`` mode) from this ``ode-pretrain`` output (its run folder or a
            checkpoint folder) instead of the teacher - the official 1-step run's warm start; empty: the teacher.
    """

    path: str = "stabilityai/stable-diffusion-xl-base-1.0"
    local_files_only: bool = False
    tiny: bool = False
    memory_mode: str = "full"
    frozen_dtype: str = "bf16"
    vae_dtype: str = "fp32"
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    guidance_scale: float = 8.0
    uncond: str = "zeros"
    resolution: int = 1024
    gan_hidden: int = 256
    gan_depth: int = 2
    generator_init: str = ""

    def __post_init__(self):
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"model.memory_mode must be one of {MEMORY_MODES}, got {self.memory_mode!r}")
        for k in ("frozen_dtype", "vae_dtype"):
            if getattr(self, k) not in DTYPES:
                raise ValueError(f"model.{k} must be one of {list(DTYPES)}, got {getattr(self, k)!r}")
        if self.uncond not in ("zeros", "empty"):
            raise ValueError(f"model.uncond must be 'zeros' or 'empty', got {self.uncond!r}")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"model.resolution must be a positive multiple of 8, got {self.resolution}")
        if self.lora_rank < 1 or self.guidance_scale < 0:
            raise ValueError(f"model.lora_rank must be >= 1 and model.guidance_scale >= 0, got {self.lora_rank}, {self.guidance_scale}")


@dataclass(frozen=True)
class SDXLDataConfig:
    """Prompts for the generator and real images for the GAN.

    Attributes:
        prompts: a .txt (one per line), .jsonl or .parquet file of prompts.
        prompt_key: the prompt field of .jsonl / .parquet (empty: the first of :data:`dmd2.data.prompts.PROMPT_KEYS` present).
        real: a folder with captions.jsonl, a folder / .tar of webdataset shards, or a latent cache.
        real_kind: ``folder`` | ``webdataset`` | ``latents``.
        seed: orders the real data.
    """

    prompts: str = ""
    prompt_key: str = ""
    real: str = ""
    real_kind: str = "folder"
    seed: int = 0

    def __post_init__(self):
        if self.real_kind not in ("folder", "webdataset", "latents"):
            raise ValueError(f"data.real_kind must be folder, webdataset or latents, got {self.real_kind!r}")


@dataclass(frozen=True)
class SDXLExportConfig:
    """The ``export`` command (:mod:`dmd2.recipes.sdxl_export`).

    Attributes:
        weights: ``ema`` (falls back to ``generator`` when the run has no EMA) | ``generator``.
        lora_format: ``fused`` (LoRA merged into a full UNet) | ``lora`` (base UNet + ``pytorch_lora_weights``).
        dtype: dtype of the written weights (``fp32`` | ``bf16`` | ``fp16``).
    """

    weights: str = "ema"
    lora_format: str = "fused"
    dtype: str = "fp32"

    def __post_init__(self):
        if self.weights not in ("ema", "generator"):
            raise ValueError(f"export.weights must be 'ema' or 'generator', got {self.weights!r}")
        if self.lora_format not in ("fused", "lora"):
            raise ValueError(f"export.lora_format must be 'fused' or 'lora', got {self.lora_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"export.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class SDXLEvalConfig:
    """The ``eval`` command (:mod:`dmd2.eval.coco`): COCO-2014 FID, Patch FID and CLIP score, all from local files.

    Attributes:
        captions: COCO-2014 ``captions_val2014.json``.
        images: folder of the reference images (val2014).
        num: number of prompts / images (paper: 10,000).
        inception: the Inception weights (``inception-2015-12-05.pt``).
        clip_model: the open_clip architecture of the CLIP score.
        clip_weights: its weights file.
        batch: images per pipeline call.
        seed: generation seed.
        out: write the result JSON here too (empty: printed only).
    """

    captions: str = ""
    images: str = ""
    num: int = 10000
    inception: str = ""
    clip_model: str = "ViT-g-14"
    clip_weights: str = ""
    batch: int = 8
    seed: int = 0
    out: str = ""


@dataclass(frozen=True)
class SDXLConfig(RecipeConfig):
    model: SDXLModelConfig = field(default_factory=SDXLModelConfig)
    data: SDXLDataConfig = field(default_factory=SDXLDataConfig)
    export: SDXLExportConfig = field(default_factory=SDXLExportConfig)
    eval: SDXLEvalConfig = field(default_factory=SDXLEvalConfig)
    ode: SDXLODEConfig = field(default_factory=SDXLODEConfig)


def grid(steps: int) -> list[int]:
    """The student's timesteps: 1 step -> ``[399]`` (DMD2's 1-step SDXL conditioning timestep, input pure noise);
    ``N >= 2`` -> ``(N - i) * (1000 // N) - 1`` for ``i = 0..N-1`` (4 -> 999, 749, 499, 249), which is also what
    diffusers' ``LCMScheduler(original_inference_steps=N)`` runs for ``num_inference_steps=N``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return [399]
    return [(steps - i) * (1000 // steps) - 1 for i in range(steps)]


def base_path(cfg: SDXLConfig) -> Path | str:
    """The teacher's location: ``model.path``, or ``OUT/tiny-base`` for the tiny preset."""
    if cfg.model.tiny:
        return Path(cfg.train.out) / "tiny-base"
    if not cfg.model.path:
        raise ValueError("model.path is empty; expected a hub id or a local diffusers SDXL folder")
    return cfg.model.path


def _write_tiny_data(root: Path, resolution: int, n: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Tiny prompts.txt and an image folder with captions.jsonl (random smooth colour images)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    words = ["a red cube", "a blue ball", "the green tree", "a cat on a mat", "an old car", "the sea at night",
             "a small house", "two yellow birds"]
    prompts = root / "prompts.txt"
    if not prompts.is_file():
        prompts.write_text("\n".join(words) + "\n")
    images = root / "images"
    if not (images / "captions.jsonl").is_file():
        images.mkdir(exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        lines = []
        for i in range(n):
            coarse = torch.rand(3, 4, 4, generator=g)
            img = torch.nn.functional.interpolate(coarse[None], size=(resolution, resolution), mode="bilinear")[0]
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
            Image.fromarray(arr).save(images / f"{i:03d}.png")
            lines.append(json.dumps({"file": f"{i:03d}.png", "caption": words[i % len(words)]}))
        (images / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return prompts, images


def _unet_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """FSDP2 units: the down/mid/up blocks of every diffusers UNet inside ``module``."""
    from diffusers import UNet2DConditionModel

    out = []
    for u in module.modules():
        if isinstance(u, UNet2DConditionModel):
            out += [*u.down_blocks, u.mid_block, *u.up_blocks]
    return out


def build(cfg: SDXLConfig, info=None) -> Components:
    """Teacher (CFG), generator, fake score, GAN head, prompt latents and real data of one run (module docstring).

    Everything is placed on ``info.device``; in the LoRA modes the frozen UNets that the trainer does not see are
    moved here too.
    """
    from ..data.prompts import read_prompts
    from ..data.sdxl_images import open_image_source, vae_encode

    m, d, t = cfg.model, cfg.data, cfg.train
    device = info.device if info is not None else torch.device("cpu")
    if m.memory_mode != "full" and t.distributed == "fsdp2":
        raise ValueError(f"model.memory_mode={m.memory_mode} shares frozen weights between networks and runs on one GPU "
                         "or with train.distributed=ddp; use model.memory_mode=full for fsdp2")
    init = None
    if m.generator_init:  # checked before anything is loaded
        if m.memory_mode != "full":
            raise ValueError(f"model.generator_init holds a full UNet; it needs model.memory_mode=full, got {m.memory_mode}")
        init = generator_init_checkpoint(m.generator_init)
    prompts_path, real_path = d.prompts, d.real
    if m.tiny:
        from ..models.sdxl_tiny import write_tiny_sdxl

        base = Path(base_path(cfg))
        main_rank = info is None or info.is_main
        if main_rank and not (base / "model_index.json").is_file():
            write_tiny_sdxl(base, seed=t.seed)
        if main_rank:
            _write_tiny_data(Path(t.out) / "tiny-data", m.resolution)
        if info is not None and info.distributed:
            import torch.distributed as dist

            dist.barrier()  # the other ranks read what rank 0 wrote
        tp, ti = Path(t.out) / "tiny-data" / "prompts.txt", Path(t.out) / "tiny-data" / "images"
        prompts_path, real_path = prompts_path or str(tp), real_path or str(ti)
    if not prompts_path:
        raise ValueError("data.prompts is empty; expected a .txt / .jsonl / .parquet file of prompts")
    prompts = read_prompts(prompts_path, key=d.prompt_key or None)
    # under FSDP2 only rank 0 reads the UNet's weights; the others build it on the meta device and receive their
    # shards from rank 0 when the trainer wraps the networks (host memory per rank: the shards, not three UNets)
    receives = info is not None and not info.loads_weights
    parts = load_sdxl(base_path(cfg), torch.float32, m.local_files_only, meta_unet=receives)
    frozen = DTYPES[m.frozen_dtype]
    nets = build_networks(parts.unet, parts.schedule, parts.prediction_type, m.memory_mode, m.lora_rank, m.lora_alpha,
                          m.lora_targets, frozen).to(device)
    if init is not None and not receives:  # the other ranks receive the warm start from rank 0 too
        load_generator_init(nets.generator, init)
    for module, dtype in ((parts.text_encoder, frozen), (parts.text_encoder_2, frozen), (parts.vae, DTYPES[m.vae_dtype])):
        module.to(device) if next(module.parameters()).dtype == dtype else module.to(device, dtype)
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)
    res = m.resolution
    scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    if res % scale:
        raise ValueError(f"model.resolution {res} must be a multiple of the VAE's downsampling factor {scale}")
    shape = (parts.unet.config.in_channels, res // scale, res // scale)
    uncond = encoder.uncond(res, res, m.uncond)
    teacher = CFGDenoiser(nets.teacher, m.guidance_scale, uncond)
    sampler = BackwardSimulationSampler(parts.schedule, cfg.sampler.grid(grid))

    def cond_of(texts):
        return {k: v.to(device) for k, v in encoder.cond(list(texts), res, res).items()}

    def latents(batch, g, dev):
        idx = torch.randint(len(prompts), (batch,), generator=g, device=g.device).tolist()
        noise = torch.randn((batch, *shape), generator=g, device=dev)
        return noise, cond_of(prompts[i] for i in idx)

    has_gan = cfg.objective.gan_generator_weight > 0 or cfg.objective.gan_discriminator_weight > 0
    head, real_data = None, None
    if has_gan:
        if not real_path:
            raise ValueError("the GAN terms need real images: set data.real (and data.real_kind), or set "
                             "objective.gan_generator_weight=0 objective.gan_discriminator_weight=0")
        dataset = open_image_source(d.real_kind, real_path, res)

        def collate(items):
            x = torch.stack([a for a, _ in items])
            if d.real_kind != "latents":
                x = vae_encode(parts.vae, x.to(device))
            if tuple(x.shape[1:]) != shape:
                raise ValueError(f"real latents have shape {tuple(x.shape[1:])}; the run expects {shape} "
                                 f"(model.resolution={res})")
            return x.to(device), cond_of(c for _, c in items)

        world = info.world_size if info is not None else 1
        real_data = IndexedBatches(dataset, shards=world * t.grad_accum, batch=t.batch_size, seed=d.seed, collate=collate)
        mid = parts.unet.config.block_out_channels[-1]
        head = GANHead([mid], hidden=m.gan_hidden, depth=m.gan_depth)

    sample_prompts = prompts[:4]

    def sample_fn(gen, dev):
        g = torch.Generator(device=dev).manual_seed(0)
        noise = torch.randn((len(sample_prompts), *shape), generator=g, device=dev)
        x0 = sampler.sample(gen, noise, cond_of(sample_prompts), generator=g)
        vae = parts.vae
        img = vae.decode((x0 / vae.config.scaling_factor).to(next(vae.parameters()).dtype), return_dict=False)[0]
        return img.float().clamp(-1, 1)

    return Components(generator=nets.generator, fake_score=nets.fake_score, teacher=teacher, schedule=parts.schedule,
                      sampler=sampler, latents=latents, real_data=real_data, gan_head=head,
                      gan_layers=["gan_tap"] if head is not None else [], sample_fn=sample_fn,
                      sample_rows=[p if len(p) <= 40 else p[:39] + "~" for p in sample_prompts],  # one row per prompt
                      fsdp_units=_unet_blocks if m.memory_mode == "full" else None)


# ------------------------------------------------------------------------------------------------ commands
def export_command(cfg: SDXLConfig, args: list[str]) -> int:
    """``export CKPT OUT``: a diffusers StableDiffusionXLPipeline folder (see :mod:`dmd2.recipes.sdxl_export`)."""
    from .sdxl_export import export_pipeline

    if len(args) != 2:
        raise ValueError("usage: python -m dmd2.recipes.sdxl export CKPT OUT (CKPT: a checkpoint or run folder)")
    out = export_pipeline(args[0], args[1], weights=cfg.export.weights, lora_format=cfg.export.lora_format,
                          dtype=cfg.export.dtype)
    print(out)
    return 0


def sample_command(cfg: SDXLConfig, args: list[str]) -> int:
    """``sample CKPT OUT.png [PROMPT ...]``: a grid from a checkpoint's generator (EMA when present) through our
    sampler on the run's grid; prompts default to four of the run's prompt file. Seed: ``train.seed``."""
    from ..core import BackwardSimulationSampler
    from ..models.sdxl import PromptEncoder, SDXLDenoiser
    from ..train.monitor import save_png
    from .sdxl_export import load_student_unet

    if len(args) < 2:
        raise ValueError("usage: python -m dmd2.recipes.sdxl sample CKPT OUT.png [PROMPT ...]")
    unet, run_cfg, parts = load_student_unet(args[0], cfg.export.weights, fuse=True)
    prompts = args[2:]
    if not prompts:
        from ..data.prompts import read_prompts

        src = run_cfg.data.prompts or str(Path(run_cfg.train.out) / "tiny-data" / "prompts.txt")
        prompts = read_prompts(src, key=run_cfg.data.prompt_key or None)[:4]
    dev = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    for module in (unet, parts.text_encoder, parts.text_encoder_2, parts.vae):
        module.to(dev)
    res = run_cfg.model.resolution
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)
    G = SDXLDenoiser(unet, parts.schedule, parts.prediction_type, gan_layer=None)
    sampler = BackwardSimulationSampler(parts.schedule, run_cfg.sampler.grid(grid))
    scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    g = torch.Generator(device=dev).manual_seed(cfg.train.seed)
    noise = torch.randn((len(prompts), unet.config.in_channels, res // scale, res // scale), generator=g, device=dev)
    with torch.no_grad():
        x0 = sampler.sample(G, noise, encoder.cond(prompts, res, res), generator=g)
        img = parts.vae.decode(x0 / parts.vae.config.scaling_factor, return_dict=False)[0]
    print(save_png(img.float().clamp(-1, 1), args[1]))
    return 0


def memory_command(cfg: SDXLConfig, args: list[str]) -> int:
    """``memory [--json]``: the memory plan per mode from a meta-device SDXL UNet (:mod:`dmd2.recipes.sdxl_memory`)."""
    from .sdxl_memory import memory_table, memory_plan

    plan = memory_plan(batch=cfg.train.batch_size, resolution=cfg.model.resolution, lora_rank=cfg.model.lora_rank)
    print(json.dumps(plan, indent=2) if "--json" in args or "json" in args else memory_table(plan))
    return 0


def cache_latents_command(cfg: SDXLConfig, args: list[str]) -> int:
    """``cache-latents OUT_DIR``: encode ``data.real`` (folder / webdataset) with the model's VAE."""
    from ..data.sdxl_images import cache_latents, open_image_source

    if len(args) != 1:
        raise ValueError("usage: python -m dmd2.recipes.sdxl cache-latents OUT_DIR data.real=... data.real_kind=folder|webdataset")
    if cfg.data.real_kind == "latents" or not cfg.data.real:
        raise ValueError("cache-latents reads data.real with data.real_kind=folder or webdataset")
    parts = load_sdxl(base_path(cfg), DTYPES[cfg.model.vae_dtype], cfg.model.local_files_only, components=("vae",))
    dev = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    parts.vae.to(dev)
    ds = open_image_source(cfg.data.real_kind, cfg.data.real, cfg.model.resolution)
    print(cache_latents(ds, parts.vae, args[0], progress=lambda i, n: print(f"\r{i}/{n}", end="", file=sys.stderr)))
    return 0


def eval_command(cfg: SDXLConfig, args: list[str]) -> int:
    """``eval PIPELINE_DIR``: COCO-2014 FID / Patch FID / CLIP score of an exported pipeline (:mod:`dmd2.eval.coco`)."""
    from ..eval.coco import evaluate_pipeline

    if len(args) != 1:
        raise ValueError("usage: python -m dmd2.recipes.sdxl eval PIPELINE_DIR eval.captions=... eval.images=... "
                         "eval.inception=... eval.clip_weights=...")
    e = cfg.eval
    result = evaluate_pipeline(args[0], captions=e.captions, images=e.images, num=e.num, inception=e.inception,
                               clip_model=e.clip_model, clip_weights=e.clip_weights, batch=e.batch, seed=e.seed,
                               out=e.out or None)
    print(json.dumps(result, indent=2))
    return 0


_PAPER = {
    "train.lr_generator": 5e-7, "train.lr_critic": 5e-7, "train.batch_size": 2, "train.mixed_precision": "bf16",
    "train.grad_checkpointing": True, "train.grad_clip": 10.0, "train.ema_decay": None, "train.checkpoint_every": 500,
    "train.log_every": 10, "critic.ratio": 5, "sampler.steps": 4, "model.guidance_scale": 8.0,
    "model.resolution": 1024, "objective.gan_generator_weight": 5e-3, "objective.gan_discriminator_weight": 1e-2,
}

PRESETS = {
    # the paper's full fine-tune (64 GPUs in the paper): three UNets, sharded with FSDP2 under torchrun
    "paper": {**_PAPER, "model.memory_mode": "full", "train.distributed": "fsdp2"},
    # the paper's LoRA variant: generator = LoRA rank 64 at lr 5e-5, full fake score
    "paper-lora": {**_PAPER, "model.memory_mode": "lora", "train.lr_generator": 5e-5},
    # one SDXL copy: generator and fake score are LoRA adapters on the frozen teacher
    "single-gpu": {**_PAPER, "model.memory_mode": "shared-base", "train.lr_generator": 5e-5, "train.lr_critic": 5e-5},
    # CPU, no download: tiny SDXL-shaped components written to OUT/tiny-base, tiny data to OUT/tiny-data
    "tiny": {
        "model.tiny": True, "model.path": "", "model.resolution": 32, "model.frozen_dtype": "fp32",
        "model.lora_rank": 4, "model.lora_alpha": 4.0, "model.gan_hidden": 16, "model.gan_depth": 1,
        "model.guidance_scale": 8.0, "train.max_steps": 4, "train.batch_size": 2, "train.lr_generator": 1e-3,
        "train.lr_critic": 1e-3, "train.checkpoint_every": 4, "train.log_every": 2, "train.ema_decay": 0.9,
        "train.sample_every": 4,
        "train.device": "cpu", "train.grad_checkpointing": True, "critic.ratio": 2,
        "sampler.steps": 2, "objective.gan_generator_weight": 5e-3, "objective.gan_discriminator_weight": 1e-2,
    },
}

# the 1-step warm start's commands (ode-pairs, ode-pretrain): the official regression, and a CPU run of it
PRESETS["ode-paper"] = ODE_PRESETS["paper"]
PRESETS["ode-tiny"] = {**PRESETS["tiny"], **ODE_PRESETS["tiny"]}

#: defaults = the paper's hyperparameters (single process; ``--preset paper`` adds FSDP2 for torchrun)
DEFAULT_CONFIG = apply_overrides(SDXLConfig(), _PAPER)

def next_steps(cfg: SDXLConfig, ckpt: Path) -> list[str]:
    """The summary's commands: a sample grid, the diffusers export, its COCO evaluation."""
    out = Path(cfg.train.out)
    return [f"python -m dmd2.recipes.sdxl sample {ckpt} {out / 'sample.png'}",
            f"python -m dmd2.recipes.sdxl export {ckpt} {out / 'exported'}   # a diffusers pipeline + README.md",
            f"python -m dmd2.recipes.sdxl eval {out / 'exported'} eval.captions=... eval.images=... "
            "eval.inception=... eval.clip_weights=..."]


RECIPE = Recipe(name="sdxl", config=DEFAULT_CONFIG, build=build, presets=PRESETS, next_steps=next_steps,
                commands={"export": export_command, "sample": sample_command, "memory": memory_command, "cache-latents": cache_latents_command,
                          "eval": eval_command, "ode-pairs": ode_pairs_command, "ode-pretrain": ode_pretrain_command},
                flags={"--num": "ode.num"})

if __name__ == "__main__":
    from dmd2.train.distributed import exit_process

    exit_process(main(RECIPE))
