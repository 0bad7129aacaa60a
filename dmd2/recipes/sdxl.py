r"""DMD2 for SDXL (Yin et al. 2024, Sec. 5.2): a 4-step (or 1-step) text-to-image student of SDXL base 1.0.

Presets + builders on :mod:`dmd2.train` (no loop of its own)::

    python -m dmd2.recipes.sdxl --preset paper data.real=latents/ data.real_kind=latents ...   # 4-step, prompts = real captions
    python -m dmd2.recipes.sdxl --preset single-gpu ...          # shared-base: one SDXL copy, fits one 80 GB GPU
    python -m dmd2.recipes.sdxl --preset tiny --out runs/tiny     # CPU, no download (tiny SDXL-shaped components)
    python -m dmd2.recipes.sdxl export RUN_OR_CKPT OUT            # diffusers StableDiffusionXLPipeline folder
    python -m dmd2.recipes.sdxl sample RUN_OR_CKPT OUT.png ["a prompt" ...]   # a sample grid from a checkpoint
    python -m dmd2.recipes.sdxl memory                            # memory plan per mode (meta-device SDXL UNet)
    python -m dmd2.recipes.sdxl cache-latents OUT_DIR             # VAE latents of data.real, for data.real_kind=latents
    python -m dmd2.recipes.sdxl ode-pairs PAIRS --num 10000 --preset ode-paper   # the 1-step warm start
    python -m dmd2.recipes.sdxl ode-pretrain PAIRS --preset ode-paper --out WARM  # (:mod:`dmd2.recipes.sdxl_ode`)
    python -m dmd2.recipes.sdxl --preset paper-1step model.generator_init=WARM data.prompts=FILE ...

The pieces: teacher = SDXL with classifier-free guidance 8 (standard form, one batched 2B forward, unconditional =
zero text embeddings); generator and fake score initialised from the teacher (full copies or LoRA adapters, per
``model.memory_mode``, see :mod:`dmd2.models.sdxl`); the GAN head (section ``gan``; paper: the official head, four
strided 4x4 convs of 1280 from 32x32 to 1x1, then a linear) reads the fake UNet's mid-block (1280 channels at 1/32 of
the image size); real latents for it are samples of the VAE posterior (:mod:`dmd2.data.sdxl_images`), drawn per read
from a generator keyed by ``(data.seed, step, shard)``; ``--steps 4`` uses timesteps 999, 749, 499, 249 with backward
simulation, ``--steps 1`` the conditioning timestep 399 on pure noise. Every paper preset against the official run
scripts, key by key: docs/presets.md.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..core import BackwardSimulationSampler, CFGDenoiser
from ..data.prompts import PromptNoise, read_prompts
from ..data.sdxl_images import LatentCollate, PosteriorSamples, open_image_source, vae_decode
from ..models.sdxl import (DEFAULT_LORA_TARGETS, DTYPES, MEMORY_MODES, PromptEncoder, build_networks, load_sdxl,
                           unet_blocks)
from ..models.sdxl_tiny import tiny_fixtures, write_tiny_fixtures
from ..train import Components, IndexedBatches, Recipe, RecipeConfig, Student, apply_overrides, derive_seed, main
from ..train.config import gan_enabled, gan_head, gan_layers
from .sdxl_ode import (ODE_PRESETS, SDXLODEConfig, generator_init_checkpoint, load_generator_init, ode_pairs_command,
                       ode_pretrain_command)

__all__ = ["SDXLModelConfig", "SDXLDataConfig", "SDXLExportConfig", "SDXLEvalConfig", "SDXLConfig", "grid", "build",
           "base_path", "student_unet", "load_student_unet", "student", "PRESETS", "RECIPE", "DTYPES"]



@dataclass(frozen=True)
class SDXLModelConfig:
    """The networks.

    Attributes:
        path: hub id or local diffusers folder of the teacher (``tiny``: empty, then ``OUT/tiny-base``).
        local_files_only: never download (``HF_HUB_OFFLINE=1`` implies it).
        tiny: write tiny SDXL-shaped components (and tiny data) into ``OUT/tiny-base`` / ``OUT/tiny-data`` first.
        memory_mode: ``full`` | ``lora`` | ``shared-base`` (:mod:`dmd2.models.sdxl`).
        frozen_dtype: dtype of frozen UNet weights (teacher, LoRA bases); trained weights are fp32.
        text_encoder_dtype: dtype of the two CLIP text encoders (fp32: the official code runs them in fp32).
        vae_dtype: dtype of the VAE (fp32: SDXL's VAE overflows in fp16).
        lora_rank, lora_alpha, lora_targets: LoRA adapters, scale ``alpha / rank`` (paper LoRA variant: rank 64,
            alpha 8, the official ``--lora_alpha`` default: scale 0.125).
        guidance_scale: the teacher's CFG scale (paper: 8).
        uncond: ``zeros`` (zero text embeddings, the paper's choice) or ``empty`` (the encoded empty prompt).
        resolution: training resolution in pixels (time ids ``(R, R, 0, 0, R, R)``).
        generator_init: start the generator (``full`` mode) from this ``ode-pretrain`` output (its run folder or a
            checkpoint folder) instead of the teacher - the official 1-step run's warm start; empty: the teacher.
    """

    path: str = "stabilityai/stable-diffusion-xl-base-1.0"
    local_files_only: bool = False
    tiny: bool = False
    memory_mode: str = "full"
    frozen_dtype: str = "bf16"
    text_encoder_dtype: str = "fp32"
    vae_dtype: str = "fp32"
    lora_rank: int = 64
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    guidance_scale: float = 8.0
    uncond: str = "zeros"
    resolution: int = 1024
    generator_init: str = ""

    def __post_init__(self):
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"model.memory_mode must be one of {MEMORY_MODES}, got {self.memory_mode!r}")
        for k in ("frozen_dtype", "text_encoder_dtype", "vae_dtype"):
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
        prompts: a .txt (one per line), .jsonl or .parquet file of prompts; or ``real``: the captions of the real-image
            set, as the official 4-step runs' ``--denoising`` takes them.
        prompt_key: the prompt field of .jsonl / .parquet (empty: the first of :data:`dmd2.data.prompts.PROMPT_KEYS` present).
        real: a folder with captions.jsonl, a folder / .tar of webdataset shards, or a latent cache.
        real_kind: ``folder`` | ``webdataset`` | ``latents``.
        seed: orders the real data and keys its VAE-posterior samples.
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
        return tiny_fixtures(cfg.train.out).base
    if not cfg.model.path:
        raise ValueError("model.path is empty; expected a hub id or a local diffusers SDXL folder")
    return cfg.model.path


def _prompts_and_real(cfg: SDXLConfig) -> tuple[list[str], object]:
    """``(prompts, real-image source or None)`` of ``data`` (the tiny preset's fixtures written first, on every rank:
    :func:`~dmd2.models.sdxl_tiny.write_tiny_fixtures`). The real set is opened when the GAN or ``data.prompts=real``
    reads it."""
    m, d = cfg.model, cfg.data
    prompts_path, real_path = d.prompts, d.real
    if m.tiny:
        tiny = write_tiny_fixtures(cfg.train.out, m.resolution, seed=cfg.train.seed)
        prompts_path, real_path = prompts_path or str(tiny.prompts), real_path or str(tiny.images)
    dataset = None
    if gan_enabled(cfg) or d.prompts == "real":
        if not real_path:
            raise ValueError("data.real is empty; the GAN terms and data.prompts=real read the real-image set: set "
                             "data.real (and data.real_kind), or objective.gan_generator_weight=0 "
                             "objective.gan_discriminator_weight=0 with data.prompts=FILE")
        dataset = open_image_source(d.real_kind, real_path, m.resolution)
    if d.prompts == "real":
        return dataset.captions(), dataset
    if prompts_path:
        return read_prompts(prompts_path, key=d.prompt_key or None), dataset
    raise ValueError("data.prompts is empty; expected a .txt / .jsonl / .parquet file of prompts, or 'real' (the "
                     "captions of data.real)")


def _sample_grid(G, sampler, encode, prompts: list[str], shape, vae, seed: int, device) -> torch.Tensor:
    """Images ``(len(prompts), 3, H, W)`` in ``[-1, 1]``: ``G`` on ``sampler``'s grid for the conditions
    ``encode(prompts)``, its noise and re-noising from one generator seeded ``seed`` on ``device``, decoded by ``vae``."""
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((len(prompts), *shape), generator=g, device=device)
    with torch.no_grad():
        return vae_decode(vae, sampler.sample(G, noise, encode(prompts), generator=g)).clamp(-1, 1)


def build(cfg: SDXLConfig, info=None) -> Components:
    """Teacher (CFG), generator, fake score, GAN head, prompt latents and real data of one run (module docstring).

    Everything is placed on ``info.device``; in the LoRA modes the frozen UNets that the trainer does not see are
    moved here too.
    """
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
    prompts, dataset = _prompts_and_real(cfg)
    # under FSDP2 only rank 0 reads the UNet's weights; the others build it on the meta device and receive their
    # shards from rank 0 when the trainer wraps the networks (host memory per rank: the shards, not three UNets)
    receives = info is not None and not info.loads_weights
    parts = load_sdxl(base_path(cfg), torch.float32, m.local_files_only, meta_unet=receives)
    nets = build_networks(parts.unet, parts.schedule, parts.prediction_type, m.memory_mode, m.lora_rank, m.lora_alpha,
                          m.lora_targets, DTYPES[m.frozen_dtype]).to(device)
    if init is not None and not receives:  # the other ranks receive the warm start from rank 0 too
        load_generator_init(nets.generator, init)
    parts.place(device, DTYPES[m.text_encoder_dtype], DTYPES[m.vae_dtype])
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)
    res, shape = m.resolution, parts.latent_shape(m.resolution)
    cond_of = partial(encoder.cond, height=res, width=res)
    teacher = CFGDenoiser(nets.teacher, m.guidance_scale, encoder.uncond(res, res, m.uncond))
    sampler = BackwardSimulationSampler(parts.schedule, cfg.sampler.grid(grid))
    layers = gan_layers(cfg, nets.fake_score, ["gan_tap"], configurable=False)  # the mid block (SDXLNets.gan_tap)
    head = gan_head(cfg, [parts.unet.config.block_out_channels[-1]])  # the mid block's channels
    real_data = None
    if head is not None:
        collate = LatentCollate(cond_of, shape, vae=None if d.real_kind == "latents" else parts.vae)
        world = info.world_size if info is not None else 1
        moments_of = IndexedBatches(dataset, shards=world * t.grad_accum, batch=t.batch_size, seed=d.seed, collate=collate)
        real_data = PosteriorSamples(moments_of, partial(derive_seed, d.seed))
    sample_prompts = prompts[:4]

    def sample_fn(gen, dev):
        return _sample_grid(gen, sampler, cond_of, sample_prompts, shape, parts.vae, 0, dev)

    return Components(generator=nets.generator, fake_score=nets.fake_score, teacher=teacher, schedule=parts.schedule,
                      sampler=sampler, latents=PromptNoise(prompts, cond_of, shape), real_data=real_data,
                      gan_head=head, gan_layers=layers, sample_fn=sample_fn,
                      sample_rows=[p if len(p) <= 40 else p[:39] + "~" for p in sample_prompts],  # one row per prompt
                      fsdp_units=unet_blocks if m.memory_mode == "full" else None)


# ------------------------------------------------------------------------------------------------ trained students
def student_unet(cfg: SDXLConfig, state_dict: dict[str, torch.Tensor], fuse: bool = True):
    """``(unet, parts)``: the base UNet of the run ``cfg`` with the generator's plain ``state_dict`` applied.

    ``full``: the UNet's weights are replaced. LoRA modes: a ``generator`` adapter (the run's rank, alpha and targets)
    is added and loaded; ``fuse`` merges it into the base weights and removes the adapter layers.
    """
    from ..models.sdxl import AdapterSwitch, adapter_weights_from_checkpoint, add_lora

    m = cfg.model
    parts = load_sdxl(base_path(cfg), torch.float32, m.local_files_only)
    unet = parts.unet
    if m.memory_mode == "full":
        prefix = "unet_module."
        state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        missing, unexpected = unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"generator weights do not match the base UNet (missing {missing[:3]}, unexpected {unexpected[:3]})")
    else:
        names = add_lora(unet, "generator", m.lora_rank, m.lora_alpha, m.lora_targets)
        lora = adapter_weights_from_checkpoint(state_dict)
        if set(lora) != set(names):
            raise ValueError(f"LoRA weights do not match the run's adapter (differing: {sorted(set(lora) ^ set(names))[:3]})")
        params = dict(unet.named_parameters())
        with torch.no_grad():
            for n, v in lora.items():
                params[n].copy_(v)
        AdapterSwitch(unet).set("generator")
        if fuse:
            unet.fuse_lora(adapter_names=["generator"])
            unet.unload_lora()
    unet.requires_grad_(False)
    return unet, parts


def load_student_unet(path, weights: str = "ema", fuse: bool = True):
    """``(unet, cfg, parts, which)`` of a run or checkpoint folder (:func:`student_unet`; ``which``: the weights read,
    see :func:`dmd2.train.generator_state_dict`)."""
    from ..train import generator_state_dict, load_config, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    _, cfg = load_config(ckpt, RECIPE)
    sd, which = generator_state_dict(ckpt, weights)
    unet, parts = student_unet(cfg, sd, fuse=fuse)
    return unet, cfg, parts, which


def student(cfg: SDXLConfig, state_dict: dict[str, torch.Tensor]) -> Student:
    """The trained student (:attr:`Recipe.generator <dmd2.train.Recipe>`): the fused student UNet as a denoiser on
    the run's grid, ``G(noise (B, 4, R/8, R/8), cond) -> latents``; ``cond``: :meth:`PromptEncoder.cond
    <dmd2.models.sdxl.PromptEncoder.cond>` of the prompts (decode with the VAE, or export a pipeline)."""
    from ..models.sdxl import SDXLDenoiser

    unet, parts = student_unet(cfg, state_dict, fuse=True)
    G = SDXLDenoiser(unet, parts.schedule, parts.prediction_type, gan_layer=None)
    return Student(G, BackwardSimulationSampler(parts.schedule, cfg.sampler.grid(grid)), parts.latent_shape(cfg.model.resolution))


# ------------------------------------------------------------------------------------------------ commands
def export_command(cfg: SDXLConfig, args: list[str]) -> int:
    """``export RUN_OR_CKPT OUT``: a diffusers StableDiffusionXLPipeline folder (:mod:`dmd2.recipes.sdxl_export`)."""
    from .sdxl_export import export_pipeline

    if len(args) != 2:
        raise ValueError("usage: python -m dmd2.recipes.sdxl export RUN_OR_CKPT OUT (a run or checkpoint folder)")
    from ..train import resolve_checkpoint

    e = cfg.export
    ckpt = resolve_checkpoint(args[0])
    unet, run_cfg, parts, which = load_student_unet(ckpt, e.weights, fuse=e.lora_format == "fused")
    out = export_pipeline(unet, parts, run_cfg, run_cfg.sampler.grid(grid), ckpt, args[1], weights=which,
                          lora_format=e.lora_format, dtype=e.dtype,
                          base_model=str(run_cfg.model.path or base_path(run_cfg)))
    print(out)
    return 0


def sample_command(cfg: SDXLConfig, args: list[str]) -> int:
    """``sample RUN_OR_CKPT OUT.png [PROMPT ...]``: a grid from a checkpoint's generator (EMA when present) through
    our sampler on the run's grid; prompts default to four of the run's prompt file. Seed: ``train.seed``."""
    from ..models.sdxl import SDXLDenoiser
    from ..train.monitor import save_png

    if len(args) < 2:
        raise ValueError("usage: python -m dmd2.recipes.sdxl sample RUN_OR_CKPT OUT.png [PROMPT ...]")
    unet, run_cfg, parts, _ = load_student_unet(args[0], cfg.export.weights, fuse=True)
    prompts = args[2:]
    if not prompts:
        src = run_cfg.data.prompts or str(tiny_fixtures(run_cfg.train.out).prompts)
        prompts = read_prompts(src, key=run_cfg.data.prompt_key or None)[:4]
    dev = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    unet.to(dev)
    parts.place(dev)
    res = run_cfg.model.resolution
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)
    G = SDXLDenoiser(unet, parts.schedule, parts.prediction_type, gan_layer=None)
    sampler = BackwardSimulationSampler(parts.schedule, run_cfg.sampler.grid(grid))
    img = _sample_grid(G, sampler, partial(encoder.cond, height=res, width=res), prompts, parts.latent_shape(res),
                       parts.vae, cfg.train.seed, dev)
    print(save_png(img, args[1]))
    return 0


def memory_command(cfg: SDXLConfig, args: list[str]) -> int:
    """``memory [--json]``: the memory plan per mode from a meta-device SDXL UNet (:mod:`dmd2.recipes.sdxl_memory`)."""
    from .sdxl_memory import memory_table, memory_plan

    plan = memory_plan(cfg.gan, batch=cfg.train.batch_size, resolution=cfg.model.resolution,
                       lora_rank=cfg.model.lora_rank, text_encoder_bytes=DTYPES[cfg.model.text_encoder_dtype].itemsize)
    extra = [a for a in args if a not in ("--json", "json")]
    if extra:
        raise ValueError(f"memory takes --json and config overrides only, got {extra}")
    print(json.dumps(plan, indent=2) if args else memory_table(plan))
    return 0


def cache_latents_command(cfg: SDXLConfig, args: list[str]) -> int:
    """``cache-latents OUT_DIR``: encode ``data.real`` (folder / webdataset) with the model's VAE."""
    from ..data.sdxl_images import cache_latents

    if len(args) != 1:
        raise ValueError("usage: python -m dmd2.recipes.sdxl cache-latents OUT_DIR data.real=... data.real_kind=folder|webdataset")
    if cfg.data.real_kind == "latents" or not cfg.data.real:
        raise ValueError("cache-latents reads data.real with data.real_kind=folder or webdataset")
    parts = load_sdxl(base_path(cfg), DTYPES[cfg.model.vae_dtype], cfg.model.local_files_only, components=("vae",))
    dev = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    parts.place(dev)
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


#: the official 4-step run (experiments/sdxl/sdxl_cond999_8node_lr5e-7_denoising4step_..._backsim_scratch.sh on 64
#: GPUs), key by key in docs/presets.md; warm-up: the official 500 scheduler steps advance 64 per iteration -> 8
_PAPER = {
    "train.max_steps": 19_000, "train.lr_generator": 5e-7, "train.lr_critic": 5e-7, "train.batch_size": 2,
    "train.warmup_steps": 8, "train.seed": 10, "train.mixed_precision": "bf16", "train.grad_checkpointing": True,
    "train.grad_clip": 10.0, "train.ema_decay": None, "train.checkpoint_every": 1000, "train.log_every": 10,
    "critic.ratio": 5, "sampler.steps": 4, "model.guidance_scale": 8.0, "model.resolution": 1024,
    "model.lora_rank": 64, "model.lora_alpha": 8.0,
    "objective.gan_generator_weight": 5e-3, "objective.gan_discriminator_weight": 1e-2,
    "objective.min_frac": 0.02, "objective.max_frac": 0.98, "objective.gan_min_frac": 0.0, "objective.gan_max_frac": 1.0,
    "gan.hidden": 1280, "gan.depth": 3, "gan.final_conv": True, "data.prompts": "real",
}

PRESETS = {
    # the paper's full fine-tune (64 GPUs): three UNets, sharded with FSDP2 under torchrun; released checkpoint 19k
    "paper": {**_PAPER, "model.memory_mode": "full", "train.distributed": "fsdp2"},
    # the paper's LoRA variant (the same script + --generator_lora): generator = LoRA rank 64 / alpha 8, full fake
    # score, both at lr 5e-5; released checkpoint 16k; DDP (LoRA shares the frozen base, which FSDP2 would break)
    "paper-lora": {**_PAPER, "model.memory_mode": "lora", "train.distributed": "ddp", "train.lr_generator": 5e-5,
                   "train.lr_critic": 5e-5, "train.max_steps": 16_000},
    # the paper's 1-step run (sdxl_cond399_..._1step_...sh): timestep 399 on pure noise, prompts from a prompt file
    # (data.prompts=FILE, the official --train_prompt_path), released checkpoint 24k; the official run starts from
    # a regression warm start (docs/sdxl.md)
    "paper-1step": {**_PAPER, "model.memory_mode": "full", "train.distributed": "fsdp2", "sampler.steps": 1,
                    "train.max_steps": 24_000, "data.prompts": ""},
    # one SDXL copy: generator and fake score are LoRA adapters on the frozen teacher
    "single-gpu": {**_PAPER, "model.memory_mode": "shared-base", "train.lr_generator": 5e-5, "train.lr_critic": 5e-5},
    # CPU, no download: tiny SDXL-shaped components written to OUT/tiny-base, tiny data to OUT/tiny-data
    "tiny": {
        "model.tiny": True, "model.path": "", "model.resolution": 32, "model.frozen_dtype": "fp32",
        "model.lora_rank": 4, "model.lora_alpha": 4.0, "gan.hidden": 16, "gan.depth": 1, "gan.final_conv": False,
        "model.guidance_scale": 8.0, "train.max_steps": 4, "train.batch_size": 2, "train.lr_generator": 1e-3,
        "train.lr_critic": 1e-3, "train.checkpoint_every": 4, "train.log_every": 2, "train.ema_decay": 0.9,
        "train.sample_every": 4, "train.warmup_steps": 0, "train.seed": 0, "data.prompts": "",
        "train.device": "cpu", "train.grad_checkpointing": True, "critic.ratio": 2,
        "sampler.steps": 2, "objective.gan_generator_weight": 5e-3, "objective.gan_discriminator_weight": 1e-2,
    },
}

# the 1-step warm start's commands (ode-pairs, ode-pretrain): the official regression, and a CPU run of it
PRESETS["ode-paper"] = {**ODE_PRESETS["paper"], "data.prompts": ""}  # a prompt file (not the 4-step runs' real captions)
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
                flags={"--num": "ode.num"}, command_flags={"memory": ("--json",)}, generator=student)

if __name__ == "__main__":
    from dmd2.train.distributed import exit_process

    exit_process(main(RECIPE))
