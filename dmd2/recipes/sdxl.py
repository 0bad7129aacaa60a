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
from pathlib import Path

import torch

from ..core import BackwardSimulationSampler, CFGDenoiser
from ..models.sdxl import DEFAULT_LORA_TARGETS, DTYPES, MEMORY_MODES, PromptEncoder, build_networks, load_sdxl
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
    from ..data.sdxl_images import open_image_source, sample_posterior, vae_moments

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
    has_gan = gan_enabled(cfg)
    dataset = None
    if has_gan or d.prompts == "real":
        if not real_path:
            raise ValueError("data.real is empty; the GAN terms and data.prompts=real read the real-image set: set "
                             "data.real (and data.real_kind), or objective.gan_generator_weight=0 "
                             "objective.gan_discriminator_weight=0 with data.prompts=FILE")
        dataset = open_image_source(d.real_kind, real_path, m.resolution)
    if d.prompts == "real":
        prompts = dataset.captions()
    elif prompts_path:
        prompts = read_prompts(prompts_path, key=d.prompt_key or None)
    else:
        raise ValueError("data.prompts is empty; expected a .txt / .jsonl / .parquet file of prompts, or 'real' (the "
                         "captions of data.real)")
    # under FSDP2 only rank 0 reads the UNet's weights; the others build it on the meta device and receive their
    # shards from rank 0 when the trainer wraps the networks (host memory per rank: the shards, not three UNets)
    receives = info is not None and not info.loads_weights
    parts = load_sdxl(base_path(cfg), torch.float32, m.local_files_only, meta_unet=receives)
    frozen = DTYPES[m.frozen_dtype]
    nets = build_networks(parts.unet, parts.schedule, parts.prediction_type, m.memory_mode, m.lora_rank, m.lora_alpha,
                          m.lora_targets, frozen).to(device)
    if init is not None and not receives:  # the other ranks receive the warm start from rank 0 too
        load_generator_init(nets.generator, init)
    text = DTYPES[m.text_encoder_dtype]
    for module, dtype in ((parts.text_encoder, text), (parts.text_encoder_2, text), (parts.vae, DTYPES[m.vae_dtype])):
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

    layers = gan_layers(cfg, nets.fake_score, ["gan_tap"], configurable=False)  # the mid block (SDXLNets.gan_tap)
    head = gan_head(cfg, [parts.unet.config.block_out_channels[-1]])  # the mid block's channels
    real_data = None
    if head is not None:
        def collate(items):  # -> posterior moments (B, 2, C, h, w), conditions of the captions
            x = torch.stack([a for a, _ in items]).to(device)
            moments = x if d.real_kind == "latents" else vae_moments(parts.vae, x)
            if tuple(moments.shape[2:]) != shape:
                raise ValueError(f"real latents have shape {tuple(moments.shape[2:])}; the run expects {shape} "
                                 f"(model.resolution={res})")
            return moments, cond_of(c for _, c in items)

        world = info.world_size if info is not None else 1
        moments_of = IndexedBatches(dataset, shards=world * t.grad_accum, batch=t.batch_size, seed=d.seed, collate=collate)

        def real_data(step, shard, batch, dev):
            """A fresh VAE-posterior sample of the batch's latents, keyed by (data.seed, step, shard)."""
            moments, cond = moments_of(step, shard, batch, dev)
            g = torch.Generator(device=moments.device).manual_seed(derive_seed(d.seed, step, shard))
            return sample_posterior(moments, g), cond

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
                      gan_layers=layers, sample_fn=sample_fn,
                      sample_rows=[p if len(p) <= 40 else p[:39] + "~" for p in sample_prompts],  # one row per prompt
                      fsdp_units=_unet_blocks if m.memory_mode == "full" else None)


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


def _latent_shape(cfg: SDXLConfig, parts) -> tuple[int, int, int]:
    res, scale = cfg.model.resolution, 2 ** (len(parts.vae.config.block_out_channels) - 1)
    return (parts.unet.config.in_channels, res // scale, res // scale)


def student(cfg: SDXLConfig, state_dict: dict[str, torch.Tensor]) -> Student:
    """The trained student (:attr:`Recipe.generator <dmd2.train.Recipe>`): the fused student UNet as a denoiser on
    the run's grid, ``G(noise (B, 4, R/8, R/8), cond) -> latents``; ``cond``: :meth:`PromptEncoder.cond
    <dmd2.models.sdxl.PromptEncoder.cond>` of the prompts (decode with the VAE, or export a pipeline)."""
    from ..models.sdxl import SDXLDenoiser

    unet, parts = student_unet(cfg, state_dict, fuse=True)
    G = SDXLDenoiser(unet, parts.schedule, parts.prediction_type, gan_layer=None)
    return Student(G, BackwardSimulationSampler(parts.schedule, cfg.sampler.grid(grid)), _latent_shape(cfg, parts))


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
    g = torch.Generator(device=dev).manual_seed(cfg.train.seed)
    noise = torch.randn((len(prompts), *_latent_shape(run_cfg, parts)), generator=g, device=dev)
    with torch.no_grad():
        x0 = sampler.sample(G, noise, encoder.cond(prompts, res, res), generator=g)
        img = parts.vae.decode(x0 / parts.vae.config.scaling_factor, return_dict=False)[0]
    print(save_png(img.float().clamp(-1, 1), args[1]))
    return 0


def memory_command(cfg: SDXLConfig, args: list[str]) -> int:
    """``memory [--json]``: the memory plan per mode from a meta-device SDXL UNet (:mod:`dmd2.recipes.sdxl_memory`)."""
    from .sdxl_memory import memory_table, memory_plan

    plan = memory_plan(cfg.gan, batch=cfg.train.batch_size, resolution=cfg.model.resolution,
                       lora_rank=cfg.model.lora_rank, text_encoder_bytes=DTYPES[cfg.model.text_encoder_dtype].itemsize)
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
                flags={"--num": "ode.num"}, generator=student)

if __name__ == "__main__":
    from dmd2.train.distributed import exit_process

    exit_process(main(RECIPE))
